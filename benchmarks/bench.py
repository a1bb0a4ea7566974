"""credici-redis against raw redis-py, measured in the same run on the same Redis.

    .venv/bin/python benchmarks/bench.py [--redis-url URL] [--quick] [--json PATH]

Three sections, each figure of the library printed beside a raw redis-py baseline and their ratio
(library / raw):

1. sync latency p50/p99, one connection, sequential calls: subtract, add and get_balance against
   ``EVALSHA`` of ``return 1``, and against raw ``EVALSHA`` of the operation's own script with the
   arguments the library sends (so the difference is the library's client-side cost alone).
2. asyncio throughput: 64 tasks calling ``subtract``, one user per task (no key contention),
   against 64 tasks sending ``EVALSHA 'return 1'`` (and subtract.lua with prebuilt arguments).
3. get_balance p50 for a user with 10 history entries and one with 100,000 (filled by pipelined
   EVALSHA of add.lua): the balance is kept, never summed from history, so the ratio is ~1.

Every key lives under a fresh namespace ``bench-<random>``, deleted at exit (also on error).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import pydantic
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from credici_redis import AsyncCrediciClient, CrediciClient, _keys, _requests, _scripts
from credici_redis._protocol import Call, Flow
from credici_redis._scripts import Script
from credici_redis.errors import StorageUnavailableError

TRIVIAL = "return 1"
PLENTY = 10**15
"""Credits given to every user that subtracts, so no run ever meets InsufficientCreditsError."""
TASKS = 64
FILL_BATCH = 5_000
"""EVALSHA calls per pipeline when filling a history."""


@dataclass(frozen=True)
class Settings:
    calls: int  # sync calls measured per operation
    warmup: int  # sync calls per operation before measuring
    rounds: int  # measured calls are split in this many interleaved blocks per operation
    async_seconds: float  # length of one asyncio throughput round
    async_rounds: int  # rounds per variant, alternated between variants
    big_history: int  # history entries of the big user in section 3
    balance_calls: int  # get_balance calls measured per user in section 3


FULL = Settings(
    calls=10_000,
    warmup=1_000,
    rounds=50,
    async_seconds=2.0,
    async_rounds=3,
    big_history=100_000,
    balance_calls=5_000,
)
QUICK = Settings(
    calls=1_000,
    warmup=200,
    rounds=10,
    async_seconds=0.5,
    async_rounds=1,
    big_history=100_000,
    balance_calls=1_000,
)


@dataclass(frozen=True)
class Row:
    section: str
    operation: str
    stat: str  # "p50" / "p99" (µs) or "ops/s"
    library: float
    raw: float
    baseline: str

    @property
    def ratio(self) -> float:
        return self.library / self.raw


# --- clients -----------------------------------------------------------------------------------

# The options `CrediciClient.from_url` gives its pool (credici_redis/_connect.py), so the raw
# baseline runs with the same client settings: timeouts, no retry, a blocking pool of 64.
TIMEOUT = 5.0
MAX_CONNECTIONS = 64


def _pool_options() -> dict[str, Any]:
    return {
        "timeout": TIMEOUT,
        "socket_timeout": TIMEOUT,
        "socket_connect_timeout": TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": MAX_CONNECTIONS,
    }


def raw_sync(url: str) -> redis.Redis:
    return redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, **_pool_options()))


def raw_async(url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, **_pool_options())
    return redis.asyncio.Redis.from_pool(pool)


def send(r: redis.Redis, call: Call) -> Any:
    """Raw redis-py EVALSHA; reloads the script on NOSCRIPT, as tests sharing this Redis flush."""
    try:
        return r.execute_command(*call.args)
    except NoScriptError:
        assert call.script is not None
        r.script_load(call.script.source)
        return r.execute_command(*call.args)


async def send_async(r: redis.asyncio.Redis, call: Call) -> Any:
    try:
        return await r.execute_command(*call.args)
    except NoScriptError:
        assert call.script is not None
        await r.script_load(call.script.source)
        return await r.execute_command(*call.args)


def trivial_call() -> Call:
    script = Script("trivial", TRIVIAL, hashlib.sha1(TRIVIAL.encode()).hexdigest())
    return Call(("EVALSHA", script.sha, 0), script)


def first_call(flow: Flow[Any]) -> Call:
    """The one command a single-round-trip flow sends; its args can be replayed by raw redis-py."""
    (call,) = next(flow)
    flow.close()
    return call


def subtract_call(client: CrediciClient, user: str, amount: int) -> Call:
    req = _requests.build_subtract(user, amount, None, None, None)
    return first_call(client.storage.ledger.subtract(req))


def add_call(client: CrediciClient, user: str, amount: int, ttl: timedelta | None) -> Call:
    req = _requests.build_add(user, amount, None, ttl, None, None, None)
    return first_call(client.storage.ledger.add(req))


def delete_namespace(r: redis.Redis, namespace: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    for key in r.scan_iter(match=f"{namespace}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += r.unlink(*batch)
            batch.clear()
    if batch:
        deleted += r.unlink(*batch)
    return deleted


# --- measuring ---------------------------------------------------------------------------------


def percentile(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile, in µs."""
    rank = max(1, math.ceil(p / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1000


def timed(fn: Callable[[], object], n: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        fn()
        out.append(clock() - start)


def interleaved(
    ops: dict[str, Callable[[], object]], calls: int, warmup: int, rounds: int
) -> dict[str, list[int]]:
    """Latencies (ns) of each op, measured in alternating blocks: noise and drift hit all alike."""
    samples: dict[str, list[int]] = {name: [] for name in ops}
    for fn in ops.values():
        timed(fn, warmup, [])
    block = max(1, calls // rounds)
    gc.collect()
    for _ in range(rounds):
        for name, fn in ops.items():
            timed(fn, block, samples[name])
    for found in samples.values():
        found.sort()
    return samples


async def throughput(
    fns: list[Callable[[], Awaitable[object]]], seconds: float
) -> tuple[int, float]:
    """(calls, elapsed s) of one task per fn, each calling its fn in a loop until the deadline."""
    clock = time.perf_counter_ns

    async def loop(fn: Callable[[], Awaitable[object]], deadline: int) -> int:
        done = 0
        while clock() < deadline:
            await fn()
            done += 1
        return done

    start = clock()
    deadline = start + int(seconds * 1e9)
    counts = await asyncio.gather(*(loop(fn, deadline) for fn in fns))
    return sum(counts), (clock() - start) / 1e9


# --- sections ----------------------------------------------------------------------------------


def sync_latency(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> list[Row]:
    sub_user, add_user, bal_user = f"{ns}-sub", f"{ns}-add", f"{ns}-bal"
    client.add(sub_user, PLENTY)
    client.add(bal_user, PLENTY)
    ledger = client.storage.ledger
    # The library's operation, and raw redis-py sending the very EVALSHA the library would send.
    ops: dict[str, tuple[str, Callable[[], object], Call]] = {
        "subtract": (
            "subtract(u, 1)",
            lambda: client.subtract(sub_user, 1),
            subtract_call(client, sub_user, 1),
        ),
        "add": (
            "add(u, 1)",
            lambda: client.add(add_user, 1),
            add_call(client, add_user, 1, None),
        ),
        "balance": (
            "get_balance(u)",
            lambda: client.get_balance(bal_user),
            first_call(ledger.balance(bal_user, None)),
        ),
    }
    measured: dict[str, Callable[[], object]] = {"trivial": partial(send, raw, trivial)}
    for name, (_, library_fn, call) in ops.items():
        measured[name] = library_fn
        measured[f"raw {name}"] = partial(send, raw, call)
    samples = interleaved(measured, s.calls, s.warmup, s.rounds)
    section = f"1. sync latency (µs), one connection, {s.calls:,} sequential calls per operation"
    rows = []
    for name, (label, _, call) in ops.items():
        script = call.script.name if call.script else "?"
        for raw_name, baseline in (
            ("trivial", f"EVALSHA '{TRIVIAL}'"),
            (f"raw {name}", f"EVALSHA {script}.lua, same args"),
        ):
            for p in (50, 99):
                rows.append(
                    Row(
                        section,
                        label,
                        f"p{p}",
                        percentile(samples[name], p),
                        percentile(samples[raw_name], p),
                        baseline,
                    )
                )
    return rows


async def async_throughput(
    url: str, trivial: Call, ns: str, sub_calls: list[Call], s: Settings
) -> list[Row]:
    aclient = AsyncCrediciClient.from_url(url, namespace=ns)
    araw = raw_async(url)
    try:
        users = [f"{ns}-task{i}" for i in range(TASKS)]
        variants: dict[str, list[Callable[[], Awaitable[object]]]] = {
            "raw_trivial": [partial(send_async, araw, trivial) for _ in users],
            "raw_subtract": [partial(send_async, araw, call) for call in sub_calls],
            "subtract": [(lambda user=user: aclient.subtract(user, 1)) for user in users],
        }
        for fns in variants.values():  # opens the 64 connections of each pool
            await throughput(fns, 0.3)
        totals = {name: [0, 0.0] for name in variants}
        gc.collect()
        for _ in range(s.async_rounds):
            for name, fns in variants.items():
                calls, elapsed = await throughput(fns, s.async_seconds)
                totals[name][0] += calls
                totals[name][1] += elapsed
    finally:
        await aclient.aclose()
        await araw.aclose()
    rate = {name: calls / elapsed for name, (calls, elapsed) in totals.items()}
    section = (
        f"2. asyncio throughput (ops/s), {TASKS} tasks on {TASKS} users (one per task), "
        f"{s.async_rounds} x {s.async_seconds:g} s"
    )
    return [
        Row(
            section,
            "subtract(u, 1)",
            "ops/s",
            rate["subtract"],
            rate["raw_trivial"],
            f"EVALSHA '{TRIVIAL}'",
        ),
        Row(
            section,
            "subtract(u, 1)",
            "ops/s",
            rate["subtract"],
            rate["raw_subtract"],
            "EVALSHA subtract.lua, same args",
        ),
    ]


def fill(raw: redis.Redis, call: Call, n: int) -> None:
    """Send `call` n times, pipelined; calls refused with NOSCRIPT are sent again after a load."""
    assert call.script is not None
    while n > 0:
        pipe = raw.pipeline(transaction=False)
        for _ in range(min(FILL_BATCH, n)):
            pipe.execute_command(*call.args)
        replies = pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and not isinstance(reply, NoScriptError):
                raise reply
        refused = sum(isinstance(reply, NoScriptError) for reply in replies)
        if refused:
            raw.script_load(call.script.source)
        n -= len(replies) - refused


def balance_growth(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> tuple[list[Row], dict[str, float]]:
    # Adds of 1 credit expiring in 30 days: the big user has `big_history` history entries, as
    # many buckets and as many entries in the expiry index, all of which get_balance must ignore.
    ttl = timedelta(days=30)
    sizes = {"small": 10, "big": s.big_history}
    users = {name: f"{ns}-hist{n}" for name, n in sizes.items()}
    for name, user in users.items():
        fill(raw, add_call(client, user, 1, ttl), sizes[name])
        stream = raw.xlen(_keys.user_keys(ns, user).history)
        if stream != sizes[name] or client.get_balance(user) != sizes[name]:
            raise RuntimeError(f"filling {user} gave {stream} history entries, not {sizes[name]}")
    samples = interleaved(
        {
            "raw_trivial": partial(send, raw, trivial),
            "small": lambda: client.get_balance(users["small"]),
            "big": lambda: client.get_balance(users["big"]),
        },
        s.balance_calls,
        s.warmup,
        s.rounds,
    )
    section = (
        f"3. get_balance p50 (µs) as history grows, {s.balance_calls:,} calls per user "
        "(history of adds of 1 credit, each its own bucket expiring in 30 days)"
    )
    trivial = percentile(samples["raw_trivial"], 50)
    small, big = percentile(samples["small"], 50), percentile(samples["big"], 50)
    rows = [
        Row(
            section,
            f"get_balance, {n:,} entries",
            "p50",
            value,
            trivial,
            f"EVALSHA '{TRIVIAL}'",
        )
        for n, value in ((sizes["small"], small), (sizes["big"], big))
    ]
    growth = {
        "small_entries": sizes["small"],
        "big_entries": sizes["big"],
        "small_p50_us": small,
        "big_p50_us": big,
        "ratio": big / small,
    }
    return rows, growth


# --- report ------------------------------------------------------------------------------------


def load_average() -> float:
    """1-minute load: other work on a 2-core machine moves every figure, so it is reported."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan


def machine(r: redis.Redis, url: str) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1m_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "hiredis": HIREDIS_AVAILABLE,
        "pydantic": pydantic.VERSION,
        "redis_server": r.info("server")["redis_version"],
        "redis_url": url,
    }


def render(
    info: dict[str, Any], mode: str, ns: str, rows: list[Row], growth: dict[str, float]
) -> str:
    lines = [
        f"credici-redis benchmark ({mode} run, namespace {ns})",
        f"machine: {info['cpu_count']} CPUs shared by this client and Redis, 1-min load "
        f"{info['load_average_1m_start']} at start, {info['load_average_1m_end']} at end",
        f"versions: Python {info['python']} | "
        f"redis-py {info['redis_py']} ({'hiredis' if info['hiredis'] else 'no hiredis'}) | "
        f"pydantic {info['pydantic']} | Redis {info['redis_server']} at {info['redis_url']}",
        "raw = redis-py on its own pool with the library's client settings; ratio = library / raw",
    ]
    header = (
        f"  {'operation':<30} {'stat':<6} {'library':>10} {'raw':>10} {'ratio':>7}  raw baseline"
    )
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += ["", section, header]
        fmt = "{:>10,.0f}" if row.stat == "ops/s" else "{:>10,.1f}"
        lines.append(
            f"  {row.operation:<30} {row.stat:<6} {fmt.format(row.library)} "
            f"{fmt.format(row.raw)} {row.ratio:>6.2f}x  {row.baseline}"
        )
    lines.append(
        f"  growth: {growth['big_entries']:,.0f} vs {growth['small_entries']:,.0f} entries "
        f"p50 {growth['big_p50_us']:.1f} / {growth['small_p50_us']:.1f} µs = "
        f"{growth['ratio']:.2f}x (expected ~1.0: the balance is never summed from history)"
    )
    return "\n".join(lines)


def run(url: str, settings: Settings, mode: str, json_path: str | None) -> None:
    started = time.perf_counter()
    ns = f"bench-{secrets.token_hex(4)}"
    raw = raw_sync(url)
    client = CrediciClient.from_url(url, namespace=ns)
    try:
        info = machine(raw, url)
        trivial = trivial_call()
        for script in (*_scripts.ALL, trivial.script):
            if script is None or raw.script_load(script.source) != script.sha:
                raise RuntimeError(f"Redis hashed script {script} differently")

        rows = sync_latency(client, raw, trivial, ns, settings)

        users = [f"{ns}-task{i}" for i in range(TASKS)]
        for user in users:
            client.add(user, PLENTY)
        sub_calls = [subtract_call(client, user, 1) for user in users]
        rows += asyncio.run(async_throughput(url, trivial, ns, sub_calls, settings))

        growth_rows, growth = balance_growth(client, raw, trivial, ns, settings)
        rows += growth_rows
        info["load_average_1m_end"] = load_average()
    finally:
        try:
            deleted = delete_namespace(raw, ns)
        finally:
            client.close()
            raw.close()
    wall = time.perf_counter() - started
    print(render(info, mode, ns, rows, growth))
    print(f"\nwall time {wall:.1f} s; {deleted:,} keys of {ns} deleted")
    if json_path:
        report = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": mode,
            "namespace": ns,
            "machine": info,
            "settings": asdict(settings),
            "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
            "balance_growth": growth,
            "wall_seconds": wall,
            "keys_deleted": deleted,
        }
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2, ensure_ascii=False)
            out.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true", help="short runs, for smoke tests")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    try:
        run(args.redis_url, QUICK if args.quick else FULL, mode, args.json)
    except (redis.ConnectionError, StorageUnavailableError) as exc:
        print(f"bench: cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
