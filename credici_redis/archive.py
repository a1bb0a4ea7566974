"""The history archive: Redis Streams -> PostgreSQL, and one seamless history read across both.

History cannot stay in Redis memory for ever. The `Archiver` copies every user's history entries
into the PostgreSQL table of ``credici_redis/sql/history.sql`` and lets Redis forget what
PostgreSQL holds; a client made with ``archive_url=`` reads both as one history.

Finding the work without scanning users: every script that appends to a user's history also
marks the user in the *outbox* of its Redis Cluster slot (``<ns>:{%S<x>}:ob``, a zset: history
key -> ms of its oldest entry not yet archived), in the same atomic script. A pass visits the
16384 slot outboxes (pipelined, per node on a cluster), never the users, and only the users with
something new. No script crosses a slot, so it works the same on Redis Cluster.

One user, one pass (nothing lost, nothing doubled):
  1. ``archive_pending.lua`` returns the entries after the user's archived-up-to id (``ar``).
  2. They are inserted into PostgreSQL with ON CONFLICT DO NOTHING (the key is the entry id), and
     committed.
  3. ``archive_done.lua`` moves ``ar`` to the last committed id, only if ``ar`` is still what step
     1 read (another archiver may have got there first), and trims the entries up to ``ar`` that
     are older than ``keep``: Redis forgets only what PostgreSQL has committed.
A crash between 2 and 3 leaves ``ar`` where it was: the next pass inserts the same rows again,
which changes nothing. Entries kept for ``keep`` (reverse needs them) wait in the slot's trim
queue (``<ns>:{%S<x>}:tq``) for their time.

Reads: `ArchiveReader` / `AsyncArchiveReader` (what ``archive_url=`` makes) return the archived
part of a history; the client reads Redis first, then PostgreSQL, and merges by transaction id:
an entry trimmed between the two reads was committed before it was trimmed, so it is in the
second, and an entry in both is returned once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

import psycopg

from credici_redis import _cluster, _keys, _scripts
from credici_redis._pg_history import (
    INSERT_HISTORY,
    Entry,
    from_pg_fields,
    history_row,
    pg_text,
)
from credici_redis._protocol import (
    Call,
    Flow,
    _fields,
    _sent,
    entry_key,
    parse_entry,
    text,
)
from credici_redis._requests import HistoryRequest
from credici_redis._time import from_ms
from credici_redis.errors import (
    CrediciError,
    InvalidInputError,
    StorageError,
    StorageUnavailableError,
)
from credici_redis.models import Transaction
from credici_redis.storage import RedisStorage

DEFAULT_KEEP = timedelta(days=7)
"""Archived entries stay in Redis this long after they were made: reverse and audit without the
archive need them; older ones are trimmed once PostgreSQL holds them."""

SLOTS_PER_ROUND = 1024
"""Slot outboxes read per pipeline."""


def schema_sql() -> str:
    """The SQL that creates the history table (shipped in the package; safe to re-run)."""
    return (resources.files("credici_redis") / "sql" / "history.sql").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class ArchiveStats:
    """What one pass did."""

    users: int = 0
    entries: int = 0
    trimmed: int = 0
    seconds: float = 0.0

    def __add__(self, other: ArchiveStats) -> ArchiveStats:
        return ArchiveStats(
            self.users + other.users,
            self.entries + other.entries,
            self.trimmed + other.trimmed,
            self.seconds + other.seconds,
        )


@dataclass(frozen=True, slots=True)
class ArchiveLag:
    """How far the archive is behind Redis."""

    oldest_unarchived: datetime | None
    """When the oldest entry not yet in PostgreSQL was made (None: nothing is waiting)."""
    users_pending: int
    entries_pending: int
    checked_at: datetime

    @property
    def seconds(self) -> float:
        """Age of the oldest entry not yet archived (0 when nothing is waiting)."""
        if self.oldest_unarchived is None:
            return 0.0
        return max((self.checked_at - self.oldest_unarchived).total_seconds(), 0.0)


@dataclass(slots=True)
class _Pending:
    user_id: str
    archived: str  # the archived-up-to id the entries follow ('' = none yet)
    entries: list[Entry] = field(default_factory=list)


# -- the Redis side, without I/O (run by RedisStorage.run) ------------------------------------


def _server_ms() -> Flow[int]:
    (reply,) = yield from _sent([Call(("TIME",))])
    return int(text(reply[0])) * 1000 + int(text(reply[1])) // 1000


def _script_call(
    namespace: str, script: _scripts.Script, user_id: str, extra: Sequence[str], argv: Sequence[str]
) -> Call:
    keys = [*_keys.user_keys(namespace, user_id), *extra]
    return Call(("EVALSHA", script.sha, len(keys), *keys, *argv), script)


def _due_users(
    namespace: str, slots: range, horizon_ms: int, count: int, cluster: bool
) -> Flow[tuple[list[str], bool]]:
    """Users of these slots with entries to archive, or kept entries older than the horizon; and
    whether some slot had `count` or more (read again after these are done)."""
    outboxes = [_keys.outbox(namespace, slot) for slot in slots]
    queues = [_keys.trim_queue(namespace, slot) for slot in slots]
    members: list[Any] = []
    full = False
    if not cluster:  # one script call for all these slots
        keys = [*outboxes, *queues]
        script = _scripts.ARCHIVE_SCAN
        (reply,) = yield from _sent(
            [Call(("EVALSHA", script.sha, len(keys), *keys, count, horizon_ms), script)]
        )
        full, members = bool(int(reply[0])), reply[1:]
    else:  # no call may cross a slot
        calls = []
        for outbox, queue in zip(outboxes, queues, strict=True):
            calls.append(Call(("ZRANGE", outbox, 0, count - 1)))
            calls.append(Call(("ZRANGEBYSCORE", queue, "-inf", horizon_ms, "LIMIT", 0, count)))
        replies = yield from _sent(calls)
        full = any(len(reply) >= count for reply in replies)
        members = [member for reply in replies for member in reply]
    users = {_keys.user_from_key(namespace, text(member)): None for member in members}
    return list(users), full


def _pending(namespace: str, users: list[str], count: int) -> Flow[list[_Pending]]:
    calls = [
        _script_call(namespace, _scripts.ARCHIVE_PENDING, user, (), (str(count),)) for user in users
    ]
    replies = yield from _sent(calls)
    found = []
    for user, reply in zip(users, replies, strict=True):
        pending = _Pending(user, text(reply[0]))
        for i in range(2, len(reply), 2):
            pending.entries.append((text(reply[i]), _fields(reply[i + 1])))
        found.append(pending)
    return found


def _done(namespace: str, batch: list[_Pending], keep_ms: int) -> Flow[int]:
    """Tell Redis what PostgreSQL committed; returns the entries trimmed."""
    calls = []
    for p in batch:
        upto = p.entries[-1][0] if p.entries else ""
        trim_queue = _keys.trim_queue(namespace, _keys.user_slot(p.user_id))
        argv = ("", p.archived, upto, str(len(p.entries)), str(keep_ms))
        calls.append(_script_call(namespace, _scripts.ARCHIVE_DONE, p.user_id, (trim_queue,), argv))
    replies = yield from _sent(calls)
    trimmed = 0
    for reply in replies:
        if text(reply[0]) == "OK":
            trimmed += int(reply[2])
        # STALE: another archiver moved this user on first; what we inserted was a no-op.
    return trimmed


def _lag(namespace: str, cluster: bool) -> Flow[ArchiveLag]:
    now = yield from _server_ms()
    oldest: float | None = None
    pending_users: list[str] = []
    for start in range(0, _keys.SLOTS, SLOTS_PER_ROUND):
        slots = range(start, min(start + SLOTS_PER_ROUND, _keys.SLOTS))
        outboxes = [_keys.outbox(namespace, s) for s in slots]
        if cluster:  # no call may cross a slot
            calls = [Call(("ZRANGE", outbox, 0, -1, "WITHSCORES")) for outbox in outboxes]
        else:  # one script call for all these slots
            script = _scripts.ARCHIVE_LAG
            calls = [Call(("EVALSHA", script.sha, len(outboxes), *outboxes), script)]
        replies = yield from _sent(calls)
        for reply in replies:
            pairs = _pairs(reply)
            for member, score in pairs:
                pending_users.append(_keys.user_from_key(namespace, member))
                oldest = score if oldest is None else min(oldest, score)
    entries = 0
    for i in range(0, len(pending_users), 500):
        chunk = pending_users[i : i + 500]
        replies = yield from _sent(
            [Call(("HGET", _keys.user_keys(namespace, u).state, "pn")) for u in chunk]
        )
        entries += sum(max(int(text(r)), 0) for r in replies if r is not None)
    return ArchiveLag(
        oldest_unarchived=None if oldest is None else from_ms(int(oldest)),
        users_pending=len(pending_users),
        entries_pending=entries,
        checked_at=from_ms(now),
    )


def _pairs(reply: Any) -> list[tuple[str, float]]:
    """ZRANGE ... WITHSCORES: a flat list (RESP2) or pairs (RESP3 / callbacks)."""
    if reply and isinstance(reply[0], list | tuple):
        return [(text(m), float(s)) for m, s in reply]
    return [(text(reply[i]), float(reply[i + 1])) for i in range(0, len(reply), 2)]


# -- the PostgreSQL side ---------------------------------------------------------------------

_INSERT = INSERT_HISTORY + " ON CONFLICT DO NOTHING"

_SELECT = """
SELECT (extract(epoch FROM created_at) * 1000)::bigint, entry_seq, fields
FROM credici_history
WHERE namespace = %s AND user_id = %s AND created_at >= %s AND created_at < %s
ORDER BY created_at DESC, entry_seq DESC
"""

_SELECT_BEFORE = """
SELECT (extract(epoch FROM created_at) * 1000)::bigint, entry_seq, fields
FROM credici_history
WHERE namespace = %s AND user_id = %s AND (created_at, entry_seq) < (%s, %s)
ORDER BY created_at, entry_seq
"""

_MIN_TIME = from_ms(0)
_MAX_TIME = from_ms(253402300799999)  # 9999-12-31


def _period(req: HistoryRequest) -> tuple[datetime, datetime]:
    low = _MIN_TIME if req.from_ms is None else from_ms(max(req.from_ms, 0))
    high = _MAX_TIME if req.to_ms is None else from_ms(max(min(req.to_ms + 1, 253402300799999), 0))
    return low, high


def _entries(rows: Iterable[tuple[Any, ...]]) -> list[Entry]:
    # Text PostgreSQL cannot hold (NUL) is stored escaped, as PostgresStorage stores it.
    return [(f"{ms}-{seq}", from_pg_fields(fields)) for ms, seq, fields in rows]


def merge(recent: list[Transaction], archived: list[Transaction]) -> list[Transaction]:
    """One history, newest first: what Redis returned, and what only PostgreSQL holds."""
    if not archived:
        return recent
    seen = {tx.transaction_id for tx in recent}
    both = recent + [tx for tx in archived if tx.transaction_id not in seen]
    both.sort(key=lambda tx: entry_key(tx.transaction_id.partition("@")[0]), reverse=True)
    return both


def _unavailable(exc: Exception) -> CrediciError:
    if isinstance(exc, psycopg.OperationalError):
        return StorageUnavailableError(f"PostgreSQL is unavailable: {exc}")
    return StorageError(f"PostgreSQL refused a credici statement: {exc}")


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
        raise InvalidInputError("the archive URL must be a postgresql:// URL")
    return url


class ArchiveReader:
    """The archived part of histories, for `CrediciClient(..., archive=...)` (thread-safe)."""

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
                return self._conn.execute(sql, params).fetchall()
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


class AsyncArchiveReader:
    """`ArchiveReader` for `AsyncCrediciClient`, on psycopg's asyncio connection."""

    def __init__(self, url: str, namespace: str, *, timeout: float = 5.0) -> None:
        self.url, self.namespace, self.timeout = _check_url(url), namespace, timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock: asyncio.Lock | None = None

    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=max(int(self.timeout), 1)
                    )
                cur = await self._conn.execute(sql, params)
                return await cur.fetchall()
            except psycopg.Error as exc:
                if self._conn is not None and self._conn.broken:
                    self._conn = None
                raise _unavailable(exc) from exc

    async def history(self, req: HistoryRequest) -> list[Transaction]:
        rows = await self._query(_SELECT, (self.namespace, pg_text(req.user_id), *_period(req)))
        return [parse_entry(req.user_id, e) for e in _entries(rows)]

    async def entries_before(self, user_id: str, entry_id: str) -> list[Entry]:
        ms, seq = entry_key(entry_id)
        rows = await self._query(
            _SELECT_BEFORE, (self.namespace, pg_text(user_id), from_ms(ms), seq)
        )
        return _entries(rows)

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


