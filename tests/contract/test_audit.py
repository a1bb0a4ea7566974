"""The audit rebuilds every balance and bucket from history alone, and catches tampering."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis._core import keys as _keys
from credici_redis.cli import main
from tests.conftest import REDIS_URL, URL_BACKENDS, FakeClock, SyncAsAsync

DAY = timedelta(days=1)


async def busy_user(client: Any, user: str, clock: FakeClock) -> None:
    """Every kind of change: expiring and permanent grants, charges across buckets, expiry,
    renewals with rollover (also while idle), an upgrade, a forfeit."""
    await client.add(user, 40)
    await client.add(user, 25, ttl=2 * DAY)
    await client.add(user, 10, ttl=DAY, idempotency_key="promo")
    await client.subtract(user, 30)
    cycle = await client.start_cycle(100, 7, user, renew=True, rollover=30)
    await client.subtract(user, 50)
    clock.now = cycle.ends_at + 2 * 7 * DAY + DAY  # three renewals, two of them idle
    await client.subtract(user, 5)
    await client.start_cycle(300, "month", user, renew=True, rollover=None)  # upgrade
    await client.subtract(user, 1)
    clock.advance(3 * DAY)
    await client.cancel_cycle(user, forfeit=True)
    await client.add(user, 7, ttl=DAY)


async def test_a_busy_history_audits_clean(client: Any, user: str, clock: FakeClock) -> None:
    await busy_user(client, user, clock)
    report = await client.audit(user)
    assert report.problems == []
    assert report.ok
    history = await client.get_all_user_transactions(user)
    assert report.entries == len(history) >= 14
    assert [t.periods for t in history if t.periods] == [2]  # the idle renewals, with rollover
    assert report.balance == report.history_balance == await client.get_balance(user)
    assert report.buckets >= 2


async def test_unknown_user_audits_clean(client: Any, user: str) -> None:
    report = await client.audit(user)
    assert (report.ok, report.entries, report.balance, report.buckets) == (True, 0, 0, 0)


@pytest.mark.parametrize("backend", URL_BACKENDS)  # opens a neighbour namespace by URL
async def test_scan_users_sees_this_namespace_only(
    make_client: Any, clock: FakeClock, url: str, namespace: str, api: str
) -> None:
    client = make_client(clock=clock)
    users = [f"u{i}" for i in range(23)] + ["{odd}:user", "ü"]
    for uid in users:
        await client.add(uid, 1)
    other = make_client(clock=clock)  # same store, but...
    neighbour = (
        SyncAsAsync(other.sync.__class__.from_url(url, namespace=namespace + "x"))
        if api == "sync"
        else other.__class__.from_url(url, namespace=namespace + "x")
    )
    await neighbour.add("stranger", 1)
    if api == "sync":
        found = [u for batch in client.sync.scan_users(5) for u in batch]
        neighbour.sync.close()
    else:
        found = [u async for batch in client.scan_users(5) for u in batch]
        await neighbour.aclose()
    assert sorted(found) == sorted(users)


@pytest.mark.parametrize("backend", ["redis"])
@pytest.mark.parametrize(
    "tamper",
    [
        lambda r, k: r.hincrby(k.amounts, r.hkeys(k.amounts)[0], 5),
        lambda r, k: r.hset(k.state, "bal", 1),
        lambda r, k: r.hdel(k.amounts, r.hkeys(k.amounts)[0]),
        lambda r, k: r.xadd(k.history, {"k": "a", "n": "3", "b": "999", "g": "x"}),
    ],
    ids=["bucket", "balance", "lost-bucket", "forged-entry"],
)
async def test_tampering_is_reported(
    client: Any, user: str, clock: FakeClock, namespace: str, tamper: Any
) -> None:
    import redis

    await busy_user(client, user, clock)
    raw = redis.Redis.from_url(REDIS_URL)
    tamper(raw, _keys.user_keys(namespace, user))
    raw.close()
    report = await client.audit(user)
    assert not report.ok
    assert report.problems


@pytest.mark.parametrize("backend", ["redis"])
@pytest.mark.parametrize("api", ["sync"])
async def test_cli_audit(
    client: Any, clock: FakeClock, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import redis

    for uid in ("a", "b", "c"):
        await busy_user(client, uid, clock)
    store = ["--redis-url", REDIS_URL, "--namespace", namespace]
    assert main(["audit", "a", *store]) == 0
    assert "a: ok" in capsys.readouterr().out
    assert main(["audit", "--all", "--no-progress", *store]) == 0
    assert "audited 3 users: 3 ok, 0 failed" in capsys.readouterr().out
    raw = redis.Redis.from_url(REDIS_URL)
    raw.hset(_keys.user_keys(namespace, "b").state, "bal", 0)
    raw.close()
    assert main(["audit", "--all", "--no-progress", *store]) == 1
    out = capsys.readouterr()
    assert "audited 3 users: 2 ok, 1 failed" in out.out
    assert "b: FAILED" in out.out + out.err


async def test_a_history_of_many_pages_with_reversals_audits_clean(
    client: Any, user: str, clock: FakeClock
) -> None:
    """The audit replays page by page (1,000 entries each), reading each reversal's original by
    id: reversals of entries pages before, of a capture and of a grant, all replay exactly."""
    first = await client.add(user, 5_000, ttl=DAY)
    await client.add(user, 300)
    charges = await client.subtract_many([(user, 1) for _ in range(1_200)])
    hold = await client.reserve(user, 40)
    captured = await client.capture(hold.hold_id, 15)
    await client.reverse(charges[0].transaction_id)  # its original is on the first page
    await client.reverse(charges[1_100].transaction_id)
    await client.reverse(captured.transaction_id)
    clock.advance(2 * DAY)  # the first grant expires: a reversed charge of it is not restored
    await client.reverse(charges[5].transaction_id)
    await client.reverse(first.transaction_id)
    report = await client.audit(user)
    assert report.problems == [] and report.ok
    assert report.entries == len(await client.get_all_user_transactions(user)) > 1_200
