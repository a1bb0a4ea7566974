"""The ledger over Redis, without I/O: how any operation becomes commands, and its replies a result.

Each operation is a *flow*: a generator that yields a batch of `Call`s (sent as one round trip,
pipelined when there are several) and receives their replies, until it returns its result. The
sync and asyncio storages (`credici_redis.storage`) only drive flows; `Ledger.execute(op, req)`
makes the flow of any `Operation` (`credici_redis._ops`): its script's call, built from the
operation's ARGV names, then its reply parsed by the operation, or turned into the error its code
means (`credici_redis._core.codes`).

Every script may also answer SCHEDULE (a calendar cycle needs boundaries only Python can compute),
CATCHUP (a step of a long catch-up was applied) or INCONSISTENT: `Ledger.scheduled` answers them.
The namespace-wide flows (users, event streams) are here too: they run no user script.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, cast

from credici_redis._core import keys as _keys
from credici_redis._core import schedule as _schedule
from credici_redis._core.codes import KINDS, refusal
from credici_redis._core.observe import QUIET, Observer
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.scripts import Script
from credici_redis._core.time import from_ms
from credici_redis.errors import CrediciError, InconsistentStateError, StorageError
from credici_redis.models import BalanceEvent, Transaction

T = TypeVar("T")
Req = TypeVar("Req")
Res = TypeVar("Res")

SCHEDULE_ATTEMPTS = 5
"""A SCHEDULE reply is answered at most this often per call (a racing renewal may move it)."""
CATCHUP_STEPS = 10_000
"""A script brings its user up to now in steps of at most 64 events (expiries, hold ttls,
renewals; lua/_ledger.lua MAX_EVENTS), replying CATCHUP while more is due: it is sent again, up
to this often (640,000 events: far more than any user can have due)."""

HISTORY_PAGE = 1000
"""Entries fetched per XRANGE/XREVRANGE, so no single reply grows unbounded."""

TX_REPLY = (
    "OK", "id", "kind", "amount", "balance_after", "expire_at", "idempotency_key", "metadata",
)  # fmt: skip
"""tx_reply (lua/_ledger.lua): what every script that records a change replies."""


@dataclass(frozen=True, slots=True)
class Call:
    """One Redis command; `script` is set for FCALL and EVALSHA, so a driver can send its
    source when the server lacks it (function not found, NOSCRIPT).
    `entry`: a history entry the script reads besides the newest (the PostgreSQL storage loads
    it), from the operation's `reads_entry`."""

    args: tuple[str | int, ...]
    script: Script | None = None
    entry: str | None = None


Flow = Generator[list[Call], list[Any], T]


def text(value: Any) -> str:
    """Replies are bytes, or str when the caller's client decodes responses."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Item(Generic[T]):
    """One operation of a batch: its call (given a schedule extension) and its reply's parser."""

    call: Callable[[str], Call]
    parse: Callable[[Any], T]


def sent(calls: list[Call]) -> Flow[list[Any]]:
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


def _script_name(call: Call) -> str:
    return call.script.name if call.script is not None else str(call.args[0])


def _still_catching_up() -> StorageError:
    return StorageError(f"the user was still catching up after {CATCHUP_STEPS:,} steps")


def answer(reply: Any, extension: str) -> str | None:
    """For a reply asking for calendar facts, the extension (ARGV 2, "<cycle>|<period>|<zone>")
    to send the call again with; None for any other reply. SCHEDULE asks for a cycle's
    boundaries, PERIOD for the budget period containing the server's now, ZONE for the UTC
    offsets of the usage zone (lua/_ledger.lua says what each part holds)."""
    if not (isinstance(reply, list) and reply):
        return None
    code = text(reply[0])
    cycle, _, rest = extension.partition("|")
    period, _, usage_zone = rest.partition("|")
    if code == "SCHEDULE":
        now, anchor, index, every, tz = (text(v) for v in reply[1:6])
        found = _schedule.boundaries_from(int(anchor), every, tz, int(index), int(now))
        cycle = f"{index}:" + ",".join(map(str, found))
    elif code == "PERIOD" and len(reply) == 4:
        period = _schedule.period_extension([text(v) for v in reply], period)
    elif code == "ZONE" and len(reply) == 4:
        usage_zone = _schedule.zone_extension([text(v) for v in reply])
    else:
        return None
    return extension_of(cycle, period, usage_zone)


