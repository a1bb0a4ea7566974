"""subtract_many / add_many: one round trip, each item's own result or error, in order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from credici_redis import (
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    InvalidUserIdError,
    Transaction,
)
from credici_redis.errors import InvalidInputError
from tests.conftest import FakeClock

DAY = timedelta(days=1)


async def test_each_item_gets_its_own_result(client: Any, user: str) -> None:
    other = user + "-b"
    await client.add(user, 10)
    results = await client.subtract_many(
        [
            (user, 4),
            (user, 100),  # insufficient: only this one fails
            (other, 1),  # unknown user: insufficient
            {"user_id": user, "amount": 0},  # bad input: never sent
            {"user_id": "", "amount": 1},
            {"user_id": user, "amount": 5, "idempotency_key": "k", "metadata": {"a": "b"}},
            {"user_id": user, "amount": 5, "idempotency_key": "k", "metadata": {"a": "b"}},
            {"user_id": user, "amount": 6, "idempotency_key": "k"},  # conflicting reuse
        ]
    )
    assert [type(r) for r in results] == [
        Transaction,
        InsufficientCreditsError,
        InsufficientCreditsError,
        InvalidAmountError,
        InvalidUserIdError,
        Transaction,
        Transaction,
        IdempotencyConflictError,
    ]
    assert results[0].balance_after == 6
    assert results[1].available == 6
    assert results[5] == results[6]  # one effect for the key
    assert results[5].metadata == {"a": "b"}
    assert await client.get_balance(user) == 1
    history = await client.get_all_user_transactions(user)
    assert [t.amount for t in history] == [-5, -4, 10]


async def test_add_many_with_expiry(client: Any, user: str, clock: FakeClock) -> None:
    at = clock.now + DAY
    results = await client.add_many(
        [
            (user, 5),
            (user, 7, at),
            {"user_id": user, "amount": 3, "ttl": timedelta(hours=1)},
            {"user_id": user, "amount": 2, "expire_at": clock.now - DAY},  # in the past
            (user, 2**53),  # too large
        ]
    )
    assert [type(r) for r in results[:3]] == [Transaction] * 3
    assert isinstance(results[3], InvalidExpiryError)
    assert isinstance(results[4], InvalidAmountError)
    assert results[1].expire_at == at
    assert await client.get_balance(user) == 15
    clock.advance(timedelta(hours=2))
    assert await client.get_balance(user) == 12


async def test_a_batch_keeps_burn_order_and_atomic_items(client: Any, user: str) -> None:
    await client.add(user, 100)
    results = await client.subtract_many([(user, 1)] * 150)
    assert sum(isinstance(r, Transaction) for r in results) == 100
    assert all(isinstance(r, InsufficientCreditsError) for r in results[100:])
    assert [r.balance_after for r in results[:100]] == list(range(99, -1, -1))


async def test_items_of_calendar_users_that_need_a_schedule(
    client: Any, user: str, clock: FakeClock
) -> None:
    clock.now = datetime(2027, 1, 15, tzinfo=timezone.utc)
    users = [f"{user}-{i}" for i in range(3)]
    for uid in users:
        await client.start_cycle(10, "month", uid, renew=True)
    clock.now = datetime(2027, 12, 20, tzinfo=timezone.utc)  # past the boundaries handed out
    results = await client.subtract_many([(uid, 3) for uid in users] + [(user, 1)])
    assert [r.balance_after for r in results[:3]] == [7, 7, 7]
    assert isinstance(results[3], InsufficientCreditsError)
    cycle = await client.get_cycle(users[0])
    assert cycle.started_at == datetime(2027, 12, 15, tzinfo=timezone.utc)


async def test_empty_and_malformed_batches(client: Any, user: str) -> None:
    assert await client.subtract_many([]) == []
    results = await client.subtract_many([("only-a-user",), "text", {"user_id": user, "x": 1}])
    assert all(isinstance(r, InvalidInputError) for r in results)
    for bad in ("abc", 5, None, {"user_id": user, "amount": 1}):
        with pytest.raises(InvalidInputError):
            await client.subtract_many(bad)
    assert await client.get_all_user_transactions(user) == []
