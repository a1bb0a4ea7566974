"""The store against the reference model: random operation sequences, checked after every step.

A hypothesis `RuleBasedStateMachine` drives 2-3 users through every operation: adds (expiring at
a time, after a ttl, or never; with a priority; with idempotency keys from a small pool; with
metadata), subtracts (sometimes more than can be taken), retries of earlier keyed writes and
conflicting reuses of their keys, credit limits, holds (reserve, capture all or part, release,
ttl), reversals (of every kind of entry, twice, and of unknown ids), cycles (fixed periods,
rollover 0 / N / all, renewing or not, upgrades, cancel with and without forfeit), limits (the
client's default limits in half the runs; a user's own rate and budget set, changed in amount
only, replaced and cleared; budgets per fixed window and per calendar day, week, month or year in
New York or Kolkata; charges aimed at exactly what the limits let through, one less or one more;
`check`) and reads, while an injected clock moves (0 ms, 1 ms, milliseconds to seconds, days,
exactly onto expiries, hold ttls, cycle ends, budget period ends and the rate's slots, and now and
then a step back).

After each operation on a user, the store must agree with the model on: the operation's result
or error (limits: which refusal, the budget's remaining credits and reset time, the rate's
retry_after; `check`'s decision; `get_limits`' budget_used and budget_resets_at), the balance,
the whole history, the balance details, the current cycle, what was used of the limits (read raw
from the user's state hash: the rate's last charge and theoretical arrival time, the budget spent,
its period and the first entry it counts) and the buckets read raw from Redis (each the same
bucket, by id, as the model's, with its priority); and the balance must equal the sum of the
history's amounts. After every step the usable buckets of every user must match, read raw (no
operation: nothing is brought up to date by looking).

It runs on the real Redis and on memory://, each with the sync and the asyncio client; and, on
each backend, a variant about limits (LimitedLedgerMachine: every user limited and funded from
the start, longer runs, no cycles). Each run of a machine has a fresh namespace (and memory store)
whose keys it deletes at the end.

Profiles, chosen with CREDICI_HYPOTHESIS_PROFILE:
    ci    (default) a fixed, derandomized set of examples (60 runs of 40 steps per backend and
          API, and 60 runs of 60 steps about limits per backend), not shrunk, with no example
          database: CI is deterministic; ~40 s in all.
    long  many more runs and steps, random, failures saved in .hypothesis/:
              CREDICI_HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/model
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta, timezone
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from credici_redis import AsyncCrediciClient, CrediciClient, CrediciError
from credici_redis._core.keys import user_keys, user_tag
from credici_redis.errors import (
    TransactionNotFoundError,
    TransferRefusedError,
)
from credici_redis.models import (
    Budget,
    Cycle,
    Decision,
    Hold,
    Limits,
    MemberUsage,
    RateLimit,
    Transaction,
    Transfer,
)
from tests.conftest import REDIS_URL, FakeClock, delete_namespace
from tests.model import ledger_model as model
from tests.model.ledger_model import (
    DAY,
    MAX_CREDITS,
    CycleView,
    DecisionView,
    Entry,
    HoldView,
    LedgerModel,
    LimitSpec,
    LimitsView,
    MemberView,
    Refused,
    TransferView,
    Usage,
    UserLedger,
)

# The model needs neither the batching client nor the backends the contract suite adds.
BACKENDS = ("redis", "memory")
APIS = ("sync", "async")

# Real I/O on every step: no per-example deadline. No health check needs suppressing: the
# machine makes its own namespace and store (no function-scoped fixture is shared by examples),
# and too_slow times the drawing of the steps, not the Redis round trips between the draws.
_COMMON = {"deadline": None}
# CI does not shrink: shrinking a failure of a machine doing real I/O can outlast the test's
# timeout, which would lose the report; the unshrunk steps are printed instead. The long profile
# shrinks.
settings.register_profile(
    "credici-model-ci",
    max_examples=60,
    stateful_step_count=40,
    phases=[Phase.explicit, Phase.generate],
    derandomize=True,
    database=None,
    print_blob=False,
    **_COMMON,
)
settings.register_profile(
    "credici-model-long", max_examples=1000, stateful_step_count=80, **_COMMON
)
PROFILE = os.environ.get("CREDICI_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in {"ci", "long"}:
    raise pytest.UsageError(f"CREDICI_HYPOTHESIS_PROFILE must be 'ci' or 'long', not {PROFILE!r}")
SETTINGS = settings.get_profile(f"credici-model-{PROFILE}")
# Runs about limits: longer ones (a charge, time passing, a give-back, another charge), fewer.
LIMITED_SETTINGS = settings(
    SETTINGS,
    max_examples=SETTINGS.max_examples,
    stateful_step_count=SETTINGS.stateful_step_count * 3 // 2,
)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MS = timedelta(milliseconds=1)
SECOND = 1000  # ms

# Store bugs found by this machine, each reproduced by a test in test_known_bugs.py: the facts of
# these (error, operation) pairs are not compared until it is fixed. Remove an entry with its fix.
KNOWN_BUGS: set[tuple[type[Exception], str]] = set()  # none left: the facts were fixed
NEVER_ID = "999999999999999"  # the expiry part of a never-expiring bucket's id

# Ids with the characters a key scheme could trip on (':', '{', '}', '%', spaces, non-ASCII).
USER_IDS = ("alice", "b{o}b:1", "çarol 100%")
USAGE_TZ = "Asia/Kolkata"
RETENTION = timedelta(days=30)  # clock steps go up to 100 days: trims happen
IDEMPOTENCY_KEYS = ("k1", "k2", "k3")  # a small pool, shared by the users: keys are per user


def ms(moment: datetime) -> int:
    return (moment - EPOCH) // MS


def at_ms(value: int) -> datetime:
    return EPOCH + value * MS


def entry_id(tx: Transaction) -> tuple[int, int]:
    """The (ms, seq) of the stream entry behind a transaction id "<ms>-<seq>@<user>"."""
    stamp, seq = tx.transaction_id.partition("@")[0].split("-")
    return int(stamp), int(seq)


def first_difference(got: list[Entry], expected: list[Entry]) -> str:
    """Where two histories (oldest first) part: what a failure report needs to show."""
    i = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), None)
    if i is None:
        return f"{len(got)} entries in the store, {len(expected)} in the model"
    return f"entry {i}: store {got[i]}, model {expected[i]}; before it: {got[max(i - 2, 0) : i]}"


class Driver:
    """One client of the store; an async one runs on a private event loop owned by the machine."""

    def __init__(
        self, api: str, url: str, namespace: str, clock: FakeClock, limits: Limits | None
    ) -> None:
        self.loop = None if api == "sync" else asyncio.new_event_loop()
        self.client: Any
        # Usage days in a zone 5:30 off UTC: its midnights fall within hours, and every
        # operation may have to ask for the zone's offsets first (ZONE).
        options: dict[str, Any] = {
            "namespace": namespace,
            "clock": clock,
            "usage_tz": USAGE_TZ,
            "history_retention": RETENTION,
        }
        if limits is not None:
            options["default_limits"] = limits
        if self.loop is None:
            self.client = CrediciClient.from_url(url, **options)
        else:
            self.client = AsyncCrediciClient.from_url(url, **options)

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return result if self.loop is None else self.loop.run_until_complete(result)

    def close(self) -> None:
        if self.loop is None:
            self.client.close()
            return
        try:
            self.loop.run_until_complete(self.client.aclose())
        finally:
            self.loop.close()


@dataclass(frozen=True)
class Call:
    """An add or subtract exactly as sent, kept so that a later step can send it again."""

    user: str
    method: str  # "add" or "subtract"
    amount: int
    expire_at: datetime | None = None
    ttl: timedelta | None = None
    key: str | None = None
    metadata: dict[str, str] | None = None
    priority: int = 0
    member: str | None = None  # subtract: a pool's member charging


# How an add expires: ("never",), ("ttl", ms), ("at", ms from now; <= 0 is invalid),
# ("tie", i): at the expiry of an existing bucket, so that burn-order ties happen.
expiries = st.one_of(
    st.just(("never",)),
    st.tuples(st.just("ttl"), st.sampled_from([1, 2, SECOND, 60 * SECOND, DAY, 30 * DAY])),
    st.tuples(st.just("ttl"), st.integers(1, 3 * DAY)),
    st.tuples(st.just("at"), st.sampled_from([-DAY, -1, 0, 1, SECOND, DAY])),
    st.tuples(st.just("at"), st.integers(-SECOND, 10 * DAY)),
    st.tuples(st.just("tie"), st.integers(0, 50)),
)
# Mostly small grants, now and then one near the cap of 2**53-1.
add_amounts = st.one_of(
    *[st.integers(1, 20)] * 12,
    *[st.integers(1, 10_000)] * 3,
    st.integers(MAX_CREDITS - 30, MAX_CREDITS),
)
priorities = st.one_of(*[st.just(0)] * 3, st.sampled_from([-1_000_000, -1, 1, 7, 1_000_000]))
# ("abs", n); ("all", d): what the user can spend + d, for "exactly all" and "just over";
# ("first", k, d): the first k+1 usable buckets in burn order + d, for burns across buckets that
# stop exactly at, just before or just after a bucket's end; ("limit", which, d): the most the
# user's limits let through now (what is left of the budget, what the rate allows, or both) + d.
charge_amounts = st.one_of(
    st.tuples(st.just("abs"), st.integers(1, 30)),
    st.tuples(st.just("abs"), st.integers(1, 4)),  # small: under most limits
    st.tuples(st.just("all"), st.integers(-3, 3)),
    st.tuples(st.just("first"), st.integers(0, 4), st.integers(-1, 1)),
    st.tuples(st.just("first"), st.integers(0, 4), st.integers(-1, 1)),
    st.tuples(
        st.just("limit"), st.sampled_from(["both", "budget", "rate"]), st.sampled_from([-1, 0, 1])
    ),
    st.tuples(
        st.just("limit"), st.sampled_from(["both", "budget", "rate"]), st.sampled_from([-1, 0, 1])
    ),
)
# A quarter of the writes carry a key; reuse_key sends most retries and conflicting requests.
keys = st.one_of(*[st.none()] * 3, st.sampled_from(IDEMPOTENCY_KEYS))
metadatas = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["a", "endpoint"]), st.text("xé✓", max_size=3), min_size=1, max_size=2
    ),
)
# How the clock moves: ("by", ms) forward; ("to", i, d): to something due (a bucket's expiry, a
# hold's ttl, a cycle's end) + d ms; now and then ("by", -ms): a step back (a failover to a server
# with a skewed clock), the only way something can fall due before the user's last entry.
clock_steps = st.one_of(
    st.tuples(st.just("by"), st.sampled_from([0, 1])),
    st.tuples(st.just("by"), st.integers(1, 120 * SECOND)),
    st.tuples(st.just("by"), st.integers(2, 3 * SECOND)),  # within a rate's slots
    st.tuples(st.just("by"), st.integers(1, 100).map(lambda days: days * DAY)),
    st.tuples(st.just("to"), st.integers(0, 50), st.sampled_from([-1, 0, 0, 1])),
    st.tuples(st.just("to"), st.integers(0, 50), st.sampled_from([-1, 0, 0, 1])),
    st.tuples(st.just("by"), st.sampled_from([-1, -SECOND, -3600 * SECOND, -2 * DAY])),
)
# Cycle periods: int days or a timedelta, as given to start_cycle.
# At least half a day, so that a jump of months renews a few hundred times, not millions.
periods = st.sampled_from([1, 30, timedelta(hours=12), timedelta(days=7, milliseconds=1)])
cycle_amounts = st.one_of(st.just(0), st.integers(1, 50))
rollovers = st.sampled_from([0, 0, 3, 20, None])
hold_ttls = st.sampled_from([1, SECOND, 300 * SECOND, DAY, 3 * DAY])
# Limits: small rates whose slots the clock's steps (ms, seconds, days) cross, and small budgets
# per fixed window (counted from the epoch) or per calendar period in zones that are not UTC (the
# machine's clock starts at 2030-01-01 00:00 UTC: still 2029 in New York, already 05:30 in
# Kolkata).
rate_limits = st.builds(
    RateLimit,
    st.sampled_from([1, 3, 20, 100]),
    st.sampled_from([7 * MS, timedelta(seconds=1), timedelta(seconds=30), timedelta(hours=1)]),
    st.one_of(st.none(), st.sampled_from([1, 10, 60, 500])),
)
budget_periods = st.sampled_from(
    [
        (timedelta(seconds=90), "UTC"),
        (timedelta(hours=1), "UTC"),
        (timedelta(days=1), "UTC"),
        ("day", "America/New_York"),
        ("day", "Asia/Kolkata"),
        ("week", "Asia/Kolkata"),
        ("month", "America/New_York"),
        ("month", "Asia/Kolkata"),
        ("year", "America/New_York"),
    ]
)
budget_amounts = st.one_of(st.integers(1, 60), st.sampled_from([1, 5, 100, 1000]))
# Who charges (issue 19): mostly the account itself, else one of two members of the pool.
members = st.sampled_from([None, None, None, "alice", "bob"])
budgets = st.builds(lambda n, p: Budget(n, p[0], p[1]), budget_amounts, budget_periods)
# The client's default limits, for the users without their own: none in half the runs.
default_limits = st.one_of(
    st.none(),
    st.none(),
    st.builds(Limits, rate=st.one_of(st.none(), rate_limits), budget=budgets),
    st.builds(Limits, rate=rate_limits, budget=st.one_of(st.none(), budgets)),
)
# ... and always a budget, mostly with a rate, in the runs about limits.
budgeted_limits = st.builds(
    Limits, rate=st.one_of(st.none(), rate_limits, rate_limits, rate_limits), budget=budgets
)


def period_ms(period: int | timedelta) -> int:
    return period * DAY if isinstance(period, int) else period // MS


def rate_spec(rate: RateLimit | None) -> model.Rate | None:
    if rate is None:
        return None
    assert rate.burst is not None
    return model.Rate(rate.amount, rate.per // MS, rate.burst)


def budget_spec(budget: Budget | None) -> model.Budget | None:
    if budget is None:
        return None
    period = budget.period if isinstance(budget.period, str) else budget.period // MS
    return model.Budget(budget.amount, period, budget.tz)


def limit_of(limit: RateLimit | Budget | None) -> model.Rate | model.Budget | None:
    """The rate or budget a refusal names, in the model's terms."""
    return rate_spec(limit) if isinstance(limit, RateLimit) else budget_spec(limit)


