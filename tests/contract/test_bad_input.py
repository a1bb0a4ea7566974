"""Bad input: a clear typed error, and nothing changes: not the balance, not the history."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from credici_redis import (
    CrediciError,
    InvalidAmountError,
    InvalidCycleError,
    InvalidExpiryError,
    InvalidUserIdError,
)
from credici_redis.errors import (
    InvalidIdempotencyKeyError,
    InvalidInputError,
    InvalidMetadataError,
    InvalidPeriodError,
)
from tests.conftest import FakeClock

BAD_AMOUNTS = [
    0,
    -1,
    -(2**53),
    2**53,
    2**64,
    True,
    False,
    1.0,
    1.5,
    math.nan,
    math.inf,
    "1",
    "abc",
    None,
    Decimal(1),
    [1],
    b"1",
]
BAD_USERS = ["", "x" * 257, "é" * 129, "\ud800", None, 1, 1.5, b"bytes", ["a"], object()]
BAD_KEYS = ["", "k" * 257, 1, b"k", ["k"], "\udfff"]
BAD_METADATA = [
    "string",
    ["a", "b"],
    {"a": 1},
    {1: "a"},
    {"a": None},
    {"a": b"x"},
    {f"k{i}": "v" for i in range(65)},
    {"big": "x" * 5000},
    {"bad": "\ud800"},
]


@pytest.fixture
async def funded(client: Any, user: str) -> tuple[Any, str, list[Any]]:
    await client.add(user, 50)
    await client.subtract(user, 8)
    return client, user, await client.get_all_user_transactions(user)


async def unchanged(client: Any, user: str, history: list[Any]) -> None:
    assert await client.get_balance(user) == 42
    assert await client.get_all_user_transactions(user) == history


@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
async def test_bad_amount(funded: Any, amount: Any) -> None:
    client, user, history = funded
    for call in (client.add(user, amount), client.subtract(user, amount)):
        with pytest.raises(InvalidAmountError) as info:
            await call
        assert info.value.amount is amount
        assert isinstance(info.value, ValueError)  # also catchable as a plain ValueError
    with pytest.raises(InvalidAmountError):
        await client.start_cycle(amount if amount != 0 else -1, 30, user)
    await unchanged(client, user, history)


@pytest.mark.parametrize("user_id", BAD_USERS, ids=repr)
async def test_bad_user_id(funded: Any, user_id: Any) -> None:
    client, user, history = funded
    calls = [
        client.add(user_id, 1),
        client.subtract(user_id, 1),
        client.get_balance(user_id),
        client.get_cycle(user_id),
        client.get_all_user_transactions(user_id),
        client.get_user_transactions_for_period(
            user_id, datetime(2020, 1, 1), datetime(2030, 1, 1)
        ),
    ]
    if user_id is not None:  # None means "new user" for start_cycle
        calls.append(client.start_cycle(10, 30, user_id))
    for call in calls:
        with pytest.raises(InvalidUserIdError):
            await call
    await unchanged(client, user, history)


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
async def test_bad_idempotency_key(funded: Any, key: Any) -> None:
    client, user, history = funded
    for call in (
        client.add(user, 1, idempotency_key=key),
        client.subtract(user, 1, idempotency_key=key),
        client.start_cycle(1, 30, user, idempotency_key=key),
    ):
        with pytest.raises(InvalidIdempotencyKeyError):
            await call
    await unchanged(client, user, history)


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=lambda m: repr(m)[:40])
async def test_bad_metadata(funded: Any, metadata: Any) -> None:
    client, user, history = funded
    for call in (
        client.add(user, 1, metadata=metadata),
        client.subtract(user, 1, metadata=metadata),
    ):
        with pytest.raises(InvalidMetadataError):
            await call
    await unchanged(client, user, history)


async def test_bad_expiry(funded: Any, clock: FakeClock) -> None:
    client, user, history = funded
    future = clock.now + timedelta(days=1)
    bad = [
        {"expire_at": "2030-01-01"},
        {"expire_at": 1893456000},
        {"expire_at": future.date()},
        {"expire_at": future, "ttl": timedelta(days=1)},
        {"ttl": 60},
        {"ttl": timedelta(0)},
        {"ttl": timedelta(microseconds=999)},
        {"ttl": -timedelta(days=1)},
        {"ttl": timedelta(days=10**6)},
        {"expire_at": clock.now - timedelta(seconds=1)},
    ]
    for kwargs in bad:
        with pytest.raises(InvalidExpiryError):
            await client.add(user, 1, **kwargs)
    await unchanged(client, user, history)


@pytest.mark.parametrize(
    "time_delta",
    [
        0,
        -1,
        1.5,
        30.0,
        "30",
        None,
        True,
        timedelta(0),
        -timedelta(days=1),
        timedelta(microseconds=5),
        10**7,
        timedelta(days=10**6),
    ],
    ids=repr,
)
async def test_bad_cycle_length(funded: Any, time_delta: Any) -> None:
    client, user, history = funded
    with pytest.raises(InvalidCycleError):
        await client.start_cycle(10, time_delta, user)
    assert await client.get_cycle(user) is None
    await unchanged(client, user, history)


async def test_bad_period(funded: Any) -> None:
    client, user, history = funded
    for from_, to_ in [("2020-01-01", datetime(2030, 1, 1)), (datetime(2020, 1, 1), None), (0, 1)]:
        with pytest.raises(InvalidPeriodError):
            await client.get_user_transactions_for_period(user, from_, to_)
    await unchanged(client, user, history)


def test_every_input_error_is_a_credici_error() -> None:
    for error in (
        InvalidAmountError,
        InvalidUserIdError,
        InvalidExpiryError,
        InvalidCycleError,
        InvalidIdempotencyKeyError,
        InvalidMetadataError,
        InvalidPeriodError,
    ):
        assert issubclass(error, InvalidInputError)
        assert issubclass(error, CrediciError)
        assert issubclass(error, ValueError)
