"""The ledger over Redis, without I/O: which commands each operation sends, what the replies mean.

Each operation is a *flow*: a generator that yields a batch of `Call`s (sent as one round trip,
pipelined when there are several) and receives their replies, until it returns its result. The
sync and asyncio storages (`credici_redis.storage`) only drive flows; everything else is here:

    operation        script              reply becomes
    add              lua/add.lua         Transaction        (parse_transaction)
    subtract         lua/subtract.lua    Transaction        (parse_transaction)
    balance          lua/balance.lua     int
    start_cycle      lua/start_cycle.lua Cycle              (parse_cycle)
    get_cycle        lua/cycle.lua       Cycle | None       (parse_cycle)
    cancel_cycle     lua/cancel_cycle.lua Cycle             (parse_cycle)
    audit            lua/audit.lua + XRANGE pages   AuditReport (credici_redis._core.audit.replay)
    scan_users       SCAN                (cursor, user ids)
    history          balance.lua + XREVRANGE pages   list[Transaction], newest first

Coded replies from the scripts become typed errors in `raise_for_code`. Every script may answer
SCHEDULE (a calendar cycle needs boundaries only Python can compute): `Ledger._scheduled` answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, cast

from credici_redis._core import audit as _audit
from credici_redis._core import keys as _keys
from credici_redis._core import schedule as _schedule
from credici_redis._core import scripts as _scripts
from credici_redis._core.requests import (
    AddRequest,
    CaptureRequest,
    HistoryRequest,
    ReserveRequest,
    ReverseRequest,
    StartCycleRequest,
    SubtractRequest,
    decode_period,
)
from credici_redis._core.scripts import Script
from credici_redis._core.time import from_ms
from credici_redis.errors import (
    AlreadyReversedError,
    CaptureExceedsHoldError,
    CrediciError,
    CycleNotFoundError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InconsistentStateError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    NotReversibleError,
    StorageError,
    TransactionArchivedError,
    TransactionNotFoundError,
)
from credici_redis.models import (
    AuditReport,
    BalanceDetails,
    BalanceEvent,
    Bucket,
    Cycle,
    CycleStatus,
    Hold,
    HoldStatus,
    Transaction,
    TransactionKind,
)

T = TypeVar("T")

SCHEDULE_ATTEMPTS = 5
"""A SCHEDULE reply is answered at most this often per call (a racing renewal may move it)."""
CATCHUP_STEPS = 10_000
"""A script brings its user up to now in steps of at most 64 events (expiries, hold ttls,
renewals; lua/_ledger.lua MAX_EVENTS), replying CATCHUP while more is due: it is sent again, up
to this often (640,000 events: far more than any user can have due)."""

HISTORY_PAGE = 1000
"""Entries fetched per XREVRANGE when reading history, so no single reply grows unbounded."""

KINDS: dict[str, TransactionKind] = {
    "a": "add",
    "s": "subtract",
    "e": "expire",
    "c": "cycle_start",
    "r": "reserve",
    "p": "capture",
    "l": "release",
    "v": "reverse",
}


@dataclass(frozen=True, slots=True)
class Call:
    """One Redis command; `script` is set for EVALSHA so a driver can reload it on NOSCRIPT."""

    args: tuple[str | int, ...]
    script: Script | None = None


Flow = Generator[list[Call], list[Any], T]


def text(value: Any) -> str:
    """Replies are bytes, or str when the caller's client decodes responses."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _clock(now_ms: int | None) -> str:
    return "" if now_ms is None else str(now_ms)


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Item(Generic[T]):
    """One operation of a batch: its call (given a schedule extension) and its reply's parser."""

    call: Callable[[str], Call]
    parse: Callable[[Any], T]


def _sent(calls: list[Call]) -> Flow[list[Any]]:
    """Send calls whose errors are the operation's: the first error reply is raised."""
    replies = yield calls
    for reply in replies:
        if isinstance(reply, CrediciError):
            raise reply
    return replies


