"""A real local Redis Cluster (3 masters, 3 replicas) for the tests of this package.

The contract fixtures of tests/conftest.py are overridden here: `backend` is "cluster" and
`url` points at this cluster, so contract tests imported into tests/cluster/ run on it with the
sync, asyncio and auto-batching clients. The shared Redis at 6379 is never touched.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

from credici_redis import AsyncCrediciClient, CrediciClient
from tests.archive.conftest import pg, postgres_url
from tests.conftest import SyncAsAsync

__all__ = ["pg", "postgres_url"]  # fixtures of the archive tests, for the archive on the cluster

NODES = 6  # 3 masters, 3 replicas


def free_ports(count: int) -> list[int]:
    """Ports free now, whose +10000 cluster bus ports are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class LocalCluster:
    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]]
    directory: Path
    commands: dict[int, list[str]] = field(default_factory=dict)

    def restart(self, port: int) -> None:
        """Start a stopped node again, as it was (its nodes.conf: it rejoins the cluster)."""
        self.processes[port] = subprocess.Popen(self.commands[port], stdout=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2)

    def masters(self) -> list[int]:
        found = []
        for port in self.ports:
            if self.processes[port].poll() is not None:
                continue
            with self.node(port) as r:
                if r.info("replication")["role"] == "master":
                    found.append(port)
        return found

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


def wait_ok(ports: list[int], deadline: float) -> None:
    """Until every node says cluster_state:ok and every replica has synced with its master."""
    while True:
        states = []
        for port in ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as r:
                    state = r.cluster("INFO").get("cluster_state")
                    replication = r.info("replication")
                    if replication["role"] == "slave" and replication["master_link_status"] != "up":
                        state = "syncing"  # a replica must hold the data before a failover
                    states.append(state)
            except redis.RedisError:
                states.append(None)
        if all(state == "ok" for state in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not become ok: {states}")
        time.sleep(0.05)


class NodeDidNotStart(RuntimeError):
    """A node's redis-server exited while starting: its port (or bus port, +10000) was taken
    between free_ports and its bind (an outgoing connection's ephemeral port, say)."""


def start_cluster(nodes: int = NODES, replicas: int = 1) -> LocalCluster:
    """A local cluster on free ports; started again on other ports if a node could not bind."""
    for attempt in range(3):
        try:
            return _start_cluster(nodes, replicas)
        except NodeDidNotStart:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_cluster(nodes: int, replicas: int) -> LocalCluster:
    directory = Path(tempfile.mkdtemp(prefix="credici-cluster-"))
    ports = free_ports(nodes)
    processes: dict[int, subprocess.Popen[bytes]] = {}
    cluster = LocalCluster(ports, processes, directory)
    try:
        for port in ports:
            # fmt: off
            cluster.commands[port] = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                "--dir", str(directory), "--logfile", f"{directory}/{port}.log",
                "--repl-diskless-sync-delay", "0", "--enable-debug-command", "local",
            ]
            # fmt: on
            processes[port] = subprocess.Popen(cluster.commands[port], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        for port in ports:
            while True:
                try:
                    with redis.Redis(port=port, socket_timeout=1) as r:
                        r.ping()
                    break
                except redis.RedisError:
                    if processes[port].poll() is not None:
                        raise NodeDidNotStart(f"redis-server on port {port} exited") from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        subprocess.run(
            ["redis-cli", "--cluster", "create"]
            + [f"127.0.0.1:{p}" for p in ports]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_ok(ports, time.monotonic() + 20)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    started = start_cluster()
    yield started
    started.stop()


@pytest.fixture
def cluster_redis(cluster: LocalCluster) -> Iterator[redis.cluster.RedisCluster]:
    r = redis.cluster.RedisCluster.from_url(cluster.url)
    yield r
    r.close()


def _delete_namespace(cluster: LocalCluster, namespace: str) -> None:
    for port in cluster.masters():
        with cluster.node(port) as r:
            for key in r.scan_iter(match=f"{namespace}:*", count=1000):
                r.unlink(key)


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield ns
    _delete_namespace(cluster, ns)


@pytest.fixture
def backend() -> str:
    return "cluster"


@pytest.fixture
def url(cluster: LocalCluster) -> str:
    return cluster.url


@pytest.fixture
async def make_client(api: str, url: str, namespace: str) -> AsyncIterator[Any]:
    """As in tests/conftest.py, with cluster=True."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        options = {"cluster": True, **options}
        if api == "sync":
            sync = CrediciClient.from_url(url, namespace=namespace, **options)
            made.append(sync)
            return SyncAsAsync(sync)
        if api == "async-batched":
            options = {"batching": True, **options}
        aclient = AsyncCrediciClient.from_url(url, namespace=namespace, **options)
        made.append(aclient)
        return aclient

    yield make
    for c in made:
        if isinstance(c, AsyncCrediciClient):
            await c.aclose()
        else:
            c.close()
