"""The values the clients return: small frozen pydantic models, integer credits, aware UTC times."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

TransactionKind = Literal[
    "add", "subtract", "expire", "cycle_start", "reserve", "capture", "release", "reverse"
]
HoldStatus = Literal["active", "captured", "released", "expired"]
CycleStatus = Literal["active", "canceled", "ended"]
CalendarPeriod = Literal["day", "week", "month", "year"]


class Transaction(BaseModel):
    """One entry of a user's history: a change of the balance, recorded by the script making it."""

    model_config = ConfigDict(frozen=True)

    transaction_id: str
    user_id: str
    kind: TransactionKind
    amount: int = Field(description="signed: + credits in, - credits out")
    created_at: AwareDatetime
    expire_at: AwareDatetime | None = None
    balance_after: int
    idempotency_key: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    hold_id: str | None = Field(default=None, description="reserve, capture, release: the hold")
    captured: int | None = Field(
        default=None, description="capture: credits charged (`amount` is what came back)"
    )
    related_id: str | None = Field(default=None, description="reverse: the transaction reversed")
    unrestored: int | None = Field(
        default=None, description="reverse: credits not given back (their bucket had expired)"
    )
    periods: int | None = Field(
        default=None,
        description=(
            "cycle_start of a renewing cycle idle for many periods: how many periods started "
            "unseen (granting 0), one every period from created_at on; None: one period"
        ),
    )


class Cycle(BaseModel):
    """A user's billing cycle: `amount` credits per period from `started_at` until `ends_at`."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    cycle_id: str = Field(description="the transaction_id of the cycle_start entry that began it")
    started_at: AwareDatetime
    ends_at: AwareDatetime
    amount: int = Field(description="credits granted per period")
    status: CycleStatus
    renew: bool
    rollover: int | None = Field(description="0: nothing carries; N: up to N; None: all")
    granted: int = Field(description="credits this cycle granted, rollover included")
    used: int = Field(description="credits subtracted during this cycle, from any bucket")
    added: int = Field(description="credits added by `add` during this cycle")
    period: int | timedelta | CalendarPeriod = Field(description="time_delta, as given")
    tz: str


class Hold(BaseModel):
    """Credits set aside by reserve until capture, release, or its ttl."""

    model_config = ConfigDict(frozen=True)

    hold_id: str
    user_id: str
    amount: int = Field(description="credits held")
    status: HoldStatus
    created_at: AwareDatetime
    expires_at: AwareDatetime
    captured: int = Field(description="credits charged by capture (0 otherwise)")
    transaction_id: str | None = Field(default=None, description="reserve: its history entry")


class BalanceEvent(BaseModel):
    """A user's balance fell below its low-balance threshold, or to 0 (`depleted`)."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    kind: Literal["low_balance", "depleted"]
    user_id: str
    balance: int = Field(description="the balance right after the change")
    threshold: int
    transaction_id: str = Field(description="the change that caused it")
    created_at: AwareDatetime


class Bucket(BaseModel):
    """Credits of one grant: what is left of it, until when, and where it stands in burn order."""

    model_config = ConfigDict(frozen=True)

    amount: int
    expire_at: AwareDatetime | None
    priority: int


class BalanceDetails(BaseModel):
    """The balance taken apart. Buckets are listed in burn order."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    balance: int = Field(description="what get_balance returns; negative while in debt")
    available: int = Field(description="what can be charged now: balance + credit_limit")
    held: int = Field(description="credits reserved by holds (none until holds exist)")
    debt: int
    credit_limit: int
    buckets: list[Bucket]


class Decision(BaseModel):
    """What `check` found: would a charge of that amount pass now (nothing was charged)?"""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    reason: Literal["credits", "rate", "budget"] | None = Field(
        description="why not (None when allowed); only credits are checked so far"
    )
    retry_after: timedelta | None = Field(
        default=None, description="when a refusal for rate or budget would lift (None: credits)"
    )
    available: int = Field(description="what can be charged now: balance + credit_limit")


class AuditReport(BaseModel):
    """The audit of one user: the balance and every bucket rebuilt from history, compared."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    ok: bool
    balance: int = Field(description="the balance Redis holds")
    history_balance: int = Field(description="what the history adds up to")
    entries: int = Field(description="history entries replayed")
    buckets: int = Field(description="buckets Redis holds")
    problems: list[str] = Field(default_factory=list)


__all__ = [
    "AuditReport",
    "CalendarPeriod",
    "Cycle",
    "CycleStatus",
    "Transaction",
    "TransactionKind",
]