def catching_up(reply: Any) -> bool:
    """A CATCHUP reply: the script applied a step of what fell due, not the operation yet."""
    return isinstance(reply, list) and len(reply) == 1 and text(reply[0]) == "CATCHUP"


def inconsistent(reply: Any) -> InconsistentStateError | None:
    """An INCONSISTENT reply (the user's keys were changed from outside): its error."""
    if isinstance(reply, list) and len(reply) == 2 and text(reply[0]) == "INCONSISTENT":
        return InconsistentStateError(text(reply[1]))
    return None


def _schedule_kept_moving() -> StorageError:
    return StorageError("the cycle's calendar schedule kept moving; try again")


def _still_catching_up() -> StorageError:
    return StorageError(f"the user was still catching up after {CATCHUP_STEPS:,} steps")


def schedule_extension(reply: Any) -> str | None:
    """For a SCHEDULE reply, the calendar boundaries to send back; None for any other reply."""
    if not (isinstance(reply, list) and reply and text(reply[0]) == "SCHEDULE"):
        return None
    now, anchor, index, period, tz = (text(v) for v in reply[1:6])
    found = _schedule.boundaries_from(int(anchor), period, tz, int(index), int(now))
    return f"{index}:" + ",".join(map(str, found))


class Ledger:
    """Builds the calls of every operation for one namespace and parses their replies."""

    def __init__(self, namespace: str, idempotency_ttl_ms: int) -> None:
        self.namespace = _keys.check_namespace(namespace)
        self.idempotency_ttl_ms = idempotency_ttl_ms

    def _script(
        self, script: Script, user_id: str, idempotency_key: str | None, *argv: str | int
    ) -> Call:
        keys: list[str] = list(_keys.user_keys(self.namespace, user_id))
        if idempotency_key is not None:
            keys.append(_keys.idempotency_key(self.namespace, user_id, idempotency_key))
        return Call(("EVALSHA", script.sha, len(keys), *keys, *argv), script)

    def _scheduled(self, batch: Callable[[str], list[Call]]) -> Flow[list[Any]]:
        """Send `batch(extension)`; when its first script asks for calendar boundaries (SCHEDULE),
        compute them and send it again with them. Nothing was written by a SCHEDULE reply. While
        it replies CATCHUP (a step of a long catch-up was applied), send it again as it was."""
        extension = ""
        schedules = 0
        for _ in range(CATCHUP_STEPS):
            replies = yield from _sent(batch(extension))
            if catching_up(replies[0]):
                continue
            refused = inconsistent(replies[0])
            if refused is not None:
                raise refused
            asked = schedule_extension(replies[0])
            if asked is None:
                return replies
            schedules += 1
            if schedules >= SCHEDULE_ATTEMPTS:
                raise _schedule_kept_moving()
            extension = asked
        raise _still_catching_up()

    def _many(self, items: Sequence[Item[T] | CrediciError]) -> Flow[list[T | CrediciError]]:
        """Many independent calls in one round trip; each item's result, or its error, in order.
        Items that are already an error (bad input) are passed through without a call. An item
        whose script asked for a schedule, or replied CATCHUP, goes out again (as `_scheduled`)."""
        results: list[T | CrediciError] = [
            item if isinstance(item, CrediciError) else StorageError("not sent") for item in items
        ]
        pending = [i for i, item in enumerate(items) if not isinstance(item, CrediciError)]
        extensions = dict.fromkeys(pending, "")
        schedules = dict.fromkeys(pending, 0)
        for _ in range(CATCHUP_STEPS):
            if not pending:
                break
            calls = [cast(Item[T], items[i]).call(extensions[i]) for i in pending]
            replies = yield calls
            again = []
            for i, reply in zip(pending, replies, strict=True):
                if catching_up(reply):
                    again.append(i)
                    continue
                refused = inconsistent(reply)
                if refused is not None:
                    results[i] = refused
                    continue
                asked = schedule_extension(reply)
                if asked is not None and schedules[i] + 1 < SCHEDULE_ATTEMPTS:
                    schedules[i] += 1
                    extensions[i] = asked
                    again.append(i)
                    continue
                if asked is not None:
                    results[i] = StorageError(
                        "the cycle's calendar schedule kept moving; try again"
                    )
                    continue
                try:
                    results[i] = cast(Item[T], items[i]).parse(reply)
                except CrediciError as error:
                    results[i] = error
            pending = again
        for i in pending:
            results[i] = _still_catching_up()
        return results

    def subtract_many(
        self, reqs: Sequence[SubtractRequest | CrediciError]
    ) -> Flow[list[Transaction | CrediciError]]:
        return (yield from self._many([self._subtract_item(r) for r in reqs]))

    def add_many(
        self, reqs: Sequence[AddRequest | CrediciError]
    ) -> Flow[list[Transaction | CrediciError]]:
        return (yield from self._many([self._add_item(r) for r in reqs]))

    def _subtract_item(
        self, req: SubtractRequest | CrediciError
    ) -> Item[Transaction] | CrediciError:
        if isinstance(req, CrediciError):
            return req
        return Item(
            lambda extension: self._subtract_call(req, extension),
            lambda reply: parse_transaction(req.user_id, reply, req.amount, req.idempotency_key),
        )

    def _add_item(self, req: AddRequest | CrediciError) -> Item[Transaction] | CrediciError:
        if isinstance(req, CrediciError):
            return req
        return Item(
            lambda extension: self._add_call(req, extension),
            lambda reply: parse_transaction(req.user_id, reply, req.amount, req.idempotency_key),
        )

    def _add_call(self, req: AddRequest, extension: str) -> Call:
        return self._script(
            _scripts.ADD, req.user_id, req.idempotency_key,
            _clock(req.now_ms), extension, req.amount, _opt(req.expire_at_ms), _opt(req.ttl_ms),
            req.fingerprint, self.idempotency_ttl_ms, req.idempotency_key or "",
            req.metadata_json, req.priority,
        )  # fmt: skip

    def _subtract_call(self, req: SubtractRequest, extension: str) -> Call:
        return self._script(
            _scripts.SUBTRACT, req.user_id, req.idempotency_key,
            _clock(req.now_ms), extension, req.amount, req.fingerprint, self.idempotency_ttl_ms,
            req.idempotency_key or "", req.metadata_json,
        )  # fmt: skip

    def add(self, req: AddRequest) -> Flow[Transaction]:
        (reply,) = yield from self._scheduled(lambda extension: [self._add_call(req, extension)])
        return parse_transaction(req.user_id, reply, req.amount, req.idempotency_key)

    def subtract(self, req: SubtractRequest) -> Flow[Transaction]:
        (reply,) = yield from self._scheduled(
            lambda extension: [self._subtract_call(req, extension)]
        )
        return parse_transaction(req.user_id, reply, req.amount, req.idempotency_key)

    def balance(self, user_id: str, now_ms: int | None) -> Flow[int]:
        (reply,) = yield from self._scheduled(
            lambda extension: [
                self._script(_scripts.BALANCE, user_id, None, _clock(now_ms), extension)
            ]
        )
        return int(text(reply[1]))

    def reserve(self, req: ReserveRequest) -> Flow[Hold]:
        (reply,) = yield from self._scheduled(lambda extension: [
            self._script(
                _scripts.RESERVE, req.user_id, req.idempotency_key,
                _clock(req.now_ms), extension, req.amount, req.ttl_ms, req.fingerprint,
                self.idempotency_ttl_ms, req.idempotency_key or "", req.metadata_json,
            )
        ])  # fmt: skip
        return parse_hold(req.user_id, reply, req.amount, key=req.idempotency_key)

    def capture(self, req: CaptureRequest) -> Flow[Transaction]:
        (reply,) = yield from self._scheduled(lambda extension: [
            self._script(
                _scripts.CAPTURE, req.user_id, req.idempotency_key,
                _clock(req.now_ms), extension, req.local_id, _opt(req.amount), req.fingerprint,
                self.idempotency_ttl_ms, req.idempotency_key or "",
            )
        ])  # fmt: skip
        fields = _checked_hold(reply, req.hold_id, req.amount, req.user_id, req.idempotency_key)
        tx = _transaction(req.user_id, fields)
        return tx.model_copy(update={"hold_id": req.hold_id, "captured": int(fields[9])})

    def release(self, user_id: str, local_id: str, now_ms: int | None) -> Flow[Hold]:
        (reply,) = yield from self._scheduled(lambda extension: [
            self._script(_scripts.RELEASE, user_id, None, _clock(now_ms), extension, local_id)
        ])  # fmt: skip
        return parse_hold(user_id, reply, 0, _keys.hold_id(user_id, local_id))

    def reverse(self, req: ReverseRequest) -> Flow[Transaction]:
        (reply,) = yield from self._scheduled(lambda extension: [
            self._script(
                _scripts.REVERSE, req.user_id, req.idempotency_key,
                _clock(req.now_ms), extension, req.entry_id, req.fingerprint,
                self.idempotency_ttl_ms, req.idempotency_key or "",
            )
        ])  # fmt: skip
        if isinstance(reply, list) and reply:
            code = text(reply[0])
            if code == "NO_TX":
                raise TransactionNotFoundError(req.transaction_id)
            if code == "ARCHIVED":
                raise TransactionArchivedError(req.transaction_id)
            if code == "NOT_REVERSIBLE":
                raise NotReversibleError(req.transaction_id, KINDS.get(text(reply[1]), "?"))
            if code == "REVERSED":
                reversal = _keys.transaction_id(req.user_id, text(reply[1]))
                raise AlreadyReversedError(req.transaction_id, reversal)
        f = _checked(reply, req.user_id, 0, req.idempotency_key)
        return _transaction(req.user_id, f).model_copy(
            update={"related_id": req.transaction_id, "unrestored": int(f[9])}
        )

    def balance_details(self, user_id: str, now_ms: int | None) -> Flow[BalanceDetails]:
        (reply,) = yield from self._scheduled(
            lambda extension: [
                self._script(_scripts.DETAILS, user_id, None, _clock(now_ms), extension)
            ]
        )
        f = _checked(reply, user_id, 0, None)
        balance, limit, held = int(f[1]), int(f[2]), int(f[3])
        buckets = [
            Bucket(amount=int(f[i + 1]), expire_at=bucket_expiry(f[i]), priority=int(f[i + 2]))
            for i in range(4, len(f), 3)
        ]
        return BalanceDetails(
            user_id=user_id,
            balance=balance,
            available=balance + limit,
            held=held,
            debt=max(-balance, 0),
            credit_limit=limit,
            buckets=buckets,
        )

    def set_credit_limit(self, user_id: str, limit: int, now_ms: int | None) -> Flow[None]:
        yield from self._scheduled(
            lambda extension: [
                self._script(
                    _scripts.SET_CREDIT_LIMIT, user_id, None, _clock(now_ms), extension, limit
                )
            ]
        )

    def start_cycle(self, req: StartCycleRequest) -> Flow[Cycle]:
        now_ms, first_ends = req.now_ms, ""
        if req.duration_ms is None:
            # A calendar period: its boundaries come from the start, so fix the start first.
            if now_ms is None:
                (server_time,) = yield from _sent([Call(("TIME",))])
                now_ms = int(text(server_time[0])) * 1000 + int(text(server_time[1])) // 1000
            first_ends = ",".join(
                map(str, _schedule.boundaries_from(now_ms, req.period, req.tz, 1, now_ms))
            )
        (reply,) = yield from self._scheduled(lambda extension: [
            self._script(
                _scripts.START_CYCLE, req.user_id, req.idempotency_key,
                _clock(now_ms), extension, req.amount, _opt(req.duration_ms), first_ends,
                req.period, req.tz, int(req.renew), _opt(req.rollover), req.fingerprint,
                self.idempotency_ttl_ms, req.idempotency_key or "",
            )
        ])  # fmt: skip
        cycle = parse_cycle(req.user_id, reply, req.amount, req.idempotency_key)
        if cycle is None:
            raise StorageError(f"start_cycle got no cycle back: {reply!r}")
        return cycle

    def get_cycle(self, user_id: str, now_ms: int | None) -> Flow[Cycle | None]:
        (reply,) = yield from self._scheduled(
            lambda extension: [
                self._script(_scripts.CYCLE, user_id, None, _clock(now_ms), extension)
            ]
        )
        return parse_cycle(user_id, reply)

    def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Flow[Cycle]:
        (reply,) = yield from self._scheduled(lambda extension: [
            self._script(
                _scripts.CANCEL_CYCLE, user_id, None, _clock(now_ms), extension, int(forfeit)
            )
        ])  # fmt: skip
        cycle = parse_cycle(user_id, reply)
        if cycle is None:
            raise CycleNotFoundError(user_id)
        return cycle

    def audit(self, user_id: str, now_ms: int | None) -> Flow[AuditReport]:
        snapshot = yield from self.audit_snapshot(user_id, now_ms)
        return snapshot.report(())

    def audit_snapshot(self, user_id: str, now_ms: int | None) -> Flow[AuditSnapshot]:
        """A snapshot of balance and buckets, then the history up to it, oldest first, in pages."""
        (reply,) = yield from self._scheduled(
            lambda extension: [
                self._script(_scripts.AUDIT, user_id, None, _clock(now_ms), extension)
            ]
        )
        f = _checked(reply, user_id, 0, None)
        balance, last, stream_last, held, trimmed = int(f[1]), f[2], f[3], int(f[4]), f[5]
        buckets = {f[i]: int(f[i + 1]) for i in range(6, len(f), 2)}
        stream = _keys.user_keys(self.namespace, user_id).history
        entries: list[tuple[str, dict[str, str]]] = []
        start = "-"
        while last != "0-0":
            (page,) = yield from _sent(
                [Call(("XRANGE", stream, start, last, "COUNT", HISTORY_PAGE))]
            )
            entries.extend((text(e[0]), _fields(e[1])) for e in page)
            if len(page) < HISTORY_PAGE:
                break
            start = "(" + text(page[-1][0])
        return AuditSnapshot(user_id, balance, buckets, held, entries, last, stream_last, trimmed)

    def set_low_balance_threshold(
        self, user_id: str, threshold: int | None, now_ms: int | None
    ) -> Flow[None]:
        yield from self._scheduled(lambda extension: [
            self._script(
                _scripts.SET_LOW_BALANCE_THRESHOLD, user_id, None, _clock(now_ms), extension,
                _opt(threshold),
            )
        ])  # fmt: skip

    def find_event_streams(self, cursor: int, count: int) -> Flow[tuple[int, list[str]]]:
        """One SCAN step over the namespace's event streams (one per slot that had an event)."""
        pattern = _keys.events_pattern(self.namespace)
        (reply,) = yield from _sent(
            [Call(("SCAN", cursor, "MATCH", pattern, "COUNT", count, "TYPE", "stream"))]
        )
        next_cursor, keys = reply
        return int(text(next_cursor)), [text(k) for k in keys]

    def join_group(self, streams: list[str], group: str) -> Flow[None]:
        """Create the consumer group on each stream, from its first event (once is enough)."""
        replies = yield [Call(("XGROUP", "CREATE", stream, group, "0")) for stream in streams]
        for reply in replies:
            if isinstance(reply, CrediciError) and "BUSYGROUP" not in str(reply.__cause__):
                raise reply

    def read_events(
        self, streams: list[str], group: str, consumer: str, count: int, claim_idle_ms: int | None
    ) -> Flow[list[BalanceEvent]]:
        """New events of every stream, one call per stream (no call crosses a slot); with
        claim_idle_ms, also events another consumer read but did not acknowledge for that long."""
        calls = [
            Call(("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", stream, ">"))
            for stream in streams
        ]
        if claim_idle_ms is not None:
            calls += [
                Call(("XAUTOCLAIM", stream, group, consumer, claim_idle_ms, "0-0", "COUNT", count))
                for stream in streams
            ]
        replies = yield calls
        found: list[BalanceEvent] = []
        for i, reply in enumerate(replies):
            stream = streams[i % len(streams)]
            if isinstance(reply, CrediciError):
                if "NOGROUP" in str(reply.__cause__):
                    continue  # a stream made after the group was joined: joined next time
                raise reply
            if not reply:
                continue
            entries = reply[1] if i >= len(streams) else reply[0][1]
            found.extend(parse_event(self.namespace, stream, e) for e in entries if e[1])
        return found

    def ack_events(self, events: list[BalanceEvent], group: str) -> Flow[None]:
        calls = []
        for event in events:
            entry_id, _, tag = event.event_id.partition("@")
            calls.append(Call(("XACK", f"{self.namespace}:{{{tag}}}:ev", group, entry_id)))
        if calls:
            yield from _sent(calls)

    def scan_users(self, cursor: int, count: int) -> Flow[tuple[int, list[str]]]:
        """One SCAN step over the namespace's users: (next cursor, user ids); cursor 0 ends."""
        (reply,) = yield from _sent(
            [Call(("SCAN", cursor, "MATCH", _keys.user_pattern(self.namespace), "COUNT", count))]
        )
        next_cursor, keys = reply
        users = []
        for key in map(text, keys):
            # The pattern also matches other keys that end in "}:s" (an idempotency record of
            # key "x}:s"): a user is one whose state key this is.
            user = _keys.user_from_key(self.namespace, key)
            if _keys.user_keys(self.namespace, user).state == key:
                users.append(user)
        return int(text(next_cursor)), users

    def history(self, req: HistoryRequest) -> Flow[list[Transaction]]:
        """Newest first, in pages of at most HISTORY_PAGE entries, up to `req.limit`; renewals
        and expiry are recorded first so the history is current."""
        stream = _keys.user_keys(self.namespace, req.user_id).history
        high = "+" if req.to_ms is None else str(req.to_ms)  # incomplete id: up to <ms>-max
        if req.before is not None and (req.to_ms is None or entry_key(req.before)[0] <= req.to_ms):
            high = "(" + req.before
        low = "-" if req.from_ms is None else str(max(req.from_ms, 0))
        if req.to_ms is not None and req.to_ms < 0:
            return []
        wanted = req.limit if req.limit is not None else float("inf")
        count = int(min(wanted, HISTORY_PAGE))
        _, page = yield from self._scheduled(lambda extension: [
            self._script(_scripts.BALANCE, req.user_id, None, _clock(req.now_ms), extension),
            Call(("XREVRANGE", stream, high, low, "COUNT", count)),
        ])  # fmt: skip
        found: list[Transaction] = []
        while True:
            found.extend(parse_entry(req.user_id, entry) for entry in page)
            if len(page) < count or len(found) >= wanted:
                return found
            count = int(min(wanted - len(found), HISTORY_PAGE))
            after = "(" + text(page[-1][0])
            (page,) = yield from _sent([Call(("XREVRANGE", stream, after, low, "COUNT", count))])


