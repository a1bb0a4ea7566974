"""credici-redis against raw redis-py, measured in the same run on the same Redis.

    .venv/bin/python benchmarks/bench.py [--redis-url URL] [--quick] [--json PATH]
        [--postgres-url URL] [--no-postgres | --only-postgres | --only-limits | --only-members]

Nine sections, printed as one table; each figure of the library beside a raw baseline measured in
the same run, their ratio (library / raw), and the issue's target where it sets one (PASS/MISS):

1. sync latency p50/p99, one connection, sequential calls: subtract, add and get_balance against
   ``EVALSHA`` of ``return 1``, and against raw ``EVALSHA`` of the operation's own script with the
   arguments the library sends (so the difference is the library's client-side cost alone).
2. ``subtract_many`` of 100 users, items/s, against a raw redis-py pipeline of 100
   ``EVALSHA 'return 1'`` (and of the 100 subtract.lua calls the library sends).
3. asyncio throughput, 64 tasks on 64 users: ``AsyncCrediciClient`` without and with
   ``batching=True``, against 64 tasks sending ``EVALSHA 'return 1'`` with redis.asyncio.
4. server side: subtract.lua under ``redis-benchmark`` (50 clients, one user) against
   ``return 1``, on a ``redis-server`` of the benchmark's own (skipped when it is not installed);
   4b Redis CPU per call of each operation; 4c charges/s with 1, 2, 4 processes; 4d where one
   subtract's Redis CPU goes (subtract.lua cut short after each step).
5. memory (MEMORY USAGE): bytes per user holding one bucket, and bytes per history entry, against
   a string counter per user and a stream of bare charges.
6. cost growth: subtract p50 with 1, 100 and 1,000 buckets; get_balance p50 with 10 and 100,000
   history entries; a period query over a narrow window in a history of 1,000 and of 1,000,000
   entries (100,000 with --quick).

7. PostgreSQL side by side: the same sync workload (subtract, add, get_balance p50/p99, one
   connection; subtract ops/s with 8 threads on 8 users) on ``PostgresStorage`` and on
   ``RedisStorage``, as PostgreSQL / Redis ratios (``--postgres-url``; ``--no-postgres`` skips it).
8. limits (issue 17): subtract under a rate and a budget (the user's own, or the client's
   ``default_limits``) against a plain subtract, and against the ``limits`` library's moving
   window hit (and fixed window, for the budget) before a plain subtract: sync p50/p99, asyncio
   ops/s (64 tasks), Redis CPU per charge (``--only-limits``: this section alone).
9. members and transfers (issue 19): a pool's member charging it (without and with a cap), and
   a transfer between two accounts in different slots, against a plain subtract: sync p50/p99,
   Redis CPU per operation.

Every key lives under a fresh namespace ``bench-<random>``, deleted at exit (also on error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import pydantic
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from credici_redis import (
    AsyncCrediciClient,
    Budget,
    CrediciClient,
    Limits,
    RateLimit,
    Transaction,
)
from credici_redis._core import audit as _audit
from credici_redis._core import keys as _keys
from credici_redis._core import scripts as _scripts
from credici_redis._core.protocol import Call, Flow, stream_fields, text
from credici_redis._core.requests import UserRequest
from credici_redis._core.scripts import LIBRARY, Script
from credici_redis._ops import account, charge
from credici_redis._ops import holds as hold_ops
from credici_redis._storages.redis_base import function_missing
from credici_redis.errors import StorageUnavailableError

TRIVIAL = "return 1"
PLENTY = 10**15
"""Credits given to every user that subtracts, so no run ever meets InsufficientCreditsError."""
TASKS = 64
BATCH = 100
"""Items per subtract_many call (section 2)."""
BENCHMARK_CLIENTS = 50
"""redis-benchmark connections (section 4)."""
BUCKET_COUNTS = (1, 100, 1_000)
BUCKET_CREDITS = 10**9
"""Credits per bucket in section 6: subtract(1) never empties one, so the bucket count holds."""
PERIOD_WINDOW = 10
"""Entries in the period query's window (section 6): one entry per millisecond, 10 ms wide."""
CHARGE_SPACING_MS = 1_000
"""Time between the history entries whose memory is measured (section 5): a charge a second."""
FILL_BATCH = 5_000
"""EVALSHA calls per pipeline when filling a history."""


@dataclass(frozen=True)
class Settings:
    calls: int  # sync calls measured per operation (section 1)
    warmup: int  # sync calls per operation before measuring
    rounds: int  # measured calls are split in this many interleaved blocks per operation
    batch_calls: int  # subtract_many / pipeline calls measured per variant (section 2)
    async_seconds: float  # length of one asyncio throughput round (section 3)
    async_rounds: int  # rounds per variant, alternated between variants
    server_requests: int  # requests per redis-benchmark run (section 4)
    server_rounds: int  # redis-benchmark runs per script, alternated
    memory_users: int  # users measured for bytes per user (section 5)
    memory_entries: int  # history entries measured for bytes per entry
    growth_calls: int  # calls measured per variant in section 6
    big_history: int  # history entries of the big get_balance user (section 6)
    period_small: int  # history entries of the small period-query user
    period_big: int  # history entries of the big period-query user
    history_read: int  # history entries read whole vs page by page (section 6d)
    pathological: int  # buckets expiring together, holds falling due together (section 6e)


FULL = Settings(
    calls=10_000,
    warmup=1_000,
    rounds=50,
    batch_calls=1_000,
    async_seconds=1.0,
    async_rounds=6,
    server_requests=100_000,
    server_rounds=3,
    memory_users=1_000,
    memory_entries=10_000,
    growth_calls=5_000,
    big_history=100_000,
    period_small=1_000,
    period_big=1_000_000,
    history_read=200_000,
    pathological=50_000,
)
QUICK = Settings(
    calls=1_000,
    warmup=200,
    rounds=10,
    batch_calls=200,
    async_seconds=0.4,
    async_rounds=3,
    server_requests=20_000,
    server_rounds=1,
    memory_users=200,
    memory_entries=1_000,
    growth_calls=1_000,
    big_history=100_000,
    period_small=1_000,
    period_big=100_000,
    history_read=50_000,
    pathological=10_000,
)


@dataclass(frozen=True)
class Target:
    """The issue's target for a row: on its ratio, or on the library's figure itself."""

    op: str  # "<=" or ">="
    bound: float
    on: str = "ratio"  # "ratio" or "value"
    unit: str = "x"

    def met(self, row: Row) -> bool:
        value = row.ratio if self.on == "ratio" else row.library
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def label(self) -> str:
        return f"{self.op} {self.bound:g}{self.unit}"


@dataclass(frozen=True)
class Row:
    section: str
    operation: str
    stat: str  # "p50 µs", "p99 µs", "µs/call", "ops/s", "req/s", "bytes"
    library: float
    raw: float
    baseline: str
    target: Target | None = None

    @property
    def ratio(self) -> float:
        return self.library / self.raw

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.target.met(self)


def progress(message: str) -> None:
    """What the run is doing, on stderr: the full run takes minutes."""
    print(f"  [bench] {message}", file=sys.stderr, flush=True)


# --- clients -----------------------------------------------------------------------------------

# The options `CrediciClient.from_url` gives its pool (credici_redis/_storages/connect.py), so
# the raw baseline runs with the same client settings: timeouts, no retry, a blocking pool of 64.
TIMEOUT = 5.0
MAX_CONNECTIONS = 64


def _pool_options(*, asyncio: bool = False) -> dict[str, Any]:
    return {
        "timeout": TIMEOUT,
        "socket_timeout": TIMEOUT,
        "socket_connect_timeout": TIMEOUT,
        "retry": AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0),
        "max_connections": MAX_CONNECTIONS,
    }


def raw_sync(url: str) -> redis.Redis:
    return redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url, **_pool_options()))


def raw_async(url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(url, **_pool_options(asyncio=True))
    return redis.asyncio.Redis.from_pool(pool)


def missing(reply: Any) -> bool:
    """NOSCRIPT, or FCALL of a function the server lacks (tests sharing this Redis flush)."""
    return isinstance(reply, NoScriptError) or function_missing(reply)


def reload(r: redis.Redis, call: Call) -> None:
    """Load what `call` needs: its script (EVALSHA), or the library (FCALL)."""
    assert call.script is not None
    if call.args[0] == "FCALL":
        with contextlib.suppress(redis.ResponseError):  # already there
            r.function_load(LIBRARY.source)
    else:
        r.script_load(call.script.source)


def send(r: redis.Redis, call: Call) -> Any:
    """Raw redis-py FCALL or EVALSHA; loads what it needs when the server lacks it."""
    try:
        return r.execute_command(*call.args)
    except redis.ResponseError as exc:
        if not missing(exc):
            raise
        reload(r, call)
        return r.execute_command(*call.args)


async def send_async(r: redis.asyncio.Redis, call: Call) -> Any:
    try:
        return await r.execute_command(*call.args)
    except redis.ResponseError as exc:
        if not missing(exc):
            raise
        assert call.script is not None
        if call.args[0] == "FCALL":
            with contextlib.suppress(redis.ResponseError):
                await r.function_load(LIBRARY.source)
        else:
            await r.script_load(call.script.source)
        return await r.execute_command(*call.args)


def send_pipeline(r: redis.Redis, calls: list[Call]) -> list[Any]:
    """Raw redis-py pipeline (no transaction), as `subtract_many` sends one; NOSCRIPT reloads."""
    pipe = r.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command(*call.args)
    replies: list[Any] = pipe.execute(raise_on_error=False)
    if any(missing(reply) for reply in replies):
        for call in calls:
            reload(r, call)
        return send_pipeline(r, calls)
    return replies


def trivial_call() -> Call:
    digest = hashlib.sha1(TRIVIAL.encode()).hexdigest()
    return Call(("EVALSHA", digest, 0), Script("trivial", TRIVIAL, digest, effect=False))


def first_call(flow: Flow[Any]) -> Call:
    """The one command a single-round-trip flow sends; its args can be replayed by raw redis-py."""
    (call,) = next(flow)
    flow.close()
    return call


def subtract_call(client: CrediciClient, user: str, amount: int, now_ms: int | None = None) -> Call:
    req = charge.build_subtract(user, amount, None, None, now_ms)
    return first_call(client.storage.ledger.execute(charge.SUBTRACT, req))


def add_call(
    client: CrediciClient,
    user: str,
    amount: int,
    ttl: timedelta | None,
    now_ms: int | None = None,
) -> Call:
    req = charge.build_add(user, amount, None, ttl, None, None, now_ms)
    return first_call(client.storage.ledger.execute(charge.ADD, req))


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


# --- filling histories -------------------------------------------------------------------------


def fill(raw: redis.Redis, script: Script, commands: Iterable[tuple[Any, ...]]) -> int:
    """Send the commands (EVALSHA of `script`) pipelined, FILL_BATCH at a time, in order; every
    reply must be OK. Commands refused with NOSCRIPT are sent again, in order, after a load."""
    sent = 0
    commands = iter(commands)
    while batch := list(itertools.islice(commands, FILL_BATCH)):
        while batch:
            pipe = raw.pipeline(transaction=False)
            for args in batch:
                pipe.execute_command(*args)
            refused = []
            for args, reply in zip(batch, pipe.execute(raise_on_error=False), strict=True):
                if missing(reply):
                    refused.append(args)
                elif isinstance(reply, Exception):
                    raise reply
                elif not (isinstance(reply, list) and reply and reply[0] in (b"OK", "OK")):
                    raise RuntimeError(f"filling got {reply!r}, not OK")
                else:
                    sent += 1
            if refused:
                with contextlib.suppress(redis.ResponseError):  # FCALL: the library
                    raw.function_load(LIBRARY.source)
                raw.script_load(script.source)
            batch = refused
    return sent


def clocked(make: Callable[[int], Call], start_ms: int, n: int, step_ms: int) -> Iterator[tuple]:
    """The args of make(start_ms), make(start_ms + step_ms), ... (n calls): built by the library
    once, then only the clock argument (found by building two calls) changes."""
    one, two = make(1).args, make(2).args
    moved = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b]
    if len(moved) != 1:
        raise RuntimeError(f"cannot find the clock argument in {one!r}")
    head, tail = one[: moved[0]], one[moved[0] + 1 :]
    return ((*head, str(start_ms + i * step_ms), *tail) for i in range(n))


