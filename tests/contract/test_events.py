"""Low-balance events: written by the change that causes them, shared by a consumer group."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import InvalidAmountError
from credici_redis.errors import InvalidInputError
from tests.conftest import BACKENDS, FakeClock, SyncAsAsync


async def collect(client: Any, **options: Any) -> list[Any]:
    """Read events until none came for a moment."""
    options = {"idle_timeout": 0.15, "poll": 0.02, **options}
    if isinstance(client, SyncAsAsync):
        return list(client.sync.events(**options))
    return [event async for event in client.events(**options)]


async def test_crossing_the_threshold_and_reaching_zero(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_low_balance_threshold(user, 20)
    await client.subtract(user, 70)  # 30: still above
    low = await client.subtract(user, 15)  # 15: below, an event
    await client.subtract(user, 5)  # 10: still below, no new event
    await client.add(user, 50)  # 60: above again
    again = await client.subtract(user, 45)  # 15: below again
    gone = await client.subtract(user, 15)  # 0: depleted
    events = await collect(client)
    assert [(e.kind, e.balance, e.threshold) for e in events] == [
        ("low_balance", 15, 20),
        ("low_balance", 15, 20),
        ("depleted", 0, 20),
    ]
    assert [e.transaction_id for e in events] == [
        low.transaction_id,
        again.transaction_id,
        gone.transaction_id,
    ]
    assert {e.user_id for e in events} == {user}
    assert await collect(client) == []  # acknowledged: not delivered again to the group


async def test_one_change_can_cross_both(client: Any, user: str) -> None:
    await client.add(user, 50)
    await client.set_low_balance_threshold(user, 10)
    await client.subtract(user, 50)
    assert [e.kind for e in await collect(client)] == ["low_balance", "depleted"]


async def test_no_threshold_no_events(client: Any, user: str) -> None:
    await client.add(user, 10)
    await client.subtract(user, 10)
    await client.set_low_balance_threshold(user, 5)
    await client.set_low_balance_threshold(user, None)
    await client.add(user, 10)
    await client.subtract(user, 10)
    assert await collect(client) == []


async def test_expiry_and_holds_can_cause_events(client: Any, user: str, clock: FakeClock) -> None:
    await client.add(user, 30, ttl=timedelta(hours=1))
    await client.add(user, 5)
    await client.set_low_balance_threshold(user, 10)
    clock.advance(timedelta(hours=2))
    await client.get_balance(user)  # the expiry is recorded here, and its event with it
    (event,) = await collect(client)
    assert (event.kind, event.balance) == ("low_balance", 5)
    hold = await client.reserve(user, 5)
    assert [e.kind for e in await collect(client)] == ["depleted"]
    await client.release(hold.hold_id)


async def test_a_group_shares_events_and_groups_each_get_all(
    make_client: Any, clock: FakeClock
) -> None:
    client = make_client(clock=clock)
    users = [f"u{i}" for i in range(40)]  # spread over many slots: many event streams
    for uid in users:
        await client.add(uid, 10)
        await client.set_low_balance_threshold(uid, 5)
        await client.subtract(uid, 6)
    first = await collect(make_client(clock=clock), consumer="a", batch=7)
    second = await collect(make_client(clock=clock), consumer="b")
    assert len(first) == 40 and second == []  # a drained the group's events
    other = await collect(make_client(clock=clock), group="billing")
    assert sorted(e.user_id for e in other) == sorted(users)
    assert len({e.event_id for e in first}) == 40


@pytest.mark.parametrize("backend", BACKENDS)  # drives the Redis storage's own event calls
@pytest.mark.parametrize("api", ["sync"])
async def test_events_a_dead_consumer_held_are_taken_over(client: Any, user: str) -> None:
    import asyncio

    await client.add(user, 10)
    await client.set_low_balance_threshold(user, 5)
    await client.subtract(user, 6)
    storage = client.sync.storage
    streams = [stream for found in storage._event_streams() for stream in found]
    storage.run(storage.ledger.join_group(streams, "credici"))
    read = storage.run(storage.ledger.read_events(streams, "credici", "dying", 10, None))
    assert [e.user_id for e in read] == [user]  # read, never acknowledged: the reader died
    assert await collect(client, consumer="other", claim_after=10.0) == []  # not yet
    await asyncio.sleep(0.3)
    taken = await collect(client, consumer="other", claim_after=0.2)
    assert [e.event_id for e in taken] == [read[0].event_id]


async def test_bad_event_arguments(client: Any, user: str) -> None:
    with pytest.raises(InvalidAmountError):
        await client.set_low_balance_threshold(user, -1)
    with pytest.raises(InvalidAmountError):
        await client.set_low_balance_threshold(user, 1.5)
    for options in (
        {"group": ""},
        {"consumer": 5},
        {"batch": 0},
        {"poll": 0},
        {"idle_timeout": -1},
    ):
        with pytest.raises(InvalidInputError):
            await collect(client, **options)


async def test_recent_events_newest_first_across_slots_without_consuming(
    client: Any, user: str
) -> None:
    """An operator's look at the newest events: from every user's slot, newest first, at most
    `limit`, and a consumer group still gets every one of them afterwards."""
    import asyncio

    made = []
    for i in range(5):  # five users: five slots, five streams on Redis
        who = f"{user}-{i}"
        await client.add(who, 10)
        await client.set_low_balance_threshold(who, 5)
        await asyncio.sleep(0.002)  # events of different slots are ordered by the ms they got
        made.append((await client.subtract(who, 6)).transaction_id)  # low_balance
    await asyncio.sleep(0.002)
    made.append((await client.subtract(f"{user}-2", 4)).transaction_id)  # depleted, the newest
    recent = await client.recent_events(limit=3)
    assert [e.transaction_id for e in recent] == made[::-1][:3]
    assert recent[0].kind == "depleted" and recent[0].user_id == f"{user}-2"
    everything = await client.recent_events(limit=1000)
    assert [e.transaction_id for e in everything] == made[::-1]
    assert [e.created_at for e in everything] == sorted(
        (e.created_at for e in everything), reverse=True
    )
    assert sorted(e.transaction_id for e in await collect(client)) == sorted(made)
    assert len(await client.recent_events()) == 6  # a look acknowledges nothing and keeps all
    for bad in (0, 1001, 2.0, "5"):
        with pytest.raises(InvalidInputError):
            await client.recent_events(limit=bad)


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_events_every_group_acknowledged_leave_the_stream(
    client: Any, user: str, url: str, namespace: str
) -> None:
    """A slot's event stream keeps what some group still needs, not every event ever written:
    acknowledged by every group (and older than a week; no wait here), an event is trimmed; one a
    group has not read, or read and not acknowledged, stays (a group made later gets what is
    still kept)."""
    import asyncio

    from credici_redis._core import keys as _keys
    from tests.conftest import raw_redis

    raw = raw_redis(url)
    stream = _keys.user_keys(namespace, user).events
    storage = client.sync.storage if isinstance(client, SyncAsAsync) else client.storage
    storage.ledger.events_kept_ms = 0  # acknowledged events are kept a week: not here
    await client.add(user, 100)
    await client.set_low_balance_threshold(user, 50)
    await client.subtract(user, 60)  # low_balance
    assert len(await collect(client, group="a")) == 1  # the only group acknowledged it
    assert raw.xlen(stream) == 0
    assert await collect(client, group="b") == []  # b joins: it gets what is still kept
    await client.add(user, 60)
    await client.subtract(user, 60)  # low_balance again
    await client.subtract(user, 40)  # depleted
    assert [e.kind for e in await collect(client, group="a")] == ["low_balance", "depleted"]
    assert raw.xlen(stream) == 2  # b has not read them
    streams = [stream]
    if isinstance(client, SyncAsAsync):  # b reads one and dies before acknowledging it
        read = storage.run(storage.ledger.read_events(streams, "b", "dying", 1, None))
        assert [e.kind for e in read] == ["low_balance"]
        assert [e.kind for e in await collect(client, group="b")] == ["depleted"]
        assert raw.xlen(stream) == 2  # the pending one, and what comes after it, stay
        await asyncio.sleep(0.1)
        taken = await collect(client, group="b", claim_after=0.05)  # another takes it over
        assert [e.kind for e in taken] == ["low_balance"]
    else:
        assert len(await collect(client, group="b")) == 2
    assert raw.xlen(stream) == 0
