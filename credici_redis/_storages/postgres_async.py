"""The asyncio PostgreSQL storage. `_storages/postgres_sync.py` is generated from this file by
tools/async_to_sync.py: edit here, then run the tool (a test fails while the two differ).

Import the storages from `credici_redis.postgres`; how they work is told there.
"""

from __future__ import annotations

import asyncio
import contextlib  # async only
import itertools

# sync only: import threading
# sync only: import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from functools import partial
from typing import Any

from credici_redis._core.protocol import Call, Flow
from credici_redis._core.requests import EventReading
from credici_redis._storages.postgres_base import (
    DEFAULT_POOL_SIZE,
    TRANSFERS_NEED_REDIS,
    PostgresLedger,
    Rows,
    SqlBatch,
    SqlFlow,
    T,
    _AsyncPool,
    _AsyncSession,
    _connect_options,
    _failure,
    _need_psycopg,
    _private_redis,
    _setup,
    create_schema,
)
from credici_redis._storages.redis_async import AsyncRedisStorage, poll_events
from credici_redis._storages.redis_base import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_NAMESPACE,
    _RedisStorageBase,
)
from credici_redis.errors import NotSupportedError, StorageError, StorageUnavailableError
from credici_redis.models import BalanceEvent, TransferRecovery

try:
    import psycopg
except ImportError:  # pragma: no cover - without the "postgres" extra
    psycopg = None  # type: ignore[assignment]


async def _execute_async(conn: psycopg.AsyncConnection[Any], batch: SqlBatch) -> list[Rows]:
    try:
        async with conn.pipeline():
            cursors = [await conn.execute(s.query, s.params or None) for s in batch.statements]
        return [await cur.fetchall() if cur.description is not None else [] for cur in cursors]
    except psycopg.Error as exc:
        raise _failure(exc, batch, conn.broken or conn.closed) from exc


async def run_sql_async(conn: psycopg.AsyncConnection[Any], flow: SqlFlow[T]) -> T:
    """Step a SQL flow on a connection; on any failure an open transaction is rolled back."""
    try:
        batch = next(flow)
        while True:
            batch = flow.send(await _execute_async(conn, batch))
    except StopIteration as done:
        result: T = done.value
        return result
    except BaseException:
        if not (conn.closed or conn.broken) and (
            conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        ):
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error:
                await conn.close()
        raise


class AsyncPostgresStorage(AsyncRedisStorage):
    """The ledger on PostgreSQL alone: the `AsyncStorage` protocol (the sync one: thread-safe).

    Every Redis call of this `AsyncRedisStorage` is answered by PostgreSQL (see the docstring of
    `credici_redis.postgres`), so each operation, its retries and its errors are the Redis
    storage's own. ``batching`` (asyncio only) is accepted for symmetry with the Redis
    storage and has no effect: every operation is its own transaction.
    """

    def __init__(
        self,
        conninfo: str,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        timeout: float = 5.0,
        max_connections: int = DEFAULT_POOL_SIZE,
        batching: bool = False,  # async only
        usage_tz: str = "UTC",
        **connect_options: Any,
    ) -> None:
        _need_psycopg()
        _RedisStorageBase.__init__(
            self,
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            retry_backoff=retry_backoff,
            owns_connection=True,
            usage_tz=usage_tz,
        )
        self.postgres = PostgresLedger(namespace, self.ledger.idempotency_ttl_ms)
        self.ledger.functions = False  # each call runs as a script on a connection's own Redis
        self._conninfo = conninfo
        self._timeout = timeout
        self._idempotency_ttl = idempotency_ttl
        self._options = _connect_options(timeout, connect_options)
        self._schema_ready = False
        self._schema_lock = contextlib.nullcontext()  # async only
        # sync only: self._schema_lock = threading.Lock()
        self._pool = _AsyncPool(self._new_session, max_connections, timeout)

    @classmethod
    def from_url(
        cls,
        url: str,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        timeout: float = 5.0,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        **options: Any,
    ) -> AsyncPostgresStorage:
        """``postgresql://user@host:port/db``; other keyword arguments go to psycopg.connect."""
        return cls(
            url,
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            timeout=timeout,
            **options,
        )

    async def _new_session(self) -> _AsyncSession:
        try:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._options)
        except psycopg.Error as exc:
            raise StorageUnavailableError(f"PostgreSQL is unavailable: {exc}") from exc
        try:
            await run_sql_async(conn, _setup(self._timeout))
            with self._schema_lock:
                if not self._schema_ready:
                    await run_sql_async(conn, create_schema())
                    self._schema_ready = True
        except BaseException:
            await conn.close()
            raise
        return _AsyncSession(conn, _private_redis(self.namespace, self._idempotency_ttl))

    async def sql(self, flow: SqlFlow[T]) -> T:
        """Run a SQL flow on a pooled connection."""
        async with self._pool.session() as session:
            return await run_sql_async(session.conn, flow)

    async def run(self, flow: Flow[T], node: Any = None) -> T:
        """Drive a Ledger flow; each call is answered in its own transaction, and a call's
        failure comes back in its place (the flow decides, as with Redis)."""
        try:
            calls = next(flow)
            while True:
                calls = flow.send([await self._answer(call) for call in calls])
        except StopIteration as done:
            result: T = done.value
            return result

    async def _answer(self, call: Call) -> Any:
        try:
            async with self._pool.session() as session:
                return await run_sql_async(session.conn, self.postgres.answer(session.lua, call))
        except StorageError as exc:
            return exc

    async def retrying_sql(self, make_flow: Callable[[], SqlFlow[T]]) -> T:
        for attempt in itertools.count():
            try:
                return await self.sql(make_flow())
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                self.ledger.observer.retry()
                await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    async def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        raise NotSupportedError(TRANSFERS_NEED_REDIS)

    async def scan_users(self, batch: int) -> AsyncIterator[list[str]]:
        """Every user of the namespace, in batches, in id order."""
        after = ""
        while True:
            users = await self.retrying_sql(partial(self.postgres.scan_users, after, batch))
            if users:
                yield users
            if len(users) < batch:
                return
            after = users[-1]

    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]:
        """As `AsyncRedisStorage.events`: each event goes to one consumer of the group,
        acknowledged once the caller comes back for the next one; unacknowledged ones are taken
        over after `claim_after` seconds."""
        return poll_events(
            lambda claim: self.retrying_sql(
                partial(self.postgres.read_events, group, consumer, reading.batch, claim)
            ),
            lambda done: self.sql(self.postgres.ack_events(done, group)),
            reading,
            self.ledger.observer,
        )

    async def recent_events(self, count: int) -> list[BalanceEvent]:
        return await self.retrying_sql(partial(self.postgres.recent_events, count))

    async def aclose(self) -> None:
        await self._pool.close()
