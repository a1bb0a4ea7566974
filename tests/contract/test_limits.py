"""Limits (issue 17): a rate and a spending budget per user, checked and used by the charge's own
script. Every backend, both clients; the clock is injected (tests/conftest.py FakeClock)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from credici_redis import (
    Budget,
    BudgetExceededError,
    Decision,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidLimitError,
    LimitExceededError,
    Limits,
    RateLimit,
    RateLimitedError,
)
from credici_redis.errors import CrediciError, InvalidUserIdError
from tests.conftest import FakeClock, MakeClient

MINUTE = timedelta(minutes=1)


# Budgets are in their own zone, never the machine's: a non-UTC local zone must not matter.
pytestmark = pytest.mark.usefixtures("local_zone_not_utc")


async def history(client: Any, user: str) -> list[Any]:
    return list(await client.get_all_user_transactions(user))


# -- set_limits / get_limits ---------------------------------------------------------------------


async def test_set_get_and_clear_limits(client: Any, user: str, clock: FakeClock) -> None:
    assert await client.get_limits(user) == Limits()
    rate, budget = RateLimit(10, MINUTE, burst=4), Budget(100, "day", "Asia/Kolkata")
    set_ = await client.set_limits(user, rate=rate, budget=budget)
    assert (set_.rate, set_.budget, set_.budget_used, set_.default) == (rate, budget, 0, False)
    local = clock.now.astimezone(ZoneInfo("Asia/Kolkata"))
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time())
    assert set_.budget_resets_at == midnight.replace(tzinfo=ZoneInfo("Asia/Kolkata"))
    assert await client.get_limits(user) == set_
    assert await client.set_limits(user) == Limits()  # cleared
    await client.add(user, 50)
    for _ in range(10):  # no limits any more
        await client.subtract(user, 1)


async def test_limits_are_not_a_change_of_the_balance(client: Any, user: str) -> None:
    await client.add(user, 5)
    before = await history(client, user)
    await client.set_limits(user, rate=RateLimit(1, MINUTE), budget=Budget(1, "month"))
    await client.get_limits(user)
    await client.check(user, 1)
    assert await history(client, user) == before
    assert await client.get_balance(user) == 5


@pytest.mark.parametrize(
    ("rate", "budget"),
    [
        ("10/minute", None),
        (None, 100),
        (Budget(1, "day"), None),
        (None, RateLimit(1, MINUTE)),
    ],
)
async def test_set_limits_refuses_what_is_not_a_limit(
    client: Any, user: str, rate: object, budget: object
) -> None:
    with pytest.raises(InvalidLimitError):
        await client.set_limits(user, rate=rate, budget=budget)
    assert await client.get_limits(user) == Limits()


@pytest.mark.parametrize(
    "make",
    [
        lambda: RateLimit(0, MINUTE),
        lambda: RateLimit(1, timedelta(0)),
        lambda: RateLimit(1, timedelta(microseconds=1500)),
        lambda: RateLimit(1, MINUTE, burst=0),
        lambda: RateLimit(True, MINUTE),
        lambda: RateLimit(2**40, timedelta(days=365), burst=2**40),  # past exact integers
        lambda: Budget(0, "day"),
        lambda: Budget(10, "fortnight"),  # type: ignore[arg-type]
        lambda: Budget(10, "day", "Mars/Olympus_Mons"),
        lambda: Budget(10, timedelta(days=1), "Europe/Paris"),  # a fixed window has no zone
        lambda: Budget(10, -MINUTE),
    ],
)
def test_a_limit_that_cannot_work_is_a_typed_error(make: Any) -> None:
    with pytest.raises(InvalidLimitError):
        make()


async def test_set_limits_refuses_a_bad_user(client: Any) -> None:
    with pytest.raises(InvalidUserIdError):
        await client.set_limits("", rate=RateLimit(1, MINUTE))


async def test_default_limits_must_be_limits(make_client: MakeClient) -> None:
    with pytest.raises(InvalidLimitError):
        make_client(default_limits=RateLimit(1, MINUTE))


# -- the rate ------------------------------------------------------------------------------------


async def test_a_burst_then_the_rate(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 1000)
    await client.set_limits(user, rate=RateLimit(6, MINUTE, burst=3))  # one credit per 10 s
    for _ in range(3):
        await client.subtract(user, 1)
    with pytest.raises(RateLimitedError) as refused:
        await client.subtract(user, 1)
    assert refused.value.retry_after == timedelta(seconds=10)
    assert (refused.value.user_id, refused.value.requested) == (user, 1)
    assert refused.value.limit == RateLimit(6, MINUTE, burst=3)  # the rate that refused
    assert isinstance(refused.value, LimitExceededError)
    clock.advance(timedelta(seconds=9, milliseconds=999))
    with pytest.raises(RateLimitedError) as again:
        await client.subtract(user, 1)
    assert again.value.retry_after == timedelta(milliseconds=1)
    clock.advance(timedelta(milliseconds=1))
    await client.subtract(user, 1)
    assert await client.get_balance(user) == 996


async def test_the_rate_is_cost_weighted(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 1000)
    await client.set_limits(user, rate=RateLimit(100, MINUTE))  # 100 credits a minute
    await client.subtract(user, 70)
    with pytest.raises(RateLimitedError) as refused:
        await client.subtract(user, 40)  # 110 > 100: 10 credits too many = 6 s
    assert refused.value.retry_after == timedelta(seconds=6)
    await client.subtract(user, 30)
    clock.advance(timedelta(seconds=30))  # 50 credits back
    await client.subtract(user, 50)
    with pytest.raises(RateLimitedError):
        await client.subtract(user, 1)


async def test_more_than_the_burst_never_passes(client: Any, user: str) -> None:
    await client.add(user, 1000)
    await client.set_limits(user, rate=RateLimit(10, MINUTE, burst=5))
    with pytest.raises(RateLimitedError) as refused:
        await client.subtract(user, 6)
    assert refused.value.retry_after is None
    decision = await client.check(user, 6)
    assert (decision.allowed, decision.reason, decision.retry_after) == (False, "rate", None)


async def test_a_refusal_uses_no_rate(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 1000)
    await client.set_limits(user, rate=RateLimit(1, timedelta(seconds=1), burst=1))
    await client.subtract(user, 1)
    for _ in range(20):  # hammering while limited does not push the next slot back
        with pytest.raises(RateLimitedError):
            await client.subtract(user, 1)
        await client.check(user, 1)
    clock.advance(timedelta(seconds=1))
    await client.subtract(user, 1)


async def test_a_new_rate_starts_with_a_full_burst(client: Any, user: str) -> None:
    await client.add(user, 1000)
    await client.set_limits(user, rate=RateLimit(2, MINUTE))
    await client.subtract(user, 2)
    with pytest.raises(RateLimitedError):
        await client.subtract(user, 1)
    await client.set_limits(user, rate=RateLimit(3, MINUTE))
    await client.subtract(user, 3)


# -- the budget ----------------------------------------------------------------------------------


async def test_a_budget_per_fixed_window(client: Any, user: str, clock: FakeClock) -> None:
    clock.now = datetime(2026, 3, 4, 10, 59, 0, tzinfo=timezone.utc)
    await client.add(user, 1000)
    await client.set_limits(user, budget=Budget(10, timedelta(hours=1)))
    await client.subtract(user, 7)
    with pytest.raises(BudgetExceededError) as refused:
        await client.subtract(user, 4)
    resets = datetime(2026, 3, 4, 11, 0, tzinfo=timezone.utc)
    assert (refused.value.remaining, refused.value.resets_at) == (3, resets)
    assert refused.value.retry_after == timedelta(minutes=1)  # by the storage's clock
    assert refused.value.limit == Budget(10, timedelta(hours=1))
    limits = await client.get_limits(user)
    assert (limits.budget_used, limits.budget_resets_at) == (7, resets)
    await client.subtract(user, 3)
    clock.now = resets  # a new window: all of it again
    await client.subtract(user, 10)
    assert (await client.get_limits(user)).budget_used == 10


async def test_a_monthly_budget_across_a_month_boundary_in_its_zone(
    client: Any, user: str, clock: FakeClock
) -> None:
    ny = ZoneInfo("America/New_York")
    clock.now = datetime(2026, 1, 31, 23, 30, tzinfo=ny).astimezone(timezone.utc)
    await client.add(user, 1000)
    await client.set_limits(user, budget=Budget(100, "month", "America/New_York"))
    await client.subtract(user, 100)
    with pytest.raises(BudgetExceededError) as refused:
        await client.subtract(user, 1)
    february = datetime(2026, 2, 1, tzinfo=ny)
    assert refused.value.resets_at == february  # midnight in New York = 05:00 UTC
    assert refused.value.resets_at.astimezone(timezone.utc).hour == 5
    # It is already February 1st in UTC, but not in New York: still January's budget.
    clock.now = datetime(2026, 2, 1, 4, 59, 59, tzinfo=timezone.utc)
    with pytest.raises(BudgetExceededError):
        await client.subtract(user, 1)
    clock.now = datetime(2026, 2, 1, 5, 0, tzinfo=timezone.utc)
    await client.subtract(user, 100)
    limits = await client.get_limits(user)
    assert (limits.budget_used, limits.budget_resets_at) == (100, datetime(2026, 3, 1, tzinfo=ny))


async def test_a_daily_budget_on_a_dst_day(client: Any, user: str, clock: FakeClock) -> None:
    paris = ZoneInfo("Europe/Paris")
    clock.now = datetime(2026, 3, 29, 0, 30, tzinfo=paris).astimezone(timezone.utc)  # 23 h day
    await client.add(user, 100)
    limits = await client.set_limits(user, budget=Budget(5, "day", "Europe/Paris"))
    assert limits.budget_resets_at == datetime(2026, 3, 30, tzinfo=paris)
    assert limits.budget_resets_at - datetime(2026, 3, 29, tzinfo=paris) == timedelta(hours=23)


async def test_a_weekly_budget_starts_on_monday(client: Any, user: str, clock: FakeClock) -> None:
    clock.now = datetime(2026, 12, 6, 12, tzinfo=timezone.utc)  # a Sunday
    limits = await client.set_limits(user, budget=Budget(5, "week", "UTC"))
    assert limits.budget_resets_at == datetime(2026, 12, 7, tzinfo=timezone.utc)


async def test_a_new_amount_keeps_what_was_spent(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_limits(user, budget=Budget(10, "month"))
    await client.subtract(user, 8)
    assert (await client.set_limits(user, budget=Budget(20, "month"))).budget_used == 8
    with pytest.raises(BudgetExceededError) as refused:
        await client.subtract(user, 13)
    assert refused.value.remaining == 12
    # another period (or zone) is another budget: it starts afresh
    assert (await client.set_limits(user, budget=Budget(20, "day"))).budget_used == 0
    await client.subtract(user, 20)


# -- one atomic gate: order, nothing changed by a refusal ----------------------------------------


async def test_refusal_order_is_credits_budget_rate(client: Any, user: str) -> None:
    await client.add(user, 20)
    await client.set_limits(user, rate=RateLimit(5, MINUTE), budget=Budget(5, "month"))
    await client.subtract(user, 5)  # rate and budget now both used up
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 16)  # all three refuse: credits
    with pytest.raises(BudgetExceededError):
        await client.subtract(user, 1)  # budget and rate refuse: budget
    await client.set_limits(user, rate=RateLimit(6, MINUTE), budget=Budget(50, "month"))
    await client.subtract(user, 6)  # a new rate: a full burst
    with pytest.raises(RateLimitedError):
        await client.subtract(user, 1)  # only the rate refuses
    for amount, reason in ((10, "credits"), (1, "rate")):
        assert (await client.check(user, amount)).reason == reason


async def test_a_refused_charge_changes_nothing(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_limits(user, rate=RateLimit(10, MINUTE), budget=Budget(10, "month"))
    await client.subtract(user, 6)
    before = (await history(client, user), await client.get_limits(user))
    for amount, error in ((5, BudgetExceededError), (200, InsufficientCreditsError)):
        with pytest.raises(error):
            await client.subtract(user, amount)
        with pytest.raises(error):
            await client.reserve(user, amount)
    assert (await history(client, user), await client.get_limits(user)) == before
    assert await client.get_balance(user) == 94
    await client.subtract(user, 4)  # what was left of rate and budget is all there


async def test_check_answers_as_the_charge_and_uses_nothing(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 100)
    await client.set_limits(user, rate=RateLimit(3, MINUTE), budget=Budget(5, "month"))
    for _ in range(10):  # checks never consume rate
        assert (await client.check(user, 3)).allowed
    await client.subtract(user, 3)
    rate = await client.check(user, 1)
    assert (rate.allowed, rate.reason, rate.retry_after) == (False, "rate", timedelta(seconds=20))
    clock.advance(timedelta(seconds=40))
    await client.subtract(user, 2)
    budget = await client.check(user, 1)
    limits = await client.get_limits(user)
    assert budget == Decision(
        allowed=False,
        reason="budget",
        retry_after=limits.budget_resets_at - clock.now,
        available=95,
    )
    with pytest.raises(BudgetExceededError):
        await client.subtract(user, 1)


async def test_a_keyed_retry_is_applied_once_and_uses_the_limits_once(
    client: Any, user: str
) -> None:
    await client.add(user, 100)
    await client.set_limits(user, rate=RateLimit(5, MINUTE), budget=Budget(5, "month"))
    first = await client.subtract(user, 5, idempotency_key="k1")
    # The retry finds the first answer, although the limits would now refuse a new charge.
    assert await client.subtract(user, 5, idempotency_key="k1") == first
    assert (await client.get_limits(user)).budget_used == 5
    with pytest.raises(IdempotencyConflictError):
        await client.subtract(user, 4, idempotency_key="k1")
    with pytest.raises(BudgetExceededError):
        await client.subtract(user, 1, idempotency_key="k2")


async def test_batches_are_limited_item_by_item(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_limits(user, budget=Budget(10, "month"))
    results = await client.subtract_many([(user, 4), (user, 4), (user, 4), (user, 2)])
    kinds = [type(r).__name__ if isinstance(r, CrediciError) else "ok" for r in results]
    assert kinds == ["ok", "ok", "BudgetExceededError", "ok"]
    assert await client.get_balance(user) == 90


# -- holds and reversals give budget back --------------------------------------------------------


async def test_a_hold_counts_when_reserved_and_gives_back_what_is_not_captured(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 100)
    await client.set_limits(user, rate=RateLimit(100, MINUTE), budget=Budget(20, "month"))
    hold = await client.reserve(user, 15)
    assert (await client.get_limits(user)).budget_used == 15
    with pytest.raises(BudgetExceededError):
        await client.reserve(user, 6)
    await client.capture(hold.hold_id, 5)
    assert (await client.get_limits(user)).budget_used == 5
    released = await client.reserve(user, 10)
    await client.release(released.hold_id)
    assert (await client.get_limits(user)).budget_used == 5
    await client.reserve(user, 10, ttl=timedelta(minutes=5))
    assert (await client.get_limits(user)).budget_used == 15
    clock.advance(timedelta(minutes=6))  # the ttl gives it back
    assert (await client.get_limits(user)).budget_used == 5
    assert await client.get_balance(user) == 95


async def test_a_reversal_gives_budget_back_within_the_period(
    client: Any, user: str, clock: FakeClock
) -> None:
    clock.now = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
    await client.add(user, 100)
    await client.set_limits(user, budget=Budget(10, "day"))
    charge = await client.subtract(user, 10)
    await client.reverse(charge.transaction_id)
    assert (await client.get_limits(user)).budget_used == 0
    late = await client.subtract(user, 10)
    clock.advance(timedelta(days=1))  # the next day: yesterday's charge is not today's budget
    await client.subtract(user, 4)
    await client.reverse(late.transaction_id)
    assert (await client.get_limits(user)).budget_used == 4


async def test_a_hold_made_before_the_budget_gives_nothing_back(client: Any, user: str) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30)
    await client.set_limits(user, budget=Budget(10, "month"))
    await client.subtract(user, 6)
    await client.release(hold.hold_id)  # never counted: nothing to give back
    assert (await client.get_limits(user)).budget_used == 6


# -- the namespace default -----------------------------------------------------------------------


async def test_default_limits_apply_to_users_without_their_own(
    make_client: MakeClient, clock: FakeClock, user: str
) -> None:
    free = Limits(rate=RateLimit(2, MINUTE), budget=Budget(100, "month"))
    client = make_client(clock=clock, default_limits=free)
    await client.add(user, 50)
    limits = await client.get_limits(user)
    assert (limits.rate, limits.budget, limits.default) == (free.rate, free.budget, True)
    await client.subtract(user, 2)
    with pytest.raises(RateLimitedError):  # a free plan, without any call per user
        await client.subtract(user, 1)
    paid = await client.set_limits(user, rate=RateLimit(100, MINUTE))
    assert (paid.budget, paid.default) == (None, False)  # its own replace the default
    await client.subtract(user, 10)
    assert (await client.set_limits(user)).default is True  # cleared: the default again
    plain = make_client(clock=clock)  # a client without a default: no limits for this user
    await plain.subtract(user, 30)


async def test_limits_hold_for_other_clients_of_the_namespace(
    make_client: MakeClient, clock: FakeClock, user: str
) -> None:
    one, two = make_client(clock=clock), make_client(clock=clock)
    await one.add(user, 100)
    await one.set_limits(user, budget=Budget(5, "month"))
    await one.subtract(user, 3)
    with pytest.raises(BudgetExceededError) as refused:
        await two.subtract(user, 3)
    assert refused.value.remaining == 2


async def test_a_charge_the_budget_never_counted_gives_nothing_back(
    client: Any, user: str, clock: FakeClock
) -> None:
    """Found by the model: a charge made while the user had no budget, reversed once the budget
    is back, must not give that budget room it never used."""
    clock.now = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)
    await client.add(user, 100)
    await client.set_limits(user, budget=Budget(10, "day"))
    await client.subtract(user, 10)
    await client.set_limits(user)  # cleared
    free = await client.subtract(user, 5)  # not counted
    await client.set_limits(user, budget=Budget(10, "day"))
    assert (await client.get_limits(user)).budget_used == 10
    await client.reverse(free.transaction_id)
    assert (await client.get_limits(user)).budget_used == 10
    with pytest.raises(BudgetExceededError):
        await client.subtract(user, 5)
    # ... nor on a later day, whose budget starts from its midnight.
    clock.advance(timedelta(days=1))
    await client.set_limits(user)
    free = await client.subtract(user, 5)
    await client.set_limits(user, budget=Budget(10, "day"))
    await client.subtract(user, 10)
    await client.reverse(free.transaction_id)
    assert (await client.get_limits(user)).budget_used == 10
