"""The values the clients return: small frozen pydantic models, integer credits, aware UTC times."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from credici_redis.errors import InvalidCycleError, InvalidLimitError

TransactionKind = Literal[
    "add",
    "subtract",
    "expire",
    "cycle_start",
    "reserve",
    "capture",
    "release",
    "reverse",
    "transfer_out",
    "transfer_in",
    "credit_limit",
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
    member: str | None = Field(
        default=None,
        description="a pool's member who spent it (subtract, reserve...); None: the account itself",
    )
    transfer_id: str | None = Field(
        default=None,
        description="transfer_out, transfer_in, the reverse of a refused transfer: its transfer",
    )
    counterparty: str | None = Field(
        default=None, description="transfer_out: the destination; transfer_in: the source"
    )
    credit_limit: int | None = Field(
        default=None, description="credit_limit: the new limit (amount 0; metadata: who and why)"
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


class ActiveHolds(BaseModel):
    """A user's active holds, soonest released first (`get_holds`)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    holds: list[Hold]
    more: bool = Field(
        description="there may be more active holds than listed: read with a larger limit"
    )


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
    history_from: AwareDatetime | None = Field(
        default=None,
        description="where the history Redis keeps begins: older entries were trimmed (archived"
        " to PostgreSQL, or past the history retention); None: Redis has all of it",
    )


class Decision(BaseModel):
    """What `check` found: would a charge of that amount pass now (nothing was charged)?"""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    reason: Literal["credits", "rate", "budget"] | None = Field(
        description="why not (None when allowed): subtract's first refusal, in its order"
        " credits, budget, rate"
    )
    retry_after: timedelta | None = Field(
        default=None,
        description="when a refusal for rate or budget lifts (None: allowed, credits, or a rate"
        " refusal that never lifts: the amount is more than the burst)",
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
    "Budget",
    "CalendarPeriod",
    "Cycle",
    "CycleStatus",
    "Granularity",
    "Limits",
    "RateLimit",
    "Transaction",
    "TransactionKind",
    "Transfer",
    "TransferRecovery",
    "TransferStatus",
    "TrimReport",
    "UsagePoint",
]


MAX_LIMIT = 2**53 - 1


def _whole(name: str, value: object, low: int = 1) -> int:
    if type(value) is not int or not low <= value <= MAX_LIMIT:
        raise InvalidLimitError(f"{name} must be an int from {low} to 2**53-1, not {value!r}")
    return value


def _window_ms(name: str, value: object) -> int:
    if not isinstance(value, timedelta) or value % timedelta(milliseconds=1):
        raise InvalidLimitError(f"{name} must be a timedelta of whole milliseconds, not {value!r}")
    ms = value // timedelta(milliseconds=1)
    if not 1 <= ms <= MAX_LIMIT:
        raise InvalidLimitError(f"{name} must be from 1 ms to 2**53-1 ms, not {value}")
    return ms


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `amount` credits per `per`, in bursts of up to `burst` credits (default: amount).
    A charge of n credits uses n units of rate (GCRA: cost-weighted, no fixed-window edges)."""

    amount: int
    per: timedelta
    burst: int | None = None

    def __post_init__(self) -> None:
        _whole("RateLimit.amount", self.amount)
        per = _window_ms("RateLimit.per", self.per)
        if self.burst is None:
            object.__setattr__(self, "burst", self.amount)
        burst = _whole("RateLimit.burst", self.burst)
        if 2 * burst * per > MAX_LIMIT:  # the scripts count in exact integers up to 2**53
            raise InvalidLimitError(
                f"RateLimit: burst x per (in ms) must stay under 2**52, not {burst} x {per}"
            )


@dataclass(frozen=True, slots=True)
class Budget:
    """At most `amount` credits spent per `period`: a calendar day, week (from Monday), month or
    year in time zone `tz`, or a fixed window (a timedelta, counted from the Unix epoch)."""

    amount: int
    period: CalendarPeriod | timedelta
    tz: str = "UTC"

    def __post_init__(self) -> None:
        _whole("Budget.amount", self.amount)
        if isinstance(self.period, timedelta):
            _window_ms("Budget.period", self.period)
            if self.tz != "UTC":
                raise InvalidLimitError(
                    "Budget: a timedelta window counts from the Unix epoch; tz applies to"
                    " calendar periods only ('day', 'week', 'month', 'year')"
                )
        elif self.period not in ("day", "week", "month", "year"):
            raise InvalidLimitError(
                "Budget.period must be 'day', 'week', 'month', 'year' or a timedelta,"
                f" not {self.period!r}"
            )
        if not isinstance(self.tz, str):
            raise InvalidLimitError(f"Budget.tz must be an IANA zone name, not {self.tz!r}")
        from credici_redis._core.schedule import zone

        try:
            zone(self.tz)
        except InvalidCycleError as exc:
            raise InvalidLimitError(f"Budget.tz: unknown time zone {self.tz!r}") from exc


class Limits(BaseModel):
    """A user's limits: `rate` and `budget` (None: not limited that way). `get_limits` also
    says what was spent of the budget in its running period and when that period ends, and
    whether these are the user's own or the client's `default_limits`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    rate: RateLimit | None = None
    budget: Budget | None = None
    budget_used: int = Field(default=0, description="spent in the running budget period")
    budget_resets_at: AwareDatetime | None = Field(
        default=None, description="when the running budget period ends (None: no budget)"
    )
    default: bool = Field(
        default=False, description="the client's default_limits (the user has none of its own)"
    )


