"""Transfers between accounts (issue 19): exactly once, in three scripts (out, in, settle), each
in one account's slot. Every Redis backend, every client; the clock is injected. PostgresStorage
refuses them with a typed error (one user per transaction). Crash recovery (a process dying
between the steps) is in tests/test_transfer_recovery.py; across cluster slots in
tests/cluster/test_cluster.py."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from credici_redis import (
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    InvalidInputError,
    InvalidUserIdError,
    NotSupportedError,
    Transfer,
    TransferRecovery,
    TransferRefusedError,
)
from tests.conftest import FakeClock, MakeClient

pytestmark = pytest.mark.usefixtures("local_zone_not_utc")

ON_REDIS = pytest.mark.parametrize("backend", ["redis", "memory"])
DAY = timedelta(days=1)


async def history(client: Any, user: str) -> list[Any]:
    return list(await client.get_all_user_transactions(user))


@ON_REDIS
async def test_a_transfer_moves_credits_and_both_histories_name_it(
    client: Any, user: str, clock: FakeClock
) -> None:
    other = user + "-to"
    await client.add(user, 100)
    t = await client.transfer(user, other, 60, metadata={"why": "fund"})
    assert isinstance(t, Transfer)
    assert (t.from_user, t.to_user, t.amount, t.status) == (user, other, 60, "completed")
    assert t.created_at == clock.now.replace(microsecond=clock.now.microsecond // 1000 * 1000)
    assert t.metadata == {"why": "fund"}
    assert (await client.get_balance(user), await client.get_balance(other)) == (40, 60)
    out, into = (await history(client, user))[0], (await history(client, other))[0]
    assert (out.kind, out.amount, out.balance_after) == ("transfer_out", -60, 40)
    assert (into.kind, into.amount, into.balance_after) == ("transfer_in", 60, 60)
    assert out.transfer_id == into.transfer_id == t.transfer_id
    assert (out.counterparty, into.counterparty) == (other, user)
    assert (out.transaction_id, into.transaction_id) == (
        t.from_transaction_id,
        t.to_transaction_id,
    )
    assert out.metadata == into.metadata == {"why": "fund"}
    assert (await client.audit(user)).ok and (await client.audit(other)).ok


@ON_REDIS
async def test_the_credits_keep_their_expiry_unless_one_is_given(
    client: Any, user: str, clock: FakeClock
) -> None:
    other, third = user + "-to", user + "-3"
    soon, later = clock.now + 2 * DAY, clock.now + 5 * DAY
    await client.add(user, 10, soon)
    await client.add(user, 20, later)
    await client.add(user, 30)
    await client.add(user, 30)
    await client.transfer(user, other, 75)  # 10 (soon) + 20 (later) + 30 + 15 (never)
    buckets = (await client.get_balance_details(other)).buckets
    # One bucket per expiry: the two never-expiring ones it came from are one here.
    assert [(b.amount, b.expire_at) for b in buckets] == [(10, soon), (20, later), (45, None)]
    given = clock.now + 3 * DAY
    t = await client.transfer(user, third, 15, expire_at=given)
    assert t.expire_at == given
    buckets = (await client.get_balance_details(third)).buckets
    assert [(b.amount, b.expire_at) for b in buckets] == [(15, given)]
    clock.now = soon  # the first bucket expires where it went
    assert await client.get_balance(other) == 65
    assert (await history(client, other))[0].kind == "expire"
    for who in (user, other, third):
        assert (await client.audit(who)).ok


@ON_REDIS
async def test_a_transfer_repays_the_destinations_debt_first(client: Any, user: str) -> None:
    other = user + "-to"
    await client.set_credit_limit(other, 50)
    await client.subtract(other, 30)
    await client.add(user, 100)
    await client.transfer(user, other, 40)
    details = await client.get_balance_details(other)
    assert (details.balance, details.debt) == (10, 0)
    assert [b.amount for b in details.buckets] == [10]
    assert (await client.audit(other)).ok


@ON_REDIS
async def test_the_source_must_hold_the_credits_and_a_refusal_changes_nothing(
    client: Any, user: str
) -> None:
    other = user + "-to"
    await client.add(user, 10)
    await client.set_credit_limit(user, 100)  # a transfer never moves credit limit
    with pytest.raises(InsufficientCreditsError) as refused:
        await client.transfer(user, other, 11)
    assert (refused.value.requested, refused.value.available) == (11, 10)
    assert (await client.get_balance(user), await client.get_balance(other)) == (10, 0)
    assert [t.kind for t in await history(client, user)] == ["credit_limit", "add"]
    assert await history(client, other) == []
    assert await client.recover_transfers(older_than=timedelta(0)) == TransferRecovery()


@ON_REDIS
async def test_a_keyed_retry_returns_the_same_transfer_once(client: Any, user: str) -> None:
    other = user + "-to"
    await client.add(user, 100)
    first = await client.transfer(user, other, 30, idempotency_key="k1")
    again = await client.transfer(user, other, 30, idempotency_key="k1")
    assert again == first
    assert (await client.get_balance(user), await client.get_balance(other)) == (70, 30)
    with pytest.raises(IdempotencyConflictError):
        await client.transfer(user, other, 31, idempotency_key="k1")
    second = await client.transfer(user, other, 30, idempotency_key="k2")
    assert second.transfer_id != first.transfer_id
    assert [t.kind for t in await history(client, other)] == ["transfer_in", "transfer_in"]


@ON_REDIS
async def test_a_destination_that_cannot_take_them_gives_them_back(client: Any, user: str) -> None:
    other = user + "-to"
    await client.add(user, 100)
    await client.add(other, 2**53 - 50)
    with pytest.raises(TransferRefusedError) as refused:
        await client.transfer(user, other, 60, idempotency_key="k")
    assert refused.value.reason == "BALANCE_LIMIT"
    assert await client.get_balance(user) == 100  # back home
    assert await client.get_balance(other) == 2**53 - 50
    back, out = (await history(client, user))[:2]
    assert (out.kind, back.kind, back.amount) == ("transfer_out", "reverse", 60)
    assert back.related_id == out.transaction_id
    assert back.transfer_id == out.transfer_id == refused.value.transfer_id
    assert back.transaction_id.startswith(refused.value.refund_id or "?")
    with pytest.raises(TransferRefusedError):  # the keyed retry: the same answer, nothing more
        await client.transfer(user, other, 60, idempotency_key="k")
    assert await client.get_balance(user) == 100
    assert len(await history(client, user)) == 3
    assert (await client.audit(user)).ok and (await client.audit(other)).ok


@ON_REDIS
async def test_bad_transfers_are_typed_errors_and_change_nothing(
    client: Any, user: str, clock: FakeClock
) -> None:
    other = user + "-to"
    await client.add(user, 10)
    with pytest.raises(InvalidInputError):
        await client.transfer(user, user, 1)
    with pytest.raises(InvalidAmountError):
        await client.transfer(user, other, 0)
    with pytest.raises(InvalidUserIdError):
        await client.transfer(user, "", 1)
    with pytest.raises(InvalidExpiryError):
        await client.transfer(user, other, 1, expire_at="tomorrow")
    with pytest.raises(InvalidExpiryError):  # the storage's clock decides: already past
        await client.transfer(user, other, 1, expire_at=clock.now - DAY)
    with pytest.raises(InvalidInputError):
        await client.recover_transfers(older_than=-DAY)
    assert (await client.get_balance(user), await client.get_balance(other)) == (10, 0)
    assert [t.kind for t in await history(client, user)] == ["add"]


@ON_REDIS
async def test_transfers_count_in_the_usage_rollups_as_grants_and_spending(
    client: Any, user: str, clock: FakeClock
) -> None:
    other = user + "-to"
    await client.add(user, 100)
    await client.transfer(user, other, 40)
    begin, end = clock.now - DAY, clock.now + DAY
    (source,) = await client.get_usage(user, begin, end, granularity="month")
    (dest,) = await client.get_usage(other, begin, end, granularity="month")
    assert (source.granted, source.spent, source.charges) == (100, 40, 0)
    assert (dest.granted, dest.spent, dest.charges) == (40, 0, 0)


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_storage_refuses_transfers(make_client: MakeClient, user: str) -> None:
    client = make_client()
    await client.add(user, 10)
    with pytest.raises(NotSupportedError):
        await client.transfer(user, user + "-to", 5)
    with pytest.raises(NotSupportedError):
        await client.recover_transfers()
    assert await client.get_balance(user) == 10
    assert json.dumps([t.kind for t in await history(client, user)]) == '["add"]'
