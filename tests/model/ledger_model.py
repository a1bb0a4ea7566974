"""A pure-Python reference model of the ledger, written from the README's semantics.

It knows nothing of Redis or Lua: times are integer milliseconds, a user is a set of buckets, a
balance, a list of history entries, holds and at most one cycle. `test_state_machine` runs random
operations on it and on the real store side by side.

Time is modelled as a sequence of events: whatever became due since the user's last operation
(cycle boundaries, hold ttls, bucket expiries) happens inside the next operation, each at its own
time, in time order (at the same moment: the cycle boundary, then holds, then buckets). Nothing
here is lazy in a way the README does not promise.

Limits (a rate and a spending budget per user, or the client's default for users without their
own) are enforced by the charges: subtract and reserve refuse for credits first, then budget,
then rate; a refusal changes nothing, an accepted charge uses credits, rate and budget together;
holds, releases, ttls, captures and reversals give budget back (never rate). `check` is a dry
run of subtract.

Identities the store makes up (transaction ids, hold ids, bucket ids) are the model's own here:
an entry is known by its position in the user's history, a hold by its number, a bucket by its
creation number; the state machine learns which store id is which.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from credici_redis.errors import (
    AlreadyReversedError,
    BudgetExceededError,
    CaptureExceedsHoldError,
    CrediciError,
    CycleNotFoundError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    NotReversibleError,
    RateLimitedError,
    TransactionArchivedError,
    TransactionNotFoundError,
    TransferRefusedError,
)

MAX_CREDITS = 2**53 - 1
"""The largest balance (and amount): Lua numbers are doubles, exact up to here."""
DAY = 86_400_000
HOLD_MEMORY = DAY
"""A finished hold is remembered a day, then it is unknown."""


class Refused(Exception):
    """What the store must raise: the error class and its facts, in the model's own identities
    (`hold`: a hold number, `entry`/`reversal`: positions in the user's history)."""

    def __init__(self, error: type[CrediciError], **facts: Any) -> None:
        super().__init__(error.__name__, facts)
        self.error = error
        self.facts = facts


@dataclass
class Bucket:
    """Credits of one grant: what is left of them, until when, and where they burn."""

    seq: int  # creation order, per user
    left: int
    expire_at: int | None  # ms; None = never
    priority: int = 0

    def burn_key(self) -> tuple[int, bool, int, int]:
        # Priority ascending, then soonest expiry, never-expiring last, ties oldest first.
        return (self.priority, self.expire_at is None, self.expire_at or 0, self.seq)

    def usable(self, now: int) -> bool:
        return self.expire_at is None or now < self.expire_at


Parts = tuple[tuple[int, int], ...]
"""Where credits came from: (bucket seq, credits), in the order they were taken."""
EntryId = tuple[int, int]
"""A history entry's place in time, as its stream id "<ms>-<seq>": (ms, seq), in order."""


@dataclass(frozen=True)
class Entry:
    """One history entry as a `Transaction` reports it (times in ms; `hold` a hold number,
    `related` the position of the reversed entry). The rest is the model's bookkeeping."""

    kind: str
    amount: int
    created_at: int
    balance_after: int
    expire_at: int | None = None
    idempotency_key: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    hold: int | None = None
    captured: int | None = None
    related: int | None = None
    unrestored: int | None = None
    periods: int | None = None
    member: str | None = None  # a pool's member who charged
    transfer: int | None = None  # transfer_out, transfer_in, a refused one's reverse: its number
    counterparty: str | None = None  # transfer_out: the destination; transfer_in: the source
    credit_limit: int | None = None  # credit_limit: the new limit
    # Not part of a Transaction:
    parts: Parts = field(default=(), compare=False)  # subtract / capture: buckets charged
    bucket: int | None = field(default=None, compare=False)  # add: the bucket it made
    id: EntryId = field(default=(0, 0), compare=False)  # (ms, seq) of its stream id


@dataclass
class Hold:
    number: int
    amount: int
    created_at: int
    expires_at: int
    parts: Parts
    entry: int  # position of its "reserve" entry
    status: str = "active"
    captured: int = 0
    ended_at: int | None = None
    forgotten: bool = False  # a day after it ended, seen by an operation: unknown from then on
    member: str | None = None  # the pool's member who holds it

    def snapshot(self) -> HoldView:
        return HoldView(
            self.number, self.amount, self.status, self.created_at, self.expires_at, self.captured
        )


@dataclass(frozen=True)
class HoldView:
    """A `Hold` as the store reports it (the reserve's entry aside)."""

    number: int
    amount: int
    status: str
    created_at: int
    expires_at: int
    captured: int


@dataclass
class Cycle:
    anchor: int
    period: int  # ms
    given_period: object  # time_delta as given
    amount: int
    renew: bool
    rollover: int | None
    index: int = 0  # periods since the anchor
    started_at: int = 0
    ends_at: int = 0
    entry: int = 0  # position of its current "cycle_start" entry
    granted: int = 0
    used: int = 0
    added: int = 0
    canceled: bool = False
    ended: bool = False
    bucket: int | None = None  # the grant's bucket

    def running(self, now: int) -> bool:
        return not self.ended and now < self.ends_at

    def view(self, now: int) -> CycleView:
        status = "ended" if self.ended or now >= self.ends_at else "active"
        if status == "active" and self.canceled:
            status = "canceled"
        return CycleView(
            self.entry,
            self.started_at,
            self.ends_at,
            self.amount,
            status,
            self.renew,
            self.rollover,
            self.granted,
            self.used,
            self.added,
            self.given_period,
        )


@dataclass(frozen=True)
class CycleView:
    """A `Cycle` as the store reports it (`entry`: position of its cycle_start entry)."""

    entry: int
    started_at: int
    ends_at: int
    amount: int
    status: str
    renew: bool
    rollover: int | None
    granted: int
    used: int
    added: int
    period: object


# Limits.


@dataclass(frozen=True)
class Rate:
    """At most `amount` credits per `per` ms, in bursts of up to `burst` (GCRA, cost-weighted)."""

    amount: int
    per: int  # ms
    burst: int


@dataclass(frozen=True)
class Budget:
    """At most `amount` credits spent per `period`: a calendar "day", "week" (from Monday),
    "month" or "year" in zone `tz`, or a fixed window of that many ms counted from the epoch."""

    amount: int
    period: str | int
    tz: str = "UTC"

    @property
    def counted(self) -> tuple[str | int, str]:
        """What a budget's usage belongs to: another period or zone is another budget."""
        return (self.period, self.tz)


@dataclass(frozen=True)
class LimitSpec:
    rate: Rate | None = None
    budget: Budget | None = None


@dataclass
class Usage:
    """What the charges used of the limits, kept whatever limits are in effect.

    Rate: `rb` the time of the last accepted charge, `ro` how far the theoretical arrival time
    was ahead of it then, in ticks of 1/amount ms, `rate` the rate it counted for. Budget: `used`
    in the period [`start`, `end`) of the budget `counted` (its (period, tz)), counting charges
    made from the history entry `since` on (an entry id). None: never used.
    """

    rb: int | None = None
    ro: int | None = None
    rate: Rate | None = None
    used: int | None = None
    start: int | None = None
    end: int | None = None
    since: EntryId | None = None
    counted: tuple[str | int, str] | None = None
    floor: EntryId | None = None
    """The first entry any budget may count: set_limits moves it (and `since`) to the next
    entry, so a charge made without that budget never gives budget back."""


@dataclass
class MemberCap:
    """A pool member's cap and what the member spent of it in the period [`start`, `end`),
    counting charges from the history entry `since` on (issue 19)."""

    budget: Budget
    used: int
    start: int
    end: int
    since: EntryId


@dataclass(frozen=True)
class MemberView:
    """`get_member_usage`'s answer (`resets_at` in ms; None: no cap)."""

    budget: Budget | None
    used: int
    resets_at: int | None


@dataclass(frozen=True)
class LimitsView:
    """`get_limits`' answer (`resets_at` in ms; None: no budget)."""

    rate: Rate | None
    budget: Budget | None
    used: int
    resets_at: int | None
    default: bool


@dataclass(frozen=True)
class DecisionView:
    """`check`'s answer (`retry_after` in ms)."""

    allowed: bool
    reason: str | None
    retry_after: int | None
    available: int


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def calendar_period(now: int, period: str, tz: str) -> tuple[int, int]:
    """The calendar period containing `now` in zone `tz`, from local midnight to local midnight:
    a day, a week from Monday, a month from the 1st, a year from January 1st."""
    zone = ZoneInfo(tz)
    today = (EPOCH + timedelta(milliseconds=now)).astimezone(zone).date()
    if period == "day":
        first, after = today, today + timedelta(days=1)
    elif period == "week":
        first = today - timedelta(days=today.weekday())
        after = first + timedelta(days=7)
    elif period == "month":
        first = date(today.year, today.month, 1)
        after = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    else:
        assert period == "year", period
        first, after = date(today.year, 1, 1), date(today.year + 1, 1, 1)

    def midnight(day: date) -> int:
        local = datetime(day.year, day.month, day.day, tzinfo=zone)
        return (local - EPOCH) // timedelta(milliseconds=1)

    return midnight(first), midnight(after)


Fingerprint = tuple[object, ...]


class UserLedger:
    """One user: buckets, balance, history, idempotency records, holds, cycle, credit limit,
    limits and what was used of them."""

    def __init__(self, user_id: str, default_limits: LimitSpec | None = None) -> None:
        self.user_id = user_id
        self.default_limits = default_limits  # the client's, for a user without its own
        self.own_limits: LimitSpec | None = None
        self.usage = Usage()
        self.members: dict[str, MemberCap] = {}  # a pool's members with a cap
        self.all_buckets: list[Bucket] = []  # by seq - 1; emptied ones stay (a return refills)
        self.balance = 0  # negative: debt
        self.held = 0
        self.limit = 0
        self.history: list[Entry] = []  # oldest first
        self.records: dict[str, tuple[Fingerprint, object]] = {}
        self.holds: list[Hold] = []  # by number - 1
        self.cycle: Cycle | None = None
        self.reversals: dict[int, int] = {}  # entry position -> its reversal's position
        self.trimmed = 0  # the first entries, gone from the store's history after a checkpoint

    # Views.

    @property
    def buckets(self) -> list[Bucket]:
        """The buckets holding credits, in burn order."""
        return sorted((b for b in self.all_buckets if b.left > 0), key=Bucket.burn_key)

    def live_buckets(self, now: int) -> list[Bucket]:
        """The buckets usable at `now`, in burn order, without recording anything."""
        return [b for b in self.buckets if b.usable(now)]

    def bucket(self, seq: int) -> Bucket:
        return self.all_buckets[seq - 1]

    def hold(self, number: int) -> Hold:
        return self.holds[number - 1]

    # Operations. Each takes the clock (`now`, ms) and returns what the store should return, or
    # raises Refused. A replay returns the original result and changes nothing; so does a request
    # refused before it reaches the user (bad input, a conflicting key). Anything else first
    # brings the user up to `now`, even when it is then refused.

    def add(
        self,
        amount: int,
        now: int,
        *,
        expire_at: int | None = None,
        ttl: int | None = None,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        priority: int = 0,
    ) -> Entry:
        assert 1 <= amount <= MAX_CREDITS and (expire_at is None or ttl is None)
        meta = dict(metadata or {})
        fingerprint = ("add", amount, expire_at, ttl, tuple(sorted(meta.items())), priority)
        prior = self._replay(key, fingerprint)
        if prior is not None:
            assert isinstance(prior, Entry)
            return prior
        if ttl is not None:
            expire_at = now + ttl
        if expire_at is not None and expire_at <= now:
            raise Refused(InvalidExpiryError)
        self.catch_up(now)
        if amount > self._room():
            raise Refused(InvalidAmountError, amount=amount)
        fill = amount - self._repay(amount)
        seq = self._new_bucket(fill, expire_at, priority) if fill else None
        self.balance += amount
        if self.cycle is not None and self.cycle.running(now):
            self.cycle.added += amount
        entry = self._append(Entry("add", amount, now, 0, expire_at, key, meta, bucket=seq), at=now)
        self._remember(key, fingerprint, entry)
        return entry

    def subtract(
        self,
        amount: int,
        now: int,
        *,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        member: str | None = None,
    ) -> Entry:
        assert 1 <= amount <= MAX_CREDITS
        meta = dict(metadata or {})
        fingerprint = ("subtract", amount, tuple(sorted(meta.items())), member)
        prior = self._replay(key, fingerprint)
        if prior is not None:
            assert isinstance(prior, Entry)
            return prior
        self.catch_up(now)
        if self.balance - amount < -self.limit:
            raise Refused(
                InsufficientCreditsError,
                user_id=self.user_id,
                requested=amount,
                available=self.balance + self.limit,
            )
        capped = self._member_gate(member, amount, now)  # the member's cap, then the limits
        self.usage = self._gate(amount, now)
        if capped is not None:
            assert member is not None
            self.members[member] = capped
        # Out of the buckets as far as there are credits; past that, it is debt.
        parts = self._take(min(amount, max(self.balance, 0)))
        self.balance -= amount
        if self.cycle is not None and self.cycle.running(now):
            self.cycle.used += amount
        entry = self._append(
            Entry("subtract", -amount, now, 0, None, key, meta, member=member, parts=parts), at=now
        )
        self._remember(key, fingerprint, entry)
        return entry

    def set_credit_limit(
        self, limit: int, now: int, metadata: Mapping[str, str] | None = None
    ) -> None:
        """A change is a "credit_limit" entry (amount 0); the same limit again writes none."""
        self.catch_up(now)
        if limit != self.limit:
            change = Entry(
                "credit_limit", 0, now, 0, metadata=dict(metadata or {}), credit_limit=limit
            )
            self._append(change, at=now)
        self.limit = limit

    def reserve(
        self,
        amount: int,
        ttl: int,
        now: int,
        *,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        member: str | None = None,
    ) -> tuple[HoldView, int]:
        """The hold, and the position of its "reserve" entry."""
        meta = dict(metadata or {})
        fingerprint = ("reserve", amount, ttl, tuple(sorted(meta.items())), member)
        prior = self._replay(key, fingerprint)
        if prior is not None:
            assert isinstance(prior, tuple)
            return prior  # type: ignore[return-value]
        self.catch_up(now)
        available = max(self.balance, 0)  # a hold never uses the credit limit
        if amount > available:
            raise Refused(
                InsufficientCreditsError,
                user_id=self.user_id,
                requested=amount,
                available=available,
            )
        capped = self._member_gate(member, amount, now)  # the held amount counts now
        self.usage = self._gate(amount, now)
        if capped is not None:
            assert member is not None
            self.members[member] = capped
        parts = self._take(amount)
        self.balance -= amount
        self.held += amount
        number = len(self.holds) + 1
        entry = self._append(
            Entry("reserve", -amount, now, 0, None, key, meta, hold=number, member=member), now
        )
        hold = Hold(
            number, amount, entry.created_at, now + ttl, parts, len(self.history) - 1,
            member=member,
        )  # fmt: skip
        self.holds.append(hold)
        result = (hold.snapshot(), hold.entry)
        self._remember(key, fingerprint, result)
        return result

    def capture(
        self, number: int, amount: int | None, now: int, *, key: str | None = None
    ) -> Entry:
        fingerprint = ("capture", number, amount)
        prior = self._replay(key, fingerprint)
        if prior is not None:
            assert isinstance(prior, Entry)
            return prior
        self.catch_up(now)
        hold = self._active_hold(number, now)
        charge = hold.amount if amount is None else amount
        if charge > hold.amount:
            raise Refused(CaptureExceedsHoldError, hold=number, amount=charge, held=hold.amount)
        # The charge is the first of the held credits in burn order; the rest goes back.
        charged: list[tuple[int, int]] = []
        rest: list[tuple[int, int]] = []
        left = charge
        for seq, credits in hold.parts:
            used = min(credits, left)
            left -= used
            if used:
                charged.append((seq, used))
            if credits > used:
                rest.append((seq, credits - used))
        entry = self._give_back(
            hold, tuple(rest), now, "capture", captured=charge, key=key, charged=tuple(charged)
        )
        if self.cycle is not None and self.cycle.running(now):
            self.cycle.used += charge
        # What was not captured comes back to the budget, and to the member's cap.
        self._budget_back(hold.amount - charge, self._charged_by(hold), now)
        self._member_back(hold.member, hold.amount - charge, self._charged_by(hold), now)
        self._finish(hold, "captured", now, captured=charge)
        self._remember(key, fingerprint, entry)
        return entry

    def release(
        self, number: int, now: int, *, metadata: Mapping[str, str] | None = None
    ) -> HoldView:
        self.catch_up(now)
        hold = self._active_hold(number, now)
        self._give_back(hold, hold.parts, now, "release", metadata=dict(metadata or {}))
        self._budget_back(hold.amount, self._charged_by(hold), now)
        self._member_back(hold.member, hold.amount, self._charged_by(hold), now)
        self._finish(hold, "released", now)
        return hold.snapshot()

    def reverse(
        self,
        position: int | None,
        now: int,
        *,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Entry:
        """`position`: the entry's place in the history; None for an id the store never made.
        `metadata`: kept in the reverse entry (a keyed retry must give the same)."""
        meta = dict(metadata or {})
        fingerprint: Fingerprint = ("reverse", position)
        if meta:
            fingerprint = ("reverse", position, tuple(sorted(meta.items())))
        prior = self._replay(key, fingerprint)
        if prior is not None:
            assert isinstance(prior, Entry)
            return prior
        self.catch_up(now)
        if position is None:  # an id older than any: after a trim, it may have been trimmed
            raise Refused(TransactionArchivedError if self.trimmed else TransactionNotFoundError)
        if position < self.trimmed:
            raise Refused(TransactionArchivedError)
        target = self.history[position]
        if target.kind not in ("add", "subtract", "capture"):
            raise Refused(NotReversibleError, entry=position, kind=target.kind)
        if position in self.reversals:
            raise Refused(AlreadyReversedError, entry=position, reversal=self.reversals[position])
        if target.kind == "add":
            # What is left of that grant is removed.
            amount, unrestored = 0, 0
            if target.bucket is not None:
                bucket = self.bucket(target.bucket)
                amount, bucket.left = -bucket.left, 0
        else:
            charged = -target.amount if target.kind == "subtract" else target.captured
            assert charged is not None
            overdraft = charged - sum(credits for _, credits in target.parts)
            coming = overdraft + sum(c for s, c in target.parts if self.bucket(s).usable(now))
            if coming > self._room():
                raise Refused(InvalidAmountError)  # of no amount the caller gave
            debt = max(-self.balance, 0)
            restored, unrestored = self._restore(target.parts, now)
            if overdraft:
                # A charge's overdraft part comes back as a never-expiring bucket.
                self._new_bucket(overdraft, None, 0)
            self._take(min(restored + overdraft, debt))  # repays the debt first
            amount = restored + overdraft
            # The charge comes back to the budget if it counted: a subtract by its own entry,
            # a capture by its hold's "reserve" entry, as long as the hold is remembered.
            charged_by: EntryId | None = target.id
            if target.kind == "capture":
                assert target.hold is not None
                hold = self.hold(target.hold)
                charged_by = None if hold.forgotten else self._charged_by(hold)
            self._budget_back(charged, charged_by, now)
            self._member_back(target.member, charged, charged_by, now)
        self.balance += amount
        entry = self._append(
            Entry(
                "reverse",
                amount,
                now,
                0,
                idempotency_key=key,
                metadata=meta,
                related=position,
                unrestored=unrestored,
                member=target.member if target.kind != "add" else None,
            ),
            now,
        )
        self.reversals[position] = len(self.history) - 1
        self._remember(key, fingerprint, entry)
        return entry

    def start_cycle(
        self,
        amount: int,
        period: int,
        given_period: object,
        now: int,
        *,
        renew: bool,
        rollover: int | None,
        key: str | None = None,
    ) -> CycleView:
        fingerprint = ("start_cycle", amount, given_period, renew, rollover)
        prior = self._replay(key, fingerprint)
        if prior is not None:
            assert isinstance(prior, CycleView)
            return prior
        self.catch_up(now)
        if amount > self._room():
            raise Refused(InvalidAmountError, amount=amount)
        carry = 0
        if self.cycle is not None and self.cycle.running(now):
            # A plan change: the running cycle ends now, the new call's rollover applies.
            carry = self._close_grant(self.cycle, rollover, now)
        cycle = Cycle(now, period, given_period, amount, renew, rollover)
        self._grant(cycle, amount, carry, now, now + period, key)
        cycle.started_at = self.history[cycle.entry].created_at
        self.cycle = cycle
        view = cycle.view(now)
        self._remember(key, fingerprint, view)
        return view

    def get_cycle(self, now: int) -> CycleView | None:
        self.catch_up(now)
        return None if self.cycle is None else self.cycle.view(now)

    def cancel_cycle(self, forfeit: bool, now: int) -> CycleView:
        self.catch_up(now)
        cycle = self.cycle
        if cycle is None or not cycle.running(now):
            raise Refused(CycleNotFoundError, user_id=self.user_id)
        cycle.canceled, cycle.renew = True, False
        if forfeit:
            self._close_grant(cycle, 0, now)
        return cycle.view(now)

    def read_balance(self, now: int) -> int:
        self.catch_up(now)
        return self.balance

    def read_history(self, now: int) -> list[Entry]:
        """Newest first: what the store still has (after `trim`)."""
        self.catch_up(now)
        return self.history[self.trimmed :][::-1]

    def trim(self, now: int, retention: int) -> int:
        """History retention: every entry dated before now - retention goes (the store first
        records a checkpoint of what they add up to). Returns how many went now. The state, and
        the usage rollups, are not history: they stay."""
        self.catch_up(now)
        kept = self.trimmed
        while kept < len(self.history) and self.history[kept].id[0] < now - retention:
            kept += 1
        gone, self.trimmed = kept - self.trimmed, kept
        return gone

    # Usage rollups.

    def rollups(self, now: int, periods: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
        """(spent, granted, expired, charges) of the entries whose stream id's ms is in each
        period [start, end): spent is what charges took net of what came back (subtract,
        reserve, capture, release, transfer_out, and reversals that give credits back),
        granted what came in (add, cycle_start, transfer_in, and reversals that take credits
        back), expired what expired; charges counts subtract and reserve entries."""
        self.catch_up(now)
        out = []
        for start, end in periods:
            total = [0, 0, 0, 0]
            for e in self.history:
                if not start <= e.id[0] < end:
                    continue
                if e.kind == "expire":
                    total[2] -= e.amount
                elif e.kind in ("add", "cycle_start", "transfer_in") or (
                    e.kind == "reverse" and e.amount < 0
                ):
                    total[1] += e.amount
                else:
                    total[0] -= e.amount
                    total[3] += e.kind in ("subtract", "reserve")
            out.append((total[0], total[1], total[2], total[3]))
        return out

    # Limits.

    def set_limits(self, limits: LimitSpec | None, now: int) -> LimitsView:
        """The user's own limits; None (or neither a rate nor a budget) clears them. What was
        used stays: a budget of the same period and zone goes on counting it."""
        self.catch_up(now)
        if limits is not None and limits.rate is None and limits.budget is None:
            limits = None
        self.own_limits = limits
        view = self._limits_view(now)
        self.usage.floor = self._next_id(now)
        if self.usage.since is not None:
            self.usage.since = self.usage.floor
        return view

    def get_limits(self, now: int) -> LimitsView:
        self.catch_up(now)
        return self._limits_view(now)

    def check(self, amount: int, now: int) -> DecisionView:
        """Would subtract(amount) pass now? Its first refusal, and nothing used."""
        self.catch_up(now)
        available = self.balance + self.limit
        if self.balance - amount < -self.limit:
            return DecisionView(False, "credits", None, available)
        try:
            self._gate(amount, now)
        except Refused as refused:
            reason = "budget" if refused.error is BudgetExceededError else "rate"
            return DecisionView(False, reason, refused.facts["retry_after"], available)
        return DecisionView(True, None, None, available)

    def limits(self) -> LimitSpec | None:
        """The limits in effect: the user's own, else the client's default."""
        return self.own_limits if self.own_limits is not None else self.default_limits

    def _limits_view(self, now: int) -> LimitsView:
        limits = self.limits()
        if limits is None:
            return LimitsView(None, None, 0, None, False)
        default = self.own_limits is None
        if limits.budget is None:
            return LimitsView(limits.rate, None, 0, None, default)
        _, end, fresh = self._budget_period(limits.budget, now)
        used = 0 if fresh else self.usage.used or 0
        return LimitsView(limits.rate, limits.budget, used, end, default)

    def _gate(self, amount: int, now: int) -> Usage:
        """What a charge of `amount` at `now` uses of the limits in effect, or Refused: budget
        before rate. The credits were checked before, by the caller."""
        limits = self.limits()
        usage = self.usage
        if limits is None:
            return usage
        after = replace(usage)
        budget = limits.budget
        if budget is not None:
            start, end, fresh = self._budget_period(budget, now)
            used = 0 if fresh else usage.used or 0
            if amount > budget.amount - used:
                raise Refused(
                    BudgetExceededError,
                    user_id=self.user_id,
                    requested=amount,
                    remaining=max(budget.amount - used, 0),
                    resets_at=end,
                    retry_after=end - now,
                    limit=budget,
                )
            # Counted from: as before within a period; from its start when a period follows
            # another of the same budget; from this charge's entry when this budget (period,
            # zone) begins.
            since: EntryId | None
            if not fresh:
                since = usage.since
            elif usage.counted == budget.counted:
                since = (start, 0)
            else:
                since = self._next_id(now)
            if usage.floor is not None and since is not None and since < usage.floor:
                since = usage.floor
            after.used, after.start, after.end = used + amount, start, end
            after.since, after.counted = since, budget.counted
        rate = limits.rate
        if rate is not None:
            if amount > rate.burst:
                raise Refused(
                    RateLimitedError,
                    user_id=self.user_id,
                    requested=amount,
                    retry_after=None,  # never
                    limit=rate,
                )
            tat = self._rate_ahead(rate, now) + amount * rate.per
            over = tat - rate.burst * rate.per
            if over > 0:
                raise Refused(
                    RateLimitedError,
                    user_id=self.user_id,
                    requested=amount,
                    retry_after=-(-over // rate.amount),  # ms, rounded up
                    limit=rate,
                )
            after.rb, after.ro, after.rate = now, tat, rate
        return after

    def _rate_ahead(self, rate: Rate, now: int) -> int:
        """How far the rate's theoretical arrival time is ahead of `now`, in ticks of 1/amount
        ms: 0 for a rate that never counted (or another rate counted last)."""
        usage = self.usage
        if usage.rate != rate or usage.ro is None:
            return 0
        assert usage.rb is not None
        elapsed = max(now - usage.rb, 0)  # a clock step back does not run the rate backwards
        if elapsed > usage.ro // rate.amount:
            return 0
        return usage.ro - elapsed * rate.amount

    def limit_room(self, now: int, *, budget: bool = True, rate: bool = True) -> int | None:
        """The largest charge the limits in effect (the budget, the rate or both) let through at
        `now` (None: no such limits): not an answer the store gives, a target for tests aiming
        at the limits' edges."""
        limits = self.limits()
        if limits is None:
            return None
        limits = LimitSpec(limits.rate if rate else None, limits.budget if budget else None)
        if limits.rate is None and limits.budget is None:
            return None
        room = MAX_CREDITS
        if limits.budget is not None:
            _, _, fresh = self._budget_period(limits.budget, now)
            used = 0 if fresh else self.usage.used or 0
            room = min(room, max(limits.budget.amount - used, 0))
        if limits.rate is not None:
            spec = limits.rate
            ahead = self._rate_ahead(spec, now)
            room = min(room, spec.burst, max(spec.burst * spec.per - ahead, 0) // spec.per)
        return room

    def _budget_period(self, budget: Budget, now: int) -> tuple[int, int, bool]:
        """The budget period containing `now`: start, end, and whether it is a new one (nothing
        spent in it yet). The period being counted goes on until its end, also for a clock that
        stepped back before its start."""
        usage = self.usage
        if usage.counted == budget.counted and usage.end is not None and now < usage.end:
            assert usage.start is not None
            return usage.start, usage.end, False
        if isinstance(budget.period, int):
            start = now - now % budget.period
            return start, start + budget.period, True
        start, end = calendar_period(now, budget.period, budget.tz)
        return start, end, True

    def _budget_back(self, amount: int, charged_by: EntryId | None, at: int) -> None:
        """`amount` credits charged (or held) by the entry `charged_by` come back to the budget
        at `at`, if they were counted in the period still counting at `at`."""
        usage = self.usage
        if amount <= 0 or charged_by is None or usage.used is None:
            return
        assert usage.since is not None and usage.end is not None
        if charged_by < usage.since or at >= usage.end:
            return
        usage.used = max(usage.used - amount, 0)

    # Members of a pool (issue 19).

    def set_member_cap(self, member: str, budget: Budget | None, now: int) -> MemberView:
        """A member's cap; None removes it. A cap of the same period and zone keeps what was
        spent in the running period; another starts afresh, counting from the next entry."""
        self.catch_up(now)
        if budget is None:
            self.members.pop(member, None)
            return MemberView(None, 0, None)
        old = self.members.get(member)
        if old is not None and old.budget.counted == budget.counted and now < old.end:
            cap = MemberCap(budget, old.used, old.start, old.end, old.since)
        else:
            # From the entry after the last one: every later charge comes after it, also one
            # dated earlier by a clock that stepped back.
            last = self.history[-1].id if self.history else (0, 0)
            start, end = self._period(budget, now)
            cap = MemberCap(budget, 0, start, end, (last[0], last[1] + 1))
        self.members[member] = cap
        return MemberView(budget, cap.used, cap.end)

    def get_member_usage(self, member: str, now: int) -> MemberView:
        self.catch_up(now)
        cap = self.members.get(member)
        if cap is None:
            return MemberView(None, 0, None)
        if now < cap.end:
            return MemberView(cap.budget, cap.used, cap.end)
        return MemberView(cap.budget, 0, self._period(cap.budget, now)[1])

    def _period(self, budget: Budget, now: int) -> tuple[int, int]:
        if isinstance(budget.period, int):
            start = now - now % budget.period
            return start, start + budget.period
        return calendar_period(now, budget.period, budget.tz)

    def _member_gate(self, member: str | None, amount: int, now: int) -> MemberCap | None:
        """What a member's charge of `amount` makes of its cap (None: no member or no cap),
        or Refused."""
        cap = None if member is None else self.members.get(member)
        if cap is None:
            return None
        if now < cap.end:
            start, end, used, since = cap.start, cap.end, cap.used, cap.since
        else:
            (start, end), used, since = self._period(cap.budget, now), 0, self._next_id(now)
        if amount > cap.budget.amount - used:
            raise Refused(
                BudgetExceededError,
                user_id=self.user_id,
                requested=amount,
                remaining=max(cap.budget.amount - used, 0),
                resets_at=end,
                retry_after=end - now,
                limit=cap.budget,
                member=member,
            )
        return MemberCap(cap.budget, used + amount, start, end, since)

    def _member_back(
        self, member: str | None, amount: int, charged_by: EntryId | None, at: int
    ) -> None:
        """As `_budget_back`, for the cap of the member who charged."""
        cap = None if member is None else self.members.get(member)
        if cap is None or amount <= 0 or charged_by is None:
            return
        if charged_by < cap.since or at >= cap.end:
            return
        cap.used = max(cap.used - amount, 0)

    # Time.

    def catch_up(self, now: int) -> None:
        """Everything that became due by `now`, each at its own time, oldest first."""
        while True:
            due: list[tuple[int, int, int]] = []  # (time, rank, which)
            cycle = self.cycle
            if cycle is not None and not cycle.ended and cycle.ends_at <= now:
                due.append((cycle.ends_at, 0, 0))
            due += [(h.expires_at, 1, h.number) for h in self.holds if h.status == "active"]
            due += [(b.expire_at, 2, b.seq) for b in self.buckets if b.expire_at is not None]
            due = [d for d in due if d[0] <= now]
            if not due:
                break
            at, rank, which = min(due)
            if rank == 0:
                assert cycle is not None
                self._period_ends(cycle, now)
            elif rank == 1:
                hold = self.hold(which)
                self._give_back(hold, hold.parts, at, "release")
                self._budget_back(hold.amount, self._charged_by(hold), at)
                self._member_back(hold.member, hold.amount, self._charged_by(hold), at)
                self._finish(hold, "expired", at)
            else:
                self._expire(self.bucket(which), at)
        # A finished hold is forgotten once an operation sees its day pass, for good: a clock
        # that steps back later does not bring it back.
        for hold in self.holds:
            if hold.ended_at is not None and now >= hold.ended_at + HOLD_MEMORY:
                hold.forgotten = True

    def _expire(self, bucket: Bucket, at: int) -> None:
        self.balance -= bucket.left
        self._append(Entry("expire", -bucket.left, at, 0, at), at)
        bucket.left = 0

    def _period_ends(self, cycle: Cycle, now: int) -> None:
        boundary = cycle.ends_at
        if not cycle.renew:
            # The grant is an ordinary bucket: it expires at the end by itself.
            cycle.ended = True
            return
        periods = self._periods_to_start(cycle, now)
        carry = self._close_grant(cycle, cycle.rollover, boundary)
        cycle.index += periods
        ends = cycle.anchor + (cycle.index + 1) * cycle.period
        # An idle user gets one grant, the current period's; periods that passed unseen grant 0
        # (a run of them, before any other event, shares one entry: `periods`).
        # A renewal cannot refuse: its grant stops where the balance would pass 2**53-1.
        grant = min(cycle.amount, self._room()) if ends > now else 0
        self._grant(cycle, grant, carry, boundary, ends, None, periods if periods > 1 else None)
        cycle.started_at = ends - cycle.period

    def _periods_to_start(self, cycle: Cycle, now: int) -> int:
        """How many periods a renewal at the cycle's end starts: 1, or every period from there
        on that also ends by `now` and before any other event (a bucket's expiry, a hold's ttl,
        a finished hold's memory ending)."""
        boundary = cycle.ends_at
        others = [
            b.expire_at for b in self.buckets if b.expire_at is not None and b.seq != cycle.bucket
        ]
        others += [h.expires_at for h in self.holds if h.status == "active"]
        others += [
            h.ended_at + HOLD_MEMORY
            for h in self.holds
            if h.ended_at is not None and not h.forgotten and h.ended_at + HOLD_MEMORY >= boundary
        ]
        limit = min([now - cycle.period, *others])
        if limit < boundary + cycle.period:
            return 1
        return (limit - boundary) // cycle.period + 1

    def _grant(
        self,
        cycle: Cycle,
        amount: int,
        carry: int,
        at: int,
        ends: int,
        key: str | None,
        periods: int | None = None,
    ) -> None:
        fill = amount + carry - self._repay(amount)
        cycle.bucket = self._new_bucket(fill, ends, 0) if fill else None
        self.balance += amount
        self._append(Entry("cycle_start", amount, at, 0, ends, key, periods=periods), at)
        cycle.entry = len(self.history) - 1
        cycle.ends_at = ends
        cycle.granted, cycle.used, cycle.added = amount + carry, 0, 0

    def _close_grant(self, cycle: Cycle, rollover: int | None, at: int) -> int:
        """Ends the cycle's grant at `at`: what carries over is returned, the rest expires."""
        if cycle.bucket is None:
            return 0
        bucket = self.bucket(cycle.bucket)
        cycle.bucket = None
        left, bucket.left = bucket.left, 0
        carry = left if rollover is None else min(left, rollover)
        if left > carry:
            self.balance -= left - carry
            self._append(Entry("expire", -(left - carry), at, 0, bucket.expire_at), at)
        return carry

    # Holds.

    def _active_hold(self, number: int, now: int) -> Hold:
        if not 1 <= number <= len(self.holds):
            raise Refused(HoldNotFoundError, hold=number)
        hold = self.hold(number)
        if hold.status != "active":
            assert hold.ended_at is not None
            if hold.forgotten:
                raise Refused(HoldNotFoundError, hold=number)
            raise Refused(HoldFinishedError, hold=number, status=hold.status)
        return hold

    def _finish(self, hold: Hold, status: str, at: int, captured: int = 0) -> None:
        hold.status, hold.captured, hold.ended_at = status, captured, at
        self.held -= hold.amount

    def _give_back(
        self,
        hold: Hold,
        parts: Parts,
        at: int,
        kind: str,
        *,
        captured: int | None = None,
        key: str | None = None,
        charged: Parts = (),
        metadata: Mapping[str, str] | None = None,
    ) -> Entry:
        """Held credits come back at `at` to their buckets; those of buckets expired by then
        come back and expire at once. What comes back repays a debt first."""
        debt = max(-self.balance, 0)
        restored, expired = self._restore(parts, at)
        self._take(min(restored, debt))
        self.balance += restored + expired
        entry = self._append(
            Entry(
                kind,
                restored + expired,
                at,
                0,
                idempotency_key=key,
                metadata=dict(metadata or {}),
                hold=hold.number,
                captured=captured,
                member=hold.member,
                parts=charged,
            ),
            at,
        )
        if expired:
            self.balance -= expired
            self._append(Entry("expire", -expired, at, 0), at)
        return entry

    # Buckets.

    def _new_bucket(self, amount: int, expire_at: int | None, priority: int) -> int:
        seq = len(self.all_buckets) + 1
        self.all_buckets.append(Bucket(seq, amount, expire_at, priority))
        return seq

    def _take(self, need: int) -> Parts:
        """`need` credits out of the buckets, in burn order."""
        parts = []
        for bucket in self.buckets:
            if need == 0:
                break
            took = min(need, bucket.left)
            bucket.left -= took
            need -= took
            parts.append((bucket.seq, took))
        assert need == 0, "the buckets hold max(balance, 0)"
        return tuple(parts)

    def _restore(self, parts: Parts, at: int) -> tuple[int, int]:
        """Credits back into the buckets they came from: (restored, expired by `at`)."""
        restored = expired = 0
        for seq, credits in parts:
            bucket = self.bucket(seq)
            if bucket.usable(at):
                bucket.left += credits
                restored += credits
            else:
                expired += credits
        return restored, expired

    def _repay(self, amount: int) -> int:
        """The part of a grant that repays debt."""
        return min(amount, max(-self.balance, 0))

    def _room(self) -> int:
        # The balance plus what holds hold stays within 2**53-1: what comes back always fits.
        return MAX_CREDITS - self.balance - self.held

    # History and idempotency.

    def _next_id(self, at: int) -> EntryId:
        """The id of the next entry dated `at`. Ids only grow: an entry dated at or before the
        last one (a clock step back) takes the last one's ms, with the next seq."""
        if self.history:
            last_ms, last_seq = self.history[-1].id
            if at <= last_ms:
                return (last_ms, last_seq + 1)
        return (at, 0)

    def _append(self, entry: Entry, at: int) -> Entry:
        entry_id = self._next_id(at)
        stamped = replace(entry, created_at=entry_id[0], balance_after=self.balance, id=entry_id)
        self.history.append(stamped)
        return stamped

    def _charged_by(self, hold: Hold) -> EntryId:
        """The entry that counted a hold against the budget: its "reserve" entry."""
        return self.history[hold.entry].id

    def _replay(self, key: str | None, fingerprint: Fingerprint) -> object:
        """The original result for a retry of the same request; a conflict for a different one."""
        if key is None or key not in self.records:
            return None
        recorded, result = self.records[key]
        if recorded != fingerprint:
            raise Refused(IdempotencyConflictError, user_id=self.user_id, idempotency_key=key)
        return result

    def _remember(self, key: str | None, fingerprint: Fingerprint, result: object) -> None:
        if key is not None:
            self.records[key] = (fingerprint, result)


@dataclass(frozen=True)
class TransferView:
    """A completed transfer as `Transfer` reports it: its number (in the order transfers began),
    the positions of its two entries in their users' histories, times in ms."""

    number: int
    from_user: str
    to_user: str
    amount: int
    created_at: int
    out_entry: int
    in_entry: int
    expire_at: int | None
    idempotency_key: str | None
    metadata: Mapping[str, str]


class LedgerModel:
    """Every user's ledger; users exist implicitly, as in the store."""

    def __init__(self, default_limits: LimitSpec | None = None) -> None:
        self.users: dict[str, UserLedger] = {}
        self.default_limits = default_limits  # the client's, for users without their own
        self.transfers = 0  # how many began (took their credits out of a source)

    def transfer(
        self,
        source: str,
        dest: str,
        amount: int,
        now: int,
        *,
        key: str | None = None,
        metadata: Mapping[str, str] | None = None,
        expire_at: int | None = None,
    ) -> TransferView:
        """Credits from `source` to `dest`, all at `now`: out of the source's buckets (never
        its credit limit), into the destination's, each keeping its bucket's expiry (or
        `expire_at`), a debt repaid first; a destination with no room gives them back (a
        reverse of the transfer_out entry) and the transfer is refused. A keyed retry answers
        the same, once."""
        assert source != dest and 1 <= amount <= MAX_CREDITS
        out, into = self.user(source), self.user(dest)
        meta = dict(metadata or {})
        fingerprint = ("transfer", dest, amount, expire_at, tuple(sorted(meta.items())))
        prior = out._replay(key, fingerprint)
        if isinstance(prior, Refused):
            raise prior
        if prior is not None:
            assert isinstance(prior, TransferView)
            return prior
        if expire_at is not None and expire_at <= now:
            raise Refused(InvalidExpiryError)
        out.catch_up(now)
        if amount > out.balance:
            raise Refused(
                InsufficientCreditsError, user_id=source, requested=amount, available=out.balance
            )
        self.transfers += 1
        number = self.transfers
        parts = out._take(amount)
        out.balance -= amount
        sent = out._append(
            Entry("transfer_out", -amount, now, 0, None, key, meta, transfer=number,
                  counterparty=dest, parts=parts),
            now,
        )  # fmt: skip
        out_position = len(out.history) - 1
        into.catch_up(now)
        if amount > into._room():
            restored, expired = out._restore(parts, now)
            assert not expired  # taken at now, from buckets usable at now
            out.balance += restored
            out._append(
                Entry("reverse", restored, now, 0, related=out_position, unrestored=0,
                      transfer=number),
                now,
            )  # fmt: skip
            out.reversals[out_position] = len(out.history) - 1
            refused = Refused(TransferRefusedError, reason="BALANCE_LIMIT")
            out._remember(key, fingerprint, refused)
            raise refused
        skip = into._repay(amount)
        pieces: list[list[Any]] = []
        if expire_at is not None:
            pieces = [[expire_at, amount - skip]] if amount > skip else []
        else:
            for seq, credits in parts:
                used = min(credits, skip)
                skip, credits = skip - used, credits - used
                expiry = out.bucket(seq).expire_at
                if credits and pieces and pieces[-1][0] == expiry:
                    pieces[-1][1] += credits
                elif credits:
                    pieces.append([expiry, credits])
        for expiry, credits in pieces:
            into._new_bucket(credits, expiry, 0)
        into.balance += amount
        into._append(
            Entry("transfer_in", amount, now, 0, expire_at, None, meta, transfer=number,
                  counterparty=source),
            now,
        )  # fmt: skip
        view = TransferView(
            number, source, dest, amount, now, out_position, len(into.history) - 1, expire_at,
            key, meta,
        )  # fmt: skip
        out._remember(key, fingerprint, view)
        assert sent is out.history[out_position]
        return view

    def user(self, user_id: str) -> UserLedger:
        if user_id not in self.users:
            self.users[user_id] = UserLedger(user_id, self.default_limits)
        return self.users[user_id]
