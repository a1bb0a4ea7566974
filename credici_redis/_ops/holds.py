"""Holds: `reserve` (lua/reserve.lua) sets credits aside, `capture` (lua/capture.lua) charges
them, `release` (lua/release.lua) gives them back, `get_hold` (lua/hold.lua) reads one. A hold
id is "<user>@<local id>": the user's keys come from it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from credici_redis._core import keys as _keys
from credici_redis._core import requests as check
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.protocol import TX_REPLY, parse_tx
from credici_redis._core.scripts import load
from credici_redis._core.time import from_ms
from credici_redis.errors import InvalidExpiryError, InvalidInputError
from credici_redis.models import ActiveHolds, Hold, HoldStatus, Transaction

DEFAULT_HOLD_TTL = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    user_id: str
    amount: int
    ttl_ms: int
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None
    default_limits: str = ""
    """The client's default limits (a spec, `_ops.limits`), for a user without its own."""
    member: str = ""
    """Who holds the user's (a pool's) credits; '' = the account itself."""


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    hold_id: str
    user_id: str
    local_id: str
    amount: int | None
    idempotency_key: str | None
    fingerprint: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """A hold by id (release, get_hold): its user, and its id within the user."""

    hold_id: str
    user_id: str
    local_id: str
    now_ms: int | None
    metadata_json: str = ""
    """release: why, kept in its "l" entry ('' = none)."""


HOLD_REPLY = ("OK", "hold_id", "amount", "status", "created_at", "expires_at", "captured")
"""hold_reply (lua/_ledger.lua)."""

HOLD_STATUSES: dict[str, HoldStatus] = {
    "active": "active",
    "captured": "captured",
    "released": "released",
    "expired": "expired",
}


def parse_hold(req: Any, r: Reply) -> Hold:
    return Hold(
        hold_id=_keys.hold_id(req.user_id, r["hold_id"]),
        user_id=req.user_id,
        amount=int(r["amount"]),
        status=HOLD_STATUSES[r["status"]],
        created_at=from_ms(int(r["created_at"])),
        expires_at=from_ms(int(r["expires_at"])),
        captured=int(r["captured"]),
        transaction_id=(
            _keys.transaction_id(req.user_id, r["transaction_id"])
            if r.has("transaction_id")
            else None
        ),
    )


def _captured(req: CaptureRequest, r: Reply) -> Transaction:
    tx = parse_tx(req.user_id, r)
    return tx.model_copy(update={"hold_id": req.hold_id, "captured": int(r["captured"])})


RESERVE: Operation[ReserveRequest, Hold] = Operation(
    "reserve",
    ReserveRequest,
    load("reserve", effect=True),
    argv=(
        "amount",
        "ttl_ms",
        "fingerprint",
        "idempotency_ttl_ms",
        "idempotency_key",
        "metadata_json",
        "default_limits",
        "member",
    ),
    reply=(*HOLD_REPLY, "transaction_id"),
    parse=parse_hold,
    refusals=frozenset({"IDEM_CONFLICT", "INSUFFICIENT", "BUDGET", "RATE"}),
    fingerprint=("amount", "ttl_ms", "metadata_json"),
    fingerprint_if_set=("member",),
)

CAPTURE: Operation[CaptureRequest, Transaction] = Operation(
    "capture",
    CaptureRequest,
    load("capture", effect=True),
    argv=("local_id", "amount", "fingerprint", "idempotency_ttl_ms", "idempotency_key"),
    reply=(*TX_REPLY, "hold_id", "captured", "member"),
    parse=_captured,
    refusals=frozenset({"IDEM_CONFLICT", "NO_HOLD", "HOLD_DONE", "HOLD_EXCEEDED"}),
    fingerprint=("local_id", "amount"),
)

RELEASE: Operation[HoldRequest, Hold] = Operation(
    "release",
    HoldRequest,
    load("release", effect=False),  # a second release has no effect: safe to repeat
    argv=("local_id", "metadata_json"),
    reply=HOLD_REPLY,
    parse=parse_hold,
    refusals=frozenset({"NO_HOLD", "HOLD_DONE"}),
)

GET_HOLD: Operation[HoldRequest, Hold] = Operation(
    "get_hold",
    HoldRequest,
    load("hold", effect=False, write=False),
    argv=("local_id",),
    reply=HOLD_REPLY,
    parse=parse_hold,
    refusals=frozenset({"NO_HOLD"}),
)


@dataclass(frozen=True, slots=True)
class HoldsRequest:
    """A user's active holds, at most `limit`."""

    user_id: str
    now_ms: int | None
    limit: int


def _active(req: HoldsRequest, r: Reply) -> ActiveHolds:
    rest, user = r.tail(), req.user_id
    holds = [
        Hold(
            hold_id=_keys.hold_id(user, rest[i]),
            user_id=user,
            amount=int(rest[i + 1]),
            status="active",
            created_at=from_ms(int(rest[i + 2].partition("-")[0])),
            expires_at=from_ms(int(rest[i + 3])),
            captured=0,
            transaction_id=_keys.transaction_id(user, rest[i + 2]) if "-" in rest[i + 2] else None,
        )
        for i in range(0, len(rest), 4)
    ]
    return ActiveHolds(user_id=req.user_id, holds=holds, more=r["more"] == "1")


GET_HOLDS: Operation[HoldsRequest, ActiveHolds] = Operation(
    "get_holds",
    HoldsRequest,
    load("holds", effect=False, write=False),
    argv=("limit",),
    reply=("OK", "more", "*holds"),
    parse=_active,
)


def build_reserve(
    user: object,
    credits: object,
    ttl: object,
    key: object,
    meta: object,
    now_ms: int | None,
    limits: str = "",
    member: object = None,
) -> ReserveRequest:
    uid, n = check.user_id(user), check.amount(credits)
    if not isinstance(ttl, timedelta):
        raise InvalidExpiryError(f"ttl must be a timedelta, not {type(ttl).__name__}")
    _, ttl_ms = check.expiry(None, ttl)
    assert ttl_ms is not None
    ikey, meta_json = check.idempotency_key(key), check.metadata(meta)
    req = ReserveRequest(uid, n, ttl_ms, None, "", meta_json, now_ms, limits, check.member(member))
    return RESERVE.with_key(req, ikey)


def build_capture(hold: object, credits: object, key: object, now_ms: int | None) -> CaptureRequest:
    if not isinstance(hold, str):
        raise InvalidInputError(f"hold_id must be a str, not {type(hold).__name__}")
    uid, local = _keys.parse_hold_id(hold)
    n = None if credits is None else check.amount(credits)
    ikey = check.idempotency_key(key)
    req = CaptureRequest(hold, check.user_id(uid), local, n, None, "", now_ms)
    return CAPTURE.with_key(req, ikey)


def build_holds(user: object, limit: object, now_ms: int | None) -> HoldsRequest:
    return HoldsRequest(check.user_id(user), now_ms, check.read_limit(limit))


def build_hold(hold: object, now_ms: int | None, meta: object = None) -> HoldRequest:
    uid, local = check.hold(hold)
    return HoldRequest(str(hold), uid, local, now_ms, check.metadata(meta))
