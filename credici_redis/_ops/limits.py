"""Limits: a user's rate and spending budget, enforced by the scripts that charge (subtract.lua,
reserve.lua, and so the batch calls) in the same atomic step as the charge. Here: `check`
(lua/check.lua: would a charge pass now?), `set_limits` (lua/set_limits.lua) and `get_limits`
(lua/get_limits.lua). The limits' wire form (a *spec*) is `credici_redis._core.limit_spec`; a
budget's calendar period, `credici_redis._core.schedule.calendar_period`.

A user's own spec is kept in its state hash; the
client's `default_limits` go with every charge as an ARGV, for users without their own (so no
script reads a key outside the user's slot).

Refusals, in this order (the first that applies is reported): credits (InsufficientCreditsError),
budget (BudgetExceededError: its wait is the longer), rate (RateLimitedError). A refusal changes
nothing; an accepted charge uses credits, rate and budget together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from credici_redis._core import requests as check
from credici_redis._core.limit_spec import decode, encode
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.scripts import load
from credici_redis._core.time import from_ms
from credici_redis.errors import InvalidLimitError
from credici_redis.models import Budget, Decision, Limits, RateLimit

REASONS: dict[str, Any] = {"": None, "credits": "credits", "budget": "budget", "rate": "rate"}


@dataclass(frozen=True, slots=True)
class CheckRequest:
    user_id: str
    amount: int
    now_ms: int | None
    default_limits: str = ""


@dataclass(frozen=True, slots=True)
class SetLimitsRequest:
    user_id: str
    limits: str
    now_ms: int | None
    default_limits: str = ""


@dataclass(frozen=True, slots=True)
class GetLimitsRequest:
    user_id: str
    now_ms: int | None
    default_limits: str = ""


# -- operations ----------------------------------------------------------------------------------


def _decision(req: CheckRequest, r: Reply) -> Decision:
    wait = r["retry_after_ms"]
    return Decision(
        allowed=r["allowed"] == "1",
        reason=REASONS[r["reason"]],
        retry_after=timedelta(milliseconds=int(wait)) if wait else None,
        available=int(r["balance"]) + int(r["credit_limit"]),  # exact past 2**53
    )


def _limits(req: Any, r: Reply) -> Limits:
    rate, budget = decode(r["limits"])
    resets = r["budget_resets_at"]
    return Limits(
        rate=rate,
        budget=budget,
        budget_used=int(r["budget_used"]),
        budget_resets_at=from_ms(int(resets)) if resets else None,
        default=r["own"] != "1" and bool(r["limits"]),
    )


LIMITS_REPLY = ("OK", "own", "limits", "budget_used", "budget_resets_at")

CHECK: Operation[CheckRequest, Decision] = Operation(
    "check",
    CheckRequest,
    load("check", effect=False, write=False),
    argv=("amount", "default_limits"),
    reply=("OK", "allowed", "reason", "balance", "credit_limit", "retry_after_ms"),
    parse=_decision,
)

SET_LIMITS: Operation[SetLimitsRequest, Limits] = Operation(
    "set_limits",
    SetLimitsRequest,
    load("set_limits", effect=False),  # setting them twice is setting them once
    argv=("limits", "default_limits"),
    reply=LIMITS_REPLY,
    parse=_limits,
)

GET_LIMITS: Operation[GetLimitsRequest, Limits] = Operation(
    "get_limits",
    GetLimitsRequest,
    load("get_limits", effect=False, write=False),
    argv=("default_limits",),
    reply=LIMITS_REPLY,
    parse=_limits,
)


def build_check(
    user: object, credits: object, now_ms: int | None, limits: str = ""
) -> CheckRequest:
    return CheckRequest(check.user_id(user), check.amount(credits), now_ms, limits)


def build_set_limits(
    user: object, rate: object, budget: object, now_ms: int | None, limits: str = ""
) -> SetLimitsRequest:
    if rate is not None and not isinstance(rate, RateLimit):
        raise InvalidLimitError(f"rate must be a RateLimit or None, not {rate!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise InvalidLimitError(f"budget must be a Budget or None, not {budget!r}")
    return SetLimitsRequest(check.user_id(user), encode(rate, budget), now_ms, limits)


def build_get_limits(user: object, now_ms: int | None, limits: str = "") -> GetLimitsRequest:
    return GetLimitsRequest(check.user_id(user), now_ms, limits)
