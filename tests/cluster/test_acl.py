"""The documented least-privilege ACL users on a Redis Cluster and with durability="replica"
(docs/security.md): the cluster user can run every operation with every client API, through a
slot migration, and each of the grants a cluster adds to the worker's is needed."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from credici_redis import CrediciClient, StorageError
from tests.cluster.conftest import LocalCluster
from tests.cluster.test_durability import _node_id, _owner, _slot
from tests.conftest import FakeClock
from tests.hostile.test_acl_tls import (
    PASSWORD,
    REFUSED,
    acl_rules,
    close,
    grants,
    make_client,
    workload,
)

CLUSTER_GRANTS = {"+cluster|slots", "+command", "+asking"}


class AllNodes:
    """What `workload` asks of its admin connection, on every node of the cluster."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def script_flush(self) -> None:
        for port in self.cluster.masters():
            with self.cluster.node(port) as r:
                r.script_flush()


@pytest.fixture
def acl_user(cluster: LocalCluster) -> Iterator[Any]:
    """Creates ACL users on every node (ACLs are per node); deletes them afterwards."""
    made: list[str] = []

    def create(name: str, rules: list[str]) -> str:
        for port in cluster.ports:
            with cluster.node(port) as r:
                r.execute_command("ACL", "SETUSER", name, *rules)
        made.append(name)
        host, port = "127.0.0.1", cluster.ports[0]
        return f"redis://{name}:{PASSWORD}@{host}:{port}/0"

    yield create
    for port in cluster.ports:
        with cluster.node(port) as r:
            for name in made:
                r.execute_command("ACL", "DELUSER", name)


def test_the_cluster_users_add_only_what_the_docs_say() -> None:
    worker = grants(acl_rules("credici"))
    assert grants(acl_rules("credici-cluster")) - worker == CLUSTER_GRANTS
    assert grants(acl_rules("credici-durable")) - worker == {"+wait"}
    assert not worker - grants(acl_rules("credici-cluster"))
    assert not worker - grants(acl_rules("credici-durable"))


@pytest.mark.parametrize("api", ["sync", "async", "async-batched"])
async def test_the_cluster_user_can_do_everything_with_replica_durability(
    cluster: LocalCluster, acl_user: Any, api: str, clock: FakeClock
) -> None:
    rules = [*acl_rules("credici-cluster"), "+wait"]  # both documented additions
    url = acl_user(f"cl-{uuid.uuid4().hex[:6]}", rules)
    options = {"namespace": "credici", "cluster": True, "durability": "replica"}
    clocked = make_client(api, url, clock=clock, **options)
    realtime = make_client(api, url, **options)
    tag = f"cl-{api}-{uuid.uuid4().hex[:6]}"
    try:
        await workload(clocked, realtime, clock, AllNodes(cluster), tag)  # type: ignore[arg-type]
    finally:
        await close(clocked)
        await close(realtime)


def _half_migrated(cluster: LocalCluster, namespace: str, user: str) -> tuple[int, int, int]:
    """Moves every key of the user's slot to another master without ending the migration: the
    old owner answers ASK for them, so only a client that may send ASKING reaches them."""
    slot = _slot(namespace, user)
    source = _owner(cluster, slot)
    target = next(port for port in cluster.masters() if port != source)
    with cluster.node(source) as src, cluster.node(target) as dst:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target))
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    return slot, source, target


def _finish(cluster: LocalCluster, slot: int, target: int) -> None:
    for port in cluster.masters():
        with cluster.node(port) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", _node_id(target))


@pytest.mark.parametrize("grant", sorted(CLUSTER_GRANTS | {"+wait"}))
def test_every_cluster_grant_is_needed(cluster: LocalCluster, acl_user: Any, grant: str) -> None:
    """Without the grant a call fails with a typed StorageError that names the refusal, and
    changes nothing; with it the same call works. For ASKING the call is made while the user's
    slot is being moved: with the grant it waits out the migration (TRYAGAIN) and succeeds."""
    rules = [*acl_rules("credici-cluster"), "+wait"]
    full = acl_user(f"full-{uuid.uuid4().hex[:6]}", rules)
    lacking = acl_user(f"no-{uuid.uuid4().hex[:6]}", [r for r in rules if r != grant])
    namespace, user = "credici", f"acl-{uuid.uuid4().hex[:8]}"
    durability = "replica" if grant == "+wait" else "primary"
    with CrediciClient.from_url(full, namespace=namespace, cluster=True) as admin:
        admin.add(user, 10)
        moving = _half_migrated(cluster, namespace, user) if grant == "+asking" else None
        finisher: threading.Timer | None = None
        try:
            with (
                pytest.raises(StorageError) as info,
                CrediciClient.from_url(
                    lacking, namespace=namespace, cluster=True, durability=durability
                ) as client,
            ):
                client.subtract(user, 1)
            message = str(info.value)
            assert REFUSED.search(message) or "Cluster mode is not enabled" in message, message
            if grant != "+wait":  # WAIT comes after the write: it was applied, and says so
                assert isinstance(info.value, StorageError)
            if moving is not None:
                finisher = threading.Timer(0.3, _finish, (cluster, moving[0], moving[2]))
                finisher.start()
            with CrediciClient.from_url(
                full, namespace=namespace, cluster=True, durability=durability
            ) as client:
                expected = 8 if grant == "+wait" else 9
                assert client.subtract(user, 1).balance_after == expected
        finally:
            if moving is not None:
                if finisher is None:
                    _finish(cluster, moving[0], moving[2])
                else:
                    finisher.join()
        history = admin.get_all_user_transactions(user)
        assert [t.amount for t in history] == ([-1, -1, 10] if grant == "+wait" else [-1, 10])
