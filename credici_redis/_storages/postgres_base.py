"""What the PostgreSQL storages share and what has no I/O of its own: the SQL flows
(`PostgresLedger`), statements, errors, and the connection pools (a thread-safe one and an
asyncio one, which genuinely differ).

The storages themselves: `_async_postgres.AsyncPostgresStorage` (the source) and
`_sync_postgres.PostgresStorage` (generated from it); `credici_redis.postgres` is where to import
them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import fakeredis

from credici_redis._core import keys as _keys

try:
    import psycopg
except ImportError:  # pragma: no cover - without the "postgres" extra
    psycopg = None  # type: ignore[assignment]
from credici_redis._core.protocol import Call, Flow, text
from credici_redis._core.time import from_ms
from credici_redis._storages.pg_history import (
    INSERT_HISTORY,
    from_pg_fields,
    from_pg_text,
    history_row,
    pg_text,
)
from credici_redis._storages.redis_sync import RedisStorage
from credici_redis.errors import (
    CrediciError,
    NotSupportedError,
    OutcomeUnknownError,
    StorageError,
    StorageUnavailableError,
)
from credici_redis.models import BalanceEvent

T = TypeVar("T")

TRANSFERS_NEED_REDIS = (
    "transfers need Redis: PostgresStorage runs each script on one user's row, and a transfer"
    " changes two users"
)

DEFAULT_POOL_SIZE = 20
"""Connections per storage at most (opened when needed). Operations on one user are serialized
by its row lock anyway, so more connections only help with many users at once."""

_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
SCHEMA_FILES = ("history.sql", "postgres_storage.sql")
_SCHEMA_LOCK = 0x6372656469  # pg_advisory_xact_lock key: processes creating the tables take turns

Rows = list[tuple[Any, ...]]
TABLES = (
    "credici_history",
    "credici_user_state",
    "credici_idempotency",
    "credici_events",
    "credici_event_groups",
    "credici_event_pending",
)


@dataclass(frozen=True, slots=True)
class Statement:
    query: str
    params: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class SqlBatch:
    """Statements sent in one round trip (pipeline mode). `commits`: the batch ends the
    transaction; `effect`: committing it applies a caller's request (a connection lost then
    leaves the outcome unknown)."""

    statements: list[Statement]
    commits: bool = False
    effect: bool = False


SqlFlow = Generator[SqlBatch, list[Rows], T]

_MS = "floor(extract(epoch FROM {}) * 1000)::bigint"
_NOW_MS = _MS.format("clock_timestamp()")
_ENTRY = f"{_MS.format('created_at')}, entry_seq, fields"
_USER = "namespace = %s AND user_id = %s"
_EVENT = "e.event_id, e.user_id, e.kind, e.balance, e.threshold, e.transaction_id, " + _MS.format(
    "e.created_at"
)
BEGIN = Statement("BEGIN")
COMMIT = Statement("COMMIT")


def schema_statements() -> list[str]:
    """Every table PostgresStorage uses, as idempotent SQL statements (comments dropped)."""
    statements: list[str] = []
    for name in SCHEMA_FILES:
        source = (_SQL_DIR / name).read_text(encoding="utf-8")
        code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())
        statements += [s.strip() for s in code.split(";") if s.strip()]
    return statements


def create_schema() -> SqlFlow[None]:
    lock = Statement(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
    tables = [Statement(sql) for sql in schema_statements()]
    yield SqlBatch([BEGIN, lock, *tables, COMMIT], commits=True)


def _entry_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def _bound(value: str, upper: bool) -> tuple[str, tuple[Any, ...]]:
    """A stream range bound ("-", "+", "<ms>", "<ms>-<seq>", "(<ms>-<seq>") as a SQL condition
    on (created_at, entry_seq): the primary key's order, so reads are index range scans."""
    if value in ("-", "+"):
        return "TRUE", ()
    exclusive = value.startswith("(")
    ms_text, dash, seq_text = value.lstrip("(").partition("-")
    at = from_ms(int(ms_text))
    if not dash:  # an incomplete id: the whole millisecond
        return ("created_at <= %s" if upper else "created_at >= %s"), (at,)
    op = ("<" if upper else ">") + ("" if exclusive else "=")
    return f"(created_at, entry_seq) {op} (%s, %s)", (at, int(seq_text))


