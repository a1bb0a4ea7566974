"""`history`: lua/balance.lua brings the user up to now (renewals and expiry are recorded), then
XREVRANGE reads the history stream newest first, in pages of at most HISTORY_PAGE entries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from credici_redis._core import keys as _keys
from credici_redis._core import requests as check
from credici_redis._core.keys import parse_transaction_id
from credici_redis._core.operation import Operation
from credici_redis._core.protocol import (
    HISTORY_PAGE,
    Call,
    Flow,
    Ledger,
    entry_key,
    parse_entry,
    sent,
    text,
)
from credici_redis._core.time import to_ms, to_ms_ceil
from credici_redis._ops.account import BALANCE
from credici_redis.errors import InvalidInputError, InvalidPeriodError
from credici_redis.models import Transaction


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """A history read, newest first: entries with from_ms <= time <= to_ms, older than the
    entry `before` (a history entry id, exclusive), of `member` (None: every entry; else a
    pool's entries naming that member), at most `limit` of them (None: all)."""

    user_id: str
    from_ms: int | None
    to_ms: int | None
    now_ms: int | None
    limit: int | None = None
    before: str | None = None
    member: str | None = None


def _history(
    ledger: Ledger, op: Operation[Any, Any], req: HistoryRequest
) -> Flow[list[Transaction]]:
    """Newest first, in pages of at most HISTORY_PAGE entries, up to `req.limit`."""
    stream = _keys.user_keys(ledger.namespace, req.user_id).history
    high = "+" if req.to_ms is None else str(req.to_ms)  # incomplete id: up to <ms>-max
    if req.before is not None and (req.to_ms is None or entry_key(req.before)[0] <= req.to_ms):
        high = "(" + req.before
    low = "-" if req.from_ms is None else str(max(req.from_ms, 0))
    if req.to_ms is not None and req.to_ms < 0:
        return []
    wanted = req.limit if req.limit is not None else float("inf")
    count = int(min(wanted, HISTORY_PAGE))
    _, page = yield from ledger.scheduled(lambda extension: [
        ledger.call(op, req, extension),
        Call(("XREVRANGE", stream, high, low, "COUNT", count)),
    ])  # fmt: skip
    found: list[Transaction] = []
    while True:
        parsed = (parse_entry(req.user_id, entry) for entry in page)
        found.extend(t for t in parsed if req.member is None or t.member == req.member)
        if len(page) < count or len(found) >= wanted:
            return found
        count = int(min(wanted - len(found), HISTORY_PAGE))
        after = "(" + text(page[-1][0])
        (page,) = yield from sent([Call(("XREVRANGE", stream, after, low, "COUNT", count))])


HISTORY: Operation[HistoryRequest, list[Transaction]] = Operation(
    "history",
    HistoryRequest,
    BALANCE.script,
    argv=(),
    reply=("OK", "balance"),
    parse=lambda req, r: None,
    flow=_history,
)

MAX_HISTORY_LIMIT = 100_000
"""The most entries one history read returns when a limit is given; page on with `before`."""


def build_history(
    user: object,
    from_: object,
    to_: object,
    now_ms: int | None,
    *,
    period: bool,
    limit: object = None,
    before: object = None,
    member: object = None,
) -> HistoryRequest:
    uid, who = check.user_id(user), check.member(member) or None
    if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_HISTORY_LIMIT):
        raise InvalidInputError(f"limit must be an int from 1 to {MAX_HISTORY_LIMIT}, or None")
    entry = None
    if before is not None:
        if not isinstance(before, str):
            raise InvalidInputError("before must be a transaction id (str) of this user")
        owner, entry = parse_transaction_id(before)
        if owner != uid:
            raise InvalidInputError(f"before={before!r} is a transaction of another user")
    if not period:
        return HistoryRequest(uid, None, None, now_ms, limit, entry, who)
    for name, value in (("from_", from_), ("to_", to_)):
        if not isinstance(value, datetime):
            raise InvalidPeriodError(f"{name} must be a datetime, not {type(value).__name__}")
    assert isinstance(from_, datetime) and isinstance(to_, datetime)
    try:
        return HistoryRequest(uid, to_ms_ceil(from_), to_ms(to_), now_ms, limit, entry, who)
    except OverflowError as exc:  # an aware time whose UTC is outside datetime's range
        raise InvalidPeriodError(f"from_ {from_} or to_ {to_} is out of range") from exc


def merge(recent: list[Transaction], archived: list[Transaction]) -> list[Transaction]:
    """One history, newest first: what Redis returned, and what only PostgreSQL holds."""
    if not archived:
        return recent
    seen = {tx.transaction_id for tx in recent}
    both = recent + [tx for tx in archived if tx.transaction_id not in seen]
    both.sort(key=lambda tx: entry_key(tx.transaction_id.partition("@")[0]), reverse=True)
    return both
