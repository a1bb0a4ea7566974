"""Issue 18 experiment: redis.asyncio against valkey-glide, raw and behind the storage interface.

    /tmp/glidevenv/bin/python benchmarks/glide_trial.py [--redis-url URL] [--seconds 5]
        [--rounds 3] [--batched] [--json PATH]

One process, one event loop, 64 tasks (bench.py's TASKS), each variant run for `--seconds` per
round, variants interleaved over `--rounds` rounds; the figure is the median round:

(a) raw redis.asyncio, 64 tasks sending ``EVALSHA 'return 1'`` (bench.py's raw_async pool: 64
    connections, 5 s timeouts, no retry);
(b) raw valkey-glide, the same EVALSHA by ``GlideClient.custom_command`` (one multiplexed client);
(c) ``AsyncCrediciClient`` on ``AsyncRedisStorage`` (``from_url``: what users get)
    ``.subtract(user, 1)`` over 1,000 users granted plenty of credits first;
(d) the same on ``GlideStorage`` (benchmarks/glide_storage.py);
(e) sequential latency p50/p99 of one subtract at a time, (c) and (d), in alternating blocks.
With --batched, (c) and (d) with batching=True as well.

Besides ops/s, each round's process CPU time (all threads: glide answers on a Rust thread) per
operation. Every key lives under ``gtrial-<random>``, deleted at exit; nothing is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from glide import RequestError

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import bench  # noqa: E402  (benchmarks/bench.py: the same raw client and loop as its section 3)
from glide_storage import GlideRedis, GlideStorage, _args  # noqa: E402

from credici_redis import AsyncCrediciClient, Transaction  # noqa: E402
from credici_redis._storages.redis_async import AsyncRedisStorage  # noqa: E402

USERS = 1_000
LATENCY_CALLS = 3_000  # per storage per round
Fn = Callable[[], Awaitable[object]]


def progress(message: str) -> None:
    print(f"  [glide-trial] {message}", file=sys.stderr, flush=True)


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(fns: list[Fn], seconds: float, r: redis.Redis) -> dict[str, float]:
    """bench.throughput, with the process's CPU time (every thread) and the Redis server's
    (INFO cpu: anything else on the shared Redis counts too) over the same span."""
    gc.collect()
    server, cpu = redis_cpu(r), time.process_time()
    calls, elapsed = await bench.throughput(fns, seconds)
    cpu, server = time.process_time() - cpu, redis_cpu(r) - server
    return {
        "ops": calls / elapsed,
        "cpu_us": cpu / calls * 1e6,
        "redis_cpu_us": server / calls * 1e6,
        "calls": calls,
    }


async def latencies(fn: Fn, n: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        await fn()
        out.append(clock() - start)


def rotating(users: list[str]) -> Callable[[], str]:
    """The next user, shared by every task: 64 tasks sweep the 1,000 users."""
    counter = itertools.count()
    return lambda: users[next(counter) % len(users)]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    url = args.redis_url
    ns = f"gtrial-{secrets.token_hex(4)}"
    sync = redis.Redis.from_url(url)
    trivial = bench.trivial_call()
    sha = str(trivial.args[1])
    araw = bench.raw_async(url)
    graw = GlideRedis(sync.connection_pool.connection_kwargs.get("host", "127.0.0.1"),
                      sync.connection_pool.connection_kwargs.get("port", 6379))  # fmt: skip
    glide_client = await graw.client()  # the bare GlideClient, for (b)
    clients: dict[str, AsyncCrediciClient] = {}
    results: dict[str, Any] = {"namespace": ns, "tasks": bench.TASKS, "users": USERS}
    try:
        clients["redis"] = AsyncCrediciClient.from_url(url, namespace=ns)
        assert type(clients["redis"].storage) is AsyncRedisStorage
        clients["glide"] = AsyncCrediciClient(GlideStorage.from_url(url, ns))
        if args.batched:
            clients["redis-batched"] = AsyncCrediciClient.from_url(url, namespace=ns, batching=True)
            clients["glide-batched"] = AsyncCrediciClient(
                GlideStorage.from_url(url, ns, batching=True)
            )
        users = [f"u{i}" for i in range(USERS)]
        progress(f"granting {USERS:,} users in {ns}")
        granted = await clients["redis"].add_many([(u, bench.PLENTY) for u in users])
        assert all(isinstance(t, Transaction) for t in granted), granted[:3]
        sync.script_load(bench.TRIVIAL)

        async def glide_trivial() -> object:
            try:
                return await glide_client.custom_command(["EVALSHA", sha, "0"])
            except RequestError as exc:  # a test sharing this Redis flushed the scripts
                if "NoScriptError" not in str(exc):
                    raise
                await glide_client.custom_command(["SCRIPT", "LOAD", bench.TRIVIAL])
                return await glide_client.custom_command(["EVALSHA", sha, "0"])

        variants: dict[str, list[Fn]] = {
            "a raw redis.asyncio EVALSHA": [
                lambda: bench.send_async(araw, trivial) for _ in range(bench.TASKS)
            ],
            "b raw glide EVALSHA": [glide_trivial] * bench.TASKS,
        }
        # The very FCALL the storage sends for subtract(u, 1), replayed by each raw client (one
        # user per task, as bench.py's section 3): the driver's cost of the real call alone.
        sub_calls = [
            bench.subtract_call(clients["redis"], f"{ns}-task{i}", 1) for i in range(bench.TASKS)
        ]
        await clients["redis"].add_many(
            [(f"{ns}-task{i}", bench.PLENTY) for i in range(bench.TASKS)]
        )
        glide_args = [_args(call.args) for call in sub_calls]
        variants["a2 raw redis.asyncio FCALL subtract"] = [
            (lambda call=call: bench.send_async(araw, call)) for call in sub_calls
        ]
        variants["b2 raw glide FCALL subtract"] = [
            (lambda a=a: glide_client.custom_command(a)) for a in glide_args
        ]
        for name, client in clients.items():
            letter = "c" if name.startswith("redis") else "d"
            nxt = rotating(users)
            variants[f"{letter} subtract, {name}"] = [
                (lambda c=client, n=nxt: c.subtract(n(), 1)) for _ in range(bench.TASKS)
            ]
        for fns in variants.values():  # opens every pool's connections, loads the library
            await bench.throughput(fns, 0.3)

        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                got = await measure(variants[name], args.seconds, sync)
                rounds[name].append(got)
                progress(
                    f"round {r + 1}: {name}: {got['ops']:,.0f} ops/s, {got['cpu_us']:.1f} µs "
                    f"CPU/op, Redis {got['redis_cpu_us']:.1f}"
                )

        progress("sequential latency")
        seq_user = {"redis": "u0", "glide": "u1"}
        seq = {
            name: (lambda c=clients[name], u=seq_user[name]: c.subtract(u, 1)) for name in seq_user
        }
        samples: dict[str, list[int]] = {name: [] for name in seq}
        for fn in seq.values():
            await latencies(fn, 300, [])
        gc.collect()
        for _ in range(args.rounds):
            for name, fn in seq.items():
                await latencies(fn, LATENCY_CALLS, samples[name])
        for found in samples.values():
            found.sort()

        results["throughput"] = {
            name: {
                "median_ops": statistics.median(g["ops"] for g in got),
                "median_cpu_us": statistics.median(g["cpu_us"] for g in got),
                "median_redis_cpu_us": statistics.median(g["redis_cpu_us"] for g in got),
                "rounds_ops": [round(g["ops"]) for g in got],
            }
            for name, got in rounds.items()
        }
        results["latency_us"] = {
            name: {"p50": bench.percentile(s, 50), "p99": bench.percentile(s, 99), "n": len(s)}
            for name, s in samples.items()
        }
        results["load_average"] = os.getloadavg()
        return results
    finally:
        for client in clients.values():
            await client.aclose()
        await araw.aclose()
        await graw.aclose()
        deleted = bench.delete_namespace(sync, ns)
        progress(f"deleted {deleted:,} keys of {ns}")
        sync.close()


def render(res: dict[str, Any]) -> str:
    t = res["throughput"]
    lines = [
        f"{res['tasks']} asyncio tasks, one process; subtract over {res['users']:,} users; "
        "median of rounds",
        f"{'variant':40} {'ops/s':>10} {'CPU µs/op':>10} {'Redis µs/op':>11}   rounds",
    ]
    for name, row in t.items():
        lines.append(
            f"{name:40} {row['median_ops']:>10,.0f} {row['median_cpu_us']:>10.1f} "
            f"{row['median_redis_cpu_us']:>11.1f}   "
            + ", ".join(f"{x:,}" for x in row["rounds_ops"])
        )
    ops = {name.split()[0]: row["median_ops"] for name, row in t.items() if "batched" not in name}
    lines.append("")
    lines.append(f"d/c (glide storage / redis-py storage)  {ops['d'] / ops['c']:.2f}")
    lines.append(f"c/a (redis-py storage / raw redis-py)   {ops['c'] / ops['a']:.2f}")
    lines.append(f"d/b (glide storage / raw glide)         {ops['d'] / ops['b']:.2f}")
    lines.append(f"b/a (raw glide / raw redis-py)          {ops['b'] / ops['a']:.2f}")
    lines.append(f"b2/a2 (raw FCALL subtract, glide/redis) {ops['b2'] / ops['a2']:.2f}")
    lines.append(
        f"c/a2, d/b2 (storage / its raw FCALL)    {ops['c'] / ops['a2']:.2f}, "
        f"{ops['d'] / ops['b2']:.2f}"
    )
    lines.append("")
    lines.append("(e) sequential subtract, one at a time")
    for name, lat in res["latency_us"].items():
        lines.append(
            f"    {name:6} p50 {lat['p50']:7.1f} µs   p99 {lat['p99']:7.1f} µs   n={lat['n']}"
        )
    lines.append(f"load average at the end: {', '.join(f'{x:.2f}' for x in res['load_average'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batched", action="store_true")
    parser.add_argument("--json")
    options = parser.parse_args()
    found = asyncio.run(main(options))
    print(render(found))
    if options.json:
        Path(options.json).write_text(json.dumps(found, indent=2))