class PostgresLedger:
    """Answers the calls of the `Ledger` flows with PostgreSQL and a private fakeredis: builds
    each SQL batch and reads its rows, without I/O of its own (the shells send the batches)."""

    def __init__(self, namespace: str, idempotency_ttl_ms: int) -> None:
        self.namespace = _keys.check_namespace(namespace)
        self.idempotency_ttl_ms = idempotency_ttl_ms

    # -- the calls of a Ledger flow ------------------------------------------------------------

    def answer(self, lua: RedisStorage, call: Call) -> SqlFlow[Any]:
        """The reply a Redis server would give to `call`."""
        command = text(call.args[0]).upper()
        if call.script is not None and call.script.name.startswith("transfer_"):
            return NotSupportedError(TRANSFERS_NEED_REDIS)
        if command == "EVALSHA" and call.script is not None:
            return (yield from self._script(lua, call))
        if command in ("XRANGE", "XREVRANGE"):
            return (yield from self._range(call))
        if command == "TIME":
            ((ms,),) = (yield SqlBatch([Statement(f"SELECT {_NOW_MS}")]))[0]
            return [str(ms // 1000), str(ms % 1000 * 1000)]
        raise StorageError(f"PostgresStorage cannot answer {command}")

    def _range(self, call: Call) -> SqlFlow[list[tuple[str, dict[str, str]]]]:
        command, stream, first, second = (text(a) for a in call.args[:4])
        count = int(text(call.args[5])) if len(call.args) > 5 else 2**62
        reverse = command.upper() == "XREVRANGE"
        low, high = (second, first) if reverse else (first, second)
        user_id = _keys.user_from_key(self.namespace, stream)
        try:
            low_sql, low_params = _bound(low, upper=False)
            high_sql, high_params = _bound(high, upper=True)
        except (OverflowError, ValueError):  # beyond datetime's years: nothing is there
            return []
        order = "DESC" if reverse else "ASC"
        (rows,) = yield SqlBatch([
            Statement(
                f"SELECT {_ENTRY} FROM credici_history WHERE {_USER} AND {low_sql} AND {high_sql}"
                f" ORDER BY created_at {order}, entry_seq {order} LIMIT %s",
                (self.namespace, pg_text(user_id), *low_params, *high_params, count),
            )
        ])  # fmt: skip
        return [(_entry_id(ms, seq), from_pg_fields(fields)) for ms, seq, fields in rows]

    def _script(self, lua: RedisStorage, call: Call) -> SqlFlow[Any]:
        """One script on one user: lock, load, run, write back, in one transaction."""
        assert call.script is not None
        numkeys = int(call.args[2])
        keys = [text(k) for k in call.args[3 : 3 + numkeys]]
        argv = list(call.args[3 + numkeys :])
        user_id = _keys.user_from_key(self.namespace, keys[0])
        user = _keys.user_keys(self.namespace, user_id)
        prefix = user.state[: -len("s")]
        records = [k[len(prefix) :] for k in keys[len(user) :]]  # idempotency records
        ns_user = (self.namespace, pg_text(user_id))
        target = call.entry  # a history entry the script reads (reverse's), besides the newest

        reads = [
            BEGIN,
            Statement(
                "INSERT INTO credici_user_state (namespace, user_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                ns_user,
            ),
            Statement(f"SELECT state FROM credici_user_state WHERE {_USER} FOR UPDATE", ns_user),
            Statement(f"SELECT {_NOW_MS}"),  # after the lock: later holders read later times
            Statement(
                f"SELECT {_ENTRY} FROM credici_history WHERE {_USER}"
                " ORDER BY created_at DESC, entry_seq DESC LIMIT 1",
                ns_user,
            ),
        ]
        if target is not None:
            try:
                where, params = _bound(target, upper=True)
                condition = where.replace("<=", "=")
            except (OverflowError, ValueError):
                condition, params = "FALSE", ()
            reads.append(
                Statement(
                    f"SELECT {_ENTRY} FROM credici_history WHERE {_USER} AND {condition}",
                    (*ns_user, *params),
                )
            )
        if records:
            reads.append(
                Statement(
                    f"SELECT record_key, record, {_MS.format('expires_at - clock_timestamp()')}"
                    f" FROM credici_idempotency WHERE {_USER} AND record_key = ANY(%s)"
                    " AND expires_at > clock_timestamp()",
                    (*ns_user, [pg_text(r) for r in records]),
                )
            )
        rows = yield SqlBatch(reads)
        ((state,),), ((now_ms,),), newest = rows[2], rows[3], rows[4]
        entries: dict[str, Any] = {_entry_id(ms, seq): from_pg_fields(f) for ms, seq, f in newest}
        if target is not None:
            entries.update({_entry_id(ms, seq): from_pg_fields(f) for ms, seq, f in rows[5]})
        kept = rows[-1] if records else []

        fake = lua.redis
        pipe = fake.pipeline(transaction=False)
        pipe.flushall()
        for suffix, value in state.items():
            _load_key(pipe, prefix + suffix, value)
        for entry_id in sorted(entries, key=lambda e: tuple(map(int, e.split("-")))):
            pipe.xadd(user.history, entries[entry_id], id=entry_id)
        for record_key, record, ttl_ms in kept:
            pipe.set(prefix + from_pg_text(record_key), bytes(record), px=max(int(ttl_ms), 1))
        pipe.execute()
        if argv[0] == "":  # the storage's clock: PostgreSQL's
            argv[0] = str(now_ms)
        reply = lua.run(_one(Call((*call.args[: 3 + numkeys], *argv), call.script)))
        if isinstance(reply, CrediciError):  # a script error: nothing of it is kept
            yield SqlBatch([Statement("ROLLBACK")], commits=True)
            return reply

        writes = self._changes(lua, user_id, user, prefix, state, newest, records, now_ms)
        yield SqlBatch([*writes, COMMIT], commits=True, effect=bool(writes) and call.script.effect)
        return reply

    def _changes(
        self,
        lua: RedisStorage,
        user_id: str,
        user: _keys.UserKeys,
        prefix: str,
        before: dict[str, Any],
        newest: Rows,
        records: list[str],
        now_ms: int,
    ) -> list[Statement]:
        """What the script changed, as statements: state, history entries, events, records."""
        fake = lua.redis
        ns_user = (self.namespace, pg_text(user_id))
        private = [k for k in user if k.startswith(prefix) and k != user.history]
        types = [text(t) for t in _pipelined(fake, [("type", k) for k in private])]
        reads: list[tuple[str, str]] = []
        for key, kind in zip(private, types, strict=True):
            if kind == "hash":
                reads.append(("hgetall", key))
            elif kind == "zset":
                reads.append(("zrange_all", key))
            elif kind != "none":
                raise StorageError(f"PostgresStorage cannot keep a Redis {kind} ({key})")
        after_from = "-" if not newest else "(" + _entry_id(newest[0][0], newest[0][1])
        values = _pipelined(
            fake,
            [
                *reads,
                ("xrange", user.history, after_from),
                ("xrange", user.events, "-"),
                *[("get", prefix + r) for r in records],
                *[("pttl", prefix + r) for r in records],
            ],
        )
        state: dict[str, Any] = {}
        for (kind, key), value in zip(reads, values, strict=False):
            suffix = key[len(prefix) :]
            if kind == "hgetall":
                state[suffix] = {"hash": {text(f): text(v) for f, v in value.items()}}
            else:
                state[suffix] = {"zset": [[text(m), s] for m, s in value]}
        rest = values[len(reads) :]
        new_entries, events = rest[0], rest[1]
        got, ttls = rest[2 : 2 + len(records)], rest[2 + len(records) :]

        out: list[Statement] = []
        if state != before:
            out.append(
                Statement(
                    "UPDATE credici_user_state SET state = %s, updated_at = clock_timestamp()"
                    f" WHERE {_USER}",
                    (json.dumps(state), *ns_user),
                )
            )
        for raw_id, raw_fields in new_entries:
            entry = (text(raw_id), {text(k): text(v) for k, v in raw_fields.items()})
            out.append(Statement(INSERT_HISTORY, history_row(self.namespace, user_id, entry)))
        for _, raw_fields in events:
            f = {text(k): text(v) for k, v in raw_fields.items()}
            out.append(
                Statement(
                    "INSERT INTO credici_events (namespace, user_id, kind, balance, threshold,"
                    " transaction_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        *ns_user,
                        f["t"],
                        int(f["b"]),
                        int(f["l"]),
                        _keys.transaction_id(user_id, f["e"]),
                        from_ms(now_ms),
                    ),
                )
            )
        written = False
        for record_key, value, ttl in zip(records, got, ttls, strict=True):
            if value is None or int(ttl) <= 0:
                continue
            written = True
            out.append(
                Statement(
                    "INSERT INTO credici_idempotency (namespace, user_id, record_key, record,"
                    " expires_at) VALUES (%s, %s, %s, %s, clock_timestamp() + %s)"
                    " ON CONFLICT (namespace, user_id, record_key) DO UPDATE"
                    " SET record = EXCLUDED.record, expires_at = EXCLUDED.expires_at",
                    (*ns_user, pg_text(record_key), bytes(value), timedelta(milliseconds=int(ttl))),
                )
            )
        if written:  # the user's expired records go with its keyed writes
            out.append(
                Statement(
                    f"DELETE FROM credici_idempotency WHERE {_USER}"
                    " AND expires_at <= clock_timestamp()",
                    ns_user,
                )
            )
        return out

    # -- users and events ----------------------------------------------------------------------

    def scan_users(self, after: str, count: int) -> SqlFlow[list[str]]:
        """The next `count` users after `after`, in id order (keyset paging on the primary key);
        a user that was only ever read has no state and is not one."""
        (rows,) = yield SqlBatch([
            Statement(
                "SELECT user_id FROM credici_user_state WHERE namespace = %s AND user_id > %s"
                " AND state <> '{}'::jsonb ORDER BY user_id LIMIT %s",
                (self.namespace, pg_text(after), count),
            )
        ])  # fmt: skip
        return [from_pg_text(user_id) for (user_id,) in rows]

    def read_events(
        self, group: str, consumer: str, count: int, claim_idle_ms: int | None
    ) -> SqlFlow[list[BalanceEvent]]:
        """Events new to the group (delivered to `consumer`, pending until acknowledged) and,
        with claim_idle_ms, those another consumer left unacknowledged for that long."""
        ns_group = (self.namespace, group)
        statements = [
            BEGIN,
            Statement(
                "INSERT INTO credici_event_groups (namespace, group_name) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                ns_group,
            ),
            Statement(
                "SELECT 1 FROM credici_event_groups WHERE namespace = %s AND group_name = %s"
                " FOR UPDATE",
                ns_group,
            ),
        ]
        if claim_idle_ms is not None:
            statements.append(
                Statement(
                    "UPDATE credici_event_pending p SET consumer = %s,"
                    " delivered_at = clock_timestamp() FROM credici_events e"
                    " WHERE p.namespace = %s AND p.group_name = %s AND p.event_id IN ("
                    "  SELECT event_id FROM credici_event_pending"
                    "  WHERE namespace = %s AND group_name = %s"
                    "  AND delivered_at <= clock_timestamp() - %s ORDER BY event_id LIMIT %s)"
                    " AND e.namespace = p.namespace AND e.event_id = p.event_id"
                    f" RETURNING {_EVENT}",
                    (consumer, *ns_group, *ns_group, timedelta(milliseconds=claim_idle_ms), count),
                )
            )
        statements += [
            Statement(
                "WITH new AS ("
                f"  SELECT e.tx, {_EVENT} AS created_ms"
                "   FROM credici_events e, credici_event_groups g"
                "   WHERE g.namespace = %s AND g.group_name = %s AND e.namespace = g.namespace"
                "   AND (e.tx, e.event_id) > (g.tx, g.event_id)"
                "   AND e.tx < txid_snapshot_xmin(txid_current_snapshot())"
                "   ORDER BY e.tx, e.event_id LIMIT %s),"
                " pending AS (INSERT INTO credici_event_pending"
                "  (namespace, group_name, event_id, consumer, delivered_at)"
                "  SELECT %s, %s, event_id, %s, clock_timestamp() FROM new),"
                " moved AS (UPDATE credici_event_groups g"
                "  SET tx = last.tx, event_id = last.event_id"
                "  FROM (SELECT tx, event_id FROM new ORDER BY tx DESC, event_id DESC LIMIT 1) last"
                "  WHERE g.namespace = %s AND g.group_name = %s)"
                " SELECT event_id, user_id, kind, balance, threshold, transaction_id, created_ms"
                " FROM new ORDER BY tx, event_id",
                (*ns_group, count, *ns_group, consumer, *ns_group),
            ),
            COMMIT,
        ]
        rows = yield SqlBatch(statements, commits=True)
        found = rows[-2] if claim_idle_ms is None else rows[-3] + rows[-2]
        return [_event(row) for row in found]

    def recent_events(self, count: int) -> SqlFlow[list[BalanceEvent]]:
        """The namespace's `count` newest events, newest first (no group, nothing acknowledged)."""
        rows = yield SqlBatch([
            Statement(
                f"SELECT {_EVENT} FROM credici_events e WHERE e.namespace = %s"
                " ORDER BY e.created_at DESC, e.event_id DESC LIMIT %s",
                (self.namespace, count),
            )
        ])  # fmt: skip
        return [_event(row) for row in rows[0]]

    def ack_events(self, events: list[BalanceEvent], group: str) -> SqlFlow[None]:
        if events:
            yield SqlBatch([
                Statement(
                    "DELETE FROM credici_event_pending WHERE namespace = %s AND group_name = %s"
                    " AND event_id = ANY(%s)",
                    (self.namespace, group, [int(e.event_id) for e in events]),
                )
            ])  # fmt: skip

    def delete_namespace(self) -> SqlFlow[None]:
        """Every row of the namespace, in every table (tests, and dropping a tenant)."""
        deletes = [
            Statement(f"DELETE FROM {table} WHERE namespace = %s", (self.namespace,))
            for table in TABLES
        ]
        yield SqlBatch([BEGIN, *deletes, COMMIT], commits=True)


def _event(row: tuple[Any, ...]) -> BalanceEvent:
    event_id, user_id, kind, balance, threshold, transaction_id, created_ms = row
    return BalanceEvent(
        event_id=str(event_id),
        kind=kind,
        user_id=from_pg_text(user_id),
        balance=balance,
        threshold=threshold,
        transaction_id=transaction_id,
        created_at=from_ms(created_ms),
    )


def _one(call: Call) -> Flow[Any]:
    """A flow of one call whose reply (or error, in its place) is the result."""
    (reply,) = yield [call]
    return reply


def _load_key(pipe: Any, key: str, value: dict[str, Any]) -> None:
    if "hash" in value:
        pipe.hset(key, mapping=value["hash"])
    elif "zset" in value:
        pipe.zadd(key, {member: score for member, score in value["zset"]})
    else:
        raise StorageError(f"unreadable state of {key}: {value!r}")


def _pipelined(fake: Any, commands: Sequence[tuple[str, ...]]) -> list[Any]:
    pipe = fake.pipeline(transaction=False)
    for name, *args in commands:
        if name == "zrange_all":
            pipe.zrange(args[0], 0, -1, withscores=True)
        elif name == "xrange":
            pipe.xrange(args[0], min=args[1])
        else:
            getattr(pipe, name)(*args)
    replies: list[Any] = pipe.execute()
    return replies


def _private_redis(namespace: str, idempotency_ttl: timedelta) -> RedisStorage:
    """The in-process Redis a connection runs the scripts on, through the Redis driver."""
    fake = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(7,)))
    return RedisStorage(fake, namespace, idempotency_ttl=idempotency_ttl)


