"""The console's user page for a user with 200,000 history entries (issue 20): what an operator
waits for. Server time per GET over loopback (httpx), and, where Chromium and chromedriver are
installed, the browser's own Navigation Timing of the same page (request to load event).

    .venv/bin/python benchmarks/console_page.py [--entries 200000] [--runs 10]

Makes the user in a fresh namespace of the Redis at $CREDICI_TEST_REDIS_URL (default
redis://127.0.0.1:6379/0): one add, then subtract_many of 1 credit, 1,000 a round trip; deletes
the namespace at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.console import create_app
from tests.web.conftest import serve_asgi

URL = os.environ.get("CREDICI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    namespace = f"console-bench-{uuid.uuid4().hex[:8]}"
    user = "heavy-user"
    try:
        started = time.perf_counter()
        with CrediciClient.from_url(URL, namespace=namespace) as ledger:
            ledger.add(user, args.entries * 2)
            for _ in range(args.entries // 1000):
                ledger.subtract_many([(user, 1)] * 1000)
            total = sum(1 for _ in ledger.iter_user_transactions(user))
        print(f"user with {total:,} entries made in {time.perf_counter() - started:.0f} s")
        client = AsyncCrediciClient.from_url(URL, namespace=namespace)
        app = create_app(client, close_client=True, read_only=False)
        with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=30) as http:
            times, size = [], 0
            for _ in range(args.runs):
                t0 = time.perf_counter()
                reply = http.get(f"/users/{user}")
                times.append((time.perf_counter() - t0) * 1000)
                size = len(reply.content)
                assert reply.status_code == 200
            print(
                f"GET /users/{{id}} over loopback: median {statistics.median(times):.1f} ms, "
                f"min {min(times):.1f}, max {max(times):.1f} ({args.runs} requests, {size:,} B)"
            )
            browser_timing(base, user, args.runs)
    finally:
        r = redis.Redis.from_url(URL)
        for key in r.scan_iter(f"{namespace}:*", count=1000):
            r.delete(key)


def browser_timing(base: str, user: str, runs: int) -> None:
    try:
        from tests.test_console_browser import browser
    except BaseException as exc:  # the module skips itself without Chromium
        print(f"browser: not measured ({type(exc).__name__}: {exc})")
        return
    navigation = (
        "const n = performance.getEntriesByType('navigation')[0];"
        "return [n.responseEnd - n.requestStart, n.domContentLoadedEventEnd - n.startTime,"
        " n.loadEventEnd - n.startTime];"
    )
    with browser() as b:
        served, ready, loaded = [], [], []
        for _ in range(runs):
            b.go(f"{base}/users/{user}")
            b.wait_for("#balance")
            response, dom, load = b.execute(navigation)
            served.append(response)
            ready.append(dom)
            loaded.append(load)
    print(
        f"Chromium (headless), median of {runs}: response {statistics.median(served):.1f} ms, "
        f"DOMContentLoaded {statistics.median(ready):.1f} ms, "
        f"load {statistics.median(loaded):.1f} ms"
    )


if __name__ == "__main__":
    main()
