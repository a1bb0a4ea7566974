"""credici-redis on a real Redis Cluster (3 masters, 3 replicas; see conftest.py).

The contract suite runs here too: its tests are collected into this module (as
``test_<module>__<test>``) with the fixtures of tests/cluster/conftest.py, so each runs with the
sync, asyncio and auto-batching clients against the cluster. Then what only a cluster has: users
on every master, scripts lost on every node, SCAN per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from _pytest.fixtures import FixtureFunctionDefinition
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from credici_redis import (
    AsyncCrediciClient,
    AsyncRedisStorage,
    CrediciClient,
    EvictionPolicyError,
    InsufficientCreditsError,
    RedisStorage,
    TransferRecovery,
    UnsafeClientError,
)
from credici_redis._core.keys import user_keys
from credici_redis.errors import InvalidInputError, OutcomeUnknownError, StorageUnavailableError
from tests.cluster.conftest import LocalCluster, start_cluster
from tests.contract import (
    test_audit,
    test_bad_input,
    test_batches,
    test_cycles,
    test_events,
    test_holds,
    test_ledger,
    test_limits_priority,
    test_reverse,
    test_transfers,
)

NOT_ON_CLUSTER = {
    # builds a second client by from_url without cluster=True: replaced by a test below
    "test_scan_users_sees_this_namespace_only",
}


def _runs_on_any_backend(test: Any) -> bool:
    """Tests pinned to the shared Redis (parametrized on `backend`) stay there."""
    marks = getattr(test, "pytestmark", [])
    return not any(m.name == "parametrize" and "backend" in str(m.args[0]) for m in marks)


def _on_the_cluster(test: Any) -> Any:
    """A test pinned to the Redis backends (transfers: not on PostgreSQL), unpinned: here it
    runs once, on the cluster."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        return await test(*args, **kwargs)

    run.pytestmark = [  # type: ignore[attr-defined]
        m for m in getattr(test, "pytestmark", []) if m.name != "parametrize"
    ]
    return run


for _name, _test in list(vars(test_transfers).items()):
    if _name.startswith("test_") and test_transfers.ON_REDIS.mark in _test.pytestmark:
        globals()[f"test_transfers__{_name[5:]}"] = _on_the_cluster(_test)

for _module in (
    test_audit,
    test_bad_input,
    test_batches,
    test_cycles,
    test_events,
    test_holds,
    test_ledger,
    test_limits_priority,
    test_reverse,
):
    _prefix = _module.__name__.rsplit(".", 1)[1]
    for _name, _test in list(vars(_module).items()):
        if isinstance(_test, FixtureFunctionDefinition):  # a module's own fixture
            assert _name not in globals(), f"two contract modules define fixture {_name}"
            globals()[_name] = _test
        elif (
            _name.startswith("test_")
            and callable(_test)
            and _name not in NOT_ON_CLUSTER
            and _runs_on_any_backend(_test)
        ):
            globals()[f"{_prefix}__{_name[5:]}"] = _test


def _node_of(cluster_redis: redis.cluster.RedisCluster, namespace: str, user: str) -> str:
    node = cluster_redis.get_node_from_key(user_keys(namespace, user).state)
    assert node is not None
    return str(node.name)


def _users_on_every_master(
    cluster_redis: redis.cluster.RedisCluster, namespace: str, count: int
) -> list[str]:
    users = [f"user-{i}" for i in range(count)]
    per_node = Counter(_node_of(cluster_redis, namespace, u) for u in users)
    assert len(per_node) == 3, per_node
    return users


def _flush_scripts(cluster: LocalCluster) -> None:
    """The library (on the primaries, which flush their replicas' too) and the scripts (on
    every node: a promoted replica has none either)."""
    for port in cluster.ports:
        with cluster.node(port) as r:
            with contextlib.suppress(redis.exceptions.ReadOnlyError):  # a replica
                r.function_flush()
            r.script_flush()


async def test_scan_users_visits_every_master(
    make_client: Any, namespace: str, cluster_redis: redis.cluster.RedisCluster, url: str
) -> None:
    client = make_client()
    users = [*_users_on_every_master(cluster_redis, namespace, 60), "{odd}:user", "ü"]
    for user in users:
        await client.add(user, 1)
    other = CrediciClient.from_url(url, namespace=namespace + "x", cluster=True)
    other.add("not-this-namespace", 1)
    other.close()
    found: list[str] = []
    batches = client.scan_users(7)
    if hasattr(batches, "__aiter__"):
        found = [u async for batch in batches for u in batch]
    else:  # SyncAsAsync: the sync iterator came back from an awaited call
        found = [u for batch in await batches for u in batch]
    assert sorted(found) == sorted(users)


