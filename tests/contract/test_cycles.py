"""Cycles that renew themselves: rollover, calendar periods in a time zone, usage per cycle."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from credici_redis import CycleNotFoundError, InvalidCycleError, InvalidTimeZoneError
from credici_redis.errors import IdempotencyConflictError
from tests.conftest import FakeClock

DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)
UTC = timezone.utc


def starts(history: list[Any]) -> list[Any]:
    """cycle_start entries, oldest first."""
    return [t for t in reversed(history) if t.kind == "cycle_start"]


async def consistent(client: Any, user: str) -> list[Any]:
    history = await client.get_all_user_transactions(user)
    assert await client.get_balance(user) == sum(t.amount for t in history)
    return history


async def test_renews_after_one_period(client: Any, user: str, clock: FakeClock) -> None:
    first = await client.start_cycle(100, 30, user, renew=True)
    await client.subtract(user, 30)
    clock.now = first.ends_at - MS
    assert (await client.get_cycle(user)).cycle_id == first.cycle_id
    clock.now = first.ends_at
    assert await client.get_balance(user) == 100  # rollover 0: the 70 left expired
    cycle = await client.get_cycle(user)
    assert cycle.cycle_id != first.cycle_id
    assert (cycle.started_at, cycle.ends_at) == (first.ends_at, first.ends_at + 30 * DAY)
    assert (cycle.status, cycle.granted, cycle.used, cycle.renew) == ("active", 100, 0, True)
    history = await consistent(client, user)
    assert [(t.kind, t.amount, t.created_at) for t in history[:2]] == [
        ("cycle_start", 100, first.ends_at),
        ("expire", -70, first.ends_at),
    ]
    assert cycle.cycle_id == history[0].transaction_id


async def test_idle_for_five_periods_gets_one_grant_and_one_entry_for_the_unseen_ones(
    client: Any, user: str, clock: FakeClock
) -> None:
    """Periods that started and ended unseen grant 0: one cycle_start entry stands for all of
    them (`periods`), dated at the first, instead of one per period."""
    first = await client.start_cycle(100, timedelta(days=7), user, renew=True)
    clock.now = first.started_at + 5 * timedelta(days=7) + timedelta(hours=3)
    assert await client.get_balance(user) == 100
    history = await consistent(client, user)
    boundaries = [first.started_at + k * timedelta(days=7) for k in range(6)]
    # On the original schedule: the first period, the four unseen ones, the current one.
    assert [t.created_at for t in starts(history)] == [boundaries[0], boundaries[1], boundaries[5]]
    assert [t.amount for t in starts(history)] == [100, 0, 100]
    assert [t.periods for t in starts(history)] == [None, 4, None]
    assert starts(history)[1].expire_at == boundaries[5]
    assert [t.amount for t in history if t.kind == "expire"] == [-100]
    cycle = await client.get_cycle(user)
    assert (cycle.started_at, cycle.ends_at) == (boundaries[5], boundaries[5] + timedelta(days=7))


@pytest.mark.parametrize(
    ("rollover", "carried"), [(0, 0), (50, 50), (70, 70), (1000, 70), (None, 70)]
)
async def test_rollover_modes(
    client: Any, user: str, clock: FakeClock, rollover: int | None, carried: int
) -> None:
    first = await client.start_cycle(100, 30, user, renew=True, rollover=rollover)
    await client.add(user, 25)  # never touched by cycles
    await client.subtract(user, 30)  # the grant expires first, so all 30 come from it
    clock.now = first.ends_at
    cycle = await client.get_cycle(user)
    assert cycle.granted == 100 + carried
    assert cycle.rollover == rollover
    assert await client.get_balance(user) == 100 + carried + 25
    expired = [t.amount for t in await consistent(client, user) if t.kind == "expire"]
    assert expired == ([-(70 - carried)] if carried < 70 else [])
    # Nothing of the new grant is spent: at the next renewal all of it is subject to rollover.
    clock.now = cycle.ends_at
    unspent = 100 + carried
    carried_again = unspent if rollover is None else min(unspent, rollover)
    assert await client.get_balance(user) == 100 + carried_again + 25


async def test_cancel_keeps_the_grant_until_the_end(
    client: Any, user: str, clock: FakeClock
) -> None:
    first = await client.start_cycle(100, 30, user, renew=True)
    canceled = await client.cancel_cycle(user)
    assert (canceled.status, canceled.renew, canceled.cycle_id) == (
        "canceled",
        False,
        first.cycle_id,
    )
    assert await client.get_balance(user) == 100
    clock.now = first.ends_at
    assert await client.get_balance(user) == 0
    assert (await client.get_cycle(user)).status == "ended"
    assert len(starts(await consistent(client, user))) == 1  # no renewal
    with pytest.raises(CycleNotFoundError):
        await client.cancel_cycle(user)


async def test_cancel_with_forfeit_expires_the_grant_now(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.start_cycle(100, 30, user, renew=True)
    await client.add(user, 10)
    await client.subtract(user, 40)
    clock.advance(DAY)
    canceled = await client.cancel_cycle(user, forfeit=True)
    assert canceled.status == "canceled"
    assert await client.get_balance(user) == 10  # added credits are not the cycle's
    newest = (await consistent(client, user))[0]
    assert (newest.kind, newest.amount, newest.created_at) == ("expire", -60, clock.now)


async def test_cancel_without_a_cycle_is_an_error(client: Any, user: str) -> None:
    await client.add(user, 5)
    with pytest.raises(CycleNotFoundError) as info:
        await client.cancel_cycle(user)
    assert info.value.user_id == user
    assert len(await client.get_all_user_transactions(user)) == 1


async def test_upgrade_mid_cycle_with_and_without_rollover(
    client: Any, user: str, clock: FakeClock
) -> None:
    await client.start_cycle(100, 30, user, renew=True)
    await client.subtract(user, 30)
    clock.advance(10 * DAY)
    upgraded = await client.start_cycle(500, 30, user, renew=True, rollover=None)
    assert (upgraded.granted, upgraded.started_at) == (570, clock.now)
    assert await client.get_balance(user) == 570
    clock.advance(DAY)
    downgraded = await client.start_cycle(50, 30, user)  # rollover 0: the 570 expire now
    assert downgraded.granted == 50
    assert await client.get_balance(user) == 50
    history = await consistent(client, user)
    assert [t.amount for t in history[:2]] == [50, -570]


async def test_usage_counters_across_a_renewal(client: Any, user: str, clock: FakeClock) -> None:
    first = await client.start_cycle(100, 30, user, renew=True)
    await client.subtract(user, 10)
    await client.add(user, 5, ttl=90 * DAY)
    await client.subtract(user, 2)
    cycle = await client.get_cycle(user)
    assert (cycle.used, cycle.added) == (12, 5)
    clock.now = first.ends_at + DAY
    await client.subtract(user, 3)
    cycle = await client.get_cycle(user)
    assert (cycle.used, cycle.added) == (3, 0)


async def test_pay_as_you_go_bills_what_was_added(client: Any, user: str, clock: FakeClock) -> None:
    first = await client.start_cycle(0, "month", user, renew=True)
    for _ in range(7):
        await client.add(user, 1)
    assert (await client.get_cycle(user)).added == 7
    clock.now = first.ends_at
    await client.add(user, 2)
    cycle = await client.get_cycle(user)
    assert (cycle.added, cycle.started_at) == (2, first.ends_at)
    assert [t.created_at for t in starts(await consistent(client, user))] == [
        first.started_at,
        first.ends_at,
    ]


async def test_monthly_from_january_31(client: Any, user: str, clock: FakeClock) -> None:
    clock.now = datetime(2027, 1, 31, 10, 0, tzinfo=UTC)
    first = await client.start_cycle(10, "month", user, renew=True)
    assert first.period == "month"
    assert first.ends_at == datetime(2027, 2, 28, 10, 0, tzinfo=UTC)
    clock.now = datetime(2027, 5, 1, tzinfo=UTC)
    history = await consistent(client, user)
    assert [t.created_at.date().isoformat() for t in starts(history)] == [
        "2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30",
    ]  # fmt: skip
    assert (await client.get_cycle(user)).ends_at == datetime(2027, 5, 31, 10, 0, tzinfo=UTC)


async def test_leap_years(client: Any, user: str, clock: FakeClock) -> None:
    clock.now = datetime(2028, 1, 31, tzinfo=UTC)
    monthly = await client.start_cycle(10, "month", user)
    assert monthly.ends_at == datetime(2028, 2, 29, tzinfo=UTC)
    other = user + "-yearly"
    clock.now = datetime(2028, 2, 29, 12, 0, tzinfo=UTC)
    yearly = await client.start_cycle(10, "year", other, renew=True)
    assert yearly.ends_at == datetime(2029, 2, 28, 12, 0, tzinfo=UTC)
    clock.now = datetime(2032, 3, 1, tzinfo=UTC)
    assert [t.created_at.date().isoformat() for t in starts(await consistent(client, other))] == [
        "2028-02-29", "2029-02-28", "2030-02-28", "2031-02-28", "2032-02-29",
    ]  # fmt: skip


async def test_monthly_in_berlin_ends_at_local_midnight_across_dst(
    client: Any, user: str, clock: FakeClock
) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    clock.now = datetime(2027, 2, 1, tzinfo=berlin)
    await client.start_cycle(10, "month", user, renew=True, tz="Europe/Berlin")
    clock.now = datetime(2028, 1, 15, tzinfo=UTC)  # idle 11 months: the schedule is refilled
    local = [t.created_at.astimezone(berlin) for t in starts(await consistent(client, user))]
    assert [d.replace(tzinfo=None) for d in local] == [
        datetime(2027, m, 1) for m in range(2, 13)
    ] + [datetime(2028, 1, 1)]
    offsets = {d.utcoffset() for d in local}
    assert offsets == {timedelta(hours=1), timedelta(hours=2)}  # both sides of DST
    cycle = await client.get_cycle(user)
    assert cycle.ends_at.astimezone(berlin).replace(tzinfo=None) == datetime(2028, 2, 1)
    assert cycle.tz == "Europe/Berlin"


async def test_weekly_and_daily_calendar_periods(client: Any, user: str, clock: FakeClock) -> None:
    new_york = ZoneInfo("America/New_York")
    clock.now = datetime(2027, 3, 13, 9, 0, tzinfo=new_york)  # DST starts 2027-03-14
    daily = await client.start_cycle(5, "day", user, tz="America/New_York")
    assert daily.ends_at == datetime(2027, 3, 14, 9, 0, tzinfo=new_york)
    assert daily.ends_at - daily.started_at == timedelta(hours=23)
    weekly = await client.start_cycle(5, "week", user + "-w", tz="America/New_York")
    assert weekly.ends_at == datetime(2027, 3, 20, 9, 0, tzinfo=new_york)


async def test_period_is_kept_as_given(client: Any, user: str) -> None:
    assert (await client.start_cycle(1, 30, user)).period == 30
    assert (await client.start_cycle(1, timedelta(hours=5), user)).period == timedelta(hours=5)
    assert (await client.start_cycle(1, "year", user)).period == "year"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tz": "Mars/Olympus"}, InvalidTimeZoneError),
        ({"tz": ""}, InvalidTimeZoneError),
        ({"tz": "../etc/passwd"}, InvalidTimeZoneError),
        ({"tz": None}, InvalidTimeZoneError),
        ({"rollover": -1}, InvalidCycleError),
        ({"rollover": 1.5}, InvalidCycleError),
        ({"rollover": True}, InvalidCycleError),
        ({"renew": 1}, InvalidCycleError),
        ({"renew": "yes"}, InvalidCycleError),
        ({"time_delta": "fortnight"}, InvalidCycleError),
        ({"time_delta": "Month"}, InvalidCycleError),
    ],
)
async def test_bad_cycle_arguments_change_nothing(
    client: Any, user: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    await client.start_cycle(100, 30, user, renew=True)
    before = await client.get_all_user_transactions(user)
    cycle = await client.get_cycle(user)
    with pytest.raises(error):
        await client.start_cycle(amount=5, user_id=user, **({"time_delta": 30} | kwargs))
    assert await client.get_all_user_transactions(user) == before
    assert await client.get_cycle(user) == cycle


async def test_cancel_flags_are_checked(client: Any, user: str) -> None:
    await client.start_cycle(100, 30, user)
    with pytest.raises(InvalidCycleError):
        await client.cancel_cycle(user, forfeit="yes")
    assert (await client.get_cycle(user)).status == "active"


async def test_start_cycle_idempotency(client: Any, user: str) -> None:
    first = await client.start_cycle(100, "month", user, renew=True, idempotency_key="signup")
    again = await client.start_cycle(100, "month", user, renew=True, idempotency_key="signup")
    assert again == first
    assert await client.get_balance(user) == 100
    with pytest.raises(IdempotencyConflictError):
        await client.start_cycle(200, "month", user, renew=True, idempotency_key="signup")
    assert len(await client.get_all_user_transactions(user)) == 1


async def test_renewal_on_the_real_clock(make_client: Any, user: str) -> None:
    import asyncio

    client = make_client()  # Redis TIME decides
    period = timedelta(milliseconds=250)
    first = await client.start_cycle(50, period, user, renew=True)
    await client.subtract(user, 10)
    await asyncio.sleep(0.8)
    assert await client.get_balance(user) == 50
    cycle = await client.get_cycle(user)
    elapsed = cycle.started_at - first.started_at
    periods = elapsed // period
    assert periods >= 3 and elapsed == periods * period  # on the original schedule
    history = await consistent(client, user)
    # Every period started once: those that passed unseen may share one entry (`periods`, from
    # its date on). Counted up to the last period the history shows: on a loaded machine more
    # periods may pass between the reads above and this one (250 ms each).
    begun = starts(history)
    last = begun[-1].created_at + ((begun[-1].periods or 1) - 1) * period
    assert last >= cycle.started_at
    assert sum(t.periods or 1 for t in begun) == (last - first.started_at) // period + 1
    # The charge took 10 from the grant of the period it fell in (the first, unless a loaded
    # machine let 250 ms pass between the two calls): that grant expired with 40, all others unused.
    (spent,) = [t for t in history if t.kind == "subtract"]
    expired = [t for t in reversed(history) if t.kind == "expire"]  # oldest first
    assert {t.amount for t in expired if t.created_at <= spent.created_at} <= {-50}
    after = [t.amount for t in expired if t.created_at > spent.created_at]
    assert after[0] == -40 and set(after[1:]) <= {-50}


async def test_calendar_cycle_on_the_real_clock(make_client: Any, user: str) -> None:
    client = make_client()
    before = datetime.now(UTC)
    cycle = await client.start_cycle(5, "day", user, tz="Asia/Tokyo")
    assert abs(cycle.started_at - before) < timedelta(seconds=5)
    tokyo = ZoneInfo("Asia/Tokyo")
    assert cycle.ends_at.astimezone(tokyo) == cycle.started_at.astimezone(tokyo) + DAY
