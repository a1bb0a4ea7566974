"""The ledger's contract: every behaviour written once, run on each backend with each client."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from credici_redis import (
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    InvalidMetadataError,
    Transaction,
)
from tests.conftest import FakeClock

DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)
MAX = 2**53 - 1


async def assert_consistent(client: Any, user: str) -> list[Transaction]:
    """balance == sum of history == the newest entry's balance_after; each entry's running sum."""
    balance = await client.get_balance(user)
    history = await client.get_all_user_transactions(user)
    assert balance == sum(t.amount for t in history)
    running = 0
    for t in reversed(history):
        running += t.amount
        assert t.balance_after == running, t
    if history:
        assert history[0].balance_after == balance
    return history


async def test_unknown_user_is_empty(client: Any, user: str) -> None:
    assert await client.get_balance(user) == 0
    assert await client.get_all_user_transactions(user) == []
    assert await client.get_cycle(user) is None


async def test_add_returns_the_recorded_transaction(
    client: Any, user: str, clock: FakeClock
) -> None:
    tx = await client.add(user, 100, metadata={"order": "42", "note": "é ✓"})
    assert tx.kind == "add"
    assert tx.amount == 100
    assert tx.balance_after == 100
    assert tx.user_id == user
    assert tx.created_at == clock.now
    assert tx.created_at.tzinfo is not None
    assert tx.expire_at is None
    assert tx.idempotency_key is None
    assert tx.metadata == {"order": "42", "note": "é ✓"}
    assert await client.get_balance(user) == 100
    assert await client.get_all_user_transactions(user) == [tx]


async def test_subtract_takes_credits_and_records_them(client: Any, user: str) -> None:
    await client.add(user, 100)
    tx = await client.subtract(user, 30, metadata={"endpoint": "/v1/chat"})
    assert (tx.kind, tx.amount, tx.balance_after) == ("subtract", -30, 70)
    assert tx.metadata == {"endpoint": "/v1/chat"}
    assert await client.get_balance(user) == 70
    history = await assert_consistent(client, user)
    assert [t.kind for t in history] == ["subtract", "add"]  # newest first
    assert len({t.transaction_id for t in history}) == 2


async def test_subtract_exactly_the_balance_leaves_zero(client: Any, user: str) -> None:
    await client.add(user, 5)
    await client.add(user, 7, ttl=DAY)
    await client.subtract(user, 12)
    assert await client.get_balance(user) == 0
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 1)


async def test_insufficient_credits_changes_nothing(client: Any, user: str) -> None:
    await client.add(user, 10)
    await client.subtract(user, 4)
    before = await client.get_all_user_transactions(user)
    with pytest.raises(InsufficientCreditsError) as info:
        await client.subtract(user, 7)
    assert (info.value.user_id, info.value.requested, info.value.available) == (user, 7, 6)
    assert await client.get_balance(user) == 6
    assert await client.get_all_user_transactions(user) == before


async def test_subtract_on_unknown_user_is_insufficient(client: Any, user: str) -> None:
    with pytest.raises(InsufficientCreditsError) as info:
        await client.subtract(user, 1)
    assert info.value.available == 0
    assert await client.get_all_user_transactions(user) == []


async def test_subtract_spans_many_buckets(client: Any, user: str) -> None:
    for i in range(40):
        await client.add(user, 1 + i % 3, ttl=DAY + i * MS)
    total = sum(1 + i % 3 for i in range(40))
    await client.subtract(user, total - 1)
    assert await client.get_balance(user) == 1
    await assert_consistent(client, user)


async def test_burn_order_soonest_expiry_first_never_last(
    client: Any, user: str, clock: FakeClock
) -> None:
    start = clock.now
    await client.add(user, 100)  # never expires
    await client.add(user, 10, start + 2 * DAY)
    await client.add(user, 10, start + DAY)
    await client.subtract(user, 15)  # all of the 1-day bucket, 5 of the 2-day bucket
    clock.advance(DAY + MS)
    assert await client.get_balance(user) == 105  # the 1-day bucket was already empty
    clock.advance(DAY)
    assert await client.get_balance(user) == 100  # 5 left in the 2-day bucket expired
    expired = [t for t in await assert_consistent(client, user) if t.kind == "expire"]
    assert [(t.amount, t.created_at) for t in expired] == [(-5, start + 2 * DAY)]


async def test_credits_expire_exactly_at_expire_at(
    client: Any, user: str, clock: FakeClock
) -> None:
    expire_at = clock.now + timedelta(hours=1)
    await client.add(user, 50, expire_at)
    await client.add(user, 5)
    clock.now = expire_at - MS
    assert await client.get_balance(user) == 55  # usable while now < expire_at
    await client.subtract(user, 20)
    clock.now = expire_at
    assert await client.get_balance(user) == 5
    history = await assert_consistent(client, user)
    newest = history[0]
    assert (newest.kind, newest.amount, newest.balance_after) == ("expire", -30, 5)
    assert newest.created_at == expire_at
    assert newest.expire_at == expire_at


async def test_expiry_is_recorded_by_the_next_operation(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 3, ttl=timedelta(minutes=1))
    clock.advance(timedelta(minutes=2))
    history = await client.get_all_user_transactions(user)  # reading history is an operation
    assert [t.kind for t in history] == ["expire", "add"]
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 1)
    assert len(await client.get_all_user_transactions(user)) == 2  # expired once, not twice


async def test_ttl_counts_from_the_storage_clock(client: Any, user: str, clock: FakeClock) -> None:
    tx = await client.add(user, 5, ttl=timedelta(seconds=90))
    assert tx.expire_at == clock.now + timedelta(seconds=90)


async def test_naive_expire_at_is_utc(client: Any, user: str, clock: FakeClock) -> None:
    naive = (clock.now + DAY).replace(tzinfo=None)
    tx = await client.add(user, 5, naive)
    assert tx.expire_at == naive.replace(tzinfo=timezone.utc)
    berlin = timezone(timedelta(hours=1))
    tx = await client.add(user, 5, (clock.now + DAY).astimezone(berlin))
    assert tx.expire_at == clock.now + DAY


@pytest.mark.parametrize("offset", [timedelta(0), -MS, -DAY, -365 * DAY])
async def test_expiry_not_in_the_future_is_rejected(
    client: Any, user: str, clock: FakeClock, offset: timedelta
) -> None:
    await client.add(user, 1)
    before = await client.get_all_user_transactions(user)
    with pytest.raises(InvalidExpiryError):
        await client.add(user, 5, clock.now + offset)
    assert await client.get_balance(user) == 1
    assert await client.get_all_user_transactions(user) == before


async def test_seed_readme_expiry_date_in_the_past_is_rejected(client: Any, user: str) -> None:
    # The seed README's example date is in the past by now: a clear typed error, not a silent grant.
    with pytest.raises(InvalidExpiryError):
        await client.add(user_id=user, amount=100, expire_at=datetime(2025, 1, 1))


async def test_real_server_clock_expires_credits(make_client: Any, user: str) -> None:
    import asyncio

    client = make_client()  # no injected clock: Redis TIME decides
    await client.add(user, 7, ttl=timedelta(milliseconds=200))
    await client.add(user, 1)
    assert await client.get_balance(user) == 8
    await asyncio.sleep(0.35)
    assert await client.get_balance(user) == 1
    assert (await client.get_all_user_transactions(user))[0].kind == "expire"


async def test_history_is_newest_first_with_unique_ids(
    client: Any, user: str, clock: FakeClock
) -> None:
    for i in range(5):
        await client.add(user, i + 1)
        clock.advance(MS)
    await client.subtract(user, 3)
    history = await assert_consistent(client, user)
    assert [t.amount for t in history] == [-3, 5, 4, 3, 2, 1]
    assert [t.created_at for t in history] == sorted((t.created_at for t in history), reverse=True)
    assert len({t.transaction_id for t in history}) == 6


async def test_same_millisecond_entries_keep_their_order(client: Any, user: str) -> None:
    for i in range(5):
        await client.add(user, i + 1)  # the clock is frozen: all in one millisecond
    history = await client.get_all_user_transactions(user)
    assert [t.amount for t in history] == [5, 4, 3, 2, 1]


async def test_history_clock_step_back_keeps_ids_growing(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 1)
    clock.advance(-timedelta(seconds=5))
    tx = await client.add(user, 2)
    history = await assert_consistent(client, user)
    assert history[0] == tx and history[0].amount == 2
    assert history[0].created_at >= history[1].created_at


async def test_period_query_bounds_are_inclusive(client: Any, user: str, clock: FakeClock) -> None:
    stamps = []
    for i in range(6):
        stamps.append((await client.add(user, i + 1)).created_at)
        clock.advance(timedelta(seconds=1))
    got = await client.get_user_transactions_for_period(user, stamps[1], stamps[4])
    assert [t.amount for t in got] == [5, 4, 3, 2]
    got = await client.get_user_transactions_for_period(user, stamps[1] + MS, stamps[4] - MS)
    assert [t.amount for t in got] == [4, 3]
    # Sub-millisecond bounds: from_ rounds up, to_ rounds down.
    micro = timedelta(microseconds=1)
    got = await client.get_user_transactions_for_period(user, stamps[1] - micro, stamps[4] + micro)
    assert [t.amount for t in got] == [5, 4, 3, 2]
    got = await client.get_user_transactions_for_period(user, stamps[1] + micro, stamps[4] - micro)
    assert [t.amount for t in got] == [4, 3]
    assert await client.get_user_transactions_for_period(user, stamps[4], stamps[1]) == []
    far = datetime(1900, 1, 1)
    assert await client.get_user_transactions_for_period(user, far, far) == []


async def test_long_history_is_read_in_pages(
    client: Any, user: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from credici_redis._core import protocol as _protocol

    monkeypatch.setattr(_protocol, "HISTORY_PAGE", 4)
    for i in range(11):
        await client.add(user, i + 1)
        if i % 3 == 0:
            clock.advance(MS)
    everything = await client.get_all_user_transactions(user)
    assert [t.amount for t in everything] == list(range(11, 0, -1))
    part = await client.get_user_transactions_for_period(
        user, everything[9].created_at, everything[0].created_at
    )
    assert part == [t for t in everything if t.created_at >= everything[9].created_at]


async def test_idempotent_retry_returns_the_original(client: Any, user: str) -> None:
    await client.add(user, 100)
    first = await client.subtract(user, 10, idempotency_key="charge-1", metadata={"a": "b"})
    again = await client.subtract(user, 10, idempotency_key="charge-1", metadata={"a": "b"})
    assert again == first
    assert first.idempotency_key == "charge-1"
    assert await client.get_balance(user) == 90
    assert len(await client.get_all_user_transactions(user)) == 2

    added = await client.add(user, 5, ttl=DAY, idempotency_key="grant-1")
    assert await client.add(user, 5, ttl=DAY, idempotency_key="grant-1") == added
    assert await client.get_balance(user) == 95


async def test_idempotency_key_reused_differently_conflicts(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.subtract(user, 10, idempotency_key="k")
    before = await client.get_all_user_transactions(user)
    for attempt in (
        client.subtract(user, 11, idempotency_key="k"),
        client.subtract(user, 10, idempotency_key="k", metadata={"x": "y"}),
        client.add(user, 10, idempotency_key="k"),
    ):
        with pytest.raises(IdempotencyConflictError) as info:
            await attempt
        assert (info.value.user_id, info.value.idempotency_key) == (user, "k")
    assert await client.get_balance(user) == 90
    assert await client.get_all_user_transactions(user) == before


async def test_idempotency_keys_belong_to_one_user(client: Any, user: str) -> None:
    other = user + "-other"
    await client.add(user, 10, idempotency_key="same")
    await client.add(other, 10, idempotency_key="same")
    assert await client.get_balance(user) == 10
    assert await client.get_balance(other) == 10


async def test_failed_charge_does_not_consume_its_key(client: Any, user: str) -> None:
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 5, idempotency_key="k")
    await client.add(user, 5)
    tx = await client.subtract(user, 5, idempotency_key="k")
    assert tx.balance_after == 0


async def test_start_cycle_grants_until_its_end(client: Any, user: str, clock: FakeClock) -> None:
    cycle = await client.start_cycle(amount=200, time_delta=30, user_id=user)
    assert cycle.user_id == user
    assert (cycle.status, cycle.renew, cycle.rollover, cycle.period) == ("active", False, 0, 30)
    assert (cycle.granted, cycle.used, cycle.added) == (200, 0, 0)
    assert cycle.amount == 200
    assert cycle.started_at == clock.now
    assert cycle.ends_at == clock.now + 30 * DAY
    assert await client.get_cycle(user) == cycle
    assert await client.get_balance(user) == 200
    (entry,) = await client.get_all_user_transactions(user)
    assert (entry.kind, entry.amount, entry.expire_at) == ("cycle_start", 200, cycle.ends_at)
    clock.now = cycle.ends_at - MS
    assert await client.get_balance(user) == 200
    clock.now = cycle.ends_at
    assert await client.get_balance(user) == 0
    await assert_consistent(client, user)


async def test_start_cycle_without_user_creates_one(client: Any) -> None:
    cycle = await client.start_cycle(50, timedelta(hours=12))
    assert uuid.UUID(cycle.user_id).version == 4
    assert cycle.ends_at - cycle.started_at == timedelta(hours=12)
    assert await client.get_balance(cycle.user_id) == 50


async def test_pay_as_you_go_cycle_of_zero(client: Any, user: str) -> None:
    # The seed's pay-as-you-go model: a cycle of 0 credits, then an add per use.
    cycle = await client.start_cycle(amount=0, time_delta=30, user_id=user)
    assert cycle.amount == 0
    await client.add(user_id=user, amount=1)
    assert await client.get_balance(user) == 1
    kinds = [t.kind for t in await assert_consistent(client, user)]
    assert kinds == ["add", "cycle_start"]


@pytest.mark.parametrize(
    "user_id",
    [
        "a:b",
        "{tag}",
        "}{",
        "with space",
        "ünïcødé-用户-🙂",
        "x" * 256,
        "é" * 128,  # 256 UTF-8 bytes
        "%7B",
        "\x00nul",
    ],
)
async def test_any_user_id_string_works(client: Any, user_id: str) -> None:
    await client.add(user_id, 3)
    await client.subtract(user_id, 1)
    assert await client.get_balance(user_id) == 2
    history = await client.get_all_user_transactions(user_id)
    assert [t.user_id for t in history] == [user_id, user_id]


async def test_distinct_user_ids_never_share_data(client: Any) -> None:
    # Pairs an escaping scheme could confuse: the raw and the encoded form, tag delimiters, case.
    ids = ["a}b", "a%7Db", "a%257Db", "{a}", "a", "A", "a:b", "a%3Ab", "a b", "a+b", "a%20b"]
    for i, uid in enumerate(ids):
        await client.add(uid, i + 1)
    for i, uid in enumerate(ids):
        assert await client.get_balance(uid) == i + 1
        assert len(await client.get_all_user_transactions(uid)) == 1


async def test_uuid_user_id_is_its_string(client: Any) -> None:
    uid = uuid.uuid4()
    await client.add(uid, 4)
    assert await client.get_balance(str(uid)) == 4
    (tx,) = await client.get_all_user_transactions(uid)
    assert tx.user_id == str(uid)


async def test_amounts_up_to_2_53_minus_1(client: Any, user: str) -> None:
    tx = await client.add(user, MAX)
    assert tx.balance_after == MAX
    assert await client.get_balance(user) == MAX
    with pytest.raises(InvalidAmountError):
        await client.add(user, 1)
    with pytest.raises(InvalidAmountError):
        await client.start_cycle(1, 30, user)
    assert await client.get_balance(user) == MAX
    assert len(await client.get_all_user_transactions(user)) == 1
    tx = await client.subtract(user, MAX - 1)
    assert tx.balance_after == 1
    await assert_consistent(client, user)


async def test_clients_share_one_store(make_client: Any, clock: FakeClock, user: str) -> None:
    a, b = make_client(clock=clock), make_client(clock=clock)
    await a.add(user, 10)
    await b.subtract(user, 4)
    assert await a.get_balance(user) == 6


async def test_a_credit_limit_change_is_recorded_with_who_and_why(
    client: Any, user: str, clock: FakeClock
) -> None:
    """Spending power is money: each change of the credit limit is a history entry (amount 0,
    the new limit, the metadata); setting the limit the user has writes nothing."""
    from credici_redis import NotReversibleError

    await client.add(user, 10)
    await client.set_credit_limit(user, 0)  # the default already: nothing to record
    await client.set_credit_limit(user, 50, metadata={"reason": "trusted", "operator": "ann"})
    await client.set_credit_limit(user, 50)  # again: nothing
    clock.advance(timedelta(seconds=1))
    await client.set_credit_limit(user, 20)
    spent = await client.subtract(user, 25)  # 10 from the bucket, 15 of overdraft
    history = await client.get_all_user_transactions(user)
    assert [(t.kind, t.amount, t.credit_limit) for t in history] == [
        ("subtract", -25, None),
        ("credit_limit", 0, 20),
        ("credit_limit", 0, 50),
        ("add", 10, None),
    ]
    assert history[2].metadata == {"reason": "trusted", "operator": "ann"}
    assert history[1].metadata == {} and history[1].balance_after == 10
    assert spent.balance_after == -15 == sum(t.amount for t in history)
    assert (await client.get_balance_details(user)).credit_limit == 20
    with pytest.raises(NotReversibleError):
        await client.reverse(history[1].transaction_id)
    usage = await client.get_usage(
        user, clock.now - timedelta(hours=1), clock.now, granularity="hour"
    )
    assert (sum(p.spent for p in usage), sum(p.granted for p in usage)) == (25, 10)
    report = await client.audit(user)
    assert report.ok, report.problems
    assert report.entries == 4
    with pytest.raises(InvalidMetadataError):
        await client.set_credit_limit(user, 30, metadata={"reason": 1})
    assert (await client.get_balance_details(user)).credit_limit == 20
