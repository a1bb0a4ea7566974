"""Latency added by credici_redis.asgi.CreditMiddleware, beside the same app without it.

    .venv/bin/python benchmarks/middleware.py [--redis-url URL] [--requests N] [--json PATH]

Two uvicorn servers, each in its own process, run the same FastAPI app (``GET /ping`` and
``GET /free``, both answering a small JSON): one bare, one with ``CreditMiddleware`` (default
price 1 credit; ``/free`` is ``@priced(0)``) charging through an ``AsyncCrediciClient`` on Redis.
This process sends sequential requests over one keep-alive connection per server with httpx, in
alternating blocks (so load from elsewhere hits every variant alike), and prints p50/p99:

- bare ``/ping``: the baseline, framework and HTTP only;
- metered ``/free``: the middleware's own work without a charge (finding the route's price);
- metered ``/ping``: the whole cost, a charge (one Redis round trip running subtract.lua) included;
- ``subtract`` from this process with the sync and the asyncio client: the charge alone, for
  reference (the server charges through the asyncio client).

Every key lives under a fresh namespace ``bench-web-<random>``, deleted at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass

import fastapi
import httpx
import redis
import uvicorn

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.asgi import CreditMiddleware, priced, user_from_header

PLENTY = 10**15
USER = "bench-user"


# --- the servers ------------------------------------------------------------------------------


def build_app(variant: str, redis_url: str, namespace: str) -> fastapi.FastAPI:
    """The same app for both servers; "metered" adds the middleware, nothing else differs."""
    client = AsyncCrediciClient.from_url(redis_url, namespace=namespace)

    @contextlib.asynccontextmanager
    async def lifespan(_: fastapi.FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = fastapi.FastAPI(lifespan=lifespan)
    if variant == "metered":
        app.add_middleware(CreditMiddleware, client=client, user=user_from_header("X-User"))

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/free")
    @priced(0)
    async def free() -> dict[str, bool]:
        return {"ok": True}

    return app


def serve(variant: str, port: int, redis_url: str, namespace: str) -> None:
    app = build_app(variant, redis_url, namespace)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def server_process(variant: str, redis_url: str, namespace: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve", variant, "--port", str(port)]
    argv += ["--redis-url", redis_url, "--namespace", namespace]
    proc = subprocess.Popen(argv)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/free", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {variant} server did not start")
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


# --- measuring --------------------------------------------------------------------------------


def percentile(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile, in µs."""
    rank = max(1, math.ceil(p / 100 * len(sorted_ns)))
    return sorted_ns[rank - 1] / 1000


def timed(fn: Callable[[], object], n: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        fn()
        elapsed = clock() - start
        out.append(fn.measured_ns if isinstance(fn, AsyncSubtract) else elapsed)


class AsyncSubtract:
    """``await client.subtract(USER, 1)`` on an event loop of its own, timed inside the loop
    (so the figure leaves out starting the loop for each call)."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = AsyncCrediciClient.from_url(redis_url, namespace=namespace)
        self.measured_ns = 0

    async def _call(self) -> None:
        start = time.perf_counter_ns()
        await self.client.subtract(USER, 1)
        self.measured_ns = time.perf_counter_ns() - start

    def __call__(self) -> None:
        self.loop.run_until_complete(self._call())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def interleaved(
    ops: dict[str, Callable[[], object]], calls: int, warmup: int, rounds: int
) -> dict[str, list[int]]:
    """Latencies (ns) of each op, measured in alternating blocks."""
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


def request(http: httpx.Client, path: str, *, charged: bool) -> Callable[[], object]:
    headers = {"X-User": USER}

    def send() -> None:
        response = http.get(path, headers=headers)
        if response.status_code != 200 or ("x-credits-cost" in response.headers) != charged:
            raise RuntimeError(f"unexpected answer to {path}: {response.status_code}")

    return send


@dataclass(frozen=True)
class Row:
    variant: str
    p50_us: float
    p99_us: float
    p50_ratio: float
    p99_ratio: float


def run(redis_url: str, requests: int, warmup: int, rounds: int, json_path: str | None) -> None:
    namespace = f"bench-web-{secrets.token_hex(4)}"
    credici = CrediciClient.from_url(redis_url, namespace=namespace)
    raw = redis.Redis.from_url(redis_url)
    load_start = os.getloadavg()[0]
    async_subtract = AsyncSubtract(redis_url, namespace)
    try:
        credici.add(USER, PLENTY)
        with (
            server_process("bare", redis_url, namespace) as bare,
            server_process("metered", redis_url, namespace) as metered,
            httpx.Client(base_url=bare) as to_bare,
            httpx.Client(base_url=metered) as to_metered,
        ):
            ops: dict[str, Callable[[], object]] = {
                "bare app, GET /ping": request(to_bare, "/ping", charged=False),
                "+ middleware, GET /free (priced 0)": request(to_metered, "/free", charged=False),
                "+ middleware, GET /ping (1 credit)": request(to_metered, "/ping", charged=True),
                "subtract() alone, sync client": lambda: credici.subtract(USER, 1),
                "subtract() alone, asyncio client": async_subtract,
            }
            samples = interleaved(ops, requests, warmup, rounds)
    finally:
        keys = list(raw.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            raw.unlink(*keys)
        async_subtract.close()
        credici.close()
        raw.close()

    base = samples["bare app, GET /ping"]
    base50, base99 = percentile(base, 50), percentile(base, 99)
    rows = []
    for name, found in samples.items():
        p50, p99 = percentile(found, 50), percentile(found, 99)
        rows.append(Row(name, p50, p99, p50 / base50, p99 / base99))

    print(
        f"CreditMiddleware latency: {requests:,} sequential requests per variant "
        f"({rounds} alternating blocks, {warmup} warm-up), one keep-alive connection each"
    )
    print(
        f"machine: {os.cpu_count()} CPUs shared by client, servers and Redis; 1-min load "
        f"{load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end | Python "
        f"{platform.python_version()} | FastAPI {fastapi.__version__} | uvicorn "
        f"{uvicorn.__version__} | httpx {httpx.__version__}"
    )
    print(f"\n  {'variant':<36} {'p50 µs':>9} {'p99 µs':>9} {'p50 ×bare':>10} {'p99 ×bare':>10}")
    for row in rows:
        print(
            f"  {row.variant:<36} {row.p50_us:>9,.0f} {row.p99_us:>9,.0f} "
            f"{row.p50_ratio:>9.2f}x {row.p99_ratio:>9.2f}x"
        )
    by_name = {row.variant: row for row in rows}
    added = by_name["+ middleware, GET /ping (1 credit)"].p50_us - base50
    own = by_name["+ middleware, GET /free (priced 0)"].p50_us - base50
    trip = by_name["subtract() alone, asyncio client"].p50_us
    print(
        f"\n  added at p50: {added:,.0f} µs for a charged request (the asyncio charge alone: "
        f"{trip:,.0f} µs); {own:,.0f} µs for a free one (finding the route's price)"
    )
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump({"requests": requests, "rows": [asdict(r) for r in rows]}, out, indent=2)
            out.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=5000, help="measured per variant")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--serve", choices=["bare", "metered"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.namespace)
        return 0
    try:
        run(args.redis_url, args.requests, args.warmup, args.rounds, args.json)
    except redis.ConnectionError as exc:
        print(f"bench: cannot reach Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