async def test_scripts_flushed_on_every_node(
    make_client: Any, namespace: str, cluster: LocalCluster, cluster_redis: Any
) -> None:
    client = make_client()
    users = _users_on_every_master(cluster_redis, namespace, 30)
    assert all(not isinstance(r, Exception) for r in await client.add_many(users_of(users, 10)))
    _flush_scripts(cluster)
    assert [t.balance_after for t in await client.subtract_many(users_of(users, 1))] == [9] * 30
    _flush_scripts(cluster)
    assert (await client.subtract(users[0], 1)).balance_after == 8
    _flush_scripts(cluster)
    results = await asyncio.gather(*(client.subtract(u, 1) for u in users))
    assert [t.balance_after for t in results] == [7] + [8] * 29
    _flush_scripts(cluster)
    assert [await client.get_balance(u) for u in users[:3]] == [7, 8, 8]


async def test_a_lost_reply_in_a_batch_is_never_sent_again(
    make_client: Any, namespace: str, cluster: LocalCluster, cluster_redis: Any
) -> None:
    """One master stalls (DEBUG SLEEP) past the client's timeout with the batch's calls already
    in its socket: those end in OutcomeUnknownError and are applied at most once. (With
    redis-py's own sync ClusterPipeline handling, the timed-out calls are sent again and report
    success: this test fails on it.)"""
    client = make_client(timeout=0.5)
    users = _users_on_every_master(cluster_redis, namespace, 30)
    await client.add_many(users_of(users, 100))
    stalled = _node_of(cluster_redis, namespace, users[0])
    node = redis.Redis(port=int(stalled.rsplit(":", 1)[1]), socket_timeout=5)
    sleeper = threading.Thread(target=node.execute_command, args=("DEBUG", "SLEEP", 1.5))
    sleeper.start()
    try:
        await asyncio.sleep(0.1)
        results = await client.subtract_many(users_of(users, 1))
    finally:
        sleeper.join()
        node.close()
    for user, result in zip(users, results, strict=True):
        if _node_of(cluster_redis, namespace, user) == stalled:
            assert isinstance(result, OutcomeUnknownError), result
        else:  # another node's reply may be read after the stalled one's timeout: unknown too
            assert isinstance(result, OutcomeUnknownError) or result.balance_after == 99, result
    await asyncio.sleep(0.2)
    balances = [await client.get_balance(user) for user in users]
    # At most once: 99 if Redis ran the call it found in the socket when it woke, 100 if the
    # client's disconnect discarded it first; never 98.
    assert set(balances) <= {99, 100}, balances
    for user, result, balance in zip(users, results, balances, strict=True):
        assert isinstance(result, OutcomeUnknownError) or balance == 99, user


def users_of(users: list[str], amount: int) -> list[tuple[str, int]]:
    return [(u, amount) for u in users]


@pytest.mark.parametrize("batching", [False, True])
async def test_concurrent_charges_never_overspend(
    cluster: LocalCluster, namespace: str, cluster_redis: Any, batching: bool
) -> None:
    users = _users_on_every_master(cluster_redis, namespace, 30)
    client = AsyncCrediciClient.from_url(
        cluster.url, namespace=namespace, cluster=True, batching=batching
    )
    try:
        await client.add_many(users_of(users, 50))
        charged: Counter[str] = Counter()
        refused: Counter[str] = Counter()

        async def charge(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(40):
                user = rng.choice(users)
                amount = rng.randint(1, 3)
                try:
                    await client.subtract(user, amount)
                    charged[user] += amount
                except InsufficientCreditsError:
                    refused[user] += 1

        await asyncio.gather(*(charge(seed) for seed in range(48)))
        assert sum(refused.values()) > 0  # 48 * 40 * 2 credits asked of 30 * 50
        for user in users:
            balance = await client.get_balance(user)
            assert balance == 50 - charged[user] >= 0
            history = await client.get_all_user_transactions(user)
            assert sum(t.amount for t in history) == balance
            assert (await client.audit(user)).ok
    finally:
        await client.aclose()


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_a_primary_that_evicts_is_refused_by_name(
    cluster: LocalCluster, namespace: str, api: str
) -> None:
    """Every primary's policy is read: one evicting primary is enough to refuse."""
    port = cluster.masters()[-1]
    with cluster.node(port) as node:
        node.config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(EvictionPolicyError) as caught:
            if api == "sync":
                with CrediciClient.from_url(cluster.url, namespace=namespace, cluster=True) as c:
                    c.add("u", 1)
            else:
                async with AsyncCrediciClient.from_url(
                    cluster.url, namespace=namespace, cluster=True
                ) as ac:
                    await ac.add("u", 1)
        assert caught.value.node == f"127.0.0.1:{port}"
        assert caught.value.policy == "volatile-lru"
    finally:
        with cluster.node(port) as node:
            node.config_set("maxmemory-policy", "noeviction")


def test_a_cluster_client_with_redis_py_s_default_retries_is_refused(
    cluster: LocalCluster,
) -> None:
    """redis-py's cluster client re-sends a command after a lost connection by default."""
    nodes = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        with pytest.raises(UnsafeClientError):
            RedisStorage(nodes, "ns")
    finally:
        nodes.close()
    with pytest.raises(UnsafeClientError):
        AsyncRedisStorage(redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=1), "ns")


