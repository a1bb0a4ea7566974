"""One Redis against a 3-master Redis Cluster, and what durability="replica" costs on each.

    .venv/bin/python benchmarks/cluster.py [--seconds 3] [--calls 2000] [--rounds 3]

Starts its own servers on free ports, in a temporary directory (nothing else is touched): a
primary with one replica, and a cluster of 3 masters and 3 replicas (as tests/cluster/ does),
all without persistence. Then prints one table:

- throughput: the same charging workload (one process, 64 asyncio tasks, `subtract(u, 1)` on
  1,000 users for `--seconds`), without and with auto-batching, default durability and
  ``durability="replica"``, on the primary (its replica attached) and on the cluster;
- latency: p50/p99 of sequential sync `subtract(u, 1)` (one thread, `--calls` calls), default
  against ``durability="replica"``, on the pair and on the cluster.

Each figure is the median of `--rounds` rounds, which interleave the setups, so that a machine
whose load drifts does not favour one of them. Takes about 30 s per round with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from credici_redis import AsyncCrediciClient, CrediciClient

USERS = [f"user-{i}" for i in range(1000)]
TASKS = 64


def free_ports(count: int) -> list[int]:
    """Ports free now, whose +10000 cluster bus ports are free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


def start(port: int, directory: Path, *extra: str) -> subprocess.Popen[bytes]:
    options = f"--port {port} --bind 127.0.0.1 --appendonly no --dir {directory} "
    options += f"--dbfilename {port}.rdb --cluster-config-file nodes-{port}.conf "
    options += "--repl-diskless-sync-delay 0 --cluster-node-timeout 2000"
    command = ["redis-server", *options.split(), "--save", "", *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def until(ports: list[int], ready: Callable[[redis.Redis], bool]) -> None:
    deadline = time.monotonic() + 30
    for port in ports:
        while True:
            try:
                with redis.Redis(port=port, socket_timeout=1) as r:
                    if ready(r):
                        break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server at {port} is not ready")
            time.sleep(0.05)


def linked(r: redis.Redis) -> bool:
    replication = r.info("replication")
    return replication["role"] == "master" or replication.get("master_link_status") == "up"


def start_pair(directory: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    primary, replica = free_ports(2)
    processes = [
        start(primary, directory),
        start(replica, directory, "--replicaof", "127.0.0.1", str(primary)),
    ]
    until([primary, replica], linked)
    return f"redis://127.0.0.1:{primary}/0", processes


def start_cluster(directory: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    ports = free_ports(6)
    processes = [start(port, directory, "--cluster-enabled", "yes") for port in ports]
    until(ports, lambda r: bool(r.ping()))
    nodes = [f"127.0.0.1:{port}" for port in ports]
    create = ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1"]
    subprocess.run([*create, "--cluster-yes"], check=True, capture_output=True, timeout=30)
    until(ports, lambda r: r.cluster("INFO")["cluster_state"] == "ok" and linked(r))
    return f"redis://127.0.0.1:{ports[0]}", processes


async def throughput(url: str, seconds: float, **options: Any) -> float:
    client = AsyncCrediciClient.from_url(
        url, namespace=f"bench{random.randrange(10**9)}", **options
    )
    try:
        for start in range(0, len(USERS), 200):
            await client.add_many([(u, 10**12) for u in USERS[start : start + 200]])
        done = 0
        loop = asyncio.get_running_loop()
        stop = loop.time() + seconds

        async def charge(seed: int) -> None:
            nonlocal done
            rng = random.Random(seed)
            while loop.time() < stop:
                await client.subtract(rng.choice(USERS), 1)
                done += 1

        began = loop.time()
        await asyncio.gather(*(charge(seed) for seed in range(TASKS)))
        return done / (loop.time() - began)
    finally:
        await client.aclose()


def latency(url: str, calls: int, **options: Any) -> tuple[float, float]:
    client = CrediciClient.from_url(url, namespace=f"bench{random.randrange(10**9)}", **options)
    try:
        client.add("solo", 10**12)
        for _ in range(200):  # warm-up: connections, scripts
            client.subtract("solo", 1)
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            client.subtract("solo", 1)
            times.append((time.perf_counter() - began) * 1000)
        times.sort()
        return statistics.median(times), times[int(len(times) * 0.99) - 1]
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput figure")
    parser.add_argument("--calls", type=int, default=2000, help="per latency figure")
    parser.add_argument("--rounds", type=int, default=3, help="figures are medians of rounds")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="credici-bench-"))
    pair_url, pair = start_pair(directory)
    cluster_url, cluster = start_cluster(directory)
    setups: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("one Redis (+1 replica)", pair_url, {}),
        ("cluster 3+3", cluster_url, {"cluster": True}),
    )
    ops: dict[tuple[str, str, bool], list[float]] = {}
    lat: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for round_ in range(args.rounds):  # rounds interleave the setups: load drifts over time
            for durability in ("primary", "replica"):
                for batching in (False, True):
                    for name, url, extra in setups:
                        print(f"{round_} {name} {durability} batching={batching}", file=sys.stderr)
                        options = {"batching": batching, "durability": durability, **extra}
                        rate = asyncio.run(throughput(url, args.seconds, **options))
                        ops.setdefault((name, durability, batching), []).append(rate)
                for name, url, extra in setups:
                    print(f"{round_} latency {name} {durability}", file=sys.stderr)
                    measured = latency(url, args.calls, durability=durability, **extra)
                    lat.setdefault((name, durability), []).append(measured)
    finally:
        for process in [*pair, *cluster]:
            process.kill()
            process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)
    rows: list[tuple[str, ...]] = [
        ("figure", "setup", "durability", "client", "ops/s or p50", "p99")
    ]
    for (name, durability, batching), rates in ops.items():
        mode = "64 tasks" + (", batching" if batching else "")
        figure = f"{statistics.median(rates):,.0f} ops/s"
        rows.append(("throughput", name, durability, mode, figure, ""))
    for (name, durability), runs in sorted(lat.items()):
        p50 = statistics.median(run[0] for run in runs)
        p99 = statistics.median(run[1] for run in runs)
        figures = (f"{p50:.3f} ms", f"{p99:.3f} ms")
        rows.append(("latency", name, durability, "sync, one at a time", *figures))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rows.insert(1, tuple("-" * width for width in widths))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"medians of {args.rounds} rounds; load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
