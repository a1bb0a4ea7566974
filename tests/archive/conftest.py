"""Fixtures of the archive tests: the real PostgreSQL, and the namespace's rows removed after."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest

from credici_redis.archive import schema_sql

POSTGRES_URL = os.environ.get(
    "CREDICI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    # Never skipped: `./run test` starts PostgreSQL when it is down, and CI requires it.
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('credici_history'))")
        conn.execute(schema_sql())
    return POSTGRES_URL


@pytest.fixture
def pg(postgres_url: str, namespace: str) -> Iterator[psycopg.Connection]:
    conn = psycopg.connect(postgres_url, autocommit=True)
    yield conn
    conn.execute("DELETE FROM credici_history WHERE namespace = %s", (namespace,))
    conn.close()
