"""Pools and members (issue 19, first step): a pool is an ordinary account whose credits its
members spend (`subtract(..., member=)`, `reserve(..., member=)`); a member's cap is a Budget of
its own, checked and counted by the charge's own script in the pool's slot. Every backend, every
client; the clock is injected."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from credici_redis import (
    Budget,
    BudgetExceededError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidLimitError,
    InvalidMemberError,
    MemberUsage,
    RateLimit,
)
from tests.conftest import FakeClock

# Caps are in their own zone, never the machine's: a non-UTC local zone must not matter.
pytestmark = pytest.mark.usefixtures("local_zone_not_utc")

KOLKATA = ZoneInfo("Asia/Kolkata")


def next_midnight(now: datetime, zone: ZoneInfo) -> datetime:
    local = now.astimezone(zone)
    return datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)


async def test_a_member_charges_the_pool_and_the_entry_names_the_member(
    client: Any, user: str
) -> None:
    await client.add(user, 100)
    tx = await client.subtract(user, 30, member="alice")
    assert (tx.member, tx.amount, tx.balance_after) == ("alice", -30, 70)
    own = await client.subtract(user, 5)
    assert own.member is None
    history = await client.get_all_user_transactions(user)
    assert [(t.kind, t.member) for t in history] == [
        ("subtract", None),
        ("subtract", "alice"),
        ("add", None),
    ]
    assert history[1] == tx


async def test_a_member_without_a_cap_is_not_counted(client: Any, user: str) -> None:
    await client.add(user, 10)
    await client.subtract(user, 4, member="bob")
    assert await client.get_member_usage(user, "bob") == MemberUsage(user_id=user, member="bob")


async def test_a_cap_holds_per_period_and_resets_at_the_local_midnight(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 1000)
    cap = Budget(10, "day", "Asia/Kolkata")
    usage = await client.set_member_cap(user, "alice", cap)
    midnight = next_midnight(clock.now, KOLKATA)
    assert usage == MemberUsage(user_id=user, member="alice", cap=cap, used=0, resets_at=midnight)
    await client.subtract(user, 6, member="alice")
    await client.subtract(user, 4, member="alice")
    with pytest.raises(BudgetExceededError) as refused:
        await client.subtract(user, 1, member="alice")
    assert refused.value.member == "alice"
    assert (refused.value.remaining, refused.value.resets_at) == (0, midnight)
    assert refused.value.limit == cap
    assert await client.get_balance(user) == 990  # the refusal changed nothing
    # Other members and the account itself are not capped by alice's cap.
    await client.subtract(user, 50, member="bob")
    await client.subtract(user, 50)
    assert (await client.get_member_usage(user, "alice")).used == 10
    clock.now = midnight  # a new day in Kolkata
    assert (await client.get_member_usage(user, "alice")).used == 0
    await client.subtract(user, 10, member="alice")
    assert (await client.get_member_usage(user, "alice")).used == 10


async def test_refusals_come_in_order_and_change_nothing(client: Any, user: str) -> None:
    await client.add(user, 5)
    await client.set_member_cap(user, "alice", Budget(3, timedelta(hours=1)))
    with pytest.raises(InsufficientCreditsError):  # credits first
        await client.subtract(user, 6, member="alice")
    await client.set_limits(user, budget=Budget(2, timedelta(hours=1)))
    with pytest.raises(BudgetExceededError) as refused:  # the member's cap before the pool's
        await client.subtract(user, 4, member="alice")
    assert refused.value.member == "alice"
    with pytest.raises(BudgetExceededError) as pool:
        await client.subtract(user, 3, member="alice")
    assert pool.value.member is None  # within alice's cap, past the pool's budget
    assert (await client.get_member_usage(user, "alice")).used == 0
    assert await client.get_balance(user) == 5
    assert [t.kind for t in await client.get_all_user_transactions(user)] == ["add"]


async def test_holds_count_against_the_cap_and_give_back(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(20, "day", "Asia/Kolkata"))
    hold = await client.reserve(user, 15, member="alice")
    assert (await client.get_member_usage(user, "alice")).used == 15
    with pytest.raises(BudgetExceededError):
        await client.subtract(user, 6, member="alice")
    captured = await client.capture(hold.hold_id, 9)  # 6 come back to the cap
    assert (await client.get_member_usage(user, "alice")).used == 9
    released = await client.reserve(user, 11, member="alice")
    await client.release(released.hold_id)
    assert (await client.get_member_usage(user, "alice")).used == 9
    expiring = await client.reserve(user, 5, member="alice", ttl=timedelta(minutes=1))
    clock.advance(timedelta(minutes=2))  # its ttl passes: released by the next operation
    assert (await client.get_member_usage(user, "alice")).used == 9
    assert (await client.get_hold(expiring.hold_id)).status == "expired"
    kinds = [(t.kind, t.member) for t in await client.get_all_user_transactions(user)]
    assert kinds[:4] == [("release", "alice"), ("reserve", "alice"), ("release", "alice"),
                         ("reserve", "alice")]  # fmt: skip
    assert ("capture", "alice") in kinds
    assert (captured.captured, captured.member) == (9, "alice")


async def test_a_reversal_gives_back_to_the_cap_in_the_same_period(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(10, "day", "Asia/Kolkata"))
    spent = await client.subtract(user, 8, member="alice")
    reversal = await client.reverse(spent.transaction_id)
    assert (await client.get_member_usage(user, "alice")).used == 0
    assert reversal.member == "alice"
    history = await client.get_all_user_transactions(user)
    assert history[0] == reversal
    # A charge of a period that ended gives nothing back to the next one.
    old = await client.subtract(user, 7, member="alice")
    clock.now = next_midnight(clock.now, KOLKATA)
    await client.subtract(user, 6, member="alice")
    await client.reverse(old.transaction_id)
    assert (await client.get_member_usage(user, "alice")).used == 6


async def test_a_new_cap_of_the_same_period_keeps_what_was_spent(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(10, "day", "Asia/Kolkata"))
    await client.subtract(user, 8, member="alice")
    raised = await client.set_member_cap(user, "alice", Budget(20, "day", "Asia/Kolkata"))
    assert raised.used == 8
    other = await client.set_member_cap(user, "alice", Budget(20, "week", "Asia/Kolkata"))
    assert other.used == 0  # another period: counting starts afresh
    removed = await client.set_member_cap(user, "alice", None)
    assert removed == MemberUsage(user_id=user, member="alice")
    await client.subtract(user, 50, member="alice")  # no cap any more


async def test_a_keyed_retry_applies_once_and_the_member_is_part_of_the_request(
    client: Any, user: str
) -> None:
    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(10, timedelta(hours=1)))
    first = await client.subtract(user, 4, member="alice", idempotency_key="k")
    again = await client.subtract(user, 4, member="alice", idempotency_key="k")
    assert again == first
    assert (await client.get_member_usage(user, "alice")).used == 4
    with pytest.raises(IdempotencyConflictError):
        await client.subtract(user, 4, member="bob", idempotency_key="k")


async def test_both_a_calendar_budget_and_a_calendar_cap_get_their_periods(
    client: Any, user: str, clock: FakeClock
) -> None:
    """The pool's budget (a month in Berlin) and the member's cap (a day in Kolkata) each ask the
    client for their calendar period: both answers go with the call."""
    await client.add(user, 100)
    await client.set_limits(user, budget=Budget(50, "month", "Europe/Berlin"))
    await client.set_member_cap(user, "alice", Budget(10, "day", "Asia/Kolkata"))
    await client.subtract(user, 10, member="alice")
    with pytest.raises(BudgetExceededError) as refused:
        await client.subtract(user, 1, member="alice")
    assert refused.value.member == "alice"
    assert (await client.get_limits(user)).budget_used == 10
    await client.subtract(user, 40, member="bob")
    with pytest.raises(BudgetExceededError) as pool:
        await client.subtract(user, 1, member="bob")
    assert pool.value.member is None


async def test_a_period_query_per_member(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 100)
    start = clock.now
    for member in ("alice", "bob", "alice", None, "alice"):
        clock.advance(timedelta(seconds=1))
        await client.subtract(user, 1, member=member)
    window = await client.get_user_transactions_for_period(user, start, clock.now, member="alice")
    assert [t.member for t in window] == ["alice"] * 3
    assert len(await client.get_user_transactions_for_period(user, start, clock.now)) == 6
    page = await client.get_user_transactions_for_period(
        user, start, clock.now, member="alice", limit=2
    )
    assert page == window[:2]


async def test_subtract_many_items_name_their_member(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(3, timedelta(hours=1)))
    results = await client.subtract_many(
        [{"user_id": user, "amount": 2, "member": "alice"},
         {"user_id": user, "amount": 2, "member": "alice"},
         {"user_id": user, "amount": 2, "member": "bob"}]
    )  # fmt: skip
    assert results[0].member == "alice" and results[2].member == "bob"
    assert isinstance(results[1], BudgetExceededError) and results[1].member == "alice"


@pytest.mark.parametrize("member", ["", 5, b"alice", "x" * 257])
async def test_a_bad_member_is_refused_and_changes_nothing(
    client: Any, user: str, member: object
) -> None:
    await client.add(user, 10)
    with pytest.raises(InvalidMemberError):
        await client.subtract(user, 1, member=member)
    with pytest.raises(InvalidMemberError):
        await client.get_member_usage(user, member)
    assert await client.get_balance(user) == 10


@pytest.mark.parametrize("cap", [10, RateLimit(1, timedelta(minutes=1)), "day"])
async def test_a_cap_must_be_a_budget(client: Any, user: str, cap: object) -> None:
    with pytest.raises(InvalidLimitError):
        await client.set_member_cap(user, "alice", cap)
    assert (await client.get_member_usage(user, "alice")).cap is None


async def test_the_audit_recounts_every_capped_member(
    client: Any, user: str, clock: FakeClock
) -> None:
    """Charges, holds (captured, released, expired), reversals (of a charge, of a capture a
    day later: nothing back then) and a new period: the audit's recount of each cap agrees."""
    await client.add(user, 10_000)
    await client.set_member_cap(user, "alice", Budget(500, "day", "Asia/Kolkata"))
    await client.set_member_cap(user, "bob", Budget(300, timedelta(hours=6)))
    spent = await client.subtract(user, 40, member="alice")
    await client.subtract(user, 7, member="bob")
    hold = await client.reserve(user, 30, member="alice")
    captured = await client.capture(hold.hold_id, 12)
    released = await client.reserve(user, 9, member="bob")
    await client.release(released.hold_id)
    await client.reserve(user, 5, member="alice", ttl=timedelta(minutes=1))
    await client.reverse(spent.transaction_id)
    clock.advance(timedelta(hours=2))  # the 5 come back by their ttl
    await client.subtract(user, 3, member="alice")
    assert (await client.get_member_usage(user, "alice")).used == 40 + 30 - 18 + 5 - 40 - 5 + 3
    report = await client.audit(user)
    assert report.ok, report.problems
    clock.advance(timedelta(days=1, hours=1))  # the capture's hold is forgotten; new periods
    await client.reverse(captured.transaction_id)
    await client.subtract(user, 11, member="alice")
    await client.subtract(user, 2)
    report = await client.audit(user)
    assert report.ok, report.problems
    assert (await client.get_member_usage(user, "alice")).used == 11


