"""PostgresStorage's own promises, on the real PostgreSQL: its clock, its tables, its row lock,
its errors. The ledger's behaviour itself is the contract suite's (tests/contract)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg
import pytest

import credici_redis._storages.postgres_sync as sync_pg  # where run_sql finds _execute
import credici_redis.postgres as pg
from credici_redis import (
    AsyncCrediciClient,
    CrediciClient,
    OutcomeUnknownError,
    StorageUnavailableError,
)
from tests.conftest import POSTGRES_URL, delete_postgres_namespace


@pytest.fixture
def client(namespace: str) -> Iterator[CrediciClient]:
    with CrediciClient.from_url(POSTGRES_URL, namespace=namespace) as made:
        yield made
    delete_postgres_namespace(namespace)


def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description is not None else []


def test_the_time_is_postgresql_s(client: CrediciClient, user: str) -> None:
    ((before,),) = query("SELECT clock_timestamp()")
    tx = client.add(user, 10)
    ((after,),) = query("SELECT clock_timestamp()")
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= tx.created_at <= after


def test_rows_are_the_history_and_the_state(
    client: CrediciClient, namespace: str, user: str
) -> None:
    client.add(user, 10, metadata={"plan": "pro"})
    client.subtract(user, 3, idempotency_key="k1")
    history = client.get_all_user_transactions(user)
    rows = query(
        "SELECT transaction_id, kind, amount, balance_after, idempotency_key, metadata"
        " FROM credici_history WHERE namespace = %s AND user_id = %s"
        " ORDER BY created_at DESC, entry_seq DESC",
        namespace,
        user,
    )
    assert rows == [
        (t.transaction_id, t.kind, t.amount, t.balance_after, t.idempotency_key, t.metadata)
        for t in history
    ]
    ((state,),) = query(
        "SELECT state FROM credici_user_state WHERE namespace = %s AND user_id = %s",
        namespace,
        user,
    )
    assert state["s"]["hash"]["bal"] == "7"
    ((key,),) = query(
        "SELECT record_key FROM credici_idempotency WHERE namespace = %s AND user_id = %s",
        namespace,
        user,
    )
    assert key == "i:k1"


def test_get_balance_reads_the_state_not_the_history(
    client: CrediciClient, namespace: str, user: str
) -> None:
    client.add(user, 10)
    client.subtract(user, 4)
    query("DELETE FROM credici_history WHERE namespace = %s AND user_id = %s", namespace, user)
    assert client.get_balance(user) == 6
    assert client.get_all_user_transactions(user) == []


def test_a_user_only_read_is_not_listed(client: CrediciClient, user: str) -> None:
    assert client.get_balance(user) == 0
    assert list(client.scan_users(10)) == []
    client.add(user, 1)
    assert list(client.scan_users(10)) == [[user]]


def test_nul_in_ids_keys_and_metadata(client: CrediciClient, namespace: str) -> None:
    user = "a\x00b"
    tx = client.add(user, 5, idempotency_key="k\x00", metadata={"m\x00": "v\x00"})
    again = client.add(user, 5, idempotency_key="k\x00", metadata={"m\x00": "v\x00"})
    assert again.transaction_id == tx.transaction_id
    assert client.get_all_user_transactions(user) == [tx]
    assert tx.metadata == {"m\x00": "v\x00"}
    client.add("\x01%00", 1)  # looks like an escaped id: still another user
    assert sorted(u for batch in client.scan_users(10) for u in batch) == sorted([user, "\x01%00"])
    assert client.get_balance(user) == 5


def test_a_dead_consumer_s_events_are_taken_over(client: CrediciClient, user: str) -> None:
    client.add(user, 10)
    client.set_low_balance_threshold(user, 5)
    client.subtract(user, 6)
    storage = client.storage
    assert isinstance(storage, pg.PostgresStorage)
    read = storage.sql(storage.postgres.read_events("credici", "dying", 10, None))
    assert [e.user_id for e in read] == [user]  # read, never acknowledged: the reader died
    options = {"idle_timeout": 0.1, "poll": 0.02}
    assert list(client.events(consumer="other", claim_after=10.0, **options)) == []
    time.sleep(0.3)
    taken = list(client.events(consumer="other", claim_after=0.2, **options))
    assert [e.event_id for e in taken] == [read[0].event_id]
    time.sleep(0.3)
    assert list(client.events(consumer="other", claim_after=0.2, **options)) == []  # acked


def test_unreachable_postgresql_is_storage_unavailable(user: str) -> None:
    with (
        CrediciClient.from_url("postgresql://postgres@127.0.0.1:1/test", timeout=1) as client,
        pytest.raises(StorageUnavailableError) as info,
    ):
        client.add(user, 1)
    assert not isinstance(info.value, OutcomeUnknownError)  # nothing was sent
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


async def test_unreachable_postgresql_is_storage_unavailable_async(user: str) -> None:
    client = AsyncCrediciClient.from_url("postgresql://postgres@127.0.0.1:1/test", timeout=1)
    with pytest.raises(StorageUnavailableError):
        await client.get_balance(user)
    await client.aclose()


def test_a_connection_lost_at_commit_is_an_unknown_outcome(
    client: CrediciClient, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's session is terminated (pg_terminate_backend) just before COMMIT is sent."""
    real = sync_pg._execute
    killed: list[int] = []

    def execute(conn: psycopg.Connection[Any], batch: pg.SqlBatch) -> list[pg.Rows]:
        if batch.commits and batch.effect and not killed:
            killed.append(conn.info.backend_pid)
            query("SELECT pg_terminate_backend(%s)", conn.info.backend_pid)
        return real(conn, batch)

    client.add(user, 10)
    monkeypatch.setattr(sync_pg, "_execute", execute)
    with pytest.raises(OutcomeUnknownError):
        client.subtract(user, 4, idempotency_key="order-1")
    assert killed
    tx = client.subtract(user, 4, idempotency_key="order-1")  # the retry, on a new connection
    assert client.get_balance(user) == 6 == tx.balance_after


def test_a_read_that_loses_its_connection_is_only_unavailable(
    client: CrediciClient, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sync_pg._execute

    def execute(conn: psycopg.Connection[Any], batch: pg.SqlBatch) -> list[pg.Rows]:
        if batch.commits:
            query("SELECT pg_terminate_backend(%s)", conn.info.backend_pid)
        return real(conn, batch)

    client.add(user, 10)
    monkeypatch.setattr(sync_pg, "_execute", execute)
    with pytest.raises(StorageUnavailableError) as info:
        client.get_balance(user)
    assert not isinstance(info.value, OutcomeUnknownError)


def test_the_schema_is_idempotent_and_shipped() -> None:
    statements = pg.schema_statements()
    assert all("IF NOT EXISTS" in s for s in statements)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]
    assert {t for (t,) in query("SELECT tablename FROM pg_tables")} >= set(pg.TABLES)


@pytest.mark.slow
def test_the_contract_suite_runs_on_a_storage_factory() -> None:
    """CREDICI_TEST_STORAGE=module:callable adds a "custom" backend to the contract suite."""
    env = {**os.environ, "CREDICI_TEST_STORAGE": "tests.postgres.example_backend:make_storage"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/contract/test_batches.py", "-k", "custom", "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    assert datetime.now(timezone.utc)  # ran to the end
