"""No double spend at any concurrency, and an idempotency key applies once however many race."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from typing import Any

import pytest

from credici_redis import CrediciClient, InsufficientCreditsError
from tests.conftest import BACKENDS, POSTGRES_URL, REDIS_URL

WORKER = textwrap.dedent(
    """
    import json, sys
    from credici_redis import CrediciClient, InsufficientCreditsError
    url, namespace, user, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ok = rejected = 0
    with CrediciClient.from_url(url, namespace=namespace) as client:
        sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()  # start together
        for _ in range(calls):
            try:
                client.subtract(user, 1)
                ok += 1
            except InsufficientCreditsError:
                rejected += 1
    print(json.dumps({"ok": ok, "rejected": rejected}))
    """
)


def _subtract_entries(history: list[Any]) -> int:
    return sum(1 for t in history if t.kind == "subtract")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["redis", "postgres"])  # servers other processes can reach
def test_eight_processes_never_overspend(backend: str, namespace: str, user: str) -> None:
    url = REDIS_URL if backend == "redis" else POSTGRES_URL
    with CrediciClient.from_url(url, namespace=namespace) as client:
        client.add(user, 1000)
        results = _run_workers(WORKER, url, namespace, user, "200")
        assert sum(r["ok"] for r in results) == 1000
        assert sum(r["rejected"] for r in results) == 600
        assert client.get_balance(user) == 0
        history = client.get_all_user_transactions(user)
        assert _subtract_entries(history) == 1000
        assert sum(t.amount for t in history) == 0


@pytest.mark.parametrize("backend", ["redis", "memory", "postgres"])
def test_threads_never_overspend(url: str, namespace: str, user: str) -> None:
    with CrediciClient.from_url(url, namespace=namespace) as client:
        client.add(user, 300)
        ok: list[int] = []
        barrier = threading.Barrier(8)

        def work() -> None:
            barrier.wait()
            for _ in range(60):
                try:
                    client.subtract(user, 1)
                    ok.append(1)
                except InsufficientCreditsError:
                    pass

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(ok) == 300
        assert client.get_balance(user) == 0
        assert _subtract_entries(client.get_all_user_transactions(user)) == 300


@pytest.mark.parametrize("api", ["async"])
async def test_1200_tasks_on_500_credits(client: Any, user: str) -> None:
    await client.add(user, 500)

    async def charge() -> bool:
        try:
            await client.subtract(user, 1)
            return True
        except InsufficientCreditsError:
            return False

    results = await asyncio.gather(*(charge() for _ in range(1200)))
    assert sum(results) == 500
    assert await client.get_balance(user) == 0
    history = await client.get_all_user_transactions(user)
    assert _subtract_entries(history) == 500
    assert sum(t.amount for t in history) == 0


@pytest.mark.parametrize("api", ["async"])
async def test_racing_retries_of_one_key_apply_once(client: Any, user: str) -> None:
    await client.add(user, 100)
    txs = await asyncio.gather(
        *(client.subtract(user, 7, idempotency_key="order-1") for _ in range(50))
    )
    assert len({t.transaction_id for t in txs}) == 1
    assert await client.get_balance(user) == 93
    assert _subtract_entries(await client.get_all_user_transactions(user)) == 1


@pytest.mark.parametrize("api", ["async"])
async def test_concurrent_mixed_traffic_keeps_balance_equal_to_history(
    client: Any, user: str
) -> None:
    async def top_up(i: int) -> None:
        await client.add(user, 1 + i % 5)

    async def charge(i: int) -> None:
        with contextlib.suppress(InsufficientCreditsError):
            await client.subtract(user, 1 + i % 7)

    await asyncio.gather(*(top_up(i) if i % 3 == 0 else charge(i) for i in range(600)))
    balance = await client.get_balance(user)
    history = await client.get_all_user_transactions(user)
    assert balance >= 0
    assert balance == sum(t.amount for t in history) == history[0].balance_after


@pytest.mark.parametrize("api", ["async"])
async def test_charging_while_the_cycle_renews_never_exceeds_the_grants(
    make_client: Any, user: str
) -> None:
    client = make_client()  # the real clock: renewals happen during the load
    await client.start_cycle(40, timedelta(milliseconds=200), user, renew=True)
    loop = asyncio.get_running_loop()
    stop = loop.time() + 1.2
    accepted = 0

    async def worker() -> None:
        nonlocal accepted
        while loop.time() < stop:
            try:
                await client.subtract(user, 1)
                accepted += 1
            except InsufficientCreditsError:
                await asyncio.sleep(0.005)

    await asyncio.gather(*(worker() for _ in range(32)))
    # The cycle keeps renewing on the real clock: a renewal between the two reads (likely on a
    # slower backend) would pair a balance with an older history, so read until both are stable.
    for _ in range(20):
        history = await client.get_all_user_transactions(user)
        balance = await client.get_balance(user)
        if await client.get_all_user_transactions(user) == history:
            break
    assert balance == sum(t.amount for t in history) == history[0].balance_after
    charges = [t for t in history if t.kind == "subtract"]
    assert len(charges) == accepted > 40
    granted = sum(t.amount for t in history if t.kind == "cycle_start")
    assert accepted <= granted
    # Per period (rollover 0, no top-ups): what was charged never exceeds that period's grant.
    per_period: list[int] = []
    for t in reversed(history):
        if t.kind == "cycle_start":
            per_period.append(0)
        elif t.kind == "subtract":
            per_period[-1] += -t.amount
    assert len(per_period) >= 4
    assert max(per_period) <= 40


@pytest.mark.parametrize("backend", BACKENDS)  # counts Redis pipelines
@pytest.mark.parametrize("api", ["async-batched"])
async def test_auto_batching_sends_concurrent_calls_together(client: Any, user: str) -> None:
    await client.add(user, 1000)
    storage = client.storage
    sent: list[int] = []
    round_trip = storage._round_trip

    async def counting(calls: Any) -> Any:
        sent.append(len(calls))
        return await round_trip(calls)

    storage._batcher._round_trip = counting
    results = await asyncio.gather(*(client.subtract(user, 1) for _ in range(300)))
    assert [r.balance_after for r in results] == list(range(999, 699, -1))
    assert sum(sent) == 300
    assert len(sent) <= 3  # 300 calls in one event-loop moment: a pipeline or a few
    assert await client.get_balance(user) == 700


@pytest.mark.parametrize("api", ["async", "async-batched"])
async def test_overdraft_never_passes_the_limit_under_concurrency(client: Any, user: str) -> None:
    await client.add(user, 100)
    await client.set_credit_limit(user, 50)

    async def charge() -> bool:
        try:
            await client.subtract(user, 1)
            return True
        except InsufficientCreditsError:
            return False

    results = await asyncio.gather(*(charge() for _ in range(400)))
    assert sum(results) == 150
    assert await client.get_balance(user) == -50
    assert (await client.audit(user)).ok


@pytest.mark.parametrize("api", ["async", "async-batched"])
async def test_concurrent_holds_never_capture_more_than_was_available(
    client: Any, user: str
) -> None:
    import random

    from credici_redis import HoldFinishedError

    await client.add(user, 500)
    rng = random.Random(7)
    captured = 0

    async def llm_call(i: int) -> None:
        nonlocal captured
        try:
            hold = await client.reserve(user, rng.randint(5, 40))
        except InsufficientCreditsError:
            return
        await asyncio.sleep(0)
        if i % 4 == 0:
            await client.release(hold.hold_id)
        else:
            tx = await client.capture(hold.hold_id, rng.randint(0, hold.amount) or None)
            captured += tx.captured
        with pytest.raises(HoldFinishedError):  # a second settle never has an effect
            await client.capture(hold.hold_id)

    await asyncio.gather(*(llm_call(i) for i in range(300)))
    details = await client.get_balance_details(user)
    assert details.held == 0
    assert captured <= 500
    assert details.balance == 500 - captured
    assert (await client.audit(user)).ok


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_a_hold_that_times_out_is_never_captured(make_client: Any, user: str) -> None:
    from credici_redis import HoldFinishedError

    client = make_client()  # the real clock
    other = make_client()
    await client.add(user, 100)
    hold = await client.reserve(user, 60, ttl=timedelta(milliseconds=150))
    await asyncio.sleep(0.3)  # the holder is still "running"...
    assert await other.get_balance(user) == 100  # ...when another operation releases the hold
    with pytest.raises(HoldFinishedError) as info:
        await client.capture(hold.hold_id, 10)
    assert info.value.status == "expired"
    assert await client.get_balance(user) == 100
    assert (await client.audit(user)).ok


LIMITED_WORKER = textwrap.dedent(
    """
    import json, sys, time
    from credici_redis import CrediciClient, InsufficientCreditsError, LimitExceededError
    url, namespace, user, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    until_refused = sys.argv[5] == "1"
    member = sys.argv[6] if len(sys.argv) > 6 else None
    ok = limited = 0
    with CrediciClient.from_url(url, namespace=namespace) as client:
        sys.stdout.write("ready\\n"); sys.stdout.flush(); sys.stdin.readline()  # start together
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                client.subtract(user, 1, member=member)
                ok += 1
            except LimitExceededError:
                limited += 1
                if until_refused:
                    break
    print(json.dumps({"ok": ok, "limited": limited}))
    """
)


def _run_workers(worker: str, *argv: str) -> list[dict[str, int]]:
    """8 processes run `worker` with `argv`, started together; their JSON results."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _hammer(
    url: str,
    namespace: str,
    user: str,
    seconds: float,
    until_refused: bool = False,
    member: str | None = None,
) -> tuple[int, int]:
    """8 processes charge 1 credit as fast as they can for `seconds` (or, `until_refused`, each
    until its first refusal), as `member` of the pool `user` if given: (accepted, refused)."""
    flag = "1" if until_refused else "0"
    who = () if member is None else (member,)
    results = _run_workers(LIMITED_WORKER, url, namespace, user, str(seconds), flag, *who)
    return sum(r["ok"] for r in results), sum(r["limited"] for r in results)


