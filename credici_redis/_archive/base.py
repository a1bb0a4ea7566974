"""The archive's parts without I/O: the Redis flows of a pass (run by a storage), the SQL, the
records. `_archive/archive_async.py` (and `_archive/archive_sync.py`, generated from it) drive
them; import the public names from `credici_redis.archive`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import psycopg

from credici_redis._core import keys as _keys
from credici_redis._core.protocol import (
    Call,
    Flow,
    entry_key,
    sent,
    stream_fields,
    text,
    time_ms,
)
from credici_redis._core.scripts import Script, load
from credici_redis._core.time import from_ms
from credici_redis._ops.history import HistoryRequest
from credici_redis._ops.history import merge as merge  # credici_redis.archive exports it
from credici_redis._storages.pg_history import (
    INSERT_HISTORY,
    Entry,
    from_pg_fields,
    pg_text,
)
from credici_redis._storages.redis_base import DEFAULT_KEEP as DEFAULT_KEEP
from credici_redis.errors import (
    CrediciError,
    InvalidInputError,
    StorageError,
    StorageUnavailableError,
)

ARCHIVE_PENDING = load("archive_pending", effect=False)
ARCHIVE_DONE = load("archive_done", effect=False)  # compare-and-set on the archived-up-to id
ARCHIVE_SCAN = load("archive_scan", effect=False)
ARCHIVE_LAG = load("archive_lag", effect=False)

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
    (reply,) = yield from sent([Call(("TIME",))])
    return time_ms(reply)


def _script_call(
    namespace: str, script: Script, user_id: str, extra: Sequence[str], argv: Sequence[str]
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
        script = ARCHIVE_SCAN
        (reply,) = yield from sent(
            [Call(("EVALSHA", script.sha, len(keys), *keys, count, horizon_ms), script)]
        )
        full, members = bool(int(reply[0])), reply[1:]
    else:  # no call may cross a slot
        calls = []
        for outbox, queue in zip(outboxes, queues, strict=True):
            calls.append(Call(("ZRANGE", outbox, 0, count - 1)))
            calls.append(Call(("ZRANGEBYSCORE", queue, "-inf", horizon_ms, "LIMIT", 0, count)))
        replies = yield from sent(calls)
        full = any(len(reply) >= count for reply in replies)
        members = [member for reply in replies for member in reply]
    users = {_keys.user_from_key(namespace, text(member)): None for member in members}
    return list(users), full


def _pending(namespace: str, users: list[str], count: int) -> Flow[list[_Pending]]:
    calls = [_script_call(namespace, ARCHIVE_PENDING, user, (), (str(count),)) for user in users]
    replies = yield from sent(calls)
    found = []
    for user, reply in zip(users, replies, strict=True):
        pending = _Pending(user, text(reply[0]))
        for i in range(2, len(reply), 2):
            pending.entries.append((text(reply[i]), stream_fields(reply[i + 1])))
        found.append(pending)
    return found


def _done(namespace: str, batch: list[_Pending], keep_ms: int) -> Flow[int]:
    """Tell Redis what PostgreSQL committed; returns the entries trimmed."""
    calls = []
    for p in batch:
        upto = p.entries[-1][0] if p.entries else ""
        trim_queue = _keys.trim_queue(namespace, _keys.user_slot(p.user_id))
        argv = ("", p.archived, upto, str(len(p.entries)), str(keep_ms))
        calls.append(_script_call(namespace, ARCHIVE_DONE, p.user_id, (trim_queue,), argv))
    replies = yield from sent(calls)
    trimmed = 0
    for reply in replies:
        if text(reply[0]) == "OK":
            trimmed += int(reply[2])
        # STALE: another archiver moved this user on first; what we inserted was a no-op.
    return trimmed


LAG_PAGE = 500
"""Users of one outbox read per call when counting the entries that wait (`_lag`)."""
LAG_CALLS = 20
"""Such pages per round trip: `_lag` holds at most LAG_PAGE * LAG_CALLS users at a time."""


def _lag(namespace: str, cluster: bool) -> Flow[ArchiveLag]:
    """How far the archive is behind, in bounded memory whatever the number of users waiting:
    each outbox's oldest member first (ZRANGE 0 0), then the users of the outboxes that hold
    any, page by page, for the entries each still has to archive (`pn`). The archiver's grants
    suffice (ZRANGE, HGET: docs/security.md)."""
    now = yield from _server_ms()
    oldest: float | None = None
    users = entries = 0
    for start in range(0, _keys.SLOTS, SLOTS_PER_ROUND):
        slots = range(start, min(start + SLOTS_PER_ROUND, _keys.SLOTS))
        outboxes = [_keys.outbox(namespace, s) for s in slots]
        if cluster:  # no call may cross a slot
            calls = [Call(("ZRANGE", outbox, 0, 0, "WITHSCORES")) for outbox in outboxes]
            firsts = [_pairs(reply) for reply in (yield from sent(calls))]
        else:  # one script call for all these slots
            script = ARCHIVE_LAG
            call = Call(("EVALSHA", script.sha, len(outboxes), *outboxes), script)
            (reply,) = yield from sent([call])
            firsts = [
                _pairs(reply[2 * i : 2 * i + 2] if reply[2 * i] else [])
                for i in range(len(outboxes))
            ]
        pages: list[tuple[str, int]] = []
        for outbox, first in zip(outboxes, firsts, strict=True):
            for _, score in first:
                oldest = score if oldest is None else min(oldest, score)
                pages.append((outbox, 0))
        while pages:
            now_pages, pages = pages[:LAG_CALLS], pages[LAG_CALLS:]
            found = yield from sent(
                [Call(("ZRANGE", box, at, at + LAG_PAGE - 1)) for box, at in now_pages]
            )
            waiting: list[str] = []
            for (box, at), members in zip(now_pages, found, strict=True):
                waiting += [_keys.user_from_key(namespace, text(m)) for m in members]
                if len(members) == LAG_PAGE:  # there may be more
                    pages.append((box, at + LAG_PAGE))
            users += len(waiting)
            counts = yield from sent(
                [Call(("HGET", _keys.user_keys(namespace, u).state, "pn")) for u in waiting]
            )
            entries += sum(max(int(text(r)), 0) for r in counts if r is not None)
    return ArchiveLag(
        oldest_unarchived=None if oldest is None else from_ms(int(oldest)),
        users_pending=users,
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
  AND (created_at, entry_seq) < (%s, %s)
  AND (%s::text IS NULL OR fields->>'mb' = %s)
ORDER BY created_at DESC, entry_seq DESC
LIMIT %s
"""

