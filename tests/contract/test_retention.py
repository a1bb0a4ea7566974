"""History retention without PostgreSQL (issue 21): `trim_history` removes entries older than the
storage's history_retention after a checkpoint; the audit replays from the checkpoint and still
finds any difference. The Redis backends (the PostgreSQL storage keeps history in PostgreSQL),
both clients; the clock is injected (tests/conftest.py FakeClock)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis

from credici_redis import CrediciClient, InvalidOptionError, TransactionNotFoundError
from credici_redis._core import keys as _keys
from credici_redis._ops import retention
from tests.conftest import REDIS_URL, FakeClock, MakeClient

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
RETENTION = timedelta(days=30)

on_redis = pytest.mark.parametrize("backend", ["redis", "memory"])
"""The PostgreSQL storage keeps history in PostgreSQL: nothing to trim in Redis."""


def raw_store(namespace: str, backend: str) -> Any:
    """The store's Redis itself (a sync client of the same memory:// server for the embedded
    one), to look at what stays and to tamper with it."""
    if backend == "redis":
        return redis.Redis.from_url(REDIS_URL)
    return CrediciClient.from_url(f"memory://{namespace}").storage.redis  # type: ignore[attr-defined]


async def history(client: Any, user: str) -> list[Any]:
    return list(await client.get_all_user_transactions(user))


async def spanning_user(client: Any, user: str, clock: FakeClock) -> dict[str, Any]:
    """A user whose buckets, holds and cycle span the retention cutoff: made 40 days ago, used
    since; returns what outlives the cutoff."""
    clock.now = datetime(2026, 1, 1, 9, 0, tzinfo=timezone.utc)
    keep = await client.add(user, 500, priority=1)  # never expires: spans everything
    soon = await client.add(user, 80, ttl=45 * DAY)  # expires after the cutoff
    await client.start_cycle(100, 7, user, renew=True, rollover=50)  # renews across it
    for i in range(30):
        clock.advance(HOUR)
        await client.subtract(user, 1 + i % 3)
    charge = await client.subtract(user, 9)
    hold = await client.reserve(user, 40, ttl=60 * DAY)  # captured after the cutoff
    reversed_late = await client.subtract(user, 13)
    clock.advance(20 * DAY)
    await client.reverse(reversed_late.transaction_id)  # a reversal after the cutoff
    clock.advance(12 * DAY)  # 32+ days after the first entries
    for _ in range(5):
        clock.advance(HOUR)
        await client.subtract(user, 2)
    return {"keep": keep, "soon": soon, "hold": hold, "charge": charge}


@on_redis
async def test_trim_removes_only_what_is_older_than_the_retention(
    make_client: MakeClient, clock: FakeClock, user: str, backend: str
) -> None:
    client = make_client(clock=clock, history_retention=RETENTION)
    made = await spanning_user(client, user, clock)
    before = await history(client, user)
    cutoff = clock.now - RETENTION
    old = [t for t in before if t.created_at < cutoff]
    assert old and len(old) < len(before)
    assert (await client.get_balance_details(user)).history_from is None
    report = await client.trim_history(user)
    assert report.trimmed == len(old) and report.problems == [] and not report.more
    assert report.checkpoint_at == max(t.created_at for t in old)
    # The reads say where the history Redis keeps begins.
    assert (await client.get_balance_details(user)).history_from == report.checkpoint_at
    after = await history(client, user)
    assert after == [t for t in before if t.created_at >= cutoff]  # the rest untouched
    assert (await client.audit(user)).ok  # replayed from the checkpoint
    # What spans the cutoff still works, and the audit still adds it all up.
    hold = made["hold"]
    await client.capture(hold.hold_id, 25)
    await client.subtract(user, 300)
    clock.advance(15 * DAY)  # the 80-credit bucket expires; the cycle renews
    await client.add(user, 7)
    report_after = await client.audit(user)
    assert report_after.ok, report_after.problems
    assert report_after.balance == await client.get_balance(user)
    with pytest.raises(TransactionNotFoundError):  # trimmed: it cannot be reversed any more
        await client.reverse(made["charge"].transaction_id)
    again = await client.trim_history(user)  # a second pass: from the checkpoint on
    assert again.problems == [] and again.trimmed > 0
    assert (await client.audit(user)).ok


@on_redis
async def test_a_second_trim_with_nothing_old_changes_nothing(
    make_client: MakeClient, clock: FakeClock, user: str, backend: str
) -> None:
    client = make_client(clock=clock, history_retention=RETENTION)
    await client.add(user, 10)
    await client.subtract(user, 3)
    report = await client.trim_history(user)
    assert (report.trimmed, report.checkpoint_at, report.problems) == (0, None, [])
    assert len(await history(client, user)) == 2
    unknown = await client.trim_history("nobody-" + user)
    assert unknown.trimmed == 0


@on_redis
async def test_the_audit_from_a_checkpoint_still_finds_tampering(
    make_client: MakeClient, clock: FakeClock, user: str, backend: str, namespace: str
) -> None:
    client = make_client(clock=clock, history_retention=RETENTION)
    await spanning_user(client, user, clock)
    assert (await client.trim_history(user)).trimmed > 0
    raw = raw_store(namespace, backend)
    keys = _keys.user_keys(namespace, user)
    bucket = sorted(raw.hkeys(keys.amounts))[0]
    raw.hincrby(keys.amounts, bucket, 5)  # credits from nowhere, after the checkpoint
    report = await client.audit(user)
    assert not report.ok and any("bucket" in p for p in report.problems)
    raw.hincrby(keys.amounts, bucket, -5)
    assert (await client.audit(user)).ok
    checkpoint = raw.get(keys.checkpoint)
    assert checkpoint is not None
    entry, _, data = checkpoint.decode().partition("\n")
    raw.set(keys.checkpoint, entry + "\n" + data.replace('"balance":', '"balance":1', 1))
    forged = await client.audit(user)  # a checkpoint that does not add up is a difference too
    assert not forged.ok


@on_redis
async def test_a_history_that_does_not_add_up_is_not_trimmed(
    make_client: MakeClient, clock: FakeClock, user: str, backend: str, namespace: str
) -> None:
    client = make_client(clock=clock, history_retention=RETENTION)
    await spanning_user(client, user, clock)
    raw = raw_store(namespace, backend)
    keys = _keys.user_keys(namespace, user)
    second = raw.xrange(keys.history, count=2)[1]
    raw.xdel(keys.history, second[0])  # an entry lost from the part to trim: it no longer adds up
    length = raw.xlen(keys.history)
    report = await client.trim_history(user)
    assert report.trimmed == 0 and report.problems
    assert raw.xlen(keys.history) == length  # the evidence stays
    assert raw.get(keys.checkpoint) is None


@on_redis
async def test_trimming_goes_in_bounded_steps(
    make_client: MakeClient, clock: FakeClock, user: str, backend: str, namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Each trim.lua call removes at most `step` entries; the pass takes as many steps as needed,
    each from the checkpoint the previous one wrote (reversals across steps included)."""
    client = make_client(clock=clock, history_retention=RETENTION)
    clock.now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    await client.add(user, 10_000)
    charges = []
    for _ in range(25):
        clock.advance(timedelta(minutes=5))
        charges.append(await client.subtract(user, 1))
    await client.reverse(charges[2].transaction_id)  # reversed in another step than its charge
    clock.advance(40 * DAY)
    await client.subtract(user, 1)
    monkeypatch.setattr(retention, "DEFAULT_STEP", 4)
    report = await client.trim_history(user)
    assert report.trimmed == 27 and report.problems == []  # add, 25 charges, the reversal
    assert [t.kind for t in await history(client, user)] == ["subtract"]
    assert (await client.audit(user)).ok
    raw = raw_store(namespace, backend)
    state = raw.hgetall(_keys.user_keys(namespace, user).state)
    assert not [k for k in state if k.startswith(b"v:")]  # both gone: the mark goes too