class MemberUsage(BaseModel):
    """A pool member's cap (`set_member_cap`) and what the member spent of it in the running
    period. A member without a cap is not counted: `cap` None, `used` 0."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    user_id: str = Field(description="the pool")
    member: str
    cap: Budget | None = None
    used: int = Field(default=0, description="spent in the running period of the cap")
    resets_at: AwareDatetime | None = Field(
        default=None, description="when the running period ends (None: no cap)"
    )


Granularity = Literal["hour", "day", "month"]


class UsagePoint(BaseModel):
    """A user's usage in one hour, day or month (`get_usage`), from the rollups every change
    updates in the same script: exact against the history entries of that period.
    granted - spent - expired is what the balance rose by in it."""

    model_config = ConfigDict(frozen=True)

    start: AwareDatetime = Field(description="the period's start, in the zone asked for")
    spent: int = Field(
        description="credits charged (subtract, reserve), net of what came back (capture, "
        "release, reversals of charges)"
    )
    granted: int = Field(description="credits added (add, cycle grants), net of reversals of adds")
    expired: int = Field(description="credits that expired unused")
    charges: int = Field(description="how many subtract and reserve calls took credits")


class TrimReport(BaseModel):
    """What `trim_history` did for a user: history entries removed from Redis after a checkpoint
    of what they added up to (the audit replays from it)."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    trimmed: int = Field(description="history entries removed by this call")
    checkpoint_at: AwareDatetime | None = Field(
        default=None, description="the newest checkpoint: history before it is gone from Redis"
    )
    archived: bool = Field(
        default=False,
        description="the user's history goes to PostgreSQL: the archiver trims it, not this",
    )
    problems: list[str] = Field(
        default_factory=list,
        description="what the replay of the entries to trim found wrong: nothing was trimmed",
    )
    more: bool = Field(default=False, description="more is due: call again")


TransferStatus = Literal["completed"]


class Transfer(BaseModel):
    """Credits moved from one account to another (`transfer`): taken out of `from_user` by
    the `transfer_out` entry `from_transaction_id`, given to `to_user` by the `transfer_in`
    entry `to_transaction_id`, exactly once."""

    model_config = ConfigDict(frozen=True)

    transfer_id: str
    from_user: str
    to_user: str
    amount: int
    status: TransferStatus
    created_at: AwareDatetime
    from_transaction_id: str
    to_transaction_id: str
    expire_at: AwareDatetime | None = Field(
        default=None, description="as given; None: the credits kept their source buckets' expiry"
    )
    idempotency_key: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class TransferRecovery(BaseModel):
    """What `recover_transfers` did with the transfers left unsettled (a process died between
    their steps) that began before `older_than` ago."""

    model_config = ConfigDict(frozen=True)

    completed: int = Field(default=0, description="finished: the destination has the credits")
    refunded: int = Field(
        default=0, description="the destination refused them (or the window passed): back home"
    )
    unresolved: list[str] = Field(
        default_factory=list,
        description=(
            "transfer ids left alone: unsettled past the marker's keep time (7 days), where "
            "no script can prove what happened; an operator decides"
        ),
    )
    failed: list[str] = Field(
        default_factory=list,
        description=(
            "'<transfer id>: <error>' of those that could not finish now (a destination whose "
            "keys are broken: InconsistentStateError); the next recovery tries them again"
        ),
    )