def _failure(exc: psycopg.Error, batch: SqlBatch, broken: bool) -> CrediciError:
    """The CrediciError a psycopg error means; the caller chains it."""
    if isinstance(exc, psycopg.OperationalError):
        if batch.commits and batch.effect and broken:
            return OutcomeUnknownError(
                "the connection to PostgreSQL failed during COMMIT; the request may have been "
                f"applied: retry it with the same idempotency key ({exc})"
            )
        return StorageUnavailableError(f"PostgreSQL is unavailable: {exc}")
    return StorageError(f"PostgreSQL refused a credici statement: {exc}")


def _need_psycopg() -> None:
    if psycopg is None:  # pragma: no cover - without the "postgres" extra
        raise ImportError("PostgreSQL storage needs psycopg: pip install 'credici-redis[postgres]'")


def _connect_options(timeout: float, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "connect_timeout": max(int(timeout + 0.999), 1),
        "tcp_user_timeout": int(timeout * 1000),  # unacknowledged data: give up after timeout
        **options,
        "autocommit": True,  # transactions are the flows' own BEGIN ... COMMIT
    }


def _session_setup(timeout: float) -> Statement:
    return Statement(f"SET statement_timeout = {int(timeout * 1000)}")


def _setup(timeout: float) -> SqlFlow[None]:
    yield SqlBatch([_session_setup(timeout)])


