"""The sync archiver and archive reader.

GENERATED from credici_redis/_archive/archive_async.py by tools/async_to_sync.py.
Do not edit: edit archive_async.py, then run `python tools/async_to_sync.py`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import psycopg

from credici_redis._archive.base import (
    _INSERT,
    _SELECT,
    _SELECT_BEFORE,
    DEFAULT_KEEP,
    SLOTS_PER_ROUND,
    ArchiveLag,
    ArchiveStats,
    _check_url,
    _done,
    _due_users,
    _entries,
    _lag,
    _Pending,
    _pending,
    _period,
    _server_ms,
    _unavailable,
    schema_sql,
)
from credici_redis._core import keys as _keys
from credici_redis._core.protocol import entry_key, parse_entry
from credici_redis._core.time import from_ms
from credici_redis._ops.history import HistoryRequest
from credici_redis._storages import cluster as _cluster
from credici_redis._storages.pg_history import Entry, history_row, pg_text
from credici_redis._storages.redis_sync import RedisStorage
from credici_redis.errors import InvalidInputError
from credici_redis.models import Transaction


class ArchiveReader:
    """The archived part of histories, for a client made with ``archive_url=``: one connection,
    one query at a time (the lock)."""

    def __init__(self, url: str, namespace: str, *, timeout: float = 5.0) -> None:
        self.url, self.namespace, self.timeout = _check_url(url), namespace, timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(
                        self.url, autocommit=True, connect_timeout=max(int(self.timeout), 1)
                    )
                cur = self._conn.execute(sql, params)
                return cur.fetchall()
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                raise _unavailable(exc) from exc

    def history(self, req: HistoryRequest) -> list[Transaction]:
        """The user's archived entries in the request's period, newest first."""
        rows = self._query(_SELECT, (self.namespace, pg_text(req.user_id), *_period(req)))
        return [parse_entry(req.user_id, e) for e in _entries(rows)]

    def entries_before(self, user_id: str, entry_id: str) -> list[Entry]:
        """Archived entries older than entry_id, oldest first (what an audit replays first)."""
        ms, seq = entry_key(entry_id)
        rows = self._query(_SELECT_BEFORE, (self.namespace, pg_text(user_id), from_ms(ms), seq))
        return _entries(rows)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Archiver:
    """Drains a namespace's history from Redis into PostgreSQL.

    ``Archiver(redis_url, postgres_url, namespace=...)`` (``cluster=True`` for a Redis
    Cluster: every shard is covered), or ``Archiver(storage=RedisStorage(...),
    postgres_url=...)``. ``run_once()`` archives everything there was when it started;
    ``follow()`` keeps going. ``keep``: archived entries younger than this stay in Redis too
    (reverse needs them).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        postgres_url: str = "",
        *,
        namespace: str = "credici",
        storage: RedisStorage | None = None,
        cluster: bool = False,
        keep: timedelta = DEFAULT_KEEP,
        users_per_batch: int = 200,
        entries_per_user: int = 1000,
        timeout: float = 5.0,
        allow_eviction: bool = False,
    ) -> None:
        if not isinstance(keep, timedelta) or keep < timedelta(0):
            raise InvalidInputError("keep must be a timedelta >= 0")
        if not 1 <= users_per_batch <= 10_000 or not 1 <= entries_per_user <= 100_000:
            raise InvalidInputError("users_per_batch and entries_per_user must be positive")
        self.postgres_url = _check_url(postgres_url)
        _keys.check_namespace(namespace)
        if storage is None:
            if redis_url is None:
                raise InvalidInputError("give a redis_url or a storage")
            from credici_redis._storages.connect import open_storage

            opened = open_storage(
                redis_url, namespace, timeout=timeout, idempotency_ttl=timedelta(days=1),
                cluster=cluster, allow_eviction=allow_eviction,
            )  # fmt: skip
            if not isinstance(opened, RedisStorage):
                raise InvalidInputError("the archiver drains a Redis storage")
            storage, self._owns_storage = opened, True
        else:
            self._owns_storage = False
        self.storage = storage
        self._cluster = _cluster.is_cluster(storage.redis)
        self.namespace = namespace
        self.keep_ms = int(keep.total_seconds() * 1000)
        self.users_per_batch = users_per_batch
        self.entries_per_user = entries_per_user
        self.timeout = timeout
        self._pg: psycopg.Connection[Any] | None = None
        self._schema_ready = False

    # PostgreSQL

    def _postgres(self) -> psycopg.Connection[Any]:
        if self._pg is None or self._pg.closed or self._pg.broken:
            try:
                self._pg = psycopg.connect(
                    self.postgres_url, autocommit=True, connect_timeout=max(int(self.timeout), 1)
                )
            except psycopg.Error as exc:
                raise _unavailable(exc) from exc
        return self._pg

    def init_schema(self) -> None:
        """Create the history table if it is missing (``credici-redis archive --init``)."""
        conn = self._postgres()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('credici_history'))")
                conn.execute(schema_sql())
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc
        self._schema_ready = True

    def _insert(self, batch: list[_Pending]) -> None:
        rows = [history_row(self.namespace, p.user_id, e) for p in batch for e in p.entries]
        if not rows:
            return
        conn = self._postgres()
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_INSERT, rows)
        except psycopg.Error as exc:
            raise _unavailable(exc) from exc

    # passes

    def run_once(self, progress: Callable[[ArchiveStats], None] | None = None) -> ArchiveStats:
        """Archive every entry that was in Redis when the pass started; return what it did."""
        if not self._schema_ready:
            self.init_schema()
        started = time.perf_counter()
        total = ArchiveStats()
        now = self.storage.run(_server_ms())
        for start in range(0, _keys.SLOTS, SLOTS_PER_ROUND):
            slots = range(start, min(start + SLOTS_PER_ROUND, _keys.SLOTS))
            while True:  # an outbox may hold more users than one read returns
                users, more = self.storage.run(
                    _due_users(
                        self.namespace, slots, now - self.keep_ms, self.users_per_batch,
                        self._cluster,
                    )
                )  # fmt: skip
                for i in range(0, len(users), self.users_per_batch):
                    total += self._archive_users(users[i : i + self.users_per_batch])
                    if progress is not None:
                        progress(total)
                if not more:
                    break
        return ArchiveStats(
            total.users, total.entries, total.trimmed, time.perf_counter() - started
        )

    def _archive_users(self, users: list[str]) -> ArchiveStats:
        stats = ArchiveStats(users=len(users))
        while users:
            batch = self.storage.run(_pending(self.namespace, users, self.entries_per_user))
            self._insert(batch)  # committed before Redis may forget anything
            trimmed = self.storage.run(_done(self.namespace, batch, self.keep_ms))
            archived = sum(len(p.entries) for p in batch)
            stats += ArchiveStats(entries=archived, trimmed=trimmed)
            users = [p.user_id for p in batch if len(p.entries) == self.entries_per_user]
        return stats

    def lag(self) -> ArchiveLag:
        """Oldest entry not yet archived, and how many users and entries wait."""
        return self.storage.run(_lag(self.namespace, self._cluster))

    def follow(
        self,
        interval: float = 1.0,
        *,
        stop: Callable[[], bool] | None = None,
        progress: Callable[[ArchiveStats, ArchiveLag], None] | None = None,
    ) -> Iterator[ArchiveStats]:
        """Pass after pass, `interval` seconds apart when a pass found nothing; yields each
        pass's stats. `stop()` returning True ends it."""
        while stop is None or not stop():
            stats = self.run_once()
            if progress is not None:
                progress(stats, self.lag())
            yield stats
            if stats.entries == 0 and stats.trimmed == 0:
                time.sleep(interval)

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
            self._pg = None
        if self._owns_storage:
            self.storage.close()

    def __enter__(self) -> Archiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