def limit_spec(limits: Limits | None) -> LimitSpec | None:
    """A client's default_limits in the model's terms (None: no limits)."""
    if limits is None or (limits.rate is None and limits.budget is None):
        return None
    return LimitSpec(rate_spec(limits.rate), budget_spec(limits.budget))


def member_view(usage: MemberUsage) -> MemberView:
    resets = usage.resets_at
    return MemberView(budget_spec(usage.cap), usage.used, None if resets is None else ms(resets))


def limits_view(limits: Limits) -> LimitsView:
    resets = limits.budget_resets_at
    return LimitsView(
        rate_spec(limits.rate),
        budget_spec(limits.budget),
        limits.budget_used,
        None if resets is None else ms(resets),
        limits.default,
    )


def decision_view(decision: Decision) -> DecisionView:
    wait = decision.retry_after
    if wait is not None:
        assert wait % MS == timedelta(0), wait
    return DecisionView(
        decision.allowed,
        decision.reason,
        None if wait is None else wait // MS,
        decision.available,
    )


def usage_fields(usage: Usage) -> list[str | None]:
    """A user's usage of its limits as the store keeps it in the state hash (rb ro rk bu bs be
    bc bk bf, see lua/_ledger.lua, "Limits"): None for a field never written."""

    def num(value: int | None) -> str | None:
        return None if value is None else str(value)

    rate, counted = usage.rate, usage.counted
    return [
        num(usage.rb),
        num(usage.ro),
        None if rate is None else f"R{rate.amount}:{rate.per}:{rate.burst}",
        num(usage.used),
        num(usage.start),
        num(usage.end),
        None if usage.since is None else f"{usage.since[0]}-{usage.since[1]}",
        None if counted is None else f"{counted[0]}:{counted[1]}",
        None if usage.floor is None else f"{usage.floor[0]}-{usage.floor[1]}",
    ]


