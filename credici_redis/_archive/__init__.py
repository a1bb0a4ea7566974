"""Moving history out of Redis into PostgreSQL, and reading it back (`credici_redis.archive`)."""
