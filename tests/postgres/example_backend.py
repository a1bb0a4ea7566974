"""An example of CREDICI_TEST_STORAGE: a storage factory the contract suite can run against.

    CREDICI_TEST_STORAGE=tests.postgres.example_backend:make_storage pytest tests/contract -k custom

A third-party backend writes the same callable for its own storage; this one builds
PostgresStorage, so the suite checks the factory path itself (tests/postgres/test_custom.py).
"""

from __future__ import annotations

from typing import Any

from credici_redis import AsyncPostgresStorage, PostgresStorage
from tests.conftest import POSTGRES_URL, delete_postgres_namespace


def make_storage(
    namespace: str, *, asynchronous: bool, **options: Any
) -> PostgresStorage | AsyncPostgresStorage:
    """A storage of `namespace`; `options` are what a test asks for (retries, idempotency_ttl,
    timeout, batching)."""
    if asynchronous:
        return AsyncPostgresStorage.from_url(POSTGRES_URL, namespace, **options)
    options.pop("batching", None)
    return PostgresStorage.from_url(POSTGRES_URL, namespace, **options)


make_storage.delete_namespace = delete_postgres_namespace  # type: ignore[attr-defined]