def _server_seconds(client: CrediciClient) -> float:
    seconds, micros = client.storage.redis.time()  # type: ignore[attr-defined]
    return float(seconds) + float(micros) / 1e6


@pytest.mark.slow
def test_eight_processes_never_pass_the_rate(namespace: str, user: str) -> None:
    """Issue 17: N processes hammering one user never get more than burst + rate x elapsed
    (the Redis server's clock, read before the first and after the last charge)."""
    from credici_redis import RateLimit

    rate, burst = 40, 15
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add(user, 100_000)
        client.set_limits(user, rate=RateLimit(rate, timedelta(seconds=1), burst=burst))
        started = _server_seconds(client)
        accepted, refused = _hammer(REDIS_URL, namespace, user, 3.0)
        elapsed = _server_seconds(client) - started
        assert accepted <= burst + rate * elapsed, (accepted, elapsed)
        assert accepted >= burst + rate * 2.0  # it did let the rate through, 3 s of it
        assert refused > accepted  # they really did hammer it
        history = client.get_all_user_transactions(user)
        assert _subtract_entries(history) == accepted
        assert client.get_balance(user) == 100_000 - accepted


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_eight_processes_never_pass_the_budget(backend: str, namespace: str, user: str) -> None:
    from credici_redis import Budget

    url = REDIS_URL if backend == "redis" else POSTGRES_URL
    with CrediciClient.from_url(url, namespace=namespace) as client:
        client.add(user, 100_000)
        client.set_limits(user, budget=Budget(300, timedelta(days=365)))
        accepted, refused = _hammer(url, namespace, user, 90.0, until_refused=True)
        # All of the budget, never more (a 365-day window: it does not turn during the run).
        assert (accepted, client.get_limits(user).budget_used) == (300, 300)
        assert refused == 8  # each process went on until the budget refused it
        assert _subtract_entries(client.get_all_user_transactions(user)) == accepted


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_eight_processes_never_pass_a_members_cap(backend: str, namespace: str, user: str) -> None:
    """Issue 19: 8 processes charging one member of a pool with a cap of 100 get exactly 100
    credits through; the pool's other credits stay."""
    from credici_redis import Budget

    url = REDIS_URL if backend == "redis" else POSTGRES_URL
    with CrediciClient.from_url(url, namespace=namespace) as client:
        client.add(user, 100_000)
        client.set_member_cap(user, "alice", Budget(100, timedelta(days=365)))
        accepted, refused = _hammer(url, namespace, user, 90.0, until_refused=True, member="alice")
        assert (accepted, client.get_member_usage(user, "alice").used) == (100, 100)
        assert refused == 8  # each process went on until the cap refused it
        history = client.get_all_user_transactions(user)
        assert [t.member for t in history if t.kind == "subtract"] == ["alice"] * 100
        assert client.get_balance(user) == 100_000 - 100