def server_ms(raw: redis.Redis) -> int:
    seconds, micros = raw.time()
    return int(seconds) * 1000 + int(micros) // 1000


def clocked_history(
    client: CrediciClient, raw: redis.Redis, user: str, entries: int, step_ms: int
) -> int:
    """A user with a grant of PLENTY, then `entries` subtracts of 1, one every `step_ms`, ending a
    minute ago (injected clock: the history is old, as real ones are). Returns the first
    subtract's time (ms)."""
    start = server_ms(raw) - 60_000 - entries * step_ms
    send(raw, add_call(client, user, PLENTY, None, start - step_ms))
    fill(
        raw,
        charge.SUBTRACT.script,
        clocked(lambda ms: subtract_call(client, user, 1, ms), start, entries, step_ms),
    )
    stream = _keys.user_keys(client.storage.namespace, user).history
    if raw.xlen(stream) != entries + 1:
        raise RuntimeError(f"filling {user} gave {raw.xlen(stream)} entries, not {entries + 1}")
    return start


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


async def interleaved_rounds(
    variants: dict[str, list[Callable[[], Awaitable[object]]]], s: Settings
) -> dict[str, list[float]]:
    """name -> [calls, elapsed s] of each variant over `async_rounds` rounds that take turns
    (a machine whose load drifts favours none of them)."""
    totals = {name: [0.0, 0.0] for name in variants}
    gc.collect()
    for _ in range(s.async_rounds):
        for name, fns in variants.items():
            calls, elapsed = await throughput(fns, s.async_seconds)
            totals[name][0] += calls
            totals[name][1] += elapsed
    return totals


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


# --- 1. sync latency ---------------------------------------------------------------------------


def sync_latency(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> list[Row]:
    progress("1. sync latency")
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
            first_call(ledger.execute(account.BALANCE, UserRequest(bal_user, None))),
        ),
    }
    measured: dict[str, Callable[[], object]] = {"trivial": partial(send, raw, trivial)}
    for name, (_, library_fn, call) in ops.items():
        measured[name] = library_fn
        measured[f"raw {name}"] = partial(send, raw, call)
    samples = interleaved(measured, s.calls, s.warmup, s.rounds)
    section = f"1. sync latency, one connection, {s.calls:,} sequential calls per operation"
    rows = []
    for name, (label, _, call) in ops.items():
        script = call.script.name if call.script else "?"
        for raw_name, baseline in (
            ("trivial", f"EVALSHA '{TRIVIAL}'"),
            (f"raw {name}", f"EVALSHA {script}.lua, same args"),
        ):
            for p in (50, 99):
                target = None
                if name == "subtract" and raw_name == "trivial" and p == 50:
                    target = Target("<=", 1.25)
                rows.append(
                    Row(
                        section,
                        label,
                        f"p{p} µs",
                        percentile(samples[name], p),
                        percentile(samples[raw_name], p),
                        baseline,
                        target,
                    )
                )
    return rows


# --- 2. subtract_many --------------------------------------------------------------------------