def test_storage_over_a_hand_built_sync_cluster_client(
    cluster: LocalCluster, namespace: str
) -> None:
    nodes = redis.cluster.RedisCluster(
        host="127.0.0.1", port=cluster.ports[0], retry=Retry(NoBackoff(), 0)
    )
    client = CrediciClient(RedisStorage(nodes, namespace))
    try:
        users = [f"u{i}" for i in range(20)]
        client.add_many(users_of(users, 5))
        assert [t.balance_after for t in client.subtract_many(users_of(users, 2))] == [3] * 20
        assert sorted(u for batch in client.scan_users(4) for u in batch) == sorted(users)
    finally:
        nodes.close()


async def test_storage_over_a_hand_built_async_cluster_client(
    cluster: LocalCluster, namespace: str
) -> None:
    nodes = redis.asyncio.cluster.RedisCluster(
        host="127.0.0.1", port=cluster.ports[0], retry=AsyncRetry(NoBackoff(), 0)
    )
    client = AsyncCrediciClient(AsyncRedisStorage(nodes, namespace, batching=True))
    try:
        users = [f"u{i}" for i in range(20)]
        await client.add_many(users_of(users, 5))
        results = await asyncio.gather(*(client.subtract(u, 2) for u in users))
        assert [t.balance_after for t in results] == [3] * 20
        assert sorted([u async for batch in client.scan_users(4) for u in batch]) == sorted(users)
    finally:
        await nodes.aclose()


def test_cluster_needs_a_redis_url_of_database_0(cluster: LocalCluster) -> None:
    with pytest.raises(InvalidInputError):
        CrediciClient.from_url("memory://", cluster=True)
    with pytest.raises(InvalidInputError):
        AsyncCrediciClient.from_url("unix:///tmp/redis.sock", cluster=True)
    with pytest.raises(InvalidInputError):
        CrediciClient.from_url(cluster.url + "/1", cluster=True)
    CrediciClient.from_url(cluster.url + "/0", cluster=True).close()


async def test_no_node_answering_is_an_outage() -> None:
    with pytest.raises(StorageUnavailableError):
        CrediciClient.from_url("redis://127.0.0.1:1", cluster=True, timeout=0.5)
    client = AsyncCrediciClient.from_url("redis://127.0.0.1:1", cluster=True, timeout=0.5)
    with pytest.raises(StorageUnavailableError):  # the asyncio client connects on first use
        await client.subtract("user", 1)
    with pytest.raises(StorageUnavailableError):
        [users async for users in client.scan_users(10)]
    await client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True])