@on_redis
async def test_trim_needs_a_retention(make_client: MakeClient, user: str, backend: str) -> None:
    client = make_client()
    with pytest.raises(InvalidOptionError):
        await client.trim_history(user)
    for bad in (timedelta(seconds=5), 30, "30d"):
        with pytest.raises(InvalidOptionError):
            make_client(history_retention=bad)


@on_redis
@pytest.mark.parametrize("api", ["sync"])
async def test_concurrent_passes_trim_each_entry_once(
    make_client: MakeClient, clock: FakeClock, user: str, backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Passes racing on one user: a step whose checkpoint moved meanwhile is refused (STALE)
    and read again, so every entry is trimmed once and the checkpoints chain."""
    import threading

    client = make_client(clock=clock, history_retention=RETENTION)
    clock.now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    await client.add(user, 10_000)
    for _ in range(60):
        clock.advance(timedelta(minutes=1))
        await client.subtract(user, 1)
    clock.advance(40 * DAY)
    monkeypatch.setattr(retention, "DEFAULT_STEP", 7)
    monkeypatch.setattr(retention, "STALE_ATTEMPTS", 1000)
    reports: list[Any] = []
    passes = [make_client(clock=clock, history_retention=RETENTION) for _ in range(4)]
    threads = [
        threading.Thread(target=lambda c=c: reports.append(c.sync.trim_history(user)))
        for c in passes
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.trimmed for r in reports) == 61
    assert all(r.problems == [] for r in reports)
    assert await history(client, user) == []
    assert (await client.audit(user)).ok


@pytest.mark.parametrize("backend", ["redis"])
@pytest.mark.parametrize("api", ["sync"])
async def test_cli_trim(
    make_client: MakeClient, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`credici-redis trim --all --retention`: on the server's clock, so the users' history is
    made with a clock 40 days back."""
    from credici_redis.cli import main

    past = FakeClock()
    past.now -= 40 * DAY
    client = make_client(clock=past)
    for uid in ("a", "b"):
        await client.add(uid, 10)
        await client.subtract(uid, 1)
    fresh = make_client()  # the server's clock: today
    await fresh.subtract("a", 1)
    store = ["--redis-url", REDIS_URL, "--namespace", namespace]
    assert main(["trim", "--all", "--retention", "30d", "--no-progress", *store]) == 0
    assert "trimmed 4 entries of 2 users; 0 not trimmed" in capsys.readouterr().out
    assert [t.kind for t in await history(fresh, "a")] == ["subtract"]
    assert await history(fresh, "b") == []
    assert (await fresh.audit("a")).ok and (await fresh.audit("b")).ok
    assert main(["audit", "--all", "--no-progress", *store]) == 0


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_storage_refuses_a_retention(make_client: MakeClient, user: str) -> None:
    with pytest.raises(InvalidOptionError):
        make_client(history_retention=RETENTION)
    with pytest.raises(InvalidOptionError):
        await make_client().trim_history(user)