def extension_of(cycle: str, period: str, usage_zone: str) -> str:
    """ARGV 2 from its parts, trailing empty parts left out."""
    if usage_zone:
        return f"{cycle}|{period}|{usage_zone}"
    return f"{cycle}|{period}" if period else cycle


def encode(value: Any) -> str | int:
    """A request field as an ARGV value: None is '', a bool 0 or 1."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    return cast(str | int, value)


ZONE_BACK_MS = 2 * 86_400_000
"""How far back the usage zone's offsets sent with every call reach (the client's clock may be
behind the server's, and a user's last entry a little older)."""


class Ledger:
    """Builds the calls of every operation for one namespace and parses their replies."""

    def __init__(self, namespace: str, idempotency_ttl_ms: int, usage_tz: str = "UTC") -> None:
        self.namespace = _keys.check_namespace(namespace)
        self.idempotency_ttl_ms = idempotency_ttl_ms
        self.usage_tz = usage_tz
        self._zone: tuple[float, str] = (float("inf"), "")  # (renew after, extension)
        if usage_tz != "UTC":
            self._zone = (0.0, "")
        self.events_kept_ms = EVENTS_KEPT_MS
        """Acknowledged events stay this long in their stream (`_trim_acknowledged`)."""
        self.observer: Observer = QUIET
        """Hears the catch-up steps, retries and events of the storage (telemetry)."""
        self.functions = True
        """Calls go as FCALL of the Functions library (`credici_redis._core.scripts.LIBRARY`);
        False: as EVALSHA of each script (a storage sets it where the library cannot be
        loaded)."""

    @property
    def extension(self) -> str:
        """ARGV 2 of a first call: '' for UTC usage days; else the usage zone with its UTC
        offsets from two days ago on (lua/_ledger.lua, "Usage rollups"), made once a day, so
        that a script asks for them (ZONE) only for a user idle since before that."""
        renew, extension = self._zone
        if time.time() < renew:
            return extension
        now = int(time.time() * 1000)
        until, offsets = _schedule.zone_offsets(self.usage_tz, now - ZONE_BACK_MS, now)
        table = ";".join(f"{t}:{o}" for t, o in offsets)
        extension = extension_of("", "", f"{self.usage_tz}={until};{table}")
        self._zone = (time.time() + 86_400, extension)
        return extension

    # -- any operation ---------------------------------------------------------------------------

    def execute(self, op: Operation[Req, Res], req: Req) -> Flow[Res]:
        """The flow of `op` on `req`: its own (`op.flow`), or its script's."""
        if op.flow is not None:
            result = yield from op.flow(self, op, req)
            return cast(Res, result)
        result = yield from self.script_flow(op, req)
        return cast(Res, result)

    def execute_many(
        self, op: Operation[Req, Res], reqs: Sequence[Req | CrediciError]
    ) -> Flow[list[Res | CrediciError]]:
        """Many requests of one operation in one round trip; each result, or its error."""
        return (yield from self._many([self._item(op, req) for req in reqs]))

    def call(self, op: Operation[Any, Any], req: Any, extension: str | None = None) -> Call:
        """The FCALL (or EVALSHA) of `op`'s script for `req`: the user's keys (and the
        idempotency record, under a key), then ARGV by the operation's names."""
        keys: list[str] = list(_keys.user_keys(self.namespace, req.user_id))
        if op.more_keys is not None:
            keys += op.more_keys(self.namespace, req)
        key = getattr(req, "idempotency_key", None)
        if key is not None:
            keys.append(_keys.idempotency_key(self.namespace, req.user_id, key))
        argv = [encode(req.now_ms), self.extension if extension is None else extension]
        for name in op.argv:
            argv.append(self.idempotency_ttl_ms if name == "idempotency_ttl_ms" else encode(
                getattr(req, name)
            ))  # fmt: skip
        entry = None if op.reads_entry is None else getattr(req, op.reads_entry)
        script = op.script
        head = ("FCALL", script.function) if self.functions else ("EVALSHA", script.sha)
        return Call((*head, len(keys), *keys, *argv), script, entry)

    def result(self, op: Operation[Req, Any], req: Req, reply: Any) -> Any:
        """The operation's reply as its result (OK, or a coded outcome), or the error it means."""
        if isinstance(reply, CrediciError):
            raise reply
        if not isinstance(reply, list) or not reply:
            raise StorageError(f"unexpected reply from a credici script: {reply!r}")
        f = [v.decode() if type(v) is bytes else str(v) for v in reply]  # the hot path: inline
        if f[0] == "OK":
            return op.parse(req, Reply(op.reply_index, f))
        outcome = op.outcomes.get(f[0])
        if outcome is not None:
            return outcome(req, f)
        raise refusal(req, f)

    def script_flow(self, op: Operation[Req, Any], req: Req) -> Flow[Any]:
        """Run the operation's script (answering SCHEDULE and CATCHUP), parse its reply."""
        (reply,) = yield from self.scheduled(lambda extension: [self.call(op, req, extension)])
        return self.result(op, req, reply)

    def server_ms(self) -> Flow[int]:
        """The Redis server's clock (TIME), in ms."""
        (reply,) = yield from sent([Call(("TIME",))])
        return time_ms(reply)

    def _item(self, op: Operation[Req, Res], req: Req | CrediciError) -> Item[Res] | CrediciError:
        if isinstance(req, CrediciError):
            return req
        return Item(
            lambda extension: self.call(op, req, extension),
            lambda reply: cast(Res, self.result(op, req, reply)),
        )

    def scheduled(self, batch: Callable[[str], list[Call]]) -> Flow[list[Any]]:
        """Send `batch(extension)`; when its first script asks for calendar boundaries (SCHEDULE),
        compute them and send it again with them. Nothing was written by a SCHEDULE reply. While
        it replies CATCHUP (a step of a long catch-up was applied), send it again as it was."""
        extension = self.extension
        schedules = 0
        for _ in range(CATCHUP_STEPS):
            calls = batch(extension)
            replies = yield from sent(calls)
            if catching_up(replies[0]):
                self.observer.catch_up_step(_script_name(calls[0]))
                continue
            refused = inconsistent(replies[0])
            if refused is not None:
                raise refused
            asked = answer(replies[0], extension)
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
        whose script asked for a schedule, or replied CATCHUP, goes out again (as `scheduled`)."""
        results: list[T | CrediciError] = [
            item if isinstance(item, CrediciError) else StorageError("not sent") for item in items
        ]
        pending = [i for i, item in enumerate(items) if not isinstance(item, CrediciError)]
        extensions = dict.fromkeys(pending, self.extension)
        schedules = dict.fromkeys(pending, 0)
        for _ in range(CATCHUP_STEPS):
            if not pending:
                break
            calls = [cast(Item[T], items[i]).call(extensions[i]) for i in pending]
            replies = yield calls
            again = []
            for i, call, reply in zip(pending, calls, replies, strict=True):
                if catching_up(reply):
                    self.observer.catch_up_step(_script_name(call))
                    again.append(i)
                    continue
                refused = inconsistent(reply)
                if refused is not None:
                    results[i] = refused
                    continue
                asked = answer(reply, extensions[i])
                if asked is not None and schedules[i] + 1 < SCHEDULE_ATTEMPTS:
                    schedules[i] += 1
                    extensions[i] = asked
                    again.append(i)
                    continue
                if asked is not None:
                    results[i] = _schedule_kept_moving()
                    continue
                try:
                    results[i] = cast(Item[T], items[i]).parse(reply)
                except CrediciError as error:
                    results[i] = error
            pending = again
        for i in pending:
            results[i] = _still_catching_up()
        return results

    # -- the namespace: users and event streams (no user script) --------------------------------

    def find_event_streams(self, cursor: int, count: int) -> Flow[tuple[int, list[str]]]:
        """One SCAN step over the namespace's event streams (one per slot that had an event)."""
        pattern = _keys.events_pattern(self.namespace)
        (reply,) = yield from sent(
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

    def last_events(self, streams: list[str], count: int) -> Flow[list[BalanceEvent]]:
        """The newest `count` events of each stream (XREVRANGE: no group, nothing acknowledged),
        one call per stream."""
        replies = yield from sent(
            [Call(("XREVRANGE", s, "+", "-", "COUNT", count)) for s in streams]
        )
        return [
            parse_event(self.namespace, stream, entry)
            for stream, reply in zip(streams, replies, strict=True)
            for entry in reply or ()
            if entry[1]
        ]

    def ack_events(self, events: list[BalanceEvent], group: str) -> Flow[None]:
        """Acknowledge `events` for `group`, then trim each stream they came from of the events
        every group has acknowledged (`_trim_acknowledged`)."""
        calls, streams = [], {}
        for event in events:
            entry_id, _, tag = event.event_id.partition("@")
            stream = _keys.events_key(self.namespace, tag)
            calls.append(Call(("XACK", stream, group, entry_id)))
            streams[stream] = True
        if calls:
            yield from sent(calls)
            yield from self._trim_acknowledged(list(streams))

    def _trim_acknowledged(self, streams: list[str]) -> Flow[None]:
        """Drop the events older than `events_kept_ms` that every consumer group of the stream
        has acknowledged: before the oldest one still pending in a group, and before the first
        not yet delivered to a group. A slot's event stream then holds what some group still
        needs and the last week, not every event ever written; a group made later gets the
        events still kept. Needs XINFO and XPENDING (optional grants, docs/security.md):
        without them, nothing is trimmed and nothing fails."""
        groups = yield [Call(("XINFO", "GROUPS", stream)) for stream in streams]
        asks: list[tuple[str, str]] = []  # (stream, group) with pending events
        # Droppable: made at or before now - events_kept_ms (MINID keeps ids from there on).
        kept = f"{max(int(time.time() * 1000) - self.events_kept_ms + 1, 0)}-0"
        keep: dict[str, str] = dict.fromkeys(streams, kept)  # stream -> the oldest id kept
        for stream, reply in zip(streams, groups, strict=True):
            if isinstance(reply, CrediciError) or not reply:
                keep[stream] = "0-0"  # no grant, or no group: keep all
                continue
            for info in map(_info, reply):
                if int(info.get("pending", "0")) > 0:
                    asks.append((stream, info["name"]))
                else:
                    keep[stream] = _older(keep[stream], _after(info["last-delivered-id"]))
        if asks:
            found = yield [Call(("XPENDING", stream, group)) for stream, group in asks]
            for (stream, _), reply in zip(asks, found, strict=True):
                oldest = _oldest_pending(reply)
                if oldest is None:  # no grant (or acknowledged since): keep all
                    keep[stream] = "0-0"
                else:
                    keep[stream] = _older(keep[stream], oldest)
        # Whole stream nodes only (~), at most TRIM_STEP entries a call: bounded work per
        # acknowledgement; a backlog of old events goes over the next acknowledgements.
        trims = [
            Call(("XTRIM", s, "MINID", "~", keep[s], "LIMIT", TRIM_STEP))
            for s in streams
            if keep[s] != "0-0"
        ]
        if trims:
            yield trims  # an error in place (no grant) leaves the stream as it was

    def scan_users(self, cursor: int, count: int) -> Flow[tuple[int, list[str]]]:
        """One SCAN step over the namespace's users: (next cursor, user ids); cursor 0 ends."""
        (reply,) = yield from sent(
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


def time_ms(reply: Any) -> int:
    """A TIME reply (seconds, microseconds) in ms."""
    return int(text(reply[0])) * 1000 + int(text(reply[1])) // 1000


def entry_key(entry_id: str) -> tuple[int, int]:
    """A history entry id "<ms>-<seq>" as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def stream_fields(raw: Any) -> dict[str, str]:
    """A stream entry's fields: a dict (RESP2 callbacks) or a flat list."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    return {text(raw[i]): text(raw[i + 1]) for i in range(0, len(raw), 2)}


def parse_tx(user_id: str, r: Reply) -> Transaction:
    """A tx_reply (`TX_REPLY` names) as a Transaction; with a "member" field (capture, reverse:
    absent from records kept before members came), the member who charged."""
    tx = _build(
        user_id, r["id"], r["kind"], r["amount"], r["balance_after"], r["expire_at"] or None,
        r["idempotency_key"] or None, r["metadata"] or None,
    )  # fmt: skip
    member = r["member"] if r.has("member") else ""
    return tx.model_copy(update={"member": member}) if member else tx


def parse_entry(user_id: str, entry: Any) -> Transaction:
    """One XRANGE entry: (id, fields)."""
    entry_id, f = entry[0], stream_fields(entry[1])
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
    if "mb" in f:
        update["member"] = f["mb"]
    if "cl" in f:
        update["credit_limit"] = int(f["cl"])
    if "tf" in f:
        update["transfer_id"] = f["tf"]
        update["counterparty"] = f.get("to", f.get("fr"))
    return tx.model_copy(update=update) if update else tx


EVENT_KINDS: dict[str, Literal["low_balance", "depleted"]] = {
    "low_balance": "low_balance",
    "depleted": "depleted",
}


EVENTS_KEPT_MS = 7 * 86_400_000
"""Low-balance events every consumer group has acknowledged are dropped after a week."""
TRIM_STEP = 10_000
"""At most this many events leave a stream per acknowledgement (`_trim_acknowledged`)."""


def _info(reply: Any) -> dict[str, str]:
    """One group of XINFO GROUPS: a dict (redis-py's callback, RESP3) or a flat list."""
    pairs = (
        list(reply.items())
        if isinstance(reply, dict)
        else list(zip(reply[::2], reply[1::2], strict=True))
    )
    return {text(k): text(v) if isinstance(v, bytes | str) else str(v) for k, v in pairs}


def _after(entry_id: str) -> str:
    """The stream id right after `entry_id`."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _older(a: str, b: str) -> str:
    key = lambda i: tuple(int(x) for x in i.split("-"))  # noqa: E731
    return min(a, b, key=key)


def _oldest_pending(reply: Any) -> str | None:
    """The smallest id of XPENDING's summary: redis-py's dict, or [count, min, max, ...]."""
    if isinstance(reply, CrediciError) or not reply:
        return None
    if isinstance(reply, dict):
        first = reply.get("min")
        count = reply.get("pending", 0)
    else:
        count, first = reply[0], reply[1]
    return text(first) if count and first is not None else None


def newest_first(events: list[BalanceEvent], count: int) -> list[BalanceEvent]:
    """The `count` newest of `events` (from several slots' streams), newest first: by time,
    then by the stream entry's sequence."""

    def order(event: BalanceEvent) -> tuple[datetime, int]:
        entry_id = event.event_id.partition("@")[0]
        return event.created_at, int(entry_id.partition("-")[2] or 0)

    return sorted(events, key=order, reverse=True)[:count]


def parse_event(namespace: str, stream: str, entry: Any) -> BalanceEvent:
    entry_id, f = text(entry[0]), stream_fields(entry[1])
    user_id = _keys.user_from_key(namespace, f["h"])
    return BalanceEvent(
        event_id=f"{entry_id}@{_keys.events_tag(namespace, stream)}",
        kind=EVENT_KINDS[f["t"]],
        user_id=user_id,
        balance=int(f["b"]),
        threshold=int(f["l"]),
        transaction_id=_keys.transaction_id(user_id, f["e"]),
        created_at=from_ms(int(entry_id.partition("-")[0])),
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
