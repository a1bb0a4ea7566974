"""Chaos on a local 3+3 Redis Cluster: a hung primary (SIGSTOP) is replaced by its replica, then
resumes (SIGCONT) and finds itself demoted, while clients charge with durability="replica".

What must hold (issue: a hung primary broke the error model): every exception a caller sees is a
typed outcome that tells the truth (StorageUnavailableError: not applied; OutcomeUnknownError:
may have been applied; ReplicationTimeoutError: applied on the primary, not replicated), never a
plain StorageError; no acknowledged write is lost; a caller that retries each failed charge with
its key until it is applied gets every key applied exactly once; audits pass.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest
import redis

from credici_redis import AsyncCrediciClient, CrediciError
from credici_redis.errors import (
    OutcomeUnknownError,
    ReplicationTimeoutError,
    StorageUnavailableError,
)
from tests.cluster.conftest import start_cluster
from tests.cluster.test_durability import _owner, _replica_of, _slot

TYPED = {
    StorageUnavailableError.__name__,
    OutcomeUnknownError.__name__,
    ReplicationTimeoutError.__name__,
}


def _took_over(replica: int, deadline: float) -> None:
    """Until the replica of the hung primary is a master in a cluster it says is ok (the hung
    node cannot be asked)."""
    while True:
        try:
            with redis.Redis(port=replica, socket_timeout=1) as r:
                if r.info("replication")["role"] == "master" and (
                    r.cluster("INFO")["cluster_state"] == "ok"
                ):
                    return
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline, "the replica did not take over"
        time.sleep(0.1)


def _has_replica(primary: int, deadline: float) -> None:
    """Until a replica is connected and in sync with `primary` (a WAIT can then succeed)."""
    while True:
        try:
            with redis.Redis(port=primary, socket_timeout=1) as r:
                info = r.info("replication")
                if info.get("connected_slaves", 0) and info["slave0"].get("state") == "online":
                    return
        except redis.RedisError:
            pass
        assert time.monotonic() < deadline, "no replica came back"
        time.sleep(0.1)


@dataclass
class Run:
    """One client's charges: what was acknowledged, what failed, how long calls took."""

    client: AsyncCrediciClient
    acked: dict[str, str] = field(default_factory=dict)  # key -> transaction id
    pending: dict[str, str] = field(default_factory=dict)  # key -> user, not acknowledged (yet)
    seen: Counter[str] = field(default_factory=Counter)  # exceptions, by type and message
    longest: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # seconds
    window: float = 0.0  # the longest gap between two successes on the hung primary's users
    retried: int = 0

    async def charge(self, worker: int, users: list[str], on_victim: set[str], stop: float) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(worker)
        last_ok: float | None = None
        for n in range(10**6):
            if loop.time() >= stop:
                return
            user, key = rng.choice(users), f"w{worker}-{n}"
            self.pending[key] = user
            began = loop.time()
            try:
                tx = await self.client.subtract(user, 1, idempotency_key=key)
            except CrediciError as exc:
                name = type(exc).__name__
                self.longest[name] = max(self.longest[name], loop.time() - began)
                self.seen[name] += 1
                self.seen[f"{name}: {str(exc)[:70]}"] += 1
                await asyncio.sleep(0.05)
                continue
            del self.pending[key]
            self.longest["ok"] = max(self.longest["ok"], loop.time() - began)
            self.acked[key] = tx.transaction_id
            if user in on_victim:
                now = loop.time()
                self.window = max(self.window, now - (now if last_ok is None else last_ok))
                last_ok = now

    async def converge(self) -> None:
        """Retry each failed charge with its key until it is applied."""
        for key, user in list(self.pending.items()):
            for _ in range(100):
                try:
                    tx = await self.client.subtract(user, 1, idempotency_key=key)
                except CrediciError as exc:
                    self.seen[f"retry {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.1)
                    continue
                self.acked[key], self.retried = tx.transaction_id, self.retried + 1
                del self.pending[key]
                break
            else:
                raise AssertionError(f"{key} never applied")

    async def found(self, users: list[str]) -> Counter[str]:
        """How often each idempotency key is in the users' histories (audits checked)."""
        found: Counter[str] = Counter()
        for user in users:
            history = await self.client.get_all_user_transactions(user)
            found.update(t.idempotency_key for t in history if t.idempotency_key)
            report = await self.client.audit(user)
            assert report.ok, report.problems
        return found

    def report(self, found: Counter[str]) -> str:
        lost = sum(1 for key in self.acked if found[key] == 0)
        return (
            f"acknowledged {len(self.acked) - self.retried}, retried to success {self.retried}, "
            f"found {len(self.acked) - lost}, lost {lost}, outcome-unknown "
            f"{self.seen[OutcomeUnknownError.__name__]}, error window {self.window:.2f} s, "
            f"longest call {dict((k, round(v, 2)) for k, v in self.longest.items())}, "
            f"exceptions {dict(self.seen)}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "takeover", "kill"])
async def test_a_primary_replaced_under_load_gives_only_typed_outcomes(fault: str) -> None:
    """Two clients charge the same way, one with durability="replica" (checked), one with
    "primary" (what it loses is reported, as the README's durability table says). The fault:
    "hang": the primary is SIGSTOPped until its replica takes over, then resumes (SIGCONT) and
    finds itself a replica; "takeover": its replica takes over at once (CLUSTER FAILOVER
    TAKEOVER), the primary learns it is demoted while calls wait on it; "kill": SIGKILL, and the
    replica takes over after the node timeout (then alone: writes wait for a replica in vain)."""
    local = start_cluster()
    users = [f"user-{i}" for i in range(24)]
    # A timeout longer than the hang: calls to the hung primary still wait when it resumes.
    runs = {
        durability: Run(
            AsyncCrediciClient.from_url(
                local.url,
                namespace=f"chaos-{durability}",
                cluster=True,
                timeout=8.0,
                durability=durability,
            )
        )
        for durability in ("replica", "primary")
    }
    try:
        for run in runs.values():
            await run.client.add_many([(u, 1_000_000) for u in users])
        victim = _owner(local, _slot("chaos-replica", users[0]))
        replica = _replica_of(victim)
        on_victim = {u for u in users if _owner(local, _slot("chaos-replica", u)) == victim}
        longer = float(os.environ.get("CREDICI_CHAOS_SECONDS", "0"))  # the long profile
        stop = asyncio.get_running_loop().time() + 12 + longer

        async def hang_primary() -> None:
            await asyncio.sleep(1)
            if fault == "kill":  # SIGKILL: its replica takes over after the node timeout
                local.processes[victim].kill()
                local.processes[victim].wait()
                await asyncio.to_thread(_took_over, replica, time.monotonic() + 20)
                local.restart(victim)  # the operator brings it back: a replica of the new primary
                await asyncio.to_thread(_has_replica, replica, time.monotonic() + 30)
                return
            if fault == "takeover":
                with redis.Redis(port=replica) as r:
                    r.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
                await asyncio.to_thread(_took_over, replica, time.monotonic() + 20)
                return
            os.kill(local.processes[victim].pid, signal.SIGSTOP)  # connected, silent
            await asyncio.to_thread(_took_over, replica, time.monotonic() + 20)
            os.kill(local.processes[victim].pid, signal.SIGCONT)  # finds itself a replica

        await asyncio.gather(
            hang_primary(),
            *(run.charge(w, users, on_victim, stop) for run in runs.values() for w in range(8)),
        )
        durable = runs["replica"]
        await durable.converge()
        found = await durable.found(users)
        print(f"\n{fault}: durability=replica: {durable.report(found)}")
        plain = runs["primary"]
        print(f"durability=primary (not retried): {plain.report(await plain.found(users))}")

        errors = {n for n in durable.seen if ":" not in n and not n.startswith("retry")}
        assert errors <= TYPED, durable.seen  # never a plain StorageError
        if fault != "takeover":  # a takeover may be too quick for any call to fail
            assert errors, "the hung primary made no caller fail: the scenario did not happen"
        assert max(durable.longest.values()) <= 8.0 + 1.0  # within the timeout (and a margin)
        assert [key for key in durable.acked if found[key] == 0] == []  # nothing acked is lost
        assert set(found.values()) == {1} and set(found) == set(durable.acked)  # each key once
    finally:
        for run in runs.values():
            await run.client.aclose()
        for process in local.processes.values():  # a stopped node cannot be killed cleanly
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
        local.stop()
