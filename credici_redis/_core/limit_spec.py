"""The wire form of limits, a *spec*: "R<amount>:<per ms>:<burst>" and/or
"B<amount>:<period>:<tz>", joined by ';' (what lua/_ledger.lua, "Limits", reads). Pure code: the
operations (`credici_redis._ops.limits`), the clients' `default_limits` and the refusal table
(`credici_redis._core.codes`) all use it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from credici_redis.errors import InvalidLimitError
from credici_redis.models import Budget, Limits, RateLimit


def _ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def encode(rate: RateLimit | None, budget: Budget | None) -> str:
    """The spec of these limits ('' for none)."""
    parts = []
    if rate is not None:
        parts.append(f"R{rate.amount}:{_ms(rate.per)}:{rate.burst}")
    if budget is not None:
        period = budget.period if isinstance(budget.period, str) else str(_ms(budget.period))
        parts.append(f"B{budget.amount}:{period}:{budget.tz}")
    return ";".join(parts)


def encode_limits(value: object) -> str:
    """A client's `default_limits` (a Limits, or None) as a spec."""
    if value is None:
        return ""
    if not isinstance(value, Limits):
        raise InvalidLimitError(f"default_limits must be a Limits or None, not {value!r}")
    return encode(value.rate, value.budget)


def decode(spec: str) -> tuple[RateLimit | None, Budget | None]:
    rate = budget = None
    for part in filter(None, spec.split(";")):
        amount, second, third = part[1:].split(":", 2)
        if part[0] == "R":
            rate = RateLimit(int(amount), timedelta(milliseconds=int(second)), int(third))
        else:
            period: Any = timedelta(milliseconds=int(second)) if second.isdigit() else second
            budget = Budget(int(amount), period, third)
    return rate, budget
