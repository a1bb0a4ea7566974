"""reverse: undo a subtract, a capture or an add, once, linked to what it undoes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import (
    AlreadyReversedError,
    IdempotencyConflictError,
    NotReversibleError,
    TransactionNotFoundError,
)
from credici_redis.errors import InvalidInputError
from tests.conftest import FakeClock

DAY = timedelta(days=1)


async def clean(client: Any, user: str) -> list[Any]:
    report = await client.audit(user)
    assert report.problems == []
    return await client.get_all_user_transactions(user)


async def test_reverse_a_subtract_restores_its_buckets(client: Any, user: str) -> None:
    await client.add(user, 5, ttl=DAY)
    await client.add(user, 100)
    before = (await client.get_balance_details(user)).buckets
    charge = await client.subtract(user, 20)
    tx = await client.reverse(charge.transaction_id)
    assert (tx.kind, tx.amount, tx.balance_after) == ("reverse", 20, 105)
    assert (tx.related_id, tx.unrestored) == (charge.transaction_id, 0)
    assert (await client.get_balance_details(user)).buckets == before
    history = await clean(client, user)
    assert history[0] == tx


async def test_credits_of_expired_buckets_are_not_restored(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 10, ttl=DAY)
    await client.add(user, 100)
    charge = await client.subtract(user, 30)  # 10 from the expiring bucket, 20 more
    clock.advance(2 * DAY)
    tx = await client.reverse(charge.transaction_id)
    assert (tx.amount, tx.unrestored) == (20, 10)
    assert await client.get_balance(user) == 100
    await clean(client, user)


async def test_reverse_an_add_removes_what_is_left(client: Any, user: str) -> None:
    grant = await client.add(user, 50, ttl=DAY)
    await client.add(user, 10)
    await client.subtract(user, 30)  # 30 of the grant (it expires first)
    tx = await client.reverse(grant.transaction_id)
    assert (tx.amount, tx.balance_after) == (-20, 10)
    spent = await client.add(user, 5, ttl=DAY)
    await client.subtract(user, 15)
    assert (await client.reverse(spent.transaction_id)).amount == 0  # nothing left of it
    await clean(client, user)


async def test_reverse_a_capture(client: Any, user: str) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 40)
    captured = await client.capture(hold.hold_id, 25)
    tx = await client.reverse(captured.transaction_id)
    assert (tx.amount, tx.balance_after) == (25, 100)
    await clean(client, user)


async def test_reverse_an_overdraft_charge(client: Any, user: str) -> None:
    await client.add(user, 10)
    await client.set_credit_limit(user, 100)
    charge = await client.subtract(user, 30)  # 10 from the bucket, 20 of debt
    await client.subtract(user, 5)  # more debt: -25
    tx = await client.reverse(charge.transaction_id)
    assert tx.balance_after == 5
    details = await client.get_balance_details(user)
    assert (details.balance, sum(b.amount for b in details.buckets)) == (5, 5)
    await clean(client, user)


async def test_reverse_once_and_only_what_can_be(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 100)
    charge = await client.subtract(user, 10)
    first = await client.reverse(charge.transaction_id)
    with pytest.raises(AlreadyReversedError) as info:
        await client.reverse(charge.transaction_id)
    assert info.value.reversal_id == first.transaction_id
    with pytest.raises(NotReversibleError) as not_reversible:
        await client.reverse(first.transaction_id)
    assert not_reversible.value.kind == "reverse"
    cycle = await client.start_cycle(10, 30, user)
    with pytest.raises(NotReversibleError):
        await client.reverse(cycle.cycle_id)
    unknown = charge.transaction_id.replace(charge.transaction_id.split("-")[0], "17", 1)
    with pytest.raises(TransactionNotFoundError):
        await client.reverse(unknown)
    for bad in ("", "abc", "1-0", "x-y@u", 5, None):
        with pytest.raises(InvalidInputError):
            await client.reverse(bad)
    assert await client.get_balance(user) == 110
    await clean(client, user)


async def test_reverse_idempotency_key(client: Any, user: str) -> None:
    await client.add(user, 100)
    a = await client.subtract(user, 10)
    b = await client.subtract(user, 20)
    tx = await client.reverse(a.transaction_id, idempotency_key="refund-1")
    assert await client.reverse(a.transaction_id, idempotency_key="refund-1") == tx
    with pytest.raises(IdempotencyConflictError):
        await client.reverse(b.transaction_id, idempotency_key="refund-1")
    assert await client.get_balance(user) == 80


async def test_a_reversal_keeps_its_metadata_and_a_keyed_retry_must_match_it(
    client: Any, user: str
) -> None:
    await client.add(user, 10)
    charge = await client.subtract(user, 4)
    why = {"reason": "disputed", "operator": "anna"}
    back = await client.reverse(charge.transaction_id, idempotency_key="r1", metadata=why)
    assert back.metadata == why
    assert (await client.get_all_user_transactions(user))[0] == back
    assert await client.reverse(charge.transaction_id, idempotency_key="r1", metadata=why) == back
    with pytest.raises(IdempotencyConflictError):
        await client.reverse(charge.transaction_id, idempotency_key="r1", metadata={"x": "y"})
