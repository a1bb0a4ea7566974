"""A user's account: `balance` (lua/balance.lua), `details` (lua/details.lua), and its settings,
`set_credit_limit` (lua/set_credit_limit.lua) and `set_low_balance_threshold`
(lua/set_low_balance_threshold.lua)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from credici_redis._core import requests as check
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.requests import UserRequest
from credici_redis._core.scripts import load
from credici_redis._core.time import NEVER_MS, from_ms
from credici_redis.models import BalanceDetails, Bucket


@dataclass(frozen=True, slots=True)
class CreditLimitRequest:
    user_id: str
    limit: int
    now_ms: int | None
    metadata_json: str = ""


@dataclass(frozen=True, slots=True)
class ThresholdRequest:
    user_id: str
    threshold: int | None
    now_ms: int | None


def bucket_expiry(bucket_id: str) -> datetime | None:
    """A bucket id starts with its expiry in ms (15 digits; all nines: never)."""
    ms = int(bucket_id[:15])
    return None if ms == NEVER_MS else from_ms(ms)


def _details(req: UserRequest, r: Reply) -> BalanceDetails:
    balance, limit, held, rest = int(r["balance"]), int(r["credit_limit"]), int(r["held"]), r.tail()
    buckets = [
        Bucket(amount=int(rest[i + 1]), expire_at=bucket_expiry(rest[i]), priority=int(rest[i + 2]))
        for i in range(0, len(rest), 3)
    ]
    return BalanceDetails(
        user_id=req.user_id,
        balance=balance,
        available=balance + limit,
        held=held,
        debt=max(-balance, 0),
        credit_limit=limit,
        buckets=buckets,
        history_from=from_ms(int(trim.partition("-")[0])) if (trim := r["history_from"]) else None,
    )


def _nothing(req: Any, r: Reply) -> None:
    return None


BALANCE: Operation[UserRequest, int] = Operation(
    "balance",
    UserRequest,
    # Writes only what any later call would write too (expiry, renewal): no WAIT for it.
    load("balance", effect=False, write=False),
    argv=(),
    reply=("OK", "balance"),
    parse=lambda req, r: int(r["balance"]),
)

DETAILS: Operation[UserRequest, BalanceDetails] = Operation(
    "details",
    UserRequest,
    load("details", effect=False, write=False),
    argv=(),
    reply=("OK", "balance", "credit_limit", "held", "history_from", "*buckets"),
    parse=_details,
)

SET_CREDIT_LIMIT: Operation[CreditLimitRequest, None] = Operation(
    "set_credit_limit",
    CreditLimitRequest,
    load("set_credit_limit", effect=False),  # setting it twice is setting it once
    argv=("limit", "metadata_json"),
    reply=("OK", "balance"),
    parse=_nothing,
)

SET_LOW_BALANCE_THRESHOLD: Operation[ThresholdRequest, None] = Operation(
    "set_low_balance_threshold",
    ThresholdRequest,
    load("set_low_balance_threshold", effect=False),
    argv=("threshold",),
    reply=("OK", "balance"),
    parse=_nothing,
)


def build_user(user: object, now_ms: int | None) -> UserRequest:
    return UserRequest(check.user_id(user), now_ms)


def build_credit_limit(
    user: object, limit: object, now_ms: int | None, meta: object = None
) -> CreditLimitRequest:
    return CreditLimitRequest(
        check.user_id(user), check.credit_limit(limit), now_ms, check.metadata(meta)
    )


def build_threshold(user: object, threshold: object, now_ms: int | None) -> ThresholdRequest:
    return ThresholdRequest(check.user_id(user), check.threshold(threshold), now_ms)
