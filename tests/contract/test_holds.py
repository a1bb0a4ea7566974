"""Holds: reserve, then capture what was used or release it; by ttl they release themselves."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import (
    CaptureExceedsHoldError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
)
from credici_redis.errors import InvalidInputError
from tests.conftest import FakeClock

DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)


async def clean(client: Any, user: str) -> list[Any]:
    report = await client.audit(user)
    assert report.problems == []
    history = await client.get_all_user_transactions(user)
    assert await client.get_balance(user) == sum(t.amount for t in history)
    return history


async def test_reserve_then_capture_part(client: Any, user: str, clock: FakeClock) -> None:
    await client.start_cycle(100, 30, user)
    hold = await client.reserve(user, 40, metadata={"call": "llm"})
    assert (hold.amount, hold.status, hold.user_id, hold.captured) == (40, "active", user, 0)
    assert hold.expires_at == clock.now + timedelta(minutes=5)  # the default ttl
    assert await client.get_balance(user) == 60  # held credits are not available
    details = await client.get_balance_details(user)
    assert (details.balance, details.held) == (60, 40)
    tx = await client.capture(hold.hold_id, 25)
    assert (tx.kind, tx.captured, tx.amount, tx.balance_after) == ("capture", 25, 15, 75)
    assert tx.hold_id == hold.hold_id
    assert await client.get_balance(user) == 75
    assert (await client.get_balance_details(user)).held == 0
    assert (await client.get_cycle(user)).used == 25  # usage is what was captured
    history = await clean(client, user)
    assert [(t.kind, t.amount) for t in history[:2]] == [("capture", 15), ("reserve", -40)]
    assert history[1].transaction_id == hold.transaction_id
    assert history[1].hold_id == hold.hold_id


async def test_capture_all_and_release(client: Any, user: str) -> None:
    await client.add(user, 100)
    first = await client.reserve(user, 30)
    tx = await client.capture(first.hold_id)
    assert (tx.captured, tx.amount) == (30, 0)
    second = await client.reserve(user, 50)
    released = await client.release(second.hold_id)
    assert (released.status, released.amount) == ("released", 50)
    assert await client.get_balance(user) == 70
    await clean(client, user)


async def test_a_hold_ends_once(client: Any, user: str) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30)
    await client.capture(hold.hold_id, 10)
    before = await client.get_all_user_transactions(user)
    for again in (
        client.capture(hold.hold_id, 5),
        client.capture(hold.hold_id),
        client.release(hold.hold_id),
    ):
        with pytest.raises(HoldFinishedError) as info:
            await again
        assert info.value.status == "captured"
    other = await client.reserve(user, 10)
    await client.release(other.hold_id)
    with pytest.raises(HoldFinishedError) as info:
        await client.capture(other.hold_id)
    assert info.value.status == "released"
    assert await client.get_balance(user) == 90
    assert len(await client.get_all_user_transactions(user)) == len(before) + 2


async def test_capture_more_than_held_changes_nothing(client: Any, user: str) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30)
    before = await client.get_all_user_transactions(user)
    with pytest.raises(CaptureExceedsHoldError) as info:
        await client.capture(hold.hold_id, 31)
    assert (info.value.held, info.value.amount) == (30, 31)
    assert isinstance(info.value, InvalidAmountError)
    assert await client.get_all_user_transactions(user) == before
    assert (await client.capture(hold.hold_id, 30)).captured == 30


async def test_ttl_releases_by_itself(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30, ttl=MINUTE)
    clock.now = hold.expires_at - timedelta(milliseconds=1)
    assert await client.get_balance(user) == 70
    clock.now = hold.expires_at
    assert await client.get_balance(user) == 100  # released inside this operation
    with pytest.raises(HoldFinishedError) as info:
        await client.capture(hold.hold_id)
    assert info.value.status == "expired"
    history = await clean(client, user)
    assert (history[0].kind, history[0].amount, history[0].created_at) == (
        "release",
        30,
        hold.expires_at,
    )


async def test_finished_holds_are_forgotten_after_a_day(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30)
    await client.release(hold.hold_id)
    clock.advance(DAY + MINUTE)
    with pytest.raises(HoldNotFoundError):
        await client.release(hold.hold_id)


async def test_reserve_needs_available_credits(client: Any, user: str) -> None:
    await client.add(user, 10)
    await client.set_credit_limit(user, 100)  # holds never use the credit limit
    with pytest.raises(InsufficientCreditsError) as info:
        await client.reserve(user, 11)
    assert info.value.available == 10
    await client.reserve(user, 10)
    with pytest.raises(InsufficientCreditsError):
        await client.reserve(user, 1)
    assert (await client.get_balance_details(user)).held == 10


async def test_release_puts_credits_back_in_their_buckets(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 5, ttl=DAY, priority=-1)
    await client.add(user, 100)
    before = (await client.get_balance_details(user)).buckets
    hold = await client.reserve(user, 20)  # empties the first bucket, 15 of the second
    assert [b.amount for b in (await client.get_balance_details(user)).buckets] == [85]
    await client.release(hold.hold_id)
    assert (await client.get_balance_details(user)).buckets == before
    await clean(client, user)


async def test_credits_of_a_bucket_that_expired_while_held(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 10, ttl=MINUTE)
    await client.add(user, 100)
    hold = await client.reserve(user, 30, ttl=DAY)  # 10 from the expiring bucket, 20 more
    clock.advance(2 * MINUTE)
    tx = await client.capture(hold.hold_id, 5)  # held credits stay capturable...
    assert tx.captured == 5
    # ...and what comes back from the expired bucket (5 of its 10) expires now.
    history = await clean(client, user)
    assert [(t.kind, t.amount) for t in history[:2]] == [("expire", -5), ("capture", 25)]
    assert await client.get_balance(user) == 100  # 110 - 5 captured - 5 expired


async def test_credits_coming_back_repay_a_debt(client: Any, user: str) -> None:
    await client.add(user, 10)
    await client.set_credit_limit(user, 50)
    hold = await client.reserve(user, 10)
    await client.subtract(user, 20)  # into debt: -20
    await client.release(hold.hold_id)
    details = await client.get_balance_details(user)
    assert (details.balance, details.debt, details.buckets) == (-10, 10, [])
    await clean(client, user)


async def test_idempotent_reserve_and_capture(client: Any, user: str) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30, idempotency_key="call-7")
    assert await client.reserve(user, 30, idempotency_key="call-7") == hold
    with pytest.raises(IdempotencyConflictError):
        await client.reserve(user, 31, idempotency_key="call-7")
    tx = await client.capture(hold.hold_id, 12, idempotency_key="settle-7")
    assert await client.capture(hold.hold_id, 12, idempotency_key="settle-7") == tx
    assert await client.get_balance(user) == 88
    await clean(client, user)


async def test_bad_hold_arguments(client: Any, user: str) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 10)
    for bad in ("", "h1", "x@y", "h1@", 17, None, hold.hold_id + "x"):
        with pytest.raises((InvalidInputError, HoldNotFoundError)):
            await client.capture(bad)
    with pytest.raises(HoldNotFoundError):
        await client.release(hold.hold_id.replace("h1@", "h999@"))
    with pytest.raises(InvalidExpiryError):
        await client.reserve(user, 5, ttl=60)
    with pytest.raises(InvalidAmountError):
        await client.reserve(user, 0)
    with pytest.raises(InvalidAmountError):
        await client.capture(hold.hold_id, 0)
    assert await client.get_balance(user) == 90
    await clean(client, user)


async def test_get_hold_reads_a_hold_as_it_is_now(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 100)
    hold = await client.reserve(user, 30, ttl=MINUTE)
    read = await client.get_hold(hold.hold_id)
    assert read.model_dump(exclude={"transaction_id"}) == hold.model_dump(
        exclude={"transaction_id"}
    )
    assert (read.status, read.captured, read.transaction_id) == ("active", 0, None)
    balance = await client.get_balance(user)

    await client.capture(hold.hold_id, 12)
    captured = await client.get_hold(hold.hold_id)
    assert (captured.status, captured.captured, captured.amount) == ("captured", 12, 30)
    assert await client.get_balance(user) == balance + 18  # reading changed nothing

    other = await client.reserve(user, 5, ttl=MINUTE)
    await client.release(other.hold_id)
    assert (await client.get_hold(other.hold_id)).status == "released"

    lapsing = await client.reserve(user, 7, ttl=MINUTE)
    clock.advance(MINUTE * 2)
    before = await client.get_all_user_transactions(user)
    expired = await client.get_hold(lapsing.hold_id)  # the ttl passed: released by this read
    assert (expired.status, expired.captured) == ("expired", 0)
    assert await client.get_all_user_transactions(user) == before  # balance read it already

    clock.advance(DAY * 2)  # a finished hold is remembered for a day, then forgotten
    with pytest.raises(HoldNotFoundError):
        await client.get_hold(hold.hold_id)
    with pytest.raises(HoldNotFoundError):
        await client.get_hold(f"h999@{user}")
    with pytest.raises(InvalidInputError):
        await client.get_hold("not-a-hold")
    await clean(client, user)


async def test_a_release_keeps_its_metadata_in_its_entry(client: Any, user: str) -> None:
    await client.add(user, 10)
    hold = await client.reserve(user, 4)
    why = {"reason": "order cancelled", "operator": "anna"}
    released = await client.release(hold.hold_id, metadata=why)
    assert (released.status, await client.get_balance(user)) == ("released", 10)
    entry = (await client.get_all_user_transactions(user))[0]
    assert (entry.kind, entry.hold_id, entry.metadata) == ("release", hold.hold_id, why)


async def test_get_holds_lists_the_active_ones_soonest_released_first(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.add(user, 100)
    late = await client.reserve(user, 5, ttl=timedelta(hours=3))
    soon = await client.reserve(user, 6, ttl=timedelta(hours=1))
    captured = await client.reserve(user, 7, ttl=timedelta(minutes=30))
    released = await client.reserve(user, 8, ttl=timedelta(minutes=20))
    await client.capture(captured.hold_id, 2)
    await client.release(released.hold_id)
    listed = await client.get_holds(user)
    assert listed.holds == [soon, late] and not listed.more  # ended ones are not listed
    assert (await client.get_holds(user, limit=1)).holds == [soon]
    assert (await client.get_holds(user, limit=1)).more
    clock.advance(timedelta(hours=2))  # soon's ttl passed: released by the read itself
    assert (await client.get_holds(user)).holds == [late]
    assert (await client.get_hold(soon.hold_id)).status == "expired"
    assert (await client.get_holds(f"{user}-nobody")).holds == []


async def test_get_holds_says_when_ended_holds_fill_its_window(client: Any, user: str) -> None:
    """One call looks at the 4 * limit next timers; ended holds (remembered a day) count too."""
    await client.add(user, 100)
    ended = [await client.reserve(user, 1, ttl=timedelta(minutes=5)) for _ in range(4)]
    for hold in ended:
        await client.release(hold.hold_id)  # forgotten in a day: before the active one's ttl
    active = await client.reserve(user, 2, ttl=timedelta(days=2))
    first = await client.get_holds(user, limit=1)
    assert first.holds == [] and first.more  # four ended holds filled the window of 4
    assert (await client.get_holds(user, limit=2)).holds == [active]
    for bad in (0, 1001, 1.0, None):
        with pytest.raises(InvalidInputError):
            await client.get_holds(user, limit=bad)