def batch_throughput(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> list[Row]:
    progress(f"2. subtract_many({BATCH})")
    users = [f"{ns}-many{i}" for i in range(BATCH)]
    client.add_many([(user, PLENTY) for user in users])
    items = [(user, 1) for user in users]
    results = client.subtract_many(items)
    if not all(isinstance(result, Transaction) for result in results):
        raise RuntimeError(f"subtract_many failed: {results!r}")
    samples = interleaved(
        {
            "raw_trivial": partial(send_pipeline, raw, [trivial] * BATCH),
            "raw_subtract": partial(
                send_pipeline, raw, [subtract_call(client, user, 1) for user in users]
            ),
            "library": lambda: client.subtract_many(items),
        },
        s.batch_calls,
        max(1, s.batch_calls // 10),
        s.rounds,
    )
    rate = {name: BATCH * len(ns_) / (sum(ns_) / 1e9) for name, ns_ in samples.items()}
    section = (
        f"2. subtract_many({BATCH}): {BATCH} users, amount 1, one round trip per call, "
        f"{s.batch_calls:,} calls; items/s"
    )
    return [
        Row(
            section,
            f"subtract_many({BATCH} items)",
            "ops/s",
            rate["library"],
            rate["raw_trivial"],
            f"pipeline of {BATCH} EVALSHA '{TRIVIAL}'",
            Target(">=", 0.7),
        ),
        Row(
            section,
            f"subtract_many({BATCH} items)",
            "ops/s",
            rate["library"],
            rate["raw_subtract"],
            f"pipeline of {BATCH} EVALSHA subtract.lua, same args",
        ),
    ]


# --- 3. asyncio throughput ---------------------------------------------------------------------


async def async_throughput(
    url: str, trivial: Call, ns: str, sub_calls: list[Call], s: Settings
) -> list[Row]:
    progress(f"3. asyncio, {TASKS} tasks")
    aclient = AsyncCrediciClient.from_url(url, namespace=ns)
    bclient = AsyncCrediciClient.from_url(url, namespace=ns, batching=True)
    araw = raw_async(url)
    try:
        users = [f"{ns}-task{i}" for i in range(TASKS)]
        variants: dict[str, list[Callable[[], Awaitable[object]]]] = {
            "raw_trivial": [partial(send_async, araw, trivial) for _ in users],
            "raw_subtract": [partial(send_async, araw, call) for call in sub_calls],
            "subtract": [partial(aclient.subtract, user, 1) for user in users],
            "batched": [partial(bclient.subtract, user, 1) for user in users],
        }
        for fns in variants.values():  # opens the connections of each pool
            await throughput(fns, 0.3)
        totals = await interleaved_rounds(variants, s)
    finally:
        await aclient.aclose()
        await bclient.aclose()
        await araw.aclose()
    rate = {name: calls / elapsed for name, (calls, elapsed) in totals.items()}
    section = (
        f"3. asyncio throughput, {TASKS} tasks on {TASKS} users (one per task), "
        f"{s.async_rounds} x {s.async_seconds:g} s per variant"
    )
    trivial_baseline = f"{TASKS} tasks, EVALSHA '{TRIVIAL}'"
    return [
        Row(
            section,
            "subtract(u, 1)",
            "ops/s",
            rate["subtract"],
            rate["raw_trivial"],
            trivial_baseline,
            Target(">=", 0.8),
        ),
        Row(
            section,
            "subtract(u, 1)",
            "ops/s",
            rate["subtract"],
            rate["raw_subtract"],
            f"{TASKS} tasks, EVALSHA subtract.lua, same args",
        ),
        Row(
            section,
            "subtract(u, 1), batching=True",
            "ops/s",
            rate["batched"],
            rate["raw_trivial"],
            trivial_baseline,
            Target(">=", 2.0),
        ),
    ]


# --- 4. server side ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis() -> Iterator[int]:
    """A redis-server of our own on a free port, no persistence; stopped (and its files removed)
    on exit. A port taken between choosing and binding it just means another try."""
    with tempfile.TemporaryDirectory(prefix="credici-bench-") as directory:
        for _ in range(5):
            port = free_port()
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", directory],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            probe = redis.Redis(port=port, socket_connect_timeout=0.2)
            try:
                for _ in range(100):
                    if proc.poll() is not None:
                        break
                    try:
                        probe.ping()
                    except redis.ConnectionError:
                        time.sleep(0.05)
                        continue
                    yield port
                    return
            finally:
                probe.close()
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        raise RuntimeError("could not start a redis-server of our own")


def redis_benchmark(port: int, args: tuple[str | int, ...], requests: int) -> float:
    """Requests per second of `args` sent by redis-benchmark, BENCHMARK_CLIENTS connections, no
    pipelining. Arguments are passed as they are, empty strings included."""
    command = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests),
               "-c", str(BENCHMARK_CLIENTS), "-P", "1", "--csv", *map(str, args)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    table = list(csv.reader(line for line in out.stdout.splitlines() if line.strip()))
    header = next(i for i, row in enumerate(table) if row and row[0] == "test")
    return float(table[header + 1][table[header].index("rps")])


def redis_cli_first_line(port: int, args: tuple[str | int, ...]) -> str:
    command = ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *map(str, args)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else out.stderr


def server_side(trivial: Call, s: Settings) -> list[Row]:
    missing = [t for t in ("redis-server", "redis-benchmark", "redis-cli") if not shutil.which(t)]
    if missing:
        progress(f"4. server side skipped: {', '.join(missing)} not on PATH")
        return []
    progress(f"4. server side: redis-benchmark, {BENCHMARK_CLIENTS} clients")
    ns, user = "bench", "server-side-user"
    with private_redis() as port:
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis(port=port)
        with CrediciClient.from_url(url, namespace=ns) as client:
            # Real state through the library: one never-expiring bucket, a charge in history.
            client.add(user, PLENTY)
            client.subtract(user, 1)
            # The very call the library sends for subtract(user, 1) on the server's clock (FCALL
            # of the library's function, loaded by the calls above).
            req = charge.build_subtract(user, 1, None, None, None)
            sub_args = client.storage.ledger.call(charge.SUBTRACT, req).args
            for script in (charge.SUBTRACT.script, trivial.script):
                assert script is not None
                if r.script_load(script.source) != script.sha:
                    raise RuntimeError(f"Redis hashed {script.name} differently")
            # The same args by redis-cli first: the reply must be OK, not an error.
            first = redis_cli_first_line(port, sub_args)
            if first != "OK":
                raise RuntimeError(f"subtract.lua by redis-cli answered {first!r}, not OK")
            before = client.get_balance(user)
            rps: dict[str, list[float]] = {"trivial": [], "subtract": []}
            cpu: dict[str, list[float]] = {"trivial": [], "subtract": []}  # usec, calls, ...
            for _ in range(s.server_rounds):
                for name, args in (("trivial", trivial.args), ("subtract", sub_args)):
                    r.config_resetstat()
                    rps[name].append(redis_benchmark(port, args, s.server_requests))
                    stats = r.info("commandstats")
                    ran = [stats.get(f"cmdstat_{c}", {}) for c in ("evalsha", "fcall")]
                    cpu[name] += [
                        sum(x.get("usec", 0) for x in ran),
                        sum(x.get("calls", 0) for x in ran),
                    ]
            # Every request was a real charge: the balance fell by exactly the requests sent.
            charged = before - client.get_balance(user)
            if charged != s.server_requests * s.server_rounds:
                raise RuntimeError(f"redis-benchmark charged {charged}, not every request")
        r.close()
    mean = {name: sum(v) / len(v) for name, v in rps.items()}
    usec = {name: sum(v[0::2]) / sum(v[1::2]) for name, v in cpu.items()}
    section = (
        f"4. server side: redis-benchmark -c {BENCHMARK_CLIENTS} -P 1, "
        f"{s.server_rounds} x {s.server_requests:,} requests per script, on a redis-server "
        "of the benchmark's own"
    )
    return [
        Row(
            section,
            f"{sub_args[0]} subtract, 1 user",
            "req/s",
            mean["subtract"],
            mean["trivial"],
            f"EVALSHA '{TRIVIAL}'",
            Target(">=", 0.5),
        ),
        Row(
            section,
            f"{sub_args[0]} subtract, Redis CPU",
            "µs/call",
            usec["subtract"],
            usec["trivial"],
            f"EVALSHA '{TRIVIAL}' (INFO commandstats, same runs)",
        ),
    ]


HAND_WRITTEN = """local b = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = tonumber(ARGV[1])
if b < n then return {'INSUFFICIENT', b} end
redis.call('DECRBY', KEYS[1], n)
local id = redis.call('XADD', KEYS[2], '*', 'k', 's', 'n', -n, 'b', b - n)
return {'OK', id}
"""
"""What a careful user writes without this library: a balance, a check, a charge, a history
entry (GET, DECRBY, XADD: no expiry, no buckets, no idempotency, no limits)."""


def script_cpu(r: redis.Redis) -> tuple[int, int]:
    """(usec, calls) of every script call since the last CONFIG RESETSTAT."""
    stats = r.info("commandstats")
    ran = [stats.get(f"cmdstat_{c}", {}) for c in ("evalsha", "eval", "fcall")]
    return sum(x.get("usec", 0) for x in ran), sum(x.get("calls", 0) for x in ran)


def operation_cpu(s: Settings) -> list[Row]:
    """Redis CPU per call of every operation that writes (and two reads), the library's own
    client sending them one at a time, each user once per round (as an API's traffic: many users,
    none hot), against the hand-written script pipelined on one user (its best case)."""
    if not shutil.which("redis-server"):
        progress("4b. Redis CPU per operation skipped: redis-server not on PATH")
        return []
    n = max(200, s.server_requests // 40)
    progress(f"4b. Redis CPU per operation: {n:,} users, each operation once per user")
    with private_redis() as port:
        r = redis.Redis(port=port)
        sha = r.script_load(HAND_WRITTEN)
        users = [f"cpu-{i}" for i in range(n)]
        for u in users:
            r.set(f"hand:{{{u}}}:b", PLENTY)
        r.config_resetstat()  # as the library's calls below: one at a time, each user once
        for u in users:
            r.evalsha(sha, 2, f"hand:{{{u}}}:b", f"hand:{{{u}}}:h", 1)
        usec, calls = script_cpu(r)
        hand = usec / calls
        r.config_resetstat()  # its best case: pipelined, one hot user
        pipe = r.pipeline(transaction=False)
        for _ in range(n):
            pipe.evalsha(sha, 2, "hand:{u}:b", "hand:{u}:h", 1)
        pipe.execute()
        usec, calls = script_cpu(r)
        hand_hot = usec / calls
        with CrediciClient.from_url(f"redis://127.0.0.1:{port}/0", namespace="cpu") as c:
            c.add_many([(u, PLENTY) for u in users])
            holds: dict[str, Any] = {}
            charges: dict[str, Any] = {}
            ops: dict[str, Callable[[str], Any]] = {
                "add": lambda u: c.add(u, 5),
                "subtract": lambda u: charges.__setitem__(u, c.subtract(u, 1)),
                "subtract, keyed": lambda u: c.subtract(u, 1, idempotency_key=f"k-{u}"),
                "reserve": lambda u: holds.__setitem__(u, c.reserve(u, 3)),
                "capture (part)": lambda u: c.capture(holds[u].hold_id, 2),
                "reverse": lambda u: c.reverse(charges[u].transaction_id),
                "get_balance": lambda u: c.get_balance(u),
                "check": lambda u: c.check(u, 1),
            }
            cpu: dict[str, float] = {}
            for name, op in ops.items():
                r.config_resetstat()
                for u in users:
                    op(u)
                usec, calls = script_cpu(r)
                cpu[name] = usec / calls
            # The library's subtract in the hand-written script's best case: pipelined, one user.
            args = subtract_call(c, users[0], 1).args
            r.config_resetstat()
            pipe = r.pipeline(transaction=False)
            for _ in range(n):
                pipe.execute_command(*args)
            pipe.execute()
            usec, calls = script_cpu(r)
            hot = usec / calls
        r.close()
    section = (
        f"4b. Redis CPU per call (INFO commandstats) of each operation, {n:,} users each once, "
        "on a redis-server of our own; the hand-written script: GET, check, DECRBY, XADD, "
        "pipelined on one user"
    )
    rows = [
        Row(section, name, "µs/call", value, hand, "hand-written ledger script, the same way")
        for name, value in cpu.items()
    ]
    rows.append(
        Row(section, "subtract, pipelined, 1 user", "µs/call", hot, hand_hot,
            "hand-written ledger script, pipelined, 1 user", Target("<=", 2.0))
    )  # fmt: skip
    return rows


CHARGE_STEPS = (
    ("FCALL and its 12 keys, 8 arguments", "local function run_subtract()"),
    ("server clock (TIME)", "local now, amount = clock"),
    ("idempotency look-up (no key given)", "if prior then return prior end"),
    ("load the user, consistency check, due events", "if ask then return ask end"),
    ("limits (none set)", "if refused then return refused end"),
    ("take the credits from the bucket", "local parts = burn(st, amount)"),
)
"""Where section 4d cuts subtract.lua: each step ends after the line starting with the text given;
the last step (history entry, usage counts, state write, reply) is the whole script minus them."""


def cut_after(source: str, line_start: str) -> str:
    """The library `source` with run_subtract returning right after the line `line_start`."""
    body = source.index("local function run_subtract()")
    line = source.index(line_start, body)
    end = source.index("\n", line) + 1
    return source[:end] + "if true then return {'OK'} end\n" + source[end:]


def charge_profile(s: Settings) -> list[Row]:
    """Where the Redis CPU of one subtract goes: the library loaded with subtract.lua cut short
    after each step (one variant loaded at a time), pipelined on one user holding one bucket;
    a step's cost is the difference between the cuts around it (medians of interleaved rounds)."""
    if not shutil.which("redis-server"):
        progress("4d. charge profile skipped: redis-server not on PATH")
        return []
    n, rounds = (2_000, 9) if s is FULL else (1_000, 3)
    progress(f"4d. a subtract's Redis CPU by step: {len(CHARGE_STEPS) + 1} cuts, {rounds} rounds")
    cuts = [cut_after(LIBRARY.source, line) for _, line in CHARGE_STEPS] + [LIBRARY.source]
    with private_redis() as port:
        r = redis.Redis(port=port)
        sha = r.script_load(HAND_WRITTEN)
        r.set("hand:{u}:b", PLENTY)
        hand_args = ("EVALSHA", sha, 2, "hand:{u}:b", "hand:{u}:h", 1)
        with CrediciClient.from_url(f"redis://127.0.0.1:{port}/0", namespace="profile") as c:
            c.add("u", PLENTY)
            c.subtract("u", 1)
            args = subtract_call(c, "u", 1).args
        medians: list[list[float]] = [[] for _ in cuts]
        hand: list[float] = []

        def pipelined(call: tuple[Any, ...], count: int) -> float:
            r.config_resetstat()
            pipe = r.pipeline(transaction=False)
            for _ in range(count):
                pipe.execute_command(*call)
            replies = pipe.execute(raise_on_error=False)
            if not (isinstance(replies[-1], list) and replies[-1][0] == b"OK"):
                raise RuntimeError(f"charge profile: the call failed: {replies[-1]!r}")
            usec, calls = script_cpu(r)
            return usec / calls

        for i in range(rounds):
            hand.append(pipelined(hand_args, n))
            order = range(len(cuts)) if i % 2 == 0 else reversed(range(len(cuts)))
            for k in order:
                for lib in r.function_list():
                    r.function_delete(lib[1])
                name = f"credici_cut{k}"
                r.function_load(cuts[k].replace(LIBRARY.name, name))
                call = (args[0], f"{name}_subtract", *args[2:])
                pipelined(call, n // 4)  # warm-up: the garbage of the library replaced
                medians[k].append(pipelined(call, n))
        r.close()
    at = [sorted(m)[len(m) // 2] for m in medians]
    hand_us = sorted(hand)[len(hand) // 2]
    section = (
        "4d. where one subtract's Redis CPU goes (INFO commandstats): subtract.lua cut short after "
        f"each step, pipelined on one user with one bucket, medians of {rounds} rounds"
    )
    names = [name for name, _ in CHARGE_STEPS]
    names.append("history entry (XADD), usage counts, state write, reply")
    rows = [Row(section, names[0], "µs/call", at[0], hand_us, "hand-written ledger script, whole")]
    rows += [
        Row(section, names[k], "µs/call", max(at[k] - at[k - 1], 0.0), hand_us,
            "hand-written ledger script, whole")
        for k in range(1, len(at))
    ]  # fmt: skip
    rows.append(Row(section, "subtract, whole", "µs/call", at[-1], hand_us,
                    "hand-written ledger script, whole"))  # fmt: skip
    return rows


def _charge_loop(url: str, ns: str, worker: int, seconds: float, start: Any, out: Any) -> None:
    """One process of section 4c: sync subtracts on users of its own until `seconds` pass."""
    users = [f"proc{worker}-{i}" for i in range(64)]
    with CrediciClient.from_url(url, namespace=ns) as client:
        client.add_many([(u, PLENTY) for u in users])
        start.wait()
        done, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            client.subtract(users[done % len(users)], 1)
            done += 1
    out.put(done)


def _redis_cpu_seconds(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def process_throughput(s: Settings) -> list[Row]:
    """Charges/s on one Redis with N client processes (sync, one call at a time each), and the
    share of a core Redis used meanwhile: how far from saturating Redis the clients get."""
    if not shutil.which("redis-server"):
        progress("4c. throughput by processes skipped: redis-server not on PATH")
        return []
    seconds = 1.0 if s.server_rounds == 1 else 3.0
    progress(f"4c. throughput with 1, 2, 4 client processes, {seconds:g} s each")
    context = multiprocessing.get_context("fork")
    rates: dict[int, tuple[float, float]] = {}
    with private_redis() as port:
        url, r = f"redis://127.0.0.1:{port}/0", redis.Redis(port=port)
        for n in (1, 2, 4):
            start, out = context.Event(), context.Queue()
            procs = [
                context.Process(target=_charge_loop, args=(url, f"p{n}", w, seconds, start, out))
                for w in range(n)
            ]
            for proc in procs:
                proc.start()
            time.sleep(0.5 + 0.2 * n)  # each has made its users
            cpu0, t0 = _redis_cpu_seconds(r), time.monotonic()
            start.set()
            done = sum(out.get(timeout=120) for _ in procs)
            cpu1, t1 = _redis_cpu_seconds(r), time.monotonic()
            for proc in procs:
                proc.join()
            rates[n] = (done / seconds, (cpu1 - cpu0) / (t1 - t0))
        r.close()
    section = (
        f"4c. charges/s with N sync client processes (64 users each, {seconds:g} s), on a "
        "redis-server of our own sharing the machine's cores; Redis's CPU share of one core"
    )
    rows = []
    for n, (rate, share) in rates.items():
        rows.append(Row(section, f"{n} process(es)", "ops/s", rate, rates[1][0], "1 process"))
        rows.append(Row(section, f"{n} process(es), Redis CPU", "core", share, 1.0, "one core"))
    return rows


# --- 5. memory ---------------------------------------------------------------------------------


def memory_usage(raw: redis.Redis, keys: list[str]) -> list[int]:
    """MEMORY USAGE of each key, every element counted (SAMPLES 0); 0 for a missing key."""
    pipe = raw.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return [int(n or 0) for n in pipe.execute()]


def bare_charges(raw: redis.Redis, stream: str, ids: list[str]) -> None:
    pipe = raw.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xadd(stream, {"n": -1}, id=entry_id)
    pipe.execute()


def memory(client: CrediciClient, raw: redis.Redis, ns: str, s: Settings, url: str) -> list[Row]:
    progress("5. memory")
    # Per user: uuid4 ids (realistic key lengths), one never-expiring grant each.
    users = [str(uuid.uuid4()) for _ in range(s.memory_users)]
    results = client.add_many([(user, 1000) for user in users])
    if not all(isinstance(result, Transaction) for result in results):
        raise RuntimeError("add_many failed")
    keys = [_keys.user_keys(ns, user) for user in users]
    # The user's own keys; the slot's shared keys (events, archive outbox) are counted apart.
    shared = {"history", "events", "outbox"}
    state = memory_usage(
        raw,
        [k for uk in keys for name, k in zip(uk._fields, uk, strict=True) if name not in shared],
    )
    outboxes = sorted({uk.outbox for uk in keys})
    outbox_share = sum(memory_usage(raw, outboxes)) / len(users)
    streams = memory_usage(raw, [user_keys.history for user_keys in keys])
    counters = [f"{ns}:{{{_keys.user_tag(user)}}}:counter" for user in users]
    pipe = raw.pipeline(transaction=False)
    for key in counters:
        pipe.set(key, 1000)
    pipe.execute()
    counter = sum(memory_usage(raw, counters)) / len(users)
    per_user = sum(state) / len(users)
    with_stream = (sum(state) + sum(streams)) / len(users)
    # A user as one looks after some use: one bucket and its 10 most recent history entries.
    for _ in range(9):
        client.subtract_many([(user, 1) for user in users])
    own = [k for uk in keys for name, k in zip(uk._fields, uk, strict=True) if name not in shared]
    with_ten = (sum(memory_usage(raw, own)) + sum(
        memory_usage(raw, [uk.history for uk in keys]))) / len(users)  # fmt: skip

    # Per history entry: subtract entries a second apart (a steadily charged user), the growth
    # of the stream's MEMORY USAGE over `memory_entries` of them, after the first 1,000.
    user = f"{ns}-memory-history"
    stream = _keys.user_keys(ns, user).history
    warm, n = 1_000, s.memory_entries
    start = server_ms(raw) - 60_000 - (warm + n) * CHARGE_SPACING_MS
    send(raw, add_call(client, user, PLENTY, None, start - CHARGE_SPACING_MS))
    make = partial(subtract_call, client, user, 1)
    times = clocked(make, start, warm + n, CHARGE_SPACING_MS)
    fill(raw, charge.SUBTRACT.script, itertools.islice(times, warm))
    (before,) = memory_usage(raw, [stream])
    fill(raw, charge.SUBTRACT.script, times)
    (after,) = memory_usage(raw, [stream])
    per_entry = (after - before) / n

    # The raw baseline: a stream of bare charges (XADD <ms>-0 n -1), as far apart.
    bare = f"{ns}:bare-charges"
    ids = [f"{start + i * CHARGE_SPACING_MS}-0" for i in range(warm + n)]
    bare_charges(raw, bare, ids[:warm])
    (bare_before,) = memory_usage(raw, [bare])
    bare_charges(raw, bare, ids[warm:])
    (bare_after,) = memory_usage(raw, [bare])
    bare_entry = (bare_after - bare_before) / n

    # Usage rollups (issue 21): a user charged every 15 minutes for 30 days (UTC days); the
    # usage hash then holds 7 days of hour records and 30 day records: bytes per day of use,
    # against the history stream of the same days.
    days, spacing = 30, 15 * 60_000
    roll_user = f"{ns}-memory-rollups"
    roll_keys = _keys.user_keys(ns, roll_user)
    roll_n = days * 86_400_000 // spacing
    roll_start = server_ms(raw) - 60_000 - roll_n * spacing
    send(raw, add_call(client, roll_user, PLENTY, None, roll_start - spacing))
    make_roll = partial(subtract_call, client, roll_user, 1)
    fill(raw, charge.SUBTRACT.script, clocked(make_roll, roll_start, roll_n, spacing))
    rollup_bytes, roll_stream = memory_usage(raw, [roll_keys.usage, roll_keys.history])
    hour_records = raw.hlen(roll_keys.usage)

    # History retention (issue 21): a user charged every 5 minutes for 10,000 charges (35 days),
    # all its keys; then trim_history with a 7-day retention (a checkpoint, then the trim).
    kept_user = f"{ns}-memory-retention"
    kept_keys = _keys.user_keys(ns, kept_user)
    charges, every = 10_000, 5 * 60_000
    kept_start = server_ms(raw) - 60_000 - charges * every
    send(raw, add_call(client, kept_user, PLENTY, None, kept_start - every))
    make_kept = partial(subtract_call, client, kept_user, 1)
    fill(raw, charge.SUBTRACT.script, clocked(make_kept, kept_start, charges, every))
    private = [k for name, k in zip(kept_keys._fields, kept_keys, strict=True)
               if name not in ("events", "outbox")]  # fmt: skip
    untrimmed = sum(memory_usage(raw, private))
    with CrediciClient.from_url(url, namespace=ns, history_retention=timedelta(days=7)) as trimming:
        report = trimming.trim_history(kept_user)
        while report.more:
            report = trimming.trim_history(kept_user)
    trimmed = sum(memory_usage(raw, private))
    kept_entries = raw.xlen(kept_keys.history)

    section = (
        f"5. memory, MEMORY USAGE ... SAMPLES 0: {s.memory_users:,} users (uuid4 ids) with one "
        f"never-expiring bucket; {n:,} history entries"
    )
    return [
        Row(
            section,
            "per user, own keys (no history)",
            "bytes",
            per_user,
            counter,
            "SET <user key> 1000 (a string counter per user)",
            Target("<=", 400, on="value", unit=" B"),
        ),
        Row(
            section,
            "per user, with its 1-entry history",
            "bytes",
            with_stream,
            counter,
            "SET <user key> 1000 (a string counter per user)",
        ),
        Row(
            section,
            "per user, 1 bucket, 10 history entries",
            "bytes",
            with_ten,
            counter,
            "SET <user key> 1000 (a string counter per user)",
            Target("<=", 1000, on="value", unit=" B"),
        ),
        Row(
            section,
            f"+ slot outbox share, {len(outboxes)} slots",
            "bytes",
            outbox_share,
            counter,
            "SET <user key> 1000 (a string counter per user)",
        ),
        Row(
            section,
            f"usage rollups per user per day ({hour_records} records)",
            "bytes",
            rollup_bytes / days,
            roll_stream / days,
            f"the history stream of those days ({roll_n // days} charges a day, 30 days)",
        ),
        Row(
            section,
            f"per user after {charges:,} charges (35 days), no retention",
            "bytes",
            untrimmed,
            untrimmed,
            "itself",
        ),
        Row(
            section,
            f"the same, 7-day retention ({kept_entries:,} entries kept)",
            "bytes",
            trimmed,
            untrimmed,
            "no retention",
        ),
        Row(
            section,
            "per history entry (subtract, 1/s)",
            "bytes",
            per_entry,
            bare_entry,
            "XADD <ms>-0 n -1 (a stream of bare charges)",
            Target("<=", 150, on="value", unit=" B"),
        ),
    ]


# --- 6. cost growth ----------------------------------------------------------------------------


def bucket_growth(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> list[Row]:
    progress("6. cost growth: buckets")
    # N buckets of BUCKET_CREDITS, distinct expiries far in the future: subtract(1) takes from
    # the soonest-expiring one and never empties it, so the bucket count stays N throughout.
    far = datetime(2100, 1, 1, tzinfo=timezone.utc)
    users = {n: f"{ns}-buckets{n}" for n in BUCKET_COUNTS}
    for n, user in users.items():
        for chunk in range(0, n, 500):
            grants = [
                (user, BUCKET_CREDITS, far + timedelta(minutes=i))
                for i in range(chunk, min(n, chunk + 500))
            ]
            if not all(isinstance(t, Transaction) for t in client.add_many(grants)):
                raise RuntimeError(f"granting {user} failed")
        amounts = _keys.user_keys(ns, user).amounts
        if raw.hlen(amounts) != n:
            raise RuntimeError(f"{user} has {raw.hlen(amounts)} buckets, not {n}")
    samples = interleaved(
        {
            "trivial": partial(send, raw, trivial),
            **{str(n): partial(client.subtract, user, 1) for n, user in users.items()},
        },
        s.growth_calls,
        s.warmup,
        s.rounds,
    )
    for n, user in users.items():
        if raw.hlen(_keys.user_keys(ns, user).amounts) != n:
            raise RuntimeError(f"{user} no longer has {n} buckets")
    section = (
        f"6a. cost growth: subtract(u, 1) p50, a user with N buckets of {BUCKET_CREDITS:,} "
        f"credits (distinct expiries), {s.growth_calls:,} calls each"
    )
    p50 = {n: percentile(samples[str(n)], 50) for n in BUCKET_COUNTS}
    rows = [
        Row(
            section,
            f"subtract, {n:,} bucket{'s' if n > 1 else ''}",
            "p50 µs",
            p50[n],
            percentile(samples["trivial"], 50),
            f"EVALSHA '{TRIVIAL}'",
        )
        for n in BUCKET_COUNTS
    ]
    one = BUCKET_COUNTS[0]
    rows += [
        Row(
            section,
            f"subtract, {n:,} vs {one} bucket",
            "p50 µs",
            p50[n],
            p50[one],
            f"the library's subtract with {one} bucket",
            Target("<=", 1.3),
        )
        for n in BUCKET_COUNTS[1:]
    ]
    return rows


def balance_growth(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> list[Row]:
    progress(f"6. cost growth: get_balance, {s.big_history:,} history entries")
    # Adds of 1 credit expiring in 30 days: the big user has `big_history` history entries, as
    # many buckets and as many entries in the expiry index, all of which get_balance must ignore.
    ttl = timedelta(days=30)
    sizes = {"small": 10, "big": s.big_history}
    users = {name: f"{ns}-hist{n}" for name, n in sizes.items()}
    for name, user in users.items():
        call = add_call(client, user, 1, ttl)
        fill(raw, charge.ADD.script, itertools.repeat(call.args, sizes[name]))
        stream = raw.xlen(_keys.user_keys(ns, user).history)
        if stream != sizes[name] or client.get_balance(user) != sizes[name]:
            raise RuntimeError(f"filling {user} gave {stream} history entries, not {sizes[name]}")
    samples = interleaved(
        {
            "raw_trivial": partial(send, raw, trivial),
            "small": partial(client.get_balance, users["small"]),
            "big": partial(client.get_balance, users["big"]),
        },
        s.growth_calls,
        s.warmup,
        s.rounds,
    )
    section = (
        f"6b. cost growth: get_balance(u) p50, history of adds of 1 credit (each its own bucket "
        f"expiring in 30 days), {s.growth_calls:,} calls each"
    )
    trivial_p50 = percentile(samples["raw_trivial"], 50)
    small, big = percentile(samples["small"], 50), percentile(samples["big"], 50)
    return [
        *(
            Row(
                section,
                f"get_balance, {n:,} entries",
                "p50 µs",
                value,
                trivial_p50,
                f"EVALSHA '{TRIVIAL}'",
            )
            for n, value in ((sizes["small"], small), (sizes["big"], big))
        ),
        Row(
            section,
            f"get_balance, {sizes['big']:,} vs {sizes['small']} entries",
            "p50 µs",
            big,
            small,
            f"the library's get_balance with {sizes['small']} entries (expected ~1x)",
        ),
    ]


def period_growth(
    client: CrediciClient, raw: redis.Redis, trivial: Call, ns: str, s: Settings
) -> list[Row]:
    sizes = {"small": s.period_small, "big": s.period_big}
    users = {name: f"{ns}-period{n}" for name, n in sizes.items()}
    windows: dict[str, tuple[datetime, datetime]] = {}
    raw_windows: dict[str, Call] = {}
    for name, user in users.items():
        progress(f"6. cost growth: period query, filling {sizes[name]:,} history entries")
        started = time.perf_counter()
        # One subtract per millisecond; the window: PERIOD_WINDOW of them, mid-history.
        first = clocked_history(client, raw, user, sizes[name], 1)
        low = first + sizes[name] // 2
        high = low + PERIOD_WINDOW - 1
        windows[name] = (
            datetime.fromtimestamp(low / 1000, timezone.utc),
            datetime.fromtimestamp(high / 1000, timezone.utc),
        )
        stream = _keys.user_keys(ns, user).history
        raw_windows[name] = Call(("XREVRANGE", stream, str(high), str(low), "COUNT", 1000))
        found = client.get_user_transactions_for_period(user, *windows[name])
        if len(found) != PERIOD_WINDOW or len(send(raw, raw_windows[name])) != PERIOD_WINDOW:
            raise RuntimeError(f"the window of {user} holds {len(found)} entries")
        progress(f"   filled in {time.perf_counter() - started:.1f} s")
    samples = interleaved(
        {
            "raw_trivial": partial(send, raw, trivial),
            **{f"raw {name}": partial(send, raw, call) for name, call in raw_windows.items()},
            **{
                name: partial(client.get_user_transactions_for_period, user, *windows[name])
                for name, user in users.items()
            },
        },
        s.growth_calls,
        s.warmup,
        s.rounds,
    )
    section = (
        f"6c. cost growth: get_user_transactions_for_period p50, a {PERIOD_WINDOW} ms window "
        f"({PERIOD_WINDOW} entries) mid-history, {s.growth_calls:,} calls each"
    )
    p50 = {name: percentile(found, 50) for name, found in samples.items()}
    rows = []
    for name in sizes:
        label = f"period query, {sizes[name]:,} entries"
        rows += [
            Row(section, label, "p50 µs", p50[name], p50["raw_trivial"], f"EVALSHA '{TRIVIAL}'"),
            Row(section, label, "p50 µs", p50[name], p50[f"raw {name}"], "XREVRANGE, same window"),
        ]
    rows.append(
        Row(
            section,
            f"period query, {sizes['big']:,} vs {sizes['small']:,}",
            "p50 µs",
            p50["big"],
            p50["small"],
            f"the library's query in {sizes['small']:,} entries (expected ~1x)",
        )
    )
    return rows


def history_read(client: CrediciClient, raw: redis.Redis, ns: str, s: Settings) -> list[Row]:
    """Peak Python heap (tracemalloc) of reading a long history: page by page with
    iter_user_transactions, against the whole list of get_all_user_transactions."""
    import tracemalloc

    user = f"{ns}-longhistory"
    progress(f"6d. history read: filling {s.history_read:,} entries")
    clocked_history(client, raw, user, s.history_read, 1)
    peaks: dict[str, float] = {}
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}

    def whole() -> int:
        return len(client.get_all_user_transactions(user))

    def paged() -> int:
        return sum(1 for _ in client.iter_user_transactions(user, page_size=1000))

    def audit() -> int:  # the audit: the history replayed page by page as it is read
        report = client.audit(user)
        if not report.ok:
            raise RuntimeError(f"the audit found problems: {report.problems[:3]}")
        return report.entries

    def audit_whole() -> int:  # the audit before: every entry in memory, then the replay
        keys = _keys.user_keys(ns, user)
        entries, start = [], "-"
        while True:
            page = raw.xrange(keys.history, start, "+", count=1000)
            entries.extend((text(i), stream_fields(f)) for i, f in page)
            if len(page) < 1000:
                break
            start = "(" + text(page[-1][0])
        buckets = {text(b): int(n) for b, n in raw.hgetall(keys.amounts).items()}
        balance = int(raw.hget(keys.state, "bal") or 0)
        return _audit.replay(user, entries, balance, buckets).entries

    for name, read in (
        ("whole", whole),
        ("paged", paged),
        ("audit_whole", audit_whole),
        ("audit", audit),
    ):
        progress(f"   reading {s.history_read:,} entries: {name}")
        gc.collect()
        tracemalloc.start()
        started = time.perf_counter()
        counts[name] = read()
        seconds[name] = time.perf_counter() - started
        peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    if len({*counts.values(), s.history_read + 1}) != 1:
        raise RuntimeError(f"history reads disagree: {counts}")
    section = (
        f"6d. history read of one user with {s.history_read + 1:,} entries: peak Python heap "
        "(tracemalloc) and time"
    )
    baseline = "get_all_user_transactions (the whole list)"
    before = "the whole history in memory, then replayed (the audit before)"
    return [
        Row(section, "iter_user_transactions (pages 1,000)", "peak MiB", peaks["paged"],
            peaks["whole"], baseline, Target("<=", 32, on="value", unit=" MiB")),
        Row(section, "iter_user_transactions (pages 1,000)", "s", seconds["paged"],
            seconds["whole"], baseline),
        Row(section, "audit (replayed page by page)", "peak MiB", peaks["audit"],
            peaks["audit_whole"], before, Target("<=", 32, on="value", unit=" MiB")),
        Row(section, "audit (replayed page by page)", "s", seconds["audit"],
            seconds["audit_whole"], before),
    ]  # fmt: skip


def reserve_call(client: CrediciClient, user: str, ttl: timedelta, now_ms: int) -> Call:
    req = hold_ops.build_reserve(user, 1, ttl, None, None, now_ms)
    return first_call(client.storage.ledger.execute(hold_ops.RESERVE, req))


def _ping_loop(port: int, stop: Any, worst: Any) -> None:
    with redis.Redis(port=port, socket_timeout=60) as r:
        r.ping()
        while not stop.is_set():
            started = time.perf_counter()
            r.ping()
            worst.value = max(worst.value, time.perf_counter() - started)


class PingWatch:
    """Another client PINGing the same Redis from a process of its own (no GIL shared with
    the client measured), as fast as it can: the slowest reply is how long everyone else
    waited while a script ran."""

    def __init__(self, port: int) -> None:
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._worst = context.Value("d", 0.0)
        self._process = context.Process(
            target=_ping_loop, args=(port, self._stop, self._worst), daemon=True
        )

    @property
    def worst(self) -> float:
        return float(self._worst.value)

    def __enter__(self) -> PingWatch:
        self._process.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._process.join()


def longest_script_us(r: redis.Redis) -> int:
    """The longest script (FCALL or EVALSHA) in the slow log (every command is logged)."""
    entries = r.slowlog_get(100_000)
    scripts = [e for e in entries if e["command"].upper().startswith((b"EVALSHA", b"FCALL"))]
    return max((int(e["duration"]) for e in scripts), default=0)


def pathological(s: Settings) -> list[Row]:
    """The users that used to stop Redis for everyone: a 1 ms renewing cycle idle for 30 days,
    many buckets expiring together, many holds falling due together; then one get_balance. On
    a redis-server of our own (the slow log is reset and logs every command)."""
    rows: list[Row] = []
    section = (
        "6e. pathological users: the longest script (SLOWLOG) and the worst PING of another "
        "client while one get_balance catches the user up (target: no script over 5 ms)"
    )
    with private_redis() as port:
        url = f"redis://127.0.0.1:{port}/0"
        raw = redis.Redis(port=port)
        now = [server_ms(raw)]
        clock = lambda: datetime.fromtimestamp(now[0] / 1000, timezone.utc)  # noqa: E731
        client = CrediciClient.from_url(url, namespace="patho", clock=clock)
        try:
            # The baseline: an ordinary user's get_balance (one bucket, nothing due).
            client.add("ordinary", 10)
            raw.config_set("slowlog-log-slower-than", 0)
            raw.config_set("slowlog-max-len", 100_000)
            raw.slowlog_reset()
            with PingWatch(port) as idle:
                started = time.perf_counter()
                client.get_balance("ordinary")
                ordinary_s = time.perf_counter() - started
                time.sleep(0.3)
            ordinary_us = longest_script_us(raw)

            def tiny_cycle() -> None:
                client.start_cycle(10, timedelta(milliseconds=1), "tiny", renew=True)
                now[0] += 30 * 86_400_000

            def buckets() -> None:
                fill(raw, charge.ADD.script, clocked(
                    lambda ms: add_call(client, "buckets", 1, timedelta(hours=1), ms),
                    now[0], s.pathological, 0))  # fmt: skip
                now[0] += 2 * 3_600_000

            def holds() -> None:
                client.add("holds", s.pathological)
                fill(raw, hold_ops.RESERVE.script, clocked(
                    lambda ms: reserve_call(client, "holds", timedelta(hours=1), ms),
                    now[0], s.pathological, 0))  # fmt: skip
                now[0] += 2 * 3_600_000

            cases = [
                ("1 ms renewing cycle, idle 30 days", tiny_cycle),
                (f"{s.pathological:,} buckets expiring at once", buckets),
                (f"{s.pathological:,} holds falling due at once", holds),
            ]
            user = {0: "tiny", 1: "buckets", 2: "holds"}
            for i, (label, prepare) in enumerate(cases):
                progress(f"6e. pathological users: {label}")
                prepare()
                raw.config_set("slowlog-log-slower-than", 0)
                raw.config_set("slowlog-max-len", 100_000)
                raw.slowlog_reset()
                with PingWatch(port) as busy:
                    started = time.perf_counter()
                    client.get_balance(user[i])
                    took = time.perf_counter() - started
                longest = longest_script_us(raw)
                raw.config_set("slowlog-log-slower-than", 10_000)
                rows += [
                    Row(section, label, "max µs", longest, ordinary_us,
                        "longest script: an ordinary user's get_balance",
                        Target("<=", 5000, on="value", unit=" µs")),
                    Row(section, label, "PING ms", busy.worst * 1000, idle.worst * 1000,
                        "worst PING of another client meanwhile (vs an ordinary get_balance)"),
                    Row(section, label, "s", took, ordinary_s,
                        "the whole get_balance, every step (vs an ordinary one)"),
                ]  # fmt: skip
        finally:
            client.close()
            raw.close()
    return rows


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


def verdict(row: Row) -> str:
    if row.target is None:
        return ""
    return f"{row.target.label()} {'PASS' if row.passed else 'MISS'}"


def render(info: dict[str, Any], mode: str, ns: str, rows: list[Row]) -> str:
    lines = [
        f"credici-redis benchmark ({mode} run, namespace {ns})",
        f"machine: {info['cpu_count']} CPUs shared by this client and Redis, 1-min load "
        f"{info['load_average_1m_start']} at start, {info['load_average_1m_end']} at end",
        f"versions: Python {info['python']} | "
        f"redis-py {info['redis_py']} ({'hiredis' if info['hiredis'] else 'no hiredis'}) | "
        f"pydantic {info['pydantic']} | Redis {info['redis_server']} at {info['redis_url']}",
        "raw = the baseline named on the right, measured in the same run (redis-py on its own "
        "pool with the library's client settings unless named); ratio = library / raw",
        "",
        f"  {'operation':<36} {'stat':<7} {'library':>10} {'raw':>10} {'ratio':>7}  "
        f"{'target':<15} raw baseline",
    ]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(section)
        fmt = "{:>10,.0f}" if row.stat in ("ops/s", "req/s", "bytes") else "{:>10,.1f}"
        lines.append(
            f"  {row.operation:<36} {row.stat:<7} {fmt.format(row.library)} "
            f"{fmt.format(row.raw)} {row.ratio:>6.2f}x  {verdict(row):<15} {row.baseline}"
        )
    targeted = [row for row in rows if row.target is not None]
    missed = [row for row in targeted if not row.passed]
    lines += ["", f"targets: {len(targeted) - len(missed)} of {len(targeted)} PASS"]
    for row in missed:
        assert row.target is not None
        if row.target.on == "ratio":
            figure = f"{row.ratio:.2f}x"
        else:
            figure = f"{row.library:,.0f}{row.target.unit}"
        section = row.section.split(" ")[0]
        lines.append(f"  MISS {section} {row.operation}: {figure}, target {row.target.label()}")
    return "\n".join(lines)


# --- 7. PostgreSQL side by side -----------------------------------------------------------------

PG_THREADS = 8


def storage_workload(url: str, ns: str, calls: int, seconds: float) -> dict[str, float]:
    """p50/p99 (µs) of sequential subtract, add and get_balance, and subtract ops/s of
    PG_THREADS threads on a user each, on the storage `url` names."""
    import threading

    figures: dict[str, float] = {}
    with CrediciClient.from_url(url, namespace=ns) as client:
        user = f"{ns}-pg"
        client.add(user, PLENTY)
        samples = interleaved(
            {
                "subtract": partial(client.subtract, user, 1),
                "add": partial(client.add, user, 1),
                "get_balance": partial(client.get_balance, user),
            },
            calls,
            max(10, calls // 10),
            5,
        )
        for name, found in samples.items():
            figures[f"{name} p50"] = percentile(found, 50)
            figures[f"{name} p99"] = percentile(found, 99)
        users = [f"{ns}-thread{i}" for i in range(PG_THREADS)]
        for u in users:
            client.add(u, PLENTY)
        counts = [0] * PG_THREADS
        deadline = time.perf_counter() + seconds

        def work(i: int) -> None:
            while time.perf_counter() < deadline:
                client.subtract(users[i], 1)
                counts[i] += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(PG_THREADS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures["threads"] = sum(counts) / (time.perf_counter() - start)
    return figures


def postgres_side_by_side(redis_url: str, postgres_url: str, ns: str, s: Settings) -> list[Row]:
    from credici_redis.postgres import PostgresStorage

    calls = max(100, s.calls // 20)
    seconds = s.async_seconds * 2
    progress(f"7. PostgreSQL side by side ({calls} calls per operation, {seconds:g} s threads)")
    on_redis = storage_workload(redis_url, ns, calls, seconds)
    try:
        on_postgres = storage_workload(postgres_url, ns, calls, seconds)
    finally:
        cleanup = PostgresStorage.from_url(postgres_url, ns)
        try:
            cleanup.sql(cleanup.postgres.delete_namespace())
        finally:
            cleanup.close()
    section = "7. PostgreSQL side by side (library = PostgresStorage, raw = RedisStorage)"
    baseline = "the same calls on RedisStorage"
    rows = [
        Row(section, f"sync {name}", "p50 µs" if "p50" in name else "p99 µs", value, on_redis[name],
            baseline)
        for name, value in on_postgres.items()
        if name != "threads"
    ]  # fmt: skip
    rows.append(
        Row(section, f"subtract, {PG_THREADS} threads", "ops/s", on_postgres["threads"],
            on_redis["threads"], baseline)
    )  # fmt: skip
    return rows


# --- 8. limits (issue 17) ----------------------------------------------------------------------

LIMIT_RATE = 100_000
"""Section 8's rate: credits per second, burst the same. No run comes near it (nor the budget),
so every charge is accepted on both sides, and the limits are checked and used on every call."""
LIMIT_BUDGET = 10**12
"""Section 8's budget: credits per calendar day (UTC); the `limits` library's fixed window too."""
LIMIT_VARIANTS = ("plain", "own", "rate", "default", "two", "three")
"""plain: no limits; own: set_limits(rate, budget); rate: set_limits(rate) alone; default: the
user of a client with default_limits=Limits(rate, budget); two: the `limits` library's moving
window hit, then a plain subtract; three: its moving window and fixed window (day) hits, then a
plain subtract. Every variant has users of its own."""


def limit_specs() -> tuple[RateLimit, Budget]:
    return RateLimit(LIMIT_RATE, timedelta(seconds=1)), Budget(LIMIT_BUDGET, "day")


def limit_rows(section: str, stats: dict[str, dict[str, float]]) -> list[Row]:
    """Each limited charge against the plain one, then against the two-library setups; stats:
    the figure of each variant, per stat."""
    plain = "subtract(u, 1), no limits, same client"
    two = "`limits` moving window hit + subtract (2 round trips)"
    three = "`limits` moving + fixed (day) window hits + subtract (3)"
    comparisons = [
        ("subtract, own rate+budget", "own", "plain", plain),
        ("subtract, own rate only", "rate", "plain", plain),
        ("subtract, default_limits rate+budget", "default", "plain",
         "subtract(u, 1), no limits (client without defaults)"),
        ("subtract, own rate+budget", "own", "two", two),
        ("subtract, own rate only", "rate", "two", two),
        ("subtract, own rate+budget", "own", "three", three),
    ]  # fmt: skip
    return [
        Row(section, label, stat, figures[ours], figures[theirs], baseline)
        for label, ours, theirs, baseline in comparisons
        for stat, figures in stats.items()
        if ours in figures and theirs in figures
    ]


def check_budget_used(found: dict[str, int], expected: dict[str, int]) -> None:
    """Every measured charge was counted in its user's budget: the limits were in effect (a
    budget period that ended meanwhile, at midnight UTC, makes the count smaller: not checked)."""
    for user, used in found.items():
        if used != expected[user]:
            raise RuntimeError(f"{user}: budget_used {used}, not the {expected[user]} charges made")


@contextlib.contextmanager
def sync_limit_variants(
    client: CrediciClient, url: str, ns: str
) -> Iterator[tuple[dict[str, Callable[[], object]], Callable[[dict[str, int]], None]]]:
    """The variants' sync calls, on a user of their own each (LIMIT_VARIANTS; the `limits`
    library's two only when it is installed), and a check to call afterwards with the number
    of calls made per variant: each was counted in the budget (ours, and the fixed window)."""
    rate, budget = limit_specs()
    users = {name: f"{ns}-limits-{name}" for name in LIMIT_VARIANTS}
    dclient = CrediciClient.from_url(
        url, namespace=ns, default_limits=Limits(rate=rate, budget=budget)
    )
    pool = None
    try:
        client.add_many([(user, PLENTY) for user in users.values()])
        client.set_limits(users["own"], rate=rate, budget=budget)
        client.set_limits(users["rate"], rate=rate)
        ops: dict[str, Callable[[], object]] = {
            "plain": partial(client.subtract, users["plain"], 1),
            "own": partial(client.subtract, users["own"], 1),
            "rate": partial(client.subtract, users["rate"], 1),
            "default": partial(dclient.subtract, users["default"], 1),
        }
        fixed_used: Callable[[], int] | None = None
        try:
            from limits import RateLimitItemPerDay, RateLimitItemPerSecond
            from limits.storage import RedisStorage
            from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
        except ImportError:
            progress("8. the `limits` library is not installed: its rows are skipped")
        else:
            # Its own pool, with the settings of the library's (two libraries, two pools).
            pool = redis.BlockingConnectionPool.from_url(url, **_pool_options())
            storage = RedisStorage(url, connection_pool=pool, key_prefix=f"{ns}:limits")
            moving = MovingWindowRateLimiter(storage)
            fixed = FixedWindowRateLimiter(storage)
            per_second = RateLimitItemPerSecond(LIMIT_RATE)
            per_day = RateLimitItemPerDay(LIMIT_BUDGET)

            def two(user: str = users["two"]) -> None:
                if not moving.hit(per_second, user):
                    raise RuntimeError("the `limits` moving window refused a hit")
                client.subtract(user, 1)

            def three(user: str = users["three"]) -> None:
                if not (moving.hit(per_second, user) and fixed.hit(per_day, user)):
                    raise RuntimeError("the `limits` windows refused a hit")
                client.subtract(user, 1)

            def fixed_used(user: str = users["three"]) -> int:
                return LIMIT_BUDGET - fixed.get_window_stats(per_day, user).remaining

            ops["two"], ops["three"] = two, three
        period = client.get_limits(users["own"]).budget_resets_at

        def check(made: dict[str, int]) -> None:
            after = {"own": client.get_limits(users["own"]),
                     "default": dclient.get_limits(users["default"])}  # fmt: skip
            if all(lim.budget_resets_at == period for lim in after.values()):
                check_budget_used({name: lim.budget_used for name, lim in after.items()}, made)
                if fixed_used is not None:
                    check_budget_used({"three": fixed_used()}, made)

        yield ops, check
    finally:
        dclient.close()
        if pool is not None:
            pool.disconnect()


def limits_sync(client: CrediciClient, url: str, ns: str, s: Settings) -> list[Row]:
    """Sync latency of a charge under limits against a plain one, and against the `limits`
    library's rate limiter before a plain charge; all variants in alternating blocks."""
    progress("8. limits: sync latency")
    with sync_limit_variants(client, url, ns) as (ops, check):
        samples = interleaved(ops, s.calls, s.warmup, s.rounds)
        check({name: s.warmup + len(found) for name, found in samples.items()})
    section = (
        f"8. limits (issue 17): subtract(u, 1) under a rate ({LIMIT_RATE:,}/s) and a budget "
        f"({LIMIT_BUDGET:.0e}/day), against none and against the `limits` library's rate "
        f"limiter before a plain subtract; sync, one connection, {s.calls:,} calls per variant"
    )
    stats = {
        f"p{p} µs": {name: percentile(found, p) for name, found in samples.items()}
        for p in (50, 99)
    }
    return limit_rows(section, stats)


def limits_server_cpu(s: Settings) -> list[Row]:
    """Redis's own CPU time per charge of each variant (INFO commandstats: the EVALSHA calls,
    which include the commands their scripts run), on a redis-server of our own: what the
    limits cost the one resource every client shares, apart from the client-side noise."""
    if not shutil.which("redis-server"):
        progress("8. limits: Redis CPU skipped: redis-server not on PATH")
        return []
    progress("8. limits: Redis CPU per charge, on a redis-server of our own")
    calls = max(1, s.growth_calls // s.rounds)
    cpu: dict[str, list[int]] = {}
    with private_redis() as port:
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis(port=port)
        with (
            CrediciClient.from_url(url, namespace="bench") as client,
            sync_limit_variants(client, url, "bench") as (ops, check),
        ):
            for fn in ops.values():  # loads the scripts, asks the budget period
                timed(fn, s.warmup, [])
            cpu = {name: [0, 0] for name in ops}  # usec, charges
            for _ in range(s.rounds):
                for name, fn in ops.items():
                    r.config_resetstat()
                    for _ in range(calls):
                        fn()
                    stats = r.info("commandstats")
                    cpu[name][0] += sum(
                        int(stats.get(f"cmdstat_{command}", {}).get("usec", 0))
                        for command in ("evalsha", "eval", "fcall")
                    )
                    cpu[name][1] += calls
            check({name: s.warmup + charges for name, (_, charges) in cpu.items()})
        r.close()
    section = (
        f"8. limits (issue 17): Redis CPU per charge (INFO commandstats, every script call of the "
        f"variant), {s.rounds} x {calls:,} charges per variant, on a redis-server of our own"
    )
    return limit_rows(section, {"µs/call": {n: u / c for n, (u, c) in cpu.items()}})


async def limits_async(url: str, ns: str, s: Settings) -> list[Row]:
    """Throughput of the same variants: TASKS tasks per variant, each on a user of its own,
    variants alternating over the rounds (as section 3)."""
    progress(f"8. limits: asyncio, {TASKS} tasks")
    rate, budget = limit_specs()
    users = {name: [f"{ns}-alimits-{name}{i}" for i in range(TASKS)] for name in LIMIT_VARIANTS}
    aclient = AsyncCrediciClient.from_url(url, namespace=ns)
    dclient = AsyncCrediciClient.from_url(
        url, namespace=ns, default_limits=Limits(rate=rate, budget=budget)
    )
    pool = None
    try:
        await aclient.add_many([(user, PLENTY) for group in users.values() for user in group])
        for user in users["own"]:
            await aclient.set_limits(user, rate=rate, budget=budget)
        for user in users["rate"]:
            await aclient.set_limits(user, rate=rate)
        variants: dict[str, list[Callable[[], Awaitable[object]]]] = {
            "plain": [partial(aclient.subtract, user, 1) for user in users["plain"]],
            "own": [partial(aclient.subtract, user, 1) for user in users["own"]],
            "rate": [partial(aclient.subtract, user, 1) for user in users["rate"]],
            "default": [partial(dclient.subtract, user, 1) for user in users["default"]],
        }
        try:
            from limits import RateLimitItemPerDay, RateLimitItemPerSecond
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
        except ImportError:
            pass  # said by limits_sync
        else:
            # redis.asyncio, as the library's client, on a pool of its own with the same settings.
            pool = redis.asyncio.BlockingConnectionPool.from_url(url, **_pool_options(asyncio=True))
            storage = RedisStorage(f"async+{url}", implementation="redispy",
                                   connection_pool=pool, key_prefix=f"{ns}:limits")  # fmt: skip
            moving = MovingWindowRateLimiter(storage)
            fixed = FixedWindowRateLimiter(storage)
            per_second = RateLimitItemPerSecond(LIMIT_RATE)
            per_day = RateLimitItemPerDay(LIMIT_BUDGET)

            async def two(user: str) -> None:
                if not await moving.hit(per_second, user):
                    raise RuntimeError("the `limits` moving window refused a hit")
                await aclient.subtract(user, 1)

            async def three(user: str) -> None:
                if not (await moving.hit(per_second, user) and await fixed.hit(per_day, user)):
                    raise RuntimeError("the `limits` windows refused a hit")
                await aclient.subtract(user, 1)

            variants["two"] = [partial(two, user) for user in users["two"]]
            variants["three"] = [partial(three, user) for user in users["three"]]
        made = dict.fromkeys(variants, 0)
        for name, fns in variants.items():  # opens the connections, asks the budget periods
            made[name] += (await throughput(fns, 0.3))[0]
        period = (await aclient.get_limits(users["own"][0])).budget_resets_at
        totals = await interleaved_rounds(variants, s)
        for name, (calls, _) in totals.items():
            made[name] += int(calls)
        after = {
            name: [await client.get_limits(user) for user in users[name]]
            for name, client in (("own", aclient), ("default", dclient))
        }
        if all(lim.budget_resets_at == period for group in after.values() for lim in group):
            check_budget_used(
                {name: sum(lim.budget_used for lim in group) for name, group in after.items()},
                made,
            )
            if "three" in variants:
                windows = [await fixed.get_window_stats(per_day, user) for user in users["three"]]
                check_budget_used({"three": sum(LIMIT_BUDGET - w.remaining for w in windows)}, made)
    finally:
        await aclient.aclose()
        await dclient.aclose()
        if pool is not None:
            await pool.aclose()
    rate_of = {name: calls / elapsed for name, (calls, elapsed) in totals.items()}
    section = (
        f"8. limits (issue 17), the same variants under asyncio: {TASKS} tasks per variant on "
        f"{TASKS} users of its own, {s.async_rounds} x {s.async_seconds:g} s per variant"
    )
    return limit_rows(section, {"ops/s": rate_of})


def member_variants(client: CrediciClient, ns: str) -> dict[str, Callable[[], object]]:
    """Section 9's calls, on a pool of their own each: a plain subtract, a member's charge
    without a cap, and one under a cap (a calendar day in a zone that is not UTC)."""
    pools = {name: f"{ns}-pool-{name}" for name in ("plain", "member", "capped", "source")}
    client.add_many([(pool, PLENTY) for pool in pools.values()])
    client.set_member_cap(pools["capped"], "alice", Budget(PLENTY, "day", "Asia/Kolkata"))
    destination = f"{ns}-destination"
    assert _keys.user_slot(pools["source"]) != _keys.user_slot(destination)  # across slots
    return {
        "plain": partial(client.subtract, pools["plain"], 1),
        "member": partial(client.subtract, pools["member"], 1, member="alice"),
        "capped": partial(client.subtract, pools["capped"], 1, member="alice"),
        "transfer": partial(client.transfer, pools["source"], destination, 1),
    }


MEMBER_ROWS = {
    "member": "subtract as a member (no cap)",
    "capped": "subtract as a member with a cap",
    "transfer": "transfer(a, b, 1) across slots",
}


def members(client: CrediciClient, s: Settings) -> list[Row]:
    """Issue 19: what a member's charge (and its cap) costs against a plain subtract: sync
    latency in alternating blocks on the shared Redis, and Redis CPU per charge on our own."""
    progress("9. members: sync latency")
    ops = member_variants(client, client.storage.ledger.namespace)
    samples = interleaved(ops, s.calls, s.warmup, s.rounds)
    rows: list[Row] = []
    section = (
        f"9. members and transfers (issue 19): against a plain subtract; sync, "
        f"one connection, {s.calls:,} calls per variant"
    )
    for p in (50, 99):
        rows += [
            Row(section, label, f"p{p} µs", percentile(samples[name], p),
                percentile(samples["plain"], p), "subtract(u, 1) on an account of its own")
            for name, label in MEMBER_ROWS.items()
        ]  # fmt: skip
    if not shutil.which("redis-server"):
        return rows
    progress("9. members: Redis CPU per charge, on a redis-server of our own")
    calls = max(1, s.growth_calls // s.rounds)
    with (
        private_redis() as port,
        CrediciClient.from_url(f"redis://127.0.0.1:{port}/0", namespace="bench") as own,
    ):
        r = redis.Redis(port=port)
        variants = member_variants(own, "bench")
        for fn in variants.values():
            timed(fn, s.warmup, [])
        cpu = {name: [0, 0] for name in variants}
        for _ in range(s.rounds):
            for name, fn in variants.items():
                r.config_resetstat()
                for _ in range(calls):
                    fn()
                usec, _ = script_cpu(r)
                cpu[name][0] += usec
                cpu[name][1] += calls  # per operation: a transfer runs three scripts
        r.close()
    section = (
        f"9. members and transfers (issue 19): Redis CPU per operation (INFO commandstats), "
        f"{s.rounds} x {calls:,} operations per variant, on a redis-server of our own"
    )
    plain = cpu["plain"][0] / cpu["plain"][1]
    rows += [
        Row(section, label, "µs/call", cpu[name][0] / cpu[name][1], plain,
            "subtract(u, 1) on an account of its own")
        for name, label in MEMBER_ROWS.items()
    ]  # fmt: skip
    return rows


def run(
    url: str,
    settings: Settings,
    mode: str,
    json_path: str | None,
    postgres_url: str | None = None,
    *,
    only_postgres: bool = False,
    only_limits: bool = False,
    only_members: bool = False,
) -> None:
    started = time.perf_counter()
    ns = f"bench-{secrets.token_hex(4)}"
    raw = raw_sync(url)
    client = CrediciClient.from_url(url, namespace=ns)
    try:
        info = machine(raw, url)
        trivial = trivial_call()
        for script in (*_scripts.LOADED.values(), trivial.script):
            if script is None or raw.script_load(script.source) != script.sha:
                raise RuntimeError(f"Redis hashed script {script} differently")

        rows: list[Row] = []
        if only_members:
            rows += members(client, settings)
        elif not (only_postgres or only_limits):
            rows += sync_latency(client, raw, trivial, ns, settings)
            rows += batch_throughput(client, raw, trivial, ns, settings)

            users = [f"{ns}-task{i}" for i in range(TASKS)]
            client.add_many([(user, PLENTY) for user in users])
            sub_calls = [subtract_call(client, user, 1) for user in users]
            rows += asyncio.run(async_throughput(url, trivial, ns, sub_calls, settings))

            rows += server_side(trivial, settings)
            rows += operation_cpu(settings)
            rows += charge_profile(settings)
            rows += process_throughput(settings)
            rows += memory(client, raw, ns, settings, url)
            rows += bucket_growth(client, raw, trivial, ns, settings)
            rows += balance_growth(client, raw, trivial, ns, settings)
            rows += period_growth(client, raw, trivial, ns, settings)
            rows += history_read(client, raw, ns, settings)
            rows += pathological(settings)
            rows += members(client, settings)
        if postgres_url and not (only_limits or only_members):
            rows += postgres_side_by_side(url, postgres_url, ns, settings)
        if not (only_postgres or only_members):
            rows += limits_sync(client, url, ns, settings)
            rows += asyncio.run(limits_async(url, ns, settings))
            rows += limits_server_cpu(settings)
        info["load_average_1m_end"] = load_average()
    finally:
        try:
            deleted = delete_namespace(raw, ns)
        finally:
            client.close()
            raw.close()
    wall = time.perf_counter() - started
    print(render(info, mode, ns, rows))
    print(f"\nwall time {wall:.1f} s; {deleted:,} keys of {ns} deleted")
    if json_path:
        report = {
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": mode,
            "namespace": ns,
            "machine": info,
            "settings": asdict(settings),
            "rows": [{**asdict(row), "ratio": row.ratio, "passed": row.passed} for row in rows],
            "targets_passed": sum(row.passed is True for row in rows),
            "targets_missed": sum(row.passed is False for row in rows),
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
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true", help="skip section 7")
    parser.add_argument("--only-postgres", action="store_true", help="section 7 alone")
    parser.add_argument("--only-limits", action="store_true", help="section 8 alone")
    parser.add_argument("--only-members", action="store_true", help="section 9 alone")
    args = parser.parse_args(argv)
    if args.no_postgres and args.only_postgres:
        parser.error("--no-postgres and --only-postgres exclude each other")
    if args.only_limits and args.only_postgres:
        parser.error("--only-limits and --only-postgres exclude each other")
    mode = "quick" if args.quick else "full"
    postgres_url = None if args.no_postgres else args.postgres_url
    try:
        run(args.redis_url, QUICK if args.quick else FULL, mode, args.json, postgres_url,
            only_postgres=args.only_postgres, only_limits=args.only_limits,
            only_members=args.only_members)  # fmt: skip
    except (redis.ConnectionError, StorageUnavailableError) as exc:
        print(f"bench: cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