def entry_key(entry_id: str) -> tuple[int, int]:
    """A history entry id "<ms>-<seq>" as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class AuditSnapshot:
    """What Redis holds of a user, and the history it still keeps, read by `Ledger.audit_snapshot`.

    `trimmed`: entries before this id were archived to PostgreSQL and trimmed from Redis ('' =
    none); the audit then needs them (`report(archived)`), read after this snapshot so none can be
    trimmed between the two reads unseen.
    """

    user_id: str
    balance: int
    buckets: dict[str, int]
    held: int
    entries: list[tuple[str, dict[str, str]]]
    last: str
    stream_last: str
    trimmed: str

    def report(self, archived: Sequence[tuple[str, dict[str, str]]]) -> AuditReport:
        """The audit, with the archived entries (any order, duplicates of kept ones allowed)."""
        kept = {entry_id for entry_id, _ in self.entries}
        older = sorted(
            ((i, f) for i, f in archived if i not in kept and entry_key(i) <= entry_key(self.last)),
            key=lambda e: entry_key(e[0]),
        )
        entries = [*older, *self.entries]
        report = _audit.replay(self.user_id, entries, self.balance, self.buckets, self.held)
        problems = list(report.problems)
        if self.trimmed and not archived:
            problems.insert(
                0,
                f"the history before {self.trimmed} was archived to PostgreSQL: audit with the "
                "archive (archive_url) to replay it",
            )
        ends = [i for i in (self.stream_last, entries[-1][0] if entries else "0-0") if i != "0-0"]
        newest = max(ends, key=entry_key, default="0-0")  # an empty stream may be all archived
        if newest != self.last:
            problems.append(f"the history ends at {newest}, the balance knows it up to {self.last}")
        if problems == report.problems:
            return report
        return report.model_copy(update={"ok": False, "problems": problems})


def raise_for_code(
    code: str, reply: Sequence[Any], user_id: str, amount: int, key: str | None
) -> None:
    """Turn a script's coded domain reply into its typed error; unknown codes are bugs."""
    if code == "INSUFFICIENT":
        raise InsufficientCreditsError(user_id, amount, int(text(reply[1])))
    if code == "IDEM_CONFLICT":
        raise IdempotencyConflictError(user_id, key or "")
    if code == "EXPIRY_PAST":
        raise InvalidExpiryError(
            f"the expiry must be after the storage's current time ({from_ms(int(text(reply[1])))})"
        )
    if code == "BALANCE_LIMIT":
        raise InvalidAmountError(
            f"adding {amount} to a balance of {text(reply[1])} would pass the limit of 2**53-1",
            amount=amount,
        )
    raise StorageError(f"unexpected reply from a credici script: {list(reply)!r}")