# -- sync ------------------------------------------------------------------------------------


@dataclass
class _Session:
    conn: psycopg.Connection[Any]
    lua: RedisStorage


class _Pool:
    """At most `size` sessions (a connection and its private Redis), made when needed; a thread
    takes one for a call and gives it back, broken ones are dropped."""

    def __init__(self, make: Callable[[], _Session], size: int, timeout: float) -> None:
        self._make, self._size, self._timeout = make, size, timeout
        self._idle: list[_Session] = []
        self._open = 0
        self._cond = threading.Condition()
        self._closed = False

    @contextmanager
    def session(self) -> Iterator[_Session]:
        session = self._take()
        try:
            yield session
        finally:
            self._give(session)

    def _take(self) -> _Session:
        with self._cond:
            # Queueing behind this process's own calls, not an outage: no time limit (each
            # holder is bounded by the connect and statement timeouts).
            self._cond.wait_for(lambda: bool(self._idle) or self._open < self._size)
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._make()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _give(self, session: _Session) -> None:
        usable = not (session.conn.closed or session.conn.broken)
        with self._cond:
            if usable and not self._closed:
                self._idle.append(session)
            else:
                self._open -= 1
                session.conn.close()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for session in idle:
            session.conn.close()


# -- asyncio ---------------------------------------------------------------------------------


@dataclass
class _AsyncSession:
    conn: psycopg.AsyncConnection[Any]
    lua: RedisStorage


class _AsyncPool:
    """`_Pool` for one event loop."""

    def __init__(self, make: Callable[[], Any], size: int, timeout: float) -> None:
        self._make, self._size, self._timeout = make, size, timeout
        self._idle: list[_AsyncSession] = []
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_AsyncSession]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._size)
        # Waiting for a free connection is queueing behind this process's own calls, not an
        # outage: no time limit (each holder is bounded by the connect and statement timeouts).
        await self._slots.acquire()
        session: _AsyncSession | None = None
        try:
            session = self._idle.pop() if self._idle else await self._make()
            yield session
        finally:
            if session is not None:
                if session.conn.closed or session.conn.broken or self._closed:
                    await session.conn.close()
                else:
                    self._idle.append(session)
            self._slots.release()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for session in idle:
            await session.conn.close()