# -- the archiver ----------------------------------------------------------------------------


class Archiver:
    """Drains a namespace's history from Redis into PostgreSQL.

    ``Archiver(redis_url, postgres_url, namespace=...)`` (``cluster=True`` for a Redis Cluster:
    every shard is covered), or ``Archiver(storage=RedisStorage(...), postgres_url=...)``.
    ``run_once()`` archives everything there was when it started; ``follow()`` keeps going.
    ``keep``: archived entries younger than this stay in Redis too (reverse needs them).
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
            from credici_redis._connect import open_storage

            opened = open_storage(
                redis_url, namespace, timeout=timeout, idempotency_ttl=timedelta(days=1),
                cluster=cluster,
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


class AsyncArchiver:
    """The `Archiver` for asyncio programs: the same passes, run in a worker thread so the event
    loop never waits on them (a pass is a background job, not a request path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sync = Archiver(*args, **kwargs)

    async def init_schema(self) -> None:
        await asyncio.to_thread(self._sync.init_schema)

    async def run_once(self) -> ArchiveStats:
        return await asyncio.to_thread(self._sync.run_once)

    async def lag(self) -> ArchiveLag:
        return await asyncio.to_thread(self._sync.lag)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._sync.close)

    async def __aenter__(self) -> AsyncArchiver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = [
    "DEFAULT_KEEP",
    "ArchiveLag",
    "ArchiveReader",
    "ArchiveStats",
    "Archiver",
    "AsyncArchiveReader",
    "AsyncArchiver",
    "merge",
    "schema_sql",
]