async def test_a_master_killed_under_load_fails_over(batching: bool) -> None:
    """SIGKILL the master of some users while 32 tasks charge: once its replica is promoted
    (4-5 s with a 2 s node timeout), those users are served again by the same client (with and
    without auto-batching), and
    every balance still equals its history. (Replication is asynchronous: a charge that the dead
    master acknowledged but had not yet sent to its replica is lost with it, unless
    durability="replica": test_durability.py.)"""
    local = start_cluster()
    try:
        probe = redis.cluster.RedisCluster.from_url(local.url)
        namespace = "failover"
        users = _users_on_every_master(probe, namespace, 30)
        victim_name = _node_of(probe, namespace, users[0])
        victims = [u for u in users if _node_of(probe, namespace, u) == victim_name]
        probe.close()
        client = AsyncCrediciClient.from_url(
            local.url, namespace=namespace, cluster=True, retries=12, timeout=1.0, batching=batching
        )
        await client.add_many(users_of(users, 1_000_000))
        served_after: Counter[str] = Counter()
        failed: list[Exception] = []
        killed_at = float("inf")
        stop = asyncio.get_running_loop().time() + 9

        async def charge(seed: int) -> None:
            rng = random.Random(seed)
            loop = asyncio.get_running_loop()
            while loop.time() < stop:
                user = rng.choice(users)
                try:
                    await client.subtract(user, 1)
                except StorageUnavailableError as exc:
                    failed.append(exc)
                    continue
                if loop.time() > killed_at + 0.5:  # the victims' slots: only a new master
                    served_after[user] += 1

        async def kill() -> None:
            nonlocal killed_at
            await asyncio.sleep(1)
            port = int(victim_name.rsplit(":", 1)[1])
            local.processes[port].kill()
            killed_at = asyncio.get_running_loop().time()

        await asyncio.gather(kill(), *(charge(seed) for seed in range(32)))
        assert all(served_after[u] > 0 for u in victims), (served_after, failed[:3])
        for user in users:
            assert (await client.audit(user)).ok
        await client.aclose()
    finally:
        local.stop()


@pytest.mark.slow
def test_a_master_killed_under_load_fails_over_sync_threads() -> None:
    """The same with the sync client shared by 16 threads."""
    local = start_cluster()
    try:
        probe = redis.cluster.RedisCluster.from_url(local.url)
        namespace = "failover"
        users = _users_on_every_master(probe, namespace, 30)
        victim_name = _node_of(probe, namespace, users[0])
        victims = [u for u in users if _node_of(probe, namespace, u) == victim_name]
        probe.close()
        client = CrediciClient.from_url(
            local.url, namespace=namespace, cluster=True, retries=12, timeout=1.0
        )
        client.add_many(users_of(users, 1_000_000))
        served_after: Counter[str] = Counter()
        lock = threading.Lock()
        start = time.monotonic()
        killed_at = start + 1

        def charge(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < start + 9:
                user = rng.choice(users)
                try:
                    client.subtract(user, 1)
                except StorageUnavailableError:
                    continue
                if time.monotonic() > killed_at + 0.5:
                    with lock:
                        served_after[user] += 1

        threads = [threading.Thread(target=charge, args=(seed,)) for seed in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, killed_at - time.monotonic()))
        local.processes[int(victim_name.rsplit(":", 1)[1])].kill()
        for thread in threads:
            thread.join()
        assert all(served_after[u] > 0 for u in victims), served_after
        for user in users:
            assert client.audit(user).ok
        client.close()
    finally:
        local.stop()


async def test_transfers_across_masters_move_each_credit_once(
    cluster: LocalCluster, namespace: str, cluster_redis: Any
) -> None:
    """Concurrent transfers between users on every master (no script crosses a slot: three
    scripts per transfer), some cut short after their first step and then recovered: the sum of
    balances never changes and every history adds up."""
    from credici_redis._ops import transfers
    from tests.test_transfer_recovery import cut

    users = _users_on_every_master(cluster_redis, namespace, 12)
    nodes = {_node_of(cluster_redis, namespace, u) for u in users}
    assert len(nodes) == 3
    client = AsyncCrediciClient.from_url(cluster.url, namespace=namespace, cluster=True)
    try:
        await client.add_many(users_of(users, 100))

        async def move(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(15):
                source, dest = rng.sample(users, 2)
                with contextlib.suppress(InsufficientCreditsError):
                    await client.transfer(source, dest, rng.randint(1, 30))

        await asyncio.gather(*(move(seed) for seed in range(16)))
        storage: Any = client.storage
        await client.add_many(users_of(users[:3], 1))
        for source, dest in zip(users[:3], users[-3:], strict=True):  # cut after step 1
            req = transfers.build_transfer(source, dest, 1, None, None, None, None)
            await storage.run(cut(storage.ledger.execute(transfers.TRANSFER, req), 1))
        assert sum([await client.get_balance(u) for u in users]) == 1200  # 3 in flight
        recovered = await client.recover_transfers(older_than=timedelta(0))
        assert recovered == TransferRecovery(completed=3)
        assert sum([await client.get_balance(u) for u in users]) == 1203
        for user in users:
            history = await client.get_all_user_transactions(user)
            assert sum(t.amount for t in history) == await client.get_balance(user)
            assert (await client.audit(user)).ok
    finally:
        await client.aclose()