class LedgerMachine(RuleBasedStateMachine):
    """The store of one backend and client, and the model, fed the same operations."""

    users = Bundle("users")

    def __init__(self, backend: str, api: str) -> None:
        super().__init__()
        self.namespace = f"t{uuid.uuid4().hex[:12]}"
        self.backend, self.api = backend, api
        # A memory:// store of this run's own, shared by the driver and the inspector.
        self.url = url = REDIS_URL if backend == "redis" else f"memory://{self.namespace}"
        self.clock = FakeClock()
        self.clock.now = datetime(2030, 1, 1, tzinfo=timezone.utc)  # runs replay identically
        self.model = LedgerModel()
        self.user_ids: list[str] = []
        self.keyed_calls: list[Call] = []  # every keyed add/subtract sent, failed ones included
        self.recorded_calls: list[Call] = []  # those that recorded their key
        # What the store calls the model's things, learnt as they appear: transaction ids by
        # history position, hold ids by number, bucket ids by (user, seq).
        self.tx_ids: dict[str, list[str]] = {}
        self.hold_ids: dict[str, list[str]] = {}
        self.bucket_ids: dict[tuple[str, int], str] = {}
        self.transfer_ids: list[str] = []  # by the model's transfer number - 1
        # The inspector reads buckets raw; it shares the driver's store but never runs a script.
        self.inspector = CrediciClient.from_url(url, namespace=self.namespace)
        self.store: Driver | None = None  # made by create_users, with the run's default limits

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        finally:
            if self.backend == "redis":
                delete_namespace(self.namespace)
            else:
                self.inspector.storage.redis.flushall()  # this run's private memory store
            self.inspector.close()

    @property
    def now(self) -> int:
        return ms(self.clock.now)

    def ledger(self, user: str) -> UserLedger:
        return self.model.user(user)

    def due_times(self) -> list[int]:
        """Every time something falls due in the model: targets for ties and clock jumps."""
        times: set[int] = set()
        for u in self.model.users.values():
            times.update(b.expire_at for b in u.buckets if b.expire_at is not None)
            times.update(h.expires_at for h in u.holds if h.status == "active")
            if u.cycle is not None and not u.cycle.ended:
                times.add(u.cycle.ends_at)
            # The end of the budget period being counted; when the rate's last charge is all
            # paid back, and when a charge of 1 passes again.
            usage, rate = u.usage, u.usage.rate
            if usage.end is not None:
                times.add(usage.end)
            if rate is not None and usage.rb is not None and usage.ro is not None:
                times.add(usage.rb + usage.ro // rate.amount)
                wait = usage.ro - (rate.burst - 1) * rate.per
                times.add(usage.rb + max(-(-wait // rate.amount), 0))
        return sorted(times)

    # Rules: credits in and out.

    @initialize(
        target=users,
        ids=st.lists(st.sampled_from(USER_IDS), min_size=2, max_size=3, unique=True),
        limits=default_limits,
    )
    def create_users(self, ids: list[str], limits: Limits | None) -> Any:
        """The users, and the client, with the run's default limits (for users without their
        own)."""
        self.store = Driver(self.api, self.url, self.namespace, self.clock, limits)
        self.model = LedgerModel(limit_spec(limits))
        self.user_ids = ids
        for user in ids:
            self.tx_ids[user], self.hold_ids[user] = [], []
        return multiple(*ids)

    @rule(
        user=users,
        amount=add_amounts,
        expiry=expiries,
        key=keys,
        metadata=metadatas,
        priority=priorities,
    )
    def add(
        self,
        user: str,
        amount: int,
        expiry: tuple[Any, ...],
        key: str | None,
        metadata: dict[str, str] | None,
        priority: int,
    ) -> None:
        expire_at, ttl = None, None
        if expiry[0] == "ttl":
            ttl = expiry[1] * MS
        elif expiry[0] == "at":
            expire_at = self.clock.now + expiry[1] * MS
        elif expiry[0] == "tie" and self.due_times():
            options = self.due_times()
            expire_at = at_ms(options[expiry[1] % len(options)])
        self.perform(Call(user, "add", amount, expire_at, ttl, key, metadata, priority))

    def charge_amount(self, user: str, amount: tuple[Any, ...], *, overdraft: bool) -> int:
        ledger = self.ledger(user)
        usable = [b.left for b in ledger.live_buckets(self.now)]
        if amount[0] == "abs":
            n = amount[1]
        elif amount[0] == "all":
            n = sum(usable) + (ledger.limit if overdraft else 0) + amount[1]
        elif amount[0] == "limit":
            which = amount[1]
            room = ledger.limit_room(self.now, budget=which != "rate", rate=which != "budget")
            n = (1 if room is None else room) + amount[2]
        else:
            n = sum(usable[: amount[1] + 1]) + amount[2]
        return int(min(max(n, 1), MAX_CREDITS))

    @precondition(lambda self: any(self.can_charge(u) for u in self.model.users.values()))
    @rule(user=users, amount=charge_amounts, key=keys, metadata=metadatas, member=members)
    def subtract(
        self,
        user: str,
        amount: tuple[Any, ...],
        key: str | None,
        metadata: dict[str, str] | None,
        member: str | None,
    ) -> None:
        user = self.prefer(user, self.can_charge)
        n = self.charge_amount(user, amount, overdraft=True)
        self.perform(Call(user, "subtract", n, key=key, metadata=metadata, member=member))

    @precondition(lambda self: self.keyed_calls)
    @rule(
        recorded=st.booleans(),
        pick=st.integers(0, 100),
        change=st.sampled_from(["none", "none", "amount", "metadata", "kind", "expiry"]),
    )
    def reuse_key(self, recorded: bool, pick: int, change: str) -> None:
        """An earlier keyed write again: as it was (a retry), or with one argument changed.

        `recorded` picks one whose key was used up, so that a changed request is a conflict.
        """
        calls = self.recorded_calls if recorded and self.recorded_calls else self.keyed_calls
        call = calls[pick % len(calls)]
        if change == "metadata":
            call = replace(call, metadata=None if call.metadata else {"a": "x"})
        elif change == "kind":
            other = "subtract" if call.method == "add" else "add"
            call = Call(call.user, other, call.amount, key=call.key, metadata=call.metadata)
        elif change == "expiry" and call.method == "add":
            if call.ttl is not None:
                call = replace(call, ttl=call.ttl + MS)
            elif call.expire_at is not None:
                call = replace(call, expire_at=call.expire_at + MS)
            else:
                # Another valid priority (an invalid one is refused before the key is looked at).
                changed = call.priority + 1 if call.priority < 1_000_000 else call.priority - 1
                call = replace(call, priority=changed)
        elif change != "none":
            call = replace(call, amount=call.amount % MAX_CREDITS + 1)
        self.perform(call)

    @rule(user=users, limit=st.sampled_from([0, 0, 5, 40]))
    def set_credit_limit(self, user: str, limit: int) -> None:
        expected = self.expect(lambda: self.ledger(user).set_credit_limit(limit, self.now))
        got = self.send("set_credit_limit", user, limit)
        self.compare(user, expected, got)

    # Rules: limits.

    @rule(
        user=users,
        rate=st.one_of(st.none(), rate_limits, st.just("same")),
        budget=st.one_of(st.none(), budgets, st.tuples(st.just("amount"), budget_amounts)),
    )
    def set_limits(
        self, user: str, rate: RateLimit | str | None, budget: Budget | tuple[str, int] | None
    ) -> None:
        """The user's own limits: a new rate (or the same again), a new budget, the budget in
        effect with only another amount (what was spent still counts); neither: cleared."""
        ledger = self.ledger(user)
        current = ledger.limits()
        if rate == "same":
            rate = None
            if current is not None and current.rate is not None:
                now_rate = current.rate
                rate = RateLimit(now_rate.amount, now_rate.per * MS, now_rate.burst)
        if isinstance(budget, tuple):
            amount, budget = budget[1], None
            if current is not None and current.budget is not None:
                period = current.budget.period
                window: Any = period if isinstance(period, str) else period * MS
                budget = Budget(amount, window, current.budget.tz)
        assert not isinstance(rate, str)
        spec = LimitSpec(rate_spec(rate), budget_spec(budget))
        expected = self.expect(lambda: ledger.set_limits(spec, self.now))
        got = self.send("set_limits", user, rate=rate, budget=budget)
        self.compare(user, expected, got)

    @precondition(lambda self: any(self.can_charge(u) for u in self.model.users.values()))
    @rule(user=users, amount=charge_amounts)
    def check(self, user: str, amount: tuple[Any, ...]) -> None:
        """Would a subtract pass? The same answer as the subtract, and nothing used."""
        user = self.prefer(user, self.can_charge)
        n = self.charge_amount(user, amount, overdraft=True)
        expected = self.expect(lambda: self.ledger(user).check(n, self.now))
        got = self.send("check", user, n)
        self.compare(user, expected, got)

    # Rules: members of a pool (issue 19).

    @rule(
        user=users,
        member=st.sampled_from(["alice", "bob"]),
        cap=st.one_of(st.none(), budgets, budgets),
    )
    def set_member_cap(self, user: str, member: str, cap: Budget | None) -> None:
        expected = self.ledger(user).set_member_cap(member, budget_spec(cap), self.now)
        got = self.send("set_member_cap", user, member, cap)
        self.compare(user, expected, got)

    # Rules: transfers between accounts (issue 19).

    @precondition(lambda self: any(u.live_buckets(self.now) for u in self.model.users.values()))
    @rule(
        source=users, dest=users, amount=charge_amounts, key=keys, metadata=metadatas,
        expiry=st.one_of(st.just(None), st.integers(-SECOND, 10 * DAY)),
    )  # fmt: skip
    def transfer(
        self,
        source: str,
        dest: str,
        amount: tuple[Any, ...],
        key: str | None,
        metadata: dict[str, str] | None,
        expiry: int | None,
    ) -> None:
        """Credits from one user to another (to an account that exists nowhere else, now and
        then): both histories, both users' buckets, the Transfer, or the refusal."""
        source = self.prefer(source, lambda ledger: ledger.live_buckets(self.now))
        if dest == source:
            dest = next((u for u in self.user_ids if u != source), source + "-x")
        if dest not in self.tx_ids:
            self.tx_ids[dest], self.hold_ids[dest] = [], []
            self.user_ids.append(dest)
        n = self.charge_amount(source, amount, overdraft=False)
        expire_at = None if expiry is None else self.clock.now + expiry * MS
        expected = self.expect(
            lambda: self.model.transfer(
                source, dest, n, self.now, key=key, metadata=metadata,
                expire_at=None if expire_at is None else ms(expire_at),
            )
        )  # fmt: skip
        got = self.send(
            "transfer", source, dest, n, idempotency_key=key, metadata=metadata,
            expire_at=expire_at,
        )  # fmt: skip
        if isinstance(got, (Transfer, TransferRefusedError)) and got.transfer_id not in (
            self.transfer_ids
        ):
            self.transfer_ids.append(got.transfer_id)
        self.check_user(dest)
        self.compare(source, expected, got, method="transfer")
        if isinstance(expected, TransferView):
            assert isinstance(got, Transfer)
            assert self.transfer_view(got) == expected

    def transfer_view(self, t: Transfer) -> TransferView:
        return TransferView(
            self.transfer_ids.index(t.transfer_id) + 1,
            t.from_user,
            t.to_user,
            t.amount,
            ms(t.created_at),
            self.tx_ids[t.from_user].index(t.from_transaction_id),
            self.tx_ids[t.to_user].index(t.to_transaction_id),
            None if t.expire_at is None else ms(t.expire_at),
            t.idempotency_key,
            t.metadata,
        )

    # Rules: holds and reversals.

    @precondition(lambda self: any(u.live_buckets(self.now) for u in self.model.users.values()))
    @rule(
        user=users, amount=charge_amounts, ttl=hold_ttls, key=keys, metadata=metadatas,
        member=members,
    )  # fmt: skip
    def reserve(
        self,
        user: str,
        amount: tuple[Any, ...],
        ttl: int,
        key: str | None,
        metadata: dict[str, str] | None,
        member: str | None,
    ) -> None:
        user = self.prefer(user, lambda ledger: ledger.live_buckets(self.now))
        n = self.charge_amount(user, amount, overdraft=False)
        expected = self.expect(
            lambda: self.ledger(user).reserve(
                n, ttl, self.now, key=key, metadata=metadata, member=member
            )
        )
        got = self.send(
            "reserve", user, n, ttl=ttl * MS, idempotency_key=key, metadata=metadata,
            member=member,
        )  # fmt: skip
        if isinstance(expected, tuple) and isinstance(got, Hold):
            view, _ = expected
            if view.number > len(self.hold_ids[user]):
                self.hold_ids[user].append(got.hold_id)
        self.compare(user, expected, got, method="reserve")

    def pick_hold(self, user: str, pick: int) -> tuple[int, str]:
        """(model number, store id): one of the user's holds, active ones first, or now and
        then one that never existed."""
        holds = sorted(self.ledger(user).holds, key=lambda h: h.status != "active")
        pick %= len(holds) + 1
        if pick == len(holds):
            return 10**6, f"h{10**6}@{user_tag(user)}"
        number = holds[pick].number
        return number, self.hold_ids[user][number - 1]

    def prefer(self, user: str, wanted: Callable[[UserLedger], object]) -> str:
        """`user` if it has what a rule needs, else the first user that has: with 2-3 users, most
        steps would otherwise be spent on users with nothing to charge, capture or reverse."""
        if wanted(self.ledger(user)):
            return user
        return next((u for u in self.user_ids if wanted(self.ledger(u))), user)

    def can_charge(self, ledger: UserLedger) -> bool:
        return bool(ledger.live_buckets(self.now)) or ledger.limit > 0

    @precondition(lambda self: any(u.holds for u in self.model.users.values()))
    @rule(
        user=users,
        pick=st.integers(0, 20),
        amount=st.one_of(
            st.none(), st.integers(1, 25), st.tuples(st.just("held"), st.integers(-1, 1))
        ),
        key=keys,
    )
    def capture(
        self, user: str, pick: int, amount: int | tuple[str, int] | None, key: str | None
    ) -> None:
        """All of a hold, some of it, exactly all, one less or one more than it holds."""
        user = self.prefer(user, lambda ledger: ledger.holds)
        number, hold_id = self.pick_hold(user, pick)
        ledger = self.ledger(user)
        if isinstance(amount, tuple):
            held = ledger.hold(number).amount if number <= len(ledger.holds) else 1
            amount = max(held + amount[1], 1)
        expected = self.expect(lambda: ledger.capture(number, amount, self.now, key=key))
        got = self.send("capture", hold_id, amount, idempotency_key=key)
        self.compare(user, expected, got, asked=hold_id, method="capture")

    @precondition(lambda self: any(u.holds for u in self.model.users.values()))
    @rule(user=users, pick=st.integers(0, 20), metadata=metadatas)
    def release(self, user: str, pick: int, metadata: dict[str, str] | None) -> None:
        user = self.prefer(user, lambda ledger: ledger.holds)
        number, hold_id = self.pick_hold(user, pick)
        expected = self.expect(
            lambda: self.ledger(user).release(number, self.now, metadata=metadata)
        )
        got = self.send("release", hold_id, metadata=metadata)
        self.compare(user, expected, got, asked=hold_id)

    @precondition(lambda self: any(u.history for u in self.model.users.values()))
    @rule(user=users, pick=st.integers(0, 200), key=keys, metadata=metadatas)
    def reverse(
        self, user: str, pick: int, key: str | None, metadata: dict[str, str] | None
    ) -> None:
        """Any entry of the history (most kinds cannot be reversed), or an unknown id."""
        user = self.prefer(user, lambda ledger: ledger.history)
        ids = self.tx_ids[user]
        position: int | None = pick % (len(ids) + 1)
        if position == len(ids):
            position, tx_id = None, f"1-0@{user_tag(user)}"
        else:
            # Mostly the newest entries: the reversible ones among them.
            position = len(ids) - 1 - position % min(len(ids), 6)
            tx_id = ids[position]
        expected = self.expect(
            lambda: self.ledger(user).reverse(position, self.now, key=key, metadata=metadata)
        )
        got = self.send("reverse", tx_id, idempotency_key=key, metadata=metadata)
        self.compare(user, expected, got, asked=tx_id)

    # Rules: history retention.

    @rule(user=users)
    def trim(self, user: str) -> None:
        """trim_history: entries older than RETENTION go after a checkpoint; the audit replays
        from it and must still add up."""
        self.check_user(user)  # catch up and learn every id first: nothing new is trimmed unseen
        expected = self.ledger(user).trim(self.now, RETENTION // MS)
        report = self.call("trim_history", user)
        assert (report.trimmed, report.problems, report.more) == (expected, [], False)
        self.check_user(user)
        audit = self.call("audit", user)
        assert audit.ok, audit.problems

    # Rules: cycles.

    @rule(
        user=users,
        amount=cycle_amounts,
        period=periods,
        rollover=rollovers,
        renew=st.booleans(),
        key=st.one_of(st.none(), st.none(), st.sampled_from(IDEMPOTENCY_KEYS)),
    )
    def start_cycle(
        self,
        user: str,
        amount: int,
        period: int | timedelta,
        rollover: int | None,
        renew: bool,
        key: str | None,
    ) -> None:
        expected = self.expect(
            lambda: self.ledger(user).start_cycle(
                amount,
                period_ms(period),
                period,
                self.now,
                renew=renew,
                rollover=rollover,
                key=key,
            )
        )
        got = self.send(
            "start_cycle",
            amount,
            period,
            user,
            rollover=rollover,
            renew=renew,
            idempotency_key=key,
        )
        self.compare(user, expected, got, method="start_cycle")

    @rule(user=users, forfeit=st.booleans())
    def cancel_cycle(self, user: str, forfeit: bool) -> None:
        expected = self.expect(lambda: self.ledger(user).cancel_cycle(forfeit, self.now))
        got = self.send("cancel_cycle", user, forfeit=forfeit)
        self.compare(user, expected, got)

    # Rules: time and reads.

    @rule(step=clock_steps)
    def move_clock(self, step: tuple[Any, ...]) -> None:
        if step[0] == "by":
            self.clock.advance(step[1] * MS)
            return
        future = [t for t in self.due_times() if t + step[2] > self.now]
        if future:
            self.clock.now = at_ms(future[step[1] % len(future)] + step[2])

    @rule(
        user=users,
        read=st.sampled_from(["balance", "history", "cycle", "limits", "limits", "alice", "bob"]),
    )
    def read(self, user: str, read: str) -> None:
        """A read is an operation too: it must first record what fell due."""
        ledger = self.ledger(user)
        if read in ("alice", "bob"):  # a member's usage
            expected_usage = ledger.get_member_usage(read, self.now)
            got_usage = self.send("get_member_usage", user, read)
            self.compare(user, expected_usage, got_usage)
        elif read == "limits":
            expected_limits = ledger.get_limits(self.now)
            got_limits = self.send("get_limits", user)
            self.compare(user, expected_limits, got_limits)
        elif read == "balance":
            expected: object = ledger.read_balance(self.now)
            got = self.send("get_balance", user)
            self.compare(user, expected, got)
        elif read == "cycle":
            expected = ledger.get_cycle(self.now)
            got = self.send("get_cycle", user)
            self.compare(user, expected, got)
        else:
            ledger.read_history(self.now)
            self.check_user(user)

    # Sending and comparing.

    @staticmethod
    def expect(operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except Refused as refused:
            return refused

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        assert self.store is not None, "create_users makes the client"
        return self.store(method, *args, **kwargs)

    def send(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.call(method, *args, **kwargs)
        except CrediciError as exc:
            return exc

    def perform(self, call: Call) -> None:
        """An add or subtract, to the model and the store."""
        ledger = self.ledger(call.user)
        if call.method == "add":
            expected = self.expect(
                lambda: ledger.add(
                    call.amount,
                    self.now,
                    expire_at=None if call.expire_at is None else ms(call.expire_at),
                    ttl=None if call.ttl is None else call.ttl // MS,
                    key=call.key,
                    metadata=call.metadata,
                    priority=call.priority,
                )
            )
            options: dict[str, Any] = {
                "expire_at": call.expire_at,
                "ttl": call.ttl,
                "priority": call.priority,
            }
        else:
            expected = self.expect(
                lambda: ledger.subtract(
                    call.amount, self.now, key=call.key, metadata=call.metadata, member=call.member
                )
            )
            options = {"member": call.member} if call.member is not None else {}
        recorded = call.key is not None and call.key in ledger.records
        got = self.send(
            call.method,
            call.user,
            call.amount,
            idempotency_key=call.key,
            metadata=call.metadata,
            **options,
        )
        if call.key is not None:
            if call not in self.keyed_calls:
                self.keyed_calls.append(call)
            if not recorded and call.key in ledger.records:
                self.recorded_calls.append(call)
        self.compare(call.user, expected, got)

    def compare(
        self,
        user: str,
        expected: Any,
        got: Any,
        *,
        asked: str | None = None,
        method: str = "",
    ) -> None:
        """The result (or error) of an operation, then the whole state of the user."""
        history = self.check_user(user)
        ledger = self.ledger(user)
        if isinstance(expected, Refused):
            assert type(got) is expected.error, f"expected {expected!r}, got {got!r}"
            for fact, value in expected.facts.items():
                if (expected.error, method) in KNOWN_BUGS:
                    break
                if fact == "hold":
                    assert got.hold_id == asked
                elif fact == "entry":
                    assert got.transaction_id == self.tx_ids[user][value]
                elif fact == "reversal":
                    assert got.reversal_id == self.tx_ids[user][value]
                elif fact == "limit":  # the rate or budget that refused
                    assert limit_of(getattr(got, fact)) == value, (fact, got)
                elif fact == "resets_at":  # ms in the model
                    assert getattr(got, fact) == at_ms(value), (fact, got)
                elif fact == "retry_after":  # ms in the model; None: never
                    wait = None if value is None else value * MS
                    assert getattr(got, fact) == wait, (fact, got)
                else:
                    assert getattr(got, fact) == value, (fact, got)
            if expected.error is TransactionNotFoundError:
                assert got.transaction_id == asked
            return
        assert not isinstance(got, CrediciError), f"expected {expected!r}, got {got!r}"
        if isinstance(expected, Entry):
            position = next(i for i, e in enumerate(ledger.history) if e is expected)
            assert isinstance(got, Transaction)
            assert got.transaction_id == self.tx_ids[user][position]
            assert self.entry_of(user, got) == expected
            assert got in history or position < ledger.trimmed  # a keyed replay of a trimmed one
        elif isinstance(expected, tuple):  # reserve
            view, position = expected
            assert isinstance(got, Hold)
            assert got.transaction_id == self.tx_ids[user][position]
            assert self.hold_view(user, got) == view
        elif isinstance(expected, HoldView):
            assert isinstance(got, Hold) and got.transaction_id is None
            assert self.hold_view(user, got) == expected
        elif isinstance(expected, CycleView) or (expected is None and isinstance(got, Cycle)):
            assert self.cycle_view(user, got) == expected
        elif isinstance(expected, LimitsView):
            assert isinstance(got, Limits)
            assert limits_view(got) == expected
        elif isinstance(expected, DecisionView):
            assert isinstance(got, Decision)
            assert decision_view(got) == expected
        elif isinstance(expected, TransferView):
            assert isinstance(got, Transfer)  # compared by the transfer rule (both users)
        elif isinstance(expected, MemberView):
            assert isinstance(got, MemberUsage)
            assert member_view(got) == expected
        else:
            assert got == expected

    def entry_of(self, user: str, tx: Transaction) -> Entry:
        """A store transaction as the model writes one (model identities, times in ms)."""
        assert tx.user_id == user
        return Entry(
            tx.kind,
            tx.amount,
            ms(tx.created_at),
            tx.balance_after,
            None if tx.expire_at is None else ms(tx.expire_at),
            tx.idempotency_key,
            tx.metadata,
            None if tx.hold_id is None else self.hold_ids[user].index(tx.hold_id) + 1,
            tx.captured,
            None if tx.related_id is None else self.tx_ids[user].index(tx.related_id),
            tx.unrestored,
            tx.periods,
            tx.member,
            None if tx.transfer_id is None else self.transfer_ids.index(tx.transfer_id) + 1,
            tx.counterparty,
            tx.credit_limit,
        )

    def hold_view(self, user: str, hold: Hold) -> HoldView:
        assert hold.user_id == user
        return HoldView(
            self.hold_ids[user].index(hold.hold_id) + 1,
            hold.amount,
            hold.status,
            ms(hold.created_at),
            ms(hold.expires_at),
            hold.captured,
        )

    def cycle_view(self, user: str, cycle: Cycle | None) -> CycleView | None:
        if cycle is None:
            return None
        assert cycle.user_id == user and cycle.tz == "UTC"
        return CycleView(
            self.tx_ids[user].index(cycle.cycle_id),
            ms(cycle.started_at),
            ms(cycle.ends_at),
            cycle.amount,
            cycle.status,
            cycle.renew,
            cycle.rollover,
            cycle.granted,
            cycle.used,
            cycle.added,
            cycle.period,
        )

    def check_user(self, user: str) -> list[Transaction]:
        """Balance, whole history, balance details, cycle and raw buckets of one user.

        It reads the balance first: an operation, which records whatever fell due by now, so
        after it the store's buckets must be exactly the model's.
        """
        ledger = self.ledger(user)
        balance = self.call("get_balance", user)
        assert balance == ledger.read_balance(self.now)
        history = self.call("get_all_user_transactions", user)
        # Ids of trimmed entries stay known (a reversal or a cycle may still name them).
        self.tx_ids[user] = self.tx_ids[user][: ledger.trimmed] + [
            t.transaction_id for t in reversed(history)
        ]
        got, expected = [self.entry_of(user, t) for t in history], ledger.read_history(self.now)
        assert got == expected, first_difference(got[::-1], expected[::-1])
        # Model-free invariants: the balance is the sum of the history (from what the trimmed
        # part added up to), each entry's balance_after its running sum, ids grow.
        base = history[-1].balance_after - history[-1].amount if ledger.trimmed and history else 0
        if history or not ledger.trimmed:
            assert balance == base + sum(t.amount for t in history)
        running = base
        for t in reversed(history):
            running += t.amount
            assert t.balance_after == running, t
        ids = [entry_id(t) for t in reversed(history)]
        assert ids == sorted(set(ids))
        details = self.call("get_balance_details", user)
        assert (details.balance, details.held, details.credit_limit) == (
            ledger.balance,
            ledger.held,
            ledger.limit,
        )
        assert details.debt == max(-ledger.balance, 0)
        assert details.available == ledger.balance + ledger.limit
        assert [(b.amount, b.expire_at, b.priority) for b in details.buckets] == [
            (b.left, None if b.expire_at is None else at_ms(b.expire_at), b.priority)
            for b in ledger.buckets
        ]
        if ledger.cycle is not None:
            cycle = self.call("get_cycle", user)
            assert self.cycle_view(user, cycle) == ledger.get_cycle(self.now)
        self.check_usage(user)
        self.check_rollups(user)
        self.check_buckets(user, exact=True)
        return history

    def check_rollups(self, user: str) -> None:
        """get_usage per hour, day and month against the model's sums of its own history, over
        windows that end at the newest entry (within what the records keep)."""
        ledger = self.ledger(user)
        latest = ledger.history[-1].id[0] if ledger.history else self.now
        zone = ZoneInfo(USAGE_TZ)
        for granularity, back in (("hour", timedelta(hours=72)), ("day", timedelta(days=45)),
                                  ("month", timedelta(days=45))):  # fmt: skip
            start, end = at_ms(latest) - back, at_ms(latest) + timedelta(hours=1)
            points = self.call("get_usage", user, start, end, granularity=granularity)
            periods = []
            for p in points:
                local = p.start.astimezone(zone)
                if granularity == "hour":
                    after = p.start + timedelta(hours=1)
                elif granularity == "day":
                    after = datetime.combine(local.date() + timedelta(days=1), time(0), zone)
                else:
                    month = (local.date().replace(day=28) + timedelta(days=4)).replace(day=1)
                    after = datetime.combine(month, time(0), zone)
                periods.append((ms(p.start), ms(after)))
            for (s, e), (following, _) in itertools.pairwise(periods):
                assert e == following, (granularity, s, e, following)  # the points tile the span
            got = [(p.spent, p.granted, p.expired, p.charges) for p in points]
            assert got == ledger.rollups(self.now, periods), granularity

    def check_usage(self, user: str) -> None:
        """What the user used of its limits, read raw from its state hash, against the model's:
        the rate's last charge and how far ahead it left the rate, the budget spent, its period
        and since when it counts."""
        names = ("rb", "ro", "rk", "bu", "bs", "be", "bc", "bk", "bf")
        redis: Any = cast(Any, self.inspector.storage).redis
        raw = redis.hmget(user_keys(self.namespace, user).state, names)
        got = [None if v is None else v.decode() for v in raw]
        assert got == usage_fields(self.ledger(user).usage), list(zip(names, got, strict=True))

    def check_buckets(self, user: str, *, exact: bool) -> None:
        """The user's buckets as stored in Redis against the model's, in burn order.

        Exact: after an operation, every bucket, each the same one (by id) as the model's.
        Otherwise only the usable ones: expired buckets may stay stored until the user's next
        operation records them.
        """
        keys = user_keys(self.namespace, user)
        r = self.inspector.storage.redis
        stored = {k.decode(): int(v) for k, v in r.hgetall(keys.amounts).items()}
        order = [(k.decode(), int(s)) for k, s in r.zrange(keys.order, 0, -1, withscores=True)]
        assert all(len(i) == 27 and i.isdigit() for i in stored), stored
        ledger = self.ledger(user)
        if exact:
            # Buckets the store made since the last look, matched with the model's by creation
            # order (the id ends with a per-user counter).
            known = {i for (u, _), i in self.bucket_ids.items() if u == user}
            new_ids = sorted((i for i in stored if i not in known), key=lambda i: i[15:])
            new_buckets = [b for b in ledger.buckets if (user, b.seq) not in self.bucket_ids]
            new_buckets.sort(key=lambda b: b.seq)
            assert len(new_ids) == len(new_buckets), (new_ids, new_buckets)
            for i, b in zip(new_ids, new_buckets, strict=True):
                self.bucket_ids[(user, b.seq)] = i
            buckets = ledger.buckets
        else:
            stored = {
                i: v for i, v in stored.items() if i[:15] == NEVER_ID or self.now < int(i[:15])
            }
            order = [(i, p) for i, p in order if i in stored]
            buckets = ledger.live_buckets(self.now)
        expected = [
            (self.bucket_ids.get((user, b.seq)), b.expire_at, b.left, b.priority) for b in buckets
        ]
        rows = [
            (i, None if i[:15] == NEVER_ID else int(i[:15]), stored[i], priority)
            for i, priority in order
        ]
        assert rows == expected
        if exact:
            assert len(order) == len(stored)
            by_expiry = {
                k.decode(): int(s) for k, s in r.zrange(keys.expiry, 0, -1, withscores=True)
            }
            assert by_expiry == {i: e for i, e, _, _ in rows if e is not None}

    @invariant()
    def usable_buckets_match(self) -> None:
        # Reads Redis directly: checking after a clock jump must not itself record what is due.
        for user in self.user_ids:
            self.check_buckets(user, exact=False)


class LimitedLedgerMachine(LedgerMachine):
    """The same machine, every user limited from the start by the client's default limits (a
    budget, mostly with a rate) and given credits, so that more of its steps charge and give back
    under limits: periods that end and follow one another, refusals at the edges, holds and
    reversals giving budget back. Cycles and credit limits, which the limits do not look at, are
    left to LedgerMachine: their steps go to the rest."""

    start_cycle = cancel_cycle = set_credit_limit = None  # type: ignore[assignment]  # not rules

    @initialize(
        target=LedgerMachine.users,
        ids=st.lists(st.sampled_from(USER_IDS), min_size=2, max_size=3, unique=True),
        limits=budgeted_limits,
        credits=st.lists(st.integers(1, 300), min_size=3, max_size=3),
    )
    def create_users(self, ids: list[str], limits: Limits | None, credits: list[int]) -> Any:
        """... each with credits to spend from the first step."""
        users = super().create_users(ids, limits)
        for user, amount in zip(ids, credits, strict=False):
            self.perform(Call(user, "add", amount))
        return users


@pytest.mark.timeout(0 if PROFILE == "long" else 300)
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_store_matches_model(backend: str, api: str) -> None:
    factory: Callable[[], LedgerMachine] = lambda: LedgerMachine(backend, api)  # noqa: E731
    run_state_machine_as_test(factory, settings=SETTINGS)


@pytest.mark.timeout(0 if PROFILE == "long" else 300)
@pytest.mark.parametrize("backend", BACKENDS)
def test_store_matches_model_under_limits(backend: str) -> None:
    factory: Any = lambda: LimitedLedgerMachine(backend, "sync")  # noqa: E731
    run_state_machine_as_test(factory, settings=LIMITED_SETTINGS)
