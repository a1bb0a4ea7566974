"""Generate the sync client from the asyncio one: credici_redis/_async_client.py -> _sync_client.py.

    python tools/async_to_sync.py          write _sync_client.py
    python tools/async_to_sync.py --check  exit 1 if _sync_client.py is not what it would write

Plain token rewriting (as psycopg's tools/async_to_sync.py does with an AST): `async def` and
`await` go, async names become their sync twins, and lines marked `# async only` are dropped.
The result is formatted with ruff, so it reads like code written by hand.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "credici_redis" / "_async_client.py"
TARGET = ROOT / "credici_redis" / "_sync_client.py"

RENAMES = {
    "AsyncCrediciClient": "CrediciClient",
    "AsyncStorage": "Storage",
    "AsyncArchiveReader": "ArchiveReader",
    "open_async_storage": "open_storage",
    "AsyncIterator": "Iterator",
    "aclose": "close",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
}
HEADER = '''"""The sync client. GENERATED from _async_client.py by tools/async_to_sync.py.

Do not edit: edit _async_client.py, then run `python tools/async_to_sync.py`.
"""
'''


def convert(source: str) -> str:
    lines = [line for line in source.splitlines() if not line.rstrip().endswith("# async only")]
    text = "\n".join(lines) + "\n"
    text = text[text.index('"""', 3) + 3 :].lstrip("\n")  # the module docstring is replaced
    text = re.sub(r"\basync def\b", "def", text)
    text = re.sub(r"\bawait ", "", text)
    text = re.sub(r"\basync with\b", "with", text)
    for old, new in RENAMES.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text)
    return HEADER + "\n" + text


def formatted(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(TARGET), "-"],
        input=code,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    fixed = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--fix", "--quiet", "--stdin-filename",
         str(TARGET), "-"],
        input=done.stdout,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    return fixed.stdout or done.stdout


def main(argv: list[str]) -> int:
    code = formatted(convert(SOURCE.read_text(encoding="utf-8")))
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != code:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run tools/async_to_sync.py")
            return 1
        return 0
    TARGET.write_text(code, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
