"""The sync PostgreSQL storage.

GENERATED from credici_redis/_storages/postgres_async.py by tools/async_to_sync.py.
Do not edit: edit postgres_async.py, then run `python tools/async_to_sync.py`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
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
    _connect_options,
    _failure,
    _need_psycopg,
    _Pool,
    _private_redis,
    _Session,
    _setup,
    create_schema,
)
from credici_redis._storages.redis_base import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_NAMESPACE,
    _RedisStorageBase,
)
from credici_redis._storages.redis_sync import RedisStorage, poll_events
from credici_redis.errors import NotSupportedError, StorageError, StorageUnavailableError
from credici_redis.models import BalanceEvent, TransferRecovery

try:
    import psycopg
except ImportError:  # pragma: no cover - without the "postgres" extra
    psycopg = None  # type: ignore[assignment]


def _execute(conn: psycopg.Connection[Any], batch: SqlBatch) -> list[Rows]:
    try:
        with conn.pipeline():
            cursors = [conn.execute(s.query, s.params or None) for s in batch.statements]
        return [cur.fetchall() if cur.description is not None else [] for cur in cursors]
    except psycopg.Error as exc:
        raise _failure(exc, batch, conn.broken or conn.closed) from exc


def run_sql(conn: psycopg.Connection[Any], flow: SqlFlow[T]) -> T:
    """Step a SQL flow on a connection; on any failure an open transaction is rolled back."""
    try:
        batch = next(flow)
        while True:
            batch = flow.send(_execute(conn, batch))
    except StopIteration as done:
        result: T = done.value
        return result
    except BaseException:
        if not (conn.closed or conn.broken) and (
            conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        ):
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                conn.close()
        raise


class PostgresStorage(RedisStorage):
    """The ledger on PostgreSQL alone: the `Storage` protocol (the sync one: thread-safe).

    Every Redis call of this `RedisStorage` is answered by PostgreSQL (see the docstring of
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
        self._schema_lock = threading.Lock()
        self._pool = _Pool(self._new_session, max_connections, timeout)

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
    ) -> PostgresStorage:
        """``postgresql://user@host:port/db``; other keyword arguments go to psycopg.connect."""
        return cls(
            url,
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            timeout=timeout,
            **options,
        )

    def _new_session(self) -> _Session:
        try:
            conn = psycopg.Connection.connect(self._conninfo, **self._options)
        except psycopg.Error as exc:
            raise StorageUnavailableError(f"PostgreSQL is unavailable: {exc}") from exc
        try:
            run_sql(conn, _setup(self._timeout))
            with self._schema_lock:
                if not self._schema_ready:
                    run_sql(conn, create_schema())
                    self._schema_ready = True
        except BaseException:
            conn.close()
            raise
        return _Session(conn, _private_redis(self.namespace, self._idempotency_ttl))

    def sql(self, flow: SqlFlow[T]) -> T:
        """Run a SQL flow on a pooled connection."""
        with self._pool.session() as session:
            return run_sql(session.conn, flow)

    def run(self, flow: Flow[T], node: Any = None) -> T:
        """Drive a Ledger flow; each call is answered in its own transaction, and a call's
        failure comes back in its place (the flow decides, as with Redis)."""
        try:
            calls = next(flow)
            while True:
                calls = flow.send([self._answer(call) for call in calls])
        except StopIteration as done:
            result: T = done.value
            return result

    def _answer(self, call: Call) -> Any:
        try:
            with self._pool.session() as session:
                return run_sql(session.conn, self.postgres.answer(session.lua, call))
        except StorageError as exc:
            return exc

    def retrying_sql(self, make_flow: Callable[[], SqlFlow[T]]) -> T:
        for attempt in itertools.count():
            try:
                return self.sql(make_flow())
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                self.ledger.observer.retry()
                time.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        raise NotSupportedError(TRANSFERS_NEED_REDIS)

    def scan_users(self, batch: int) -> Iterator[list[str]]:
        """Every user of the namespace, in batches, in id order."""
        after = ""
        while True:
            users = self.retrying_sql(partial(self.postgres.scan_users, after, batch))
            if users:
                yield users
            if len(users) < batch:
                return
            after = users[-1]

    def events(self, group: str, consumer: str, reading: EventReading) -> Iterator[BalanceEvent]:
        """As `RedisStorage.events`: each event goes to one consumer of the group,
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

    def recent_events(self, count: int) -> list[BalanceEvent]:
        return self.retrying_sql(partial(self.postgres.recent_events, count))

    def close(self) -> None:
        self._pool.close()
