"""Usage rollups (issue 21): `get_usage` per hour, day and month against sums of the history,
at day boundaries of non-UTC zones, with retention of the records and typed errors. Every
backend, both clients; the clock is injected (tests/conftest.py FakeClock)."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from credici_redis import (
    InvalidPeriodError,
    InvalidTimeZoneError,
    Transaction,
    UsagePoint,
    UsageUnavailableError,
    UsageZoneError,
)
from tests.conftest import FakeClock, MakeClient

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


# Usage days are in the storage's usage_tz, never the machine's zone.
pytestmark = pytest.mark.usefixtures("local_zone_not_utc")


def counted(tx: Transaction) -> tuple[int, int, int, int]:
    """What one history entry adds to (spent, granted, expired, charges): the definition,
    written again here from the models' kinds (not from the library's code)."""
    n = tx.amount
    if tx.kind == "expire":
        return (0, 0, -n, 0)
    if tx.kind in ("add", "cycle_start", "transfer_in") or (tx.kind == "reverse" and n < 0):
        return (0, n, 0, 0)
    return (-n, 0, 0, 1 if tx.kind in ("subtract", "reserve") else 0)


def expected(history: list[Transaction], period_of: Any) -> dict[Any, list[int]]:
    sums: dict[Any, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for tx in history:
        total = sums[period_of(tx.created_at)]
        for i, v in enumerate(counted(tx)):
            total[i] += v
    return sums


def as_tuple(p: UsagePoint) -> tuple[int, int, int, int]:
    return (p.spent, p.granted, p.expired, p.charges)


async def workload(client: Any, user: str, clock: FakeClock) -> None:
    """Grants, charges, holds, a reversal, an expiry and a cycle over about three days, at
    uneven steps (so the entries cross hours and local midnights)."""
    await client.add(user, 1_000)
    await client.add(user, 40, ttl=5 * HOUR)
    await client.start_cycle(100, 1, user, renew=True)
    step = timedelta(minutes=47)
    for i in range(80):
        clock.advance(step)
        if i % 9 == 4:
            hold = await client.reserve(user, 7, ttl=timedelta(minutes=30))
            if i % 2:
                await client.capture(hold.hold_id, 5)
            # else: released by its ttl later (an entry dated at the ttl)
        elif i % 13 == 6:
            tx = await client.subtract(user, 11)
            await client.reverse(tx.transaction_id)
        else:
            await client.subtract(user, 1 + i % 4)
    clock.advance(2 * HOUR)
    await client.get_balance(user)  # brings due expiries and ttls in


async def test_usage_is_the_history_summed_per_hour_day_and_month(
    make_client: MakeClient, clock: FakeClock, user: str
) -> None:
    tz = "America/New_York"
    client = make_client(clock=clock, usage_tz=tz)
    clock.now = datetime(2026, 3, 6, 20, 5, tzinfo=timezone.utc)  # DST starts on March 8th
    begin = clock.now
    await workload(client, user, clock)
    history = list(await client.get_all_user_transactions(user))
    assert {tx.kind for tx in history} >= {"add", "subtract", "expire", "cycle_start", "reserve",
                                          "capture", "release", "reverse"}  # fmt: skip
    zone = ZoneInfo(tz)
    end = clock.now + HOUR

    hours = await client.get_usage(user, begin, end, granularity="hour")
    want = expected(history, lambda at: at.replace(minute=0, second=0, microsecond=0))
    got = {p.start.astimezone(timezone.utc): list(as_tuple(p)) for p in hours}
    assert {k: v for k, v in got.items() if any(v)} == dict(want)
    assert [p.start for p in hours] == sorted(p.start for p in hours)
    assert len(hours) == len(set(got))

    days = await client.get_usage(user, begin, end, granularity="day")
    want = expected(history, lambda at: at.astimezone(zone).date())
    got = {p.start.date(): list(as_tuple(p)) for p in days}
    assert {k: v for k, v in got.items() if any(v)} == dict(want)
    for p in days:  # each starts at its local midnight, in the zone
        assert p.start.tzinfo is not None and p.start.utcoffset() == zone.utcoffset(p.start)
        assert (p.start.hour, p.start.minute) == (0, 0)

    months = await client.get_usage(user, begin, end, granularity="month")
    assert [as_tuple(p) for p in months] == [tuple(sum(v[i] for v in want.values())
                                                   for i in range(4))]  # fmt: skip
    total = as_tuple(months[0])
    balance = await client.get_balance(user)
    assert total[1] - total[0] - total[2] == balance  # granted - spent - expired


@pytest.mark.parametrize(
    ("tz", "midnight_utc"),
    [
        ("Asia/Kolkata", datetime(2026, 5, 4, 18, 30, tzinfo=timezone.utc)),  # +05:30
        ("America/New_York", datetime(2026, 11, 1, 4, 0, tzinfo=timezone.utc)),  # DST ends
        ("UTC", datetime(2026, 5, 5, 0, 0, tzinfo=timezone.utc)),
    ],
)
async def test_a_local_midnight_splits_the_days_not_the_hour(
    make_client: MakeClient, clock: FakeClock, user: str, tz: str, midnight_utc: datetime
) -> None:
    client = make_client(clock=clock, usage_tz=tz)
    clock.now = midnight_utc - timedelta(minutes=20)
    await client.add(user, 100)
    clock.now = midnight_utc - timedelta(minutes=1)
    await client.subtract(user, 3)
    clock.now = midnight_utc + timedelta(minutes=1)
    await client.subtract(user, 5)
    await client.subtract(user, 7)
    since = midnight_utc - DAY
    days = await client.get_usage(user, since, midnight_utc + HOUR, granularity="day", tz=tz)
    local = midnight_utc.astimezone(ZoneInfo(tz)).date()
    by_day = {p.start.date(): as_tuple(p) for p in days}
    assert by_day[local - DAY] == (3, 100, 0, 1)
    assert by_day[local] == (12, 0, 0, 2)
    hours = await client.get_usage(user, since, midnight_utc + HOUR, granularity="hour", tz=tz)
    by_hour = {p.start.astimezone(timezone.utc): as_tuple(p) for p in hours}
    hour = midnight_utc.replace(minute=0)
    if midnight_utc.minute:  # a zone 30 minutes off: one UTC hour holds both sides of midnight
        assert by_hour[hour] == (15, 100, 0, 3)
    else:
        assert by_hour[hour - HOUR] == (3, 100, 0, 1)
        assert by_hour[hour] == (12, 0, 0, 2)
    assert all(p.start.tzinfo is not None for p in hours)


async def test_days_in_another_zone_than_counted_are_refused(
    make_client: MakeClient, clock: FakeClock, user: str
) -> None:
    client = make_client(clock=clock, usage_tz="Asia/Kolkata")
    await client.add(user, 10)
    await client.subtract(user, 1)
    with pytest.raises(UsageZoneError) as caught:
        await client.get_usage(user, clock.now - DAY, clock.now + DAY, tz="Europe/Paris")
    assert (caught.value.counted, caught.value.asked) == ("Asia/Kolkata", "Europe/Paris")
    hours = await client.get_usage(
        user, clock.now - HOUR, clock.now + HOUR, granularity="hour", tz="Europe/Paris"
    )
    assert sum(p.spent for p in hours) == 1  # hours are UTC hours: any zone labels them
    other = make_client(clock=clock)  # a UTC client on the same store reads what was counted
    with pytest.raises(UsageZoneError):
        await other.get_usage(user, clock.now - DAY, clock.now + DAY)


async def test_hour_records_are_kept_a_week_and_days_longer(
    make_client: MakeClient, clock: FakeClock, user: str
) -> None:
    client = make_client(clock=clock)
    clock.now = datetime(2026, 1, 10, 12, 30, tzinfo=timezone.utc)
    first = clock.now
    await client.add(user, 100)
    await client.subtract(user, 2)
    clock.advance(8 * DAY)
    await client.subtract(user, 3)
    clock.advance(HOUR)
    await client.subtract(user, 4)  # a fold: the hour records of 8 days ago go
    with pytest.raises(UsageUnavailableError) as caught:
        await client.get_usage(user, first, clock.now, granularity="hour")
    hour_now = clock.now.replace(minute=0, second=0, microsecond=0)
    assert caught.value.available_from == hour_now - 7 * DAY + HOUR  # 168 hours kept
    hours = await client.get_usage(user, clock.now - DAY, clock.now + HOUR, granularity="hour")
    assert sum(p.spent for p in hours) == 7
    days = await client.get_usage(user, first, clock.now + HOUR, granularity="day")
    assert [as_tuple(p) for p in days if any(as_tuple(p))] == [(2, 100, 0, 1), (7, 0, 0, 2)]
    clock.advance(400 * DAY)
    await client.subtract(user, 1)
    clock.advance(DAY)
    await client.subtract(user, 1)  # day records older than 400 days go too, in one fold
    with pytest.raises(UsageUnavailableError):
        await client.get_usage(user, first, first + DAY, granularity="day")
    recent = await client.get_usage(user, clock.now - DAY, clock.now + HOUR, granularity="month")
    assert sum(p.spent for p in recent) == 2


async def test_usage_of_a_user_without_history_is_zeros_and_writes_nothing(
    make_client: MakeClient, clock: FakeClock, user: str
) -> None:
    client = make_client(clock=clock, usage_tz="Asia/Kolkata")
    days = await client.get_usage(user, clock.now - 3 * DAY, clock.now, granularity="day")
    assert len(days) in (3, 4) and all(as_tuple(p) == (0, 0, 0, 0) for p in days)
    assert await client.get_balance(user) == 0
    found = client.scan_users()
    if hasattr(found, "__await__"):  # the sync client, seen through SyncAsAsync
        found = await found
    if hasattr(found, "__aiter__"):
        users = [u async for batch in found for u in batch]
    else:
        users = [u for batch in found for u in batch]
    assert user not in users  # a read of a user without history leaves no state


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"granularity": "week"}, InvalidPeriodError),
        ({"tz": "Mars/Olympus_Mons"}, InvalidTimeZoneError),
        ({"from_": "yesterday"}, InvalidPeriodError),
        ({"to_": datetime(2000, 1, 1, tzinfo=timezone.utc)}, InvalidPeriodError),  # before from_
        ({"from_": datetime(2020, 1, 1, tzinfo=timezone.utc)}, InvalidPeriodError),  # too long
        (
            {"granularity": "hour", "from_": datetime(2026, 1, 1, tzinfo=timezone.utc)},
            InvalidPeriodError,
        ),
    ],
)
async def test_bad_usage_queries_are_typed_errors(
    client: Any, user: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    args = {"from_": datetime(2026, 12, 1, tzinfo=timezone.utc),
            "to_": datetime(2027, 3, 1, tzinfo=timezone.utc), **kwargs}  # fmt: skip
    with pytest.raises(error):
        await client.get_usage(user, args.pop("from_"), args.pop("to_"), **args)


async def test_a_bad_usage_zone_is_refused_before_anything_connects(
    make_client: MakeClient,
) -> None:
    with pytest.raises(InvalidTimeZoneError):
        make_client(usage_tz="Nowhere/Special")
    with pytest.raises(InvalidTimeZoneError):
        make_client(usage_tz="UTC|x")


async def test_usage_is_counted_for_batches_too(client: Any, clock: FakeClock, user: str) -> None:
    await client.add(user, 100)
    results = await client.subtract_many([(user, 2), (user, 3), (user, 500)])
    assert [getattr(r, "amount", None) for r in results][:2] == [-2, -3]
    points = await client.get_usage(user, clock.now - HOUR, clock.now + HOUR, granularity="hour")
    assert sum(as_tuple(p)[0] for p in points) == 5
    assert sum(as_tuple(p)[3] for p in points) == 2


def test_the_day_numbers_are_local_dates() -> None:
    """The usage day of an instant is its local date (checked against zoneinfo directly)."""
    from credici_redis._core.schedule import zone_offsets

    tz = "Australia/Lord_Howe"  # a 30-minute DST shift
    start = int(datetime(2026, 3, 30, tzinfo=timezone.utc).timestamp() * 1000)
    until, offsets = zone_offsets(tz, start, start + 30 * 86_400_000)
    assert until == start + 37 * 86_400_000
    assert len(offsets) == 2  # DST ends on April 5th
    change_ms, after = offsets[1]
    zone = ZoneInfo(tz)
    before_change = datetime.fromtimestamp((change_ms - 1) / 1000, zone)
    at_change = datetime.fromtimestamp(change_ms / 1000, zone)
    assert before_change.utcoffset() != at_change.utcoffset()
    assert after == at_change.utcoffset() // timedelta(milliseconds=1)
    assert at_change.date() == date(2026, 4, 5)


async def test_usage_past_2_53_credits_is_exact(client: Any, clock: FakeClock, user: str) -> None:
    """A period's sums may pass 2**53 - 1 (the most a balance holds) where the amounts come and
    go: counted exactly all the same (found by the reference model)."""
    most = 2**53 - 1
    clock.now = datetime(2026, 6, 1, 10, 0, tzinfo=timezone.utc)
    for _ in range(3):
        await client.add(user, most)
        await client.subtract(user, most)
        clock.advance(timedelta(minutes=5))
    await client.add(user, 7)
    hours = await client.get_usage(user, clock.now - HOUR, clock.now + HOUR, granularity="hour")
    days = await client.get_usage(user, clock.now - DAY, clock.now + HOUR, granularity="day")
    for points in (hours, days):
        assert sum(p.granted for p in points) == 3 * most + 7
        assert sum(p.spent for p in points) == 3 * most
        assert sum(p.charges for p in points) == 3
    clock.advance(2 * HOUR)
    await client.subtract(user, 1)  # the hour closes: its record holds the big sums
    hours = await client.get_usage(user, clock.now - 3 * HOUR, clock.now + HOUR, granularity="hour")
    assert [(p.spent, p.granted) for p in hours if p.granted] == [(3 * most, 3 * most + 7)]
    month = await client.get_usage(user, clock.now - DAY, clock.now, granularity="month")
    assert (month[-1].spent, month[-1].granted) == (3 * most + 1, 3 * most + 7)


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_an_hour_is_closed_into_its_records_once(
    client: Any, clock: FakeClock, user: str, backend: str, namespace: str
) -> None:
    """The running hour is counted in the state hash: the usage hash gets its hour and day
    records once the hour is over, not a write per charge."""
    import redis as redis_py

    from credici_redis import CrediciClient
    from credici_redis._core import keys as _keys
    from tests.conftest import REDIS_URL

    raw: Any = (
        redis_py.Redis.from_url(REDIS_URL)
        if backend == "redis"
        else CrediciClient.from_url(f"memory://{namespace}").storage.redis  # type: ignore[attr-defined]
    )
    usage_key = _keys.user_keys(namespace, user).usage
    clock.now = datetime(2026, 6, 1, 10, 0, tzinfo=timezone.utc)
    await client.add(user, 100)
    for _ in range(5):
        clock.advance(timedelta(minutes=5))
        await client.subtract(user, 1)
    assert raw.hgetall(usage_key) == {}  # all in the running hour, in the state hash
    clock.advance(HOUR)
    await client.subtract(user, 1)
    hour = int(datetime(2026, 6, 1, 10, tzinfo=timezone.utc).timestamp()) // 3600
    day = (date(2026, 6, 1) - date(1970, 1, 1)).days
    assert raw.hgetall(usage_key) == {
        f"H{hour}".encode(): b"5:100:0:5",
        f"D{day}".encode(): b"5:100:0:5",
    }


async def test_a_new_user_in_a_zone_costs_no_extra_round_trip(
    make_client: MakeClient, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client sends the usage zone's offsets (from two days back) with its calls: a user's
    first charge does not have to ask for them (ZONE); an idle user's does (tested above)."""
    from credici_redis._core import schedule

    asked: list[Any] = []
    real = schedule.zone_extension
    monkeypatch.setattr(schedule, "zone_extension", lambda r: asked.append(r) or real(r))
    client = make_client(usage_tz="Asia/Kolkata")  # the store's own clock
    await client.add(user, 10)
    await client.subtract(user, 1)
    now = datetime.now(timezone.utc)
    days = await client.get_usage(user, now - DAY, now + HOUR)
    assert sum(p.spent for p in days) == 1 and sum(p.granted for p in days) == 10
    assert asked == []