def _checked(reply: Any, user_id: str, amount: int, key: str | None) -> list[str]:
    if isinstance(reply, CrediciError):
        raise reply
    if not isinstance(reply, list) or not reply:
        raise StorageError(f"unexpected reply from a credici script: {reply!r}")
    fields = [text(v) for v in reply]
    if fields[0] != "OK":
        raise_for_code(fields[0], fields, user_id, amount, key)
    return fields


def _transaction(user_id: str, f: list[str]) -> Transaction:
    # f: OK, id, kind, amount, balance_after, expire_at, idempotency key, metadata JSON
    return _build(user_id, f[1], f[2], f[3], f[4], f[5] or None, f[6] or None, f[7] or None)


def parse_transaction(user_id: str, reply: Any, amount: int, key: str | None) -> Transaction:
    return _transaction(user_id, _checked(reply, user_id, amount, key))


STATUSES: dict[str, CycleStatus] = {"a": "active", "c": "canceled", "e": "ended"}


def parse_cycle(user_id: str, reply: Any, amount: int = 0, key: str | None = None) -> Cycle | None:
    """A cycle_reply (see lua/_ledger.lua), or None for NONE / NO_CYCLE. amount and key: the
    request's, for the facts of its errors (start_cycle)."""
    if isinstance(reply, list) and reply and text(reply[0]) in ("NONE", "NO_CYCLE"):
        return None
    f = _checked(reply, user_id, amount, key)
    # OK, ci, cs, ce, ca, cg, cu, cad, status, crn, cro, cp, ctz
    return Cycle(
        user_id=user_id,
        cycle_id=_keys.transaction_id(user_id, f[1]),
        started_at=from_ms(int(f[2])),
        ends_at=from_ms(int(f[3])),
        amount=int(f[4]),
        granted=int(f[5]),
        used=int(f[6]),
        added=int(f[7]),
        status=STATUSES[f[8]],
        renew=f[9] == "1",
        rollover=None if f[10] == "" else int(f[10]),
        period=decode_period(f[11]),
        tz=f[12],
    )


