"""The archive on a real Redis Cluster (issue 5 + 6): every shard is drained, nothing is lost or
doubled even while slots move between masters, and reads through ``archive_url=`` are seamless.

The archiver visits the 16,384 slot outboxes with per-slot commands (no call crosses a slot) and
its user scripts go through the storage's routing, so MOVED, ASK and TRYAGAIN are followed as for
any client call.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from datetime import timedelta

import psycopg
import pytest

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis._core.keys import user_keys
from credici_redis.archive import Archiver
from tests.cluster.conftest import LocalCluster
from tests.cluster.test_durability import _owner, _slot, move_slot


def _rows(pg: psycopg.Connection, namespace: str) -> list[tuple[str, str, int, int]]:
    """(transaction_id, user_id, amount, balance_after) per row, oldest first per user."""
    return pg.execute(
        "SELECT transaction_id, user_id, amount, balance_after FROM credici_history"
        " WHERE namespace = %s ORDER BY user_id, created_at, entry_seq",
        (namespace,),
    ).fetchall()


async def test_a_pass_drains_every_master_and_reads_stay_seamless(
    cluster: LocalCluster,
    namespace: str,
    pg: psycopg.Connection,
    postgres_url: str,
) -> None:
    users = [f"user-{i}" for i in range(36)]
    owners = {_owner(cluster, _slot(namespace, u)) for u in users}
    assert owners == set(cluster.masters()), "the users must live on every master"
    plain = CrediciClient.from_url(cluster.url, namespace=namespace, cluster=True)
    for round_ in range(3):
        for u in users:
            plain.add(u, 10, metadata={"round": str(round_)})
            plain.subtract(u, 4)
    before = {u: plain.get_all_user_transactions(u) for u in users}
    with Archiver(
        cluster.url, postgres_url, namespace=namespace, cluster=True, keep=timedelta(0)
    ) as job:
        lag = job.lag()
        assert (lag.users_pending, lag.entries_pending) == (36, 36 * 6)
        stats = job.run_once()
        assert (stats.users, stats.entries, stats.trimmed) == (36, 216, 216)
        after = job.lag()
        assert (after.users_pending, after.entries_pending) == (0, 0)
    found = _rows(pg, namespace)
    assert len(found) == 216 == len({r[0] for r in found})
    assert {r[0] for r in found} == {t.transaction_id for h in before.values() for t in h}
    for port in cluster.masters():  # Redis forgot what PostgreSQL holds, on every master
        with cluster.node(port) as r:
            for u in users:
                if _owner(cluster, _slot(namespace, u)) == port:
                    assert r.xlen(user_keys(namespace, u).history) == 0
    assert plain.get_all_user_transactions(users[0]) == []
    plain.close()
    sync = CrediciClient.from_url(
        cluster.url, namespace=namespace, cluster=True, archive_url=postgres_url
    )
    aclient = AsyncCrediciClient.from_url(
        cluster.url, namespace=namespace, cluster=True, archive_url=postgres_url
    )
    try:
        for u in users[:6]:
            sync.subtract(u, 1)  # one entry in Redis, six in PostgreSQL
            merged = sync.get_all_user_transactions(u)
            assert merged[1:] == before[u] and merged[0].amount == -1
            assert await aclient.get_all_user_transactions(u) == merged
            assert sync.audit(u).ok and (await aclient.audit(u)).ok
            assert sync.get_balance(u) == 17
    finally:
        sync.close()
        await aclient.aclose()


@pytest.mark.slow
def test_archiver_passes_while_slots_move_and_clients_charge(
    cluster: LocalCluster,
    namespace: str,
    pg: psycopg.Connection,
    postgres_url: str,
) -> None:
    """An archiver runs pass after pass (trimming at once) while three threads charge and the
    slots of some users move to another master and back. Afterwards PostgreSQL holds every
    acknowledged charge exactly once, each user's balance_after chain has no gap, and the balance
    equals the sum of the archived history."""
    users = [f"mover-{i}" for i in range(30)]
    slots = {u: _slot(namespace, u) for u in users}
    source = _owner(cluster, slots[users[0]])
    movers = [u for u in users if _owner(cluster, slots[u]) == source]
    target = next(port for port in cluster.masters() if port != source)
    moving = sorted({slots[u] for u in movers})
    assert len(moving) >= 4, moving

    setup = CrediciClient.from_url(cluster.url, namespace=namespace, cluster=True)
    for u in users:
        setup.add(u, 100_000)
    acked: dict[str, list[str]] = defaultdict(list)
    errors: list[BaseException] = []
    done = threading.Event()
    passes = {"n": 0, "entries": 0, "during_moves": 0}
    moving_now = threading.Event()

    def charge(seed: int) -> None:
        rng = random.Random(seed)
        with CrediciClient.from_url(cluster.url, namespace=namespace, cluster=True) as client:
            while not done.is_set():
                user = rng.choice(movers if rng.random() < 0.7 else users)
                try:
                    acked[user].append(client.subtract(user, rng.randint(1, 5)).transaction_id)
                except Exception as exc:
                    errors.append(exc)

    def archive() -> None:
        with Archiver(
            cluster.url, postgres_url, namespace=namespace, cluster=True, keep=timedelta(0)
        ) as job:
            while not done.is_set():
                try:
                    stats = job.run_once()
                except Exception as exc:
                    errors.append(exc)
                    continue
                passes["n"] += 1
                passes["entries"] += stats.entries
                if moving_now.is_set():
                    passes["during_moves"] += 1

    workers = [threading.Thread(target=charge, args=(s,)) for s in range(3)]
    workers.append(threading.Thread(target=archive))
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.5)
        moving_now.set()
        for there, back in ((source, target), (target, source)):
            for slot in moving:
                move_slot(cluster, slot, there, back)
        moving_now.clear()
        time.sleep(0.5)
    finally:
        done.set()
        for worker in workers:
            worker.join(60)
    assert errors == [], errors[:5]
    assert passes["during_moves"] >= 1 and passes["entries"] > 0, passes
    with Archiver(
        cluster.url, postgres_url, namespace=namespace, cluster=True, keep=timedelta(0)
    ) as job:
        job.run_once()
        assert job.lag().entries_pending == 0
    found = _rows(pg, namespace)
    ids = [r[0] for r in found]
    assert len(ids) == len(set(ids)), "a row was archived twice"
    by_user: dict[str, list[tuple[str, str, int, int]]] = defaultdict(list)
    for row in found:
        by_user[row[1]].append(row)
    for u in users:
        rows = by_user[u]
        assert set(acked[u]) <= {r[0] for r in rows}, u  # every acknowledged charge is there
        assert len(rows) == 1 + len(acked[u]), u  # the grant, then the charges: nothing else
        balance = 0
        for _, _, amount, balance_after in rows:  # a chain with no gap
            balance += amount
            assert balance == balance_after, u
        assert setup.get_balance(u) == balance, u
    setup.close()
