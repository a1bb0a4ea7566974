"""Grant priority, overdraft with a credit limit, and the balance taken apart."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import InsufficientCreditsError, InvalidAmountError, InvalidPriorityError
from tests.conftest import FakeClock

DAY = timedelta(days=1)


async def clean(client: Any, user: str) -> None:
    report = await client.audit(user)
    assert report.problems == []


async def test_priority_comes_before_expiry(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 10, ttl=DAY)  # priority 0, expires soon
    await client.add(user, 10, priority=-1)  # never expires, but burns first
    await client.add(user, 10, ttl=2 * DAY, priority=5)  # last
    await client.subtract(user, 15)
    details = await client.get_balance_details(user)
    assert [(b.amount, b.priority) for b in details.buckets] == [(5, 0), (10, 5)]
    assert details.buckets[0].expire_at == clock.now + DAY
    await clean(client, user)


async def test_balance_details(client: Any, user: str, clock: FakeClock) -> None:
    empty = await client.get_balance_details(user)
    assert (empty.balance, empty.available, empty.debt, empty.credit_limit) == (0, 0, 0, 0)
    assert (empty.held, empty.buckets) == (0, [])
    await client.add(user, 3)
    await client.add(user, 4, ttl=DAY)
    details = await client.get_balance_details(user)
    assert details.balance == 7 == sum(b.amount for b in details.buckets)
    assert [b.expire_at for b in details.buckets] == [clock.now + DAY, None]  # burn order


async def test_overdraft_down_to_the_limit(client: Any, user: str) -> None:
    await client.add(user, 10)
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 11)
    await client.set_credit_limit(user, 50)
    tx = await client.subtract(user, 40)
    assert tx.balance_after == -30
    assert await client.get_balance(user) == -30
    with pytest.raises(InsufficientCreditsError) as info:
        await client.subtract(user, 21)
    assert info.value.available == 20  # what can still be charged
    await client.subtract(user, 20)
    details = await client.get_balance_details(user)
    assert (details.balance, details.debt, details.available, details.buckets) == (-50, 50, 0, [])
    await clean(client, user)


async def test_debt_is_repaid_first(client: Any, user: str, clock: FakeClock) -> None:
    await client.set_credit_limit(user, 100)
    await client.subtract(user, 30)
    await client.add(user, 20, ttl=DAY)  # all of it repays debt: no bucket
    assert (await client.get_balance_details(user)).buckets == []
    await client.add(user, 25)  # 10 repay, 15 in the bucket
    details = await client.get_balance_details(user)
    assert details.balance == 15
    assert [b.amount for b in details.buckets] == [15]
    clock.advance(2 * DAY)  # nothing expires: the repaid credits are gone, not in a bucket
    assert await client.get_balance(user) == 15
    await client.subtract(user, 40)
    cycle = await client.start_cycle(100, 30, user)  # a cycle grant repays debt too
    assert cycle.granted == 100
    details = await client.get_balance_details(user)
    assert details.balance == 75
    assert [b.amount for b in details.buckets] == [75]
    await clean(client, user)


async def test_lowering_the_limit_keeps_the_debt(client: Any, user: str) -> None:
    await client.set_credit_limit(user, 10)
    await client.subtract(user, 10)
    await client.set_credit_limit(user, 0)
    assert await client.get_balance(user) == -10
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 1)
    await client.add(user, 11)
    assert await client.get_balance(user) == 1
    await clean(client, user)


@pytest.mark.parametrize("limit", [-1, 1.5, "10", None, True, 2**53])
async def test_bad_credit_limit(client: Any, user: str, limit: Any) -> None:
    await client.add(user, 5)
    with pytest.raises(InvalidAmountError):
        await client.set_credit_limit(user, limit)
    assert (await client.get_balance_details(user)).credit_limit == 0


@pytest.mark.parametrize("priority", [1.0, "1", None, True, 10**6 + 1, -(10**6) - 1])
async def test_bad_priority(client: Any, user: str, priority: Any) -> None:
    with pytest.raises(InvalidPriorityError):
        await client.add(user, 5, priority=priority)
    assert await client.get_all_user_transactions(user) == []


async def test_priority_is_part_of_the_idempotent_request(client: Any, user: str) -> None:
    from credici_redis import IdempotencyConflictError

    await client.add(user, 5, priority=1, idempotency_key="g")
    with pytest.raises(IdempotencyConflictError):
        await client.add(user, 5, priority=2, idempotency_key="g")
