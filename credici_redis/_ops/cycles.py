"""Subscription cycles: `start_cycle` (lua/start_cycle.lua), `get_cycle` (lua/cycle.lua) and
`cancel_cycle` (lua/cancel_cycle.lua). Each replies a cycle_reply, parsed into a Cycle."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from credici_redis._core import keys as _keys
from credici_redis._core import requests as check
from credici_redis._core import schedule as _schedule
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.protocol import Flow, Ledger
from credici_redis._core.requests import UserRequest
from credici_redis._core.scripts import load
from credici_redis._core.time import from_ms
from credici_redis.errors import InvalidTimeZoneError
from credici_redis.models import Cycle, CycleStatus


@dataclass(frozen=True, slots=True)
class StartCycleRequest:
    user_id: str
    amount: int
    period: str
    """The period as given, encoded: "days:N", "us:N", or a calendar period name."""
    duration_ms: int | None
    """Fixed periods only; None for a calendar period."""
    tz: str
    renew: bool
    rollover: int | None
    idempotency_key: str | None
    fingerprint: str
    now_ms: int | None
    first_ends: str = ""
    """A calendar cycle's first boundaries "B1,B2,...", fixed by the flow from its start."""


@dataclass(frozen=True, slots=True)
class CancelCycleRequest:
    user_id: str
    forfeit: bool
    now_ms: int | None


CYCLE_REPLY = (
    "OK", "cycle_id", "started_at", "ends_at", "amount", "granted", "used", "added", "status",
    "renew", "rollover", "period", "tz",
)  # fmt: skip
"""cycle_reply (lua/_ledger.lua)."""

STATUSES: dict[str, CycleStatus] = {"a": "active", "c": "canceled", "e": "ended"}


def parse_cycle(req: Any, r: Reply) -> Cycle:
    return Cycle(
        user_id=req.user_id,
        cycle_id=_keys.transaction_id(req.user_id, r["cycle_id"]),
        started_at=from_ms(int(r["started_at"])),
        ends_at=from_ms(int(r["ends_at"])),
        amount=int(r["amount"]),
        granted=int(r["granted"]),
        used=int(r["used"]),
        added=int(r["added"]),
        status=STATUSES[r["status"]],
        renew=r["renew"] == "1",
        rollover=None if r["rollover"] == "" else int(r["rollover"]),
        period=check.decode_period(r["period"]),
        tz=r["tz"],
    )


def _start_cycle(ledger: Ledger, op: Operation[Any, Any], req: StartCycleRequest) -> Flow[Cycle]:
    """A calendar period's boundaries come from the cycle's start: fix the start first (the
    server's clock, unless the caller gave one)."""
    if req.duration_ms is None:
        now_ms = req.now_ms if req.now_ms is not None else (yield from ledger.server_ms())
        ends = _schedule.boundaries_from(now_ms, req.period, req.tz, 1, now_ms)
        req = replace(req, now_ms=now_ms, first_ends=",".join(map(str, ends)))
    cycle: Cycle = yield from ledger.script_flow(op, req)
    return cycle


START_CYCLE: Operation[StartCycleRequest, Cycle] = Operation(
    "start_cycle",
    StartCycleRequest,
    load("start_cycle", effect=True),
    argv=(
        "amount",
        "duration_ms",
        "first_ends",
        "period",
        "tz",
        "renew",
        "rollover",
        "fingerprint",
        "idempotency_ttl_ms",
        "idempotency_key",
    ),
    reply=CYCLE_REPLY,
    parse=parse_cycle,
    refusals=frozenset({"IDEM_CONFLICT", "BALANCE_LIMIT"}),
    fingerprint=("amount", "period", "tz", "renew", "rollover"),
    flow=_start_cycle,
)

GET_CYCLE: Operation[UserRequest, Cycle | None] = Operation(
    "get_cycle",
    UserRequest,
    load("cycle", effect=False, write=False),
    argv=(),
    reply=CYCLE_REPLY,
    parse=parse_cycle,
    outcomes={"NONE": lambda req, f: None},
)

CANCEL_CYCLE: Operation[CancelCycleRequest, Cycle] = Operation(
    "cancel_cycle",
    CancelCycleRequest,
    # Cancelling twice is the same as once: safe to retry without a key.
    load("cancel_cycle", effect=True),
    argv=("forfeit",),
    reply=CYCLE_REPLY,
    parse=parse_cycle,
    refusals=frozenset({"NO_CYCLE"}),
)


def build_start_cycle(
    credits: object,
    time_delta: object,
    user: object,
    *,
    rollover_: object,
    renew: object,
    tz: object,
    key: object,
    now_ms: int | None,
) -> StartCycleRequest:
    n = check.amount(credits, allow_zero=True)
    period, duration = check.cycle_period(time_delta)
    keep = check.rollover(rollover_)
    renews = check.flag("renew", renew)
    if not isinstance(tz, str):
        raise InvalidTimeZoneError(f"tz must be an IANA time zone name, got {tz!r}")
    _schedule.zone(tz)
    uid = str(uuid.uuid4()) if user is None else check.user_id(user)
    ikey = check.idempotency_key(key)
    req = StartCycleRequest(uid, n, period, duration, tz, renews, keep, None, "", now_ms)
    return START_CYCLE.with_key(req, ikey)


def build_cancel_cycle(user: object, forfeit: object, now_ms: int | None) -> CancelCycleRequest:
    return CancelCycleRequest(check.user_id(user), check.flag("forfeit", forfeit), now_ms)
