"""Load test: simulated API workers charging and topping up credits through credici-redis.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s

Each locust user is a worker serving requests for many credit users; 10% of its calls go to a few
hot users (a busy tenant), the rest spread over the others. Every library call is reported as a
locust request of type "credici": ``subtract``, ``add``, ``get_balance``, ``subtract_many(10)``.
Running out of credits is a normal outcome, reported as a success named
``subtract (insufficient)``, after which the worker tops the user up; any other exception is a
failure.

Environment:
    CREDICI_REDIS_URL         redis://127.0.0.1:6379/0
    CREDICI_NAMESPACE         locust-<random>; a random namespace is deleted when locust quits,
                              one you name is kept (for `credici-redis audit --all`)
    CREDICI_USERS             1000   credit users
    CREDICI_HOT_USERS         5      of them hot
    CREDICI_HOT_SHARE         0.1    share of calls that go to a hot user
    CREDICI_MAX_CONNECTIONS   256    Redis connections per locust process
"""

from __future__ import annotations

import os
import random
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import redis
from locust import User, between, events, task
from locust.env import Environment

from credici_redis import CrediciClient, InsufficientCreditsError, Transaction

T = TypeVar("T")

REDIS_URL = os.environ.get("CREDICI_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMED_NAMESPACE = os.environ.get("CREDICI_NAMESPACE")
NAMESPACE = NAMED_NAMESPACE or f"locust-{secrets.token_hex(4)}"
USERS = int(os.environ.get("CREDICI_USERS", "1000"))
HOT_USERS = int(os.environ.get("CREDICI_HOT_USERS", "5"))
HOT_SHARE = float(os.environ.get("CREDICI_HOT_SHARE", "0.1"))
MAX_CONNECTIONS = int(os.environ.get("CREDICI_MAX_CONNECTIONS", "256"))
BATCH = 10

# One client per locust process, shared by its users (gevent makes redis-py's sockets
# cooperative), as one web worker process shares one client between its requests.
client = CrediciClient.from_url(REDIS_URL, namespace=NAMESPACE, max_connections=MAX_CONNECTIONS)


def pick_user() -> str:
    if random.random() < HOT_SHARE:
        return f"hot-{random.randrange(HOT_USERS)}"
    return f"user-{random.randrange(USERS)}"


def top_up_amount() -> int:
    return random.randint(50, 200)


def top_up_expiry() -> timedelta | None:
    """Half never expire, most others within the hour, some within seconds (so buckets expire
    during a run, and history gets "expire" entries)."""
    roll = random.random()
    if roll < 0.5:
        return None
    if roll < 0.9:
        return timedelta(hours=1)
    return timedelta(seconds=random.uniform(2, 5))


def timed(name: str, fn: Callable[[], T]) -> T | InsufficientCreditsError | None:
    """Call fn, report it as one locust request. InsufficientCreditsError is a business outcome:
    reported as a success under "<name> (insufficient)" and returned; other errors fail."""
    start = time.perf_counter()
    exception: Exception | None = None
    result: T | InsufficientCreditsError | None = None
    try:
        result = fn()
    except InsufficientCreditsError as exc:
        name, result = f"{name} (insufficient)", exc
    except Exception as exc:
        exception = exc
    events.request.fire(
        request_type="credici",
        name=name,
        response_time=(time.perf_counter() - start) * 1000,
        response_length=0,
        exception=exception,
        context={},
    )
    return result


class BatchError(Exception):
    """An item of a subtract_many failed with something other than insufficient credits."""


def charge_many(items: list[tuple[str, int]]) -> list[Any]:
    results = client.subtract_many(items)
    failed = [r for r in results if not isinstance(r, Transaction | InsufficientCreditsError)]
    if failed:
        raise BatchError(f"{len(failed)} of {len(items)} items failed: {failed[0]!r}")
    return results


class CreditsWorker(User):
    """An API worker: charges per request, tops up users who run out, sometimes reads balances
    or charges a batch."""

    wait_time = between(0.001, 0.01)

    @task(16)
    def charge(self) -> None:
        user = pick_user()
        result = timed("subtract", lambda: client.subtract(user, random.randint(1, 5)))
        if isinstance(result, InsufficientCreditsError):
            timed("add", lambda: client.add(user, top_up_amount(), ttl=top_up_expiry()))

    @task(3)
    def top_up(self) -> None:
        user = pick_user()
        timed("add", lambda: client.add(user, top_up_amount(), ttl=top_up_expiry()))

    @task(1)
    def balance(self) -> None:
        user = pick_user()
        timed("get_balance", lambda: client.get_balance(user))

    @task(1)
    def charge_batch(self) -> None:
        items = [(pick_user(), random.randint(1, 3)) for _ in range(BATCH)]
        timed(f"subtract_many({BATCH})", lambda: charge_many(items))


@events.test_start.add_listener
def announce(environment: Environment, **_: Any) -> None:
    print(f"credici load test: {REDIS_URL}, namespace {NAMESPACE}", flush=True)


@events.quitting.add_listener
def clean_up(environment: Environment, **_: Any) -> None:
    """A namespace made up here would be found by nobody: delete it. A named one stays."""
    client.close()
    if NAMED_NAMESPACE or os.environ.get("CREDICI_KEEP") == "1":
        return
    r = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(r.scan_iter(match=f"{NAMESPACE}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.unlink(*keys[i : i + 500])
    finally:
        r.close()