@pytest.mark.parametrize("backend", ["redis"])
async def test_the_audit_reports_a_member_counter_that_disagrees(
    client: Any, user: str, namespace: str
) -> None:
    import redis

    from credici_redis._core import keys as _keys
    from tests.conftest import REDIS_URL

    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(50, timedelta(hours=1)))
    await client.subtract(user, 20, member="alice")
    assert (await client.audit(user)).ok
    members = _keys.user_keys(namespace, user).members
    raw = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    cap, used, rest = raw.hget(members, "alice").split("|", 2)
    raw.hset(members, "alice", f"{cap}|{int(used) - 15}|{rest}")  # 15 credits forgotten
    raw.close()
    report = await client.audit(user)
    assert not report.ok
    assert report.problems == [
        "member 'alice': its cap counts 5 spent this period, history gives 20"
    ]


@pytest.mark.parametrize("backend", ["redis"])
@pytest.mark.parametrize("api", ["sync"])
async def test_a_pool_with_more_capped_members_than_the_audit_reads_is_not_recounted(
    client: Any, user: str, namespace: str
) -> None:
    """The audit reads at most 1,000 member records (audit.lua MAX_MEMBERS): past that, none."""
    import redis

    from credici_redis._core import keys as _keys
    from tests.conftest import REDIS_URL

    await client.add(user, 100)
    await client.set_member_cap(user, "alice", Budget(50, timedelta(hours=1)))
    await client.subtract(user, 20, member="alice")
    members = _keys.user_keys(namespace, user).members
    raw = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    cap, used, rest = raw.hget(members, "alice").split("|", 2)
    raw.hset(members, "alice", f"{cap}|{int(used) - 15}|{rest}")  # 15 credits forgotten
    assert not (await client.audit(user)).ok  # recounted: the difference is found
    record = raw.hget(members, "alice")
    raw.hset(members, mapping={f"m{i}": record for i in range(1000)})  # 1,001 capped members
    raw.close()
    report = await client.audit(user)
    assert report.ok and report.problems == []  # not recounted; the rest is audited as ever
