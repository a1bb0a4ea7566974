"""``python -m credici_redis``: the same command line as ``credici-redis``."""

import sys

from credici_redis.cli import main

if __name__ == "__main__":
    sys.exit(main())