_SELECT_BEFORE = """
SELECT (extract(epoch FROM created_at) * 1000)::bigint, entry_seq, fields
FROM credici_history
WHERE namespace = %s AND user_id = %s AND (created_at, entry_seq) < (%s, %s)
ORDER BY created_at, entry_seq
"""

_MIN_TIME = from_ms(0)
_MAX_TIME = from_ms(253402300799999)  # 9999-12-31


def _period(
    req: HistoryRequest,
) -> tuple[datetime, datetime, datetime, int, str | None, str | None, int | None]:
    """The parameters of `_SELECT` after the user: the period, the `before` entry, the member
    (twice; None: every entry), the limit (LIMIT NULL is no limit)."""
    low = _MIN_TIME if req.from_ms is None else from_ms(max(req.from_ms, 0))
    high = _MAX_TIME if req.to_ms is None else from_ms(max(min(req.to_ms + 1, 253402300799999), 0))
    before_ms, before_seq = (
        (253402300799999, 2**63 - 1) if req.before is None else entry_key(req.before)
    )
    member = None if req.member is None else pg_text(req.member)
    before = from_ms(min(before_ms, 253402300799999))
    return low, high, before, before_seq, member, member, req.limit


def _entries(rows: Iterable[tuple[Any, ...]]) -> list[Entry]:
    # Text PostgreSQL cannot hold (NUL) is stored escaped, as PostgresStorage stores it.
    return [(f"{ms}-{seq}", from_pg_fields(fields)) for ms, seq, fields in rows]


def _unavailable(exc: Exception) -> CrediciError:
    if isinstance(exc, psycopg.OperationalError):
        return StorageUnavailableError(f"PostgreSQL is unavailable: {exc}")
    return StorageError(f"PostgreSQL refused a credici statement: {exc}")


def _check_url(url: object) -> str:
    if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
        raise InvalidInputError("the archive URL must be a postgresql:// URL")
    return url