NEVER_MS = 999_999_999_999_999


def bucket_expiry(bucket_id: str) -> datetime | None:
    """A bucket id starts with its expiry in ms (15 digits; all nines: never)."""
    ms = int(bucket_id[:15])
    return None if ms == NEVER_MS else from_ms(ms)


def _fields(raw: Any) -> dict[str, str]:
    """A stream entry's fields: a dict (RESP2 callbacks) or a flat list."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    return {text(raw[i]): text(raw[i + 1]) for i in range(0, len(raw), 2)}


def parse_entry(user_id: str, entry: Any) -> Transaction:
    """One XRANGE entry: (id, fields)."""
    entry_id, f = entry[0], _fields(entry[1])
    tx = _build(user_id, text(entry_id), f["k"], f["n"], f["b"], f.get("x"), f.get("i"), f.get("m"))
    update: dict[str, Any] = {}
    if "h" in f and f["k"] != "e":
        update["hold_id"] = _keys.hold_id(user_id, f["h"])
        if "q" in f:
            update["captured"] = int(f["q"])
    if "o" in f:
        update["related_id"] = _keys.transaction_id(user_id, f["o"])
        update["unrestored"] = int(f.get("w", "0"))
    if "v" in f:
        update["periods"] = int(f["v"])
    return tx.model_copy(update=update) if update else tx


EVENT_KINDS: dict[str, Literal["low_balance", "depleted"]] = {
    "low_balance": "low_balance",
    "depleted": "depleted",
}


def parse_event(namespace: str, stream: str, entry: Any) -> BalanceEvent:
    entry_id, f = text(entry[0]), _fields(entry[1])
    user_id = _keys.user_from_key(namespace, f["h"])
    tag = stream[len(namespace) + 2 : stream.index("}")]
    return BalanceEvent(
        event_id=f"{entry_id}@{tag}",
        kind=EVENT_KINDS[f["t"]],
        user_id=user_id,
        balance=int(f["b"]),
        threshold=int(f["l"]),
        transaction_id=_keys.transaction_id(user_id, f["e"]),
        created_at=from_ms(int(entry_id.partition("-")[0])),
    )


HOLD_STATUSES: dict[str, HoldStatus] = {
    "active": "active",
    "captured": "captured",
    "released": "released",
    "expired": "expired",
}


def _checked_hold(
    reply: Any, hold_id: str, amount: int | None, user_id: str = "", key: str | None = None
) -> list[str]:
    """A hold script's reply, with the hold's own errors raised."""
    if isinstance(reply, list) and reply:
        code = text(reply[0])
        if code == "NO_HOLD":
            raise HoldNotFoundError(hold_id)
        if code == "HOLD_DONE":
            raise HoldFinishedError(hold_id, text(reply[1]))
        if code == "HOLD_EXCEEDED":
            raise CaptureExceedsHoldError(hold_id, amount or 0, int(text(reply[1])))
    return _checked(reply, user_id, amount or 0, key)


def parse_hold(
    user_id: str, reply: Any, amount: int, hold_id: str = "", key: str | None = None
) -> Hold:
    # OK, hold id, amount, status, created, expires, captured[, reserve entry id]
    if isinstance(reply, list) and reply and text(reply[0]) == "INSUFFICIENT":
        raise InsufficientCreditsError(user_id, amount, int(text(reply[1])))
    f = _checked_hold(reply, hold_id, amount, user_id, key)
    return Hold(
        hold_id=_keys.hold_id(user_id, f[1]),
        user_id=user_id,
        amount=int(f[2]),
        status=HOLD_STATUSES[f[3]],
        created_at=from_ms(int(f[4])),
        expires_at=from_ms(int(f[5])),
        captured=int(f[6]),
        transaction_id=_keys.transaction_id(user_id, f[7]) if len(f) > 7 else None,
    )


def _build(
    user_id: str,
    entry_id: str,
    kind: str,
    amount: str,
    balance_after: str,
    expire_at: str | None,
    idempotency_key: str | None,
    metadata: str | None,
) -> Transaction:
    return Transaction(
        transaction_id=_keys.transaction_id(user_id, entry_id),
        user_id=user_id,
        kind=KINDS[kind],
        amount=int(amount),
        created_at=from_ms(int(entry_id.partition("-")[0])),
        expire_at=None if expire_at is None else from_ms(int(expire_at)),
        balance_after=int(balance_after),
        idempotency_key=idempotency_key,
        metadata=json.loads(metadata) if metadata else {},
    )
