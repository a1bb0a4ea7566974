"""Load test: simulated API workers charging and topping up credits through credici-redis.

    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s

A second scenario, `ExampleApiUser`, drives the example web app (examples/fastapi_app.py) over
HTTP instead; it runs only when named (or picked in the web UI with ``--class-picker``):

    locust -f loadtests/locustfile.py ExampleApiUser --host http://127.0.0.1:8000 ...

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
    CREDICI_ABANDON_SHARE     0.1    ExampleApiUser: share of streams it hangs up on midway

ExampleApiUser: each locust user is one caller of the app (``X-User: lt-<random>``): it signs up
(1,000 credits), then calls ``/v1/echo`` (1 credit), ``/v1/summarize`` (5), ``/v1/generate``
(streamed tokens metered by usage: 200 reserved, 1 credit per token captured) and ``/balance``.
A 402 is a normal outcome, reported as a success named ``<route> (402)``, after which the caller
tops up. Some streams are abandoned after two tokens (``/v1/generate (abandoned)``): a client
disconnect, which the middleware settles by capturing the tokens reported so far.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import redis
from locust import HttpUser, User, between, events, task
from locust.clients import ResponseContextManager
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
ABANDON_SHARE = float(os.environ.get("CREDICI_ABANDON_SHARE", "0.1"))
BATCH = 10
WORDS = ["credits", "are", "held", "then", "captured", "when", "the", "stream", "ends"]

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


library_used = False
"""Whether this process ran the library scenario (so made keys in NAMESPACE to clean up)."""


class CreditsWorker(User):
    """An API worker: charges per request, tops up users who run out, sometimes reads balances
    or charges a batch."""

    wait_time = between(0.001, 0.01)

    def on_start(self) -> None:
        global library_used
        library_used = True

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


class ExampleApiUser(HttpUser):
    """A caller of the example app over HTTP (module docstring); needs ``--host``."""

    wait_time = between(0.005, 0.05)

    def on_start(self) -> None:
        self.headers = {"X-User": f"lt-{secrets.token_hex(6)}"}
        with self.client.post(
            "/signup", headers=self.headers, name="/signup", catch_response=True
        ) as r:
            if r.status_code == 409:  # signed up already: fine
                r.success()

    def top_up(self) -> None:
        self.client.post("/topup", json={"amount": 1000}, headers=self.headers, name="/topup")

    def paid(self, r: ResponseContextManager, name: str) -> bool:
        """Whether the call was served; a 402 is a success of its own name, then a top-up."""
        if r.status_code != 402:
            return r.ok
        cast(dict[str, Any], r.request_meta)["name"] = f"{name} (402)"  # a dict, typed Mapping
        r.success()
        self.top_up()
        return False

    @task(4)
    def echo(self) -> None:
        with self.client.get(
            "/v1/echo", params={"text": "hi"}, headers=self.headers, name="/v1/echo",
            catch_response=True,
        ) as r:  # fmt: skip
            self.paid(r, "/v1/echo")

    @task(2)
    def summarize(self) -> None:
        body = {"text": " ".join(random.choices(WORDS, k=20))}
        with self.client.post(
            "/v1/summarize", json=body, headers=self.headers, name="/v1/summarize",
            catch_response=True,
        ) as r:  # fmt: skip
            self.paid(r, "/v1/summarize")

    @task(4)
    def generate(self) -> None:
        """Stream a fake LLM answer; sometimes hang up after two tokens."""
        max_tokens = random.randint(1, 30)
        body = {"prompt": " ".join(random.choices(WORDS, k=30)), "max_tokens": max_tokens}
        abandon = random.random() < ABANDON_SHARE
        name = "/v1/generate (abandoned)" if abandon else "/v1/generate"
        with self.client.post(
            "/v1/generate", json=body, headers=self.headers, name=name, stream=True,
            catch_response=True,
        ) as r:  # fmt: skip
            if not self.paid(r, "/v1/generate"):
                return
            if r.headers.get("x-credits-reserved") != "200":
                r.failure(f"X-Credits-Reserved: {r.headers.get('x-credits-reserved')!r}")
                return
            tokens, last = 0, {}
            for line in r.iter_lines():
                if not line:
                    continue
                last = json.loads(line)
                tokens += "token" in last
                if abandon and tokens == 2:
                    r.close()  # the client leaves mid-stream
                    r.success()
                    return
            if last != {"done": True, "tokens": max_tokens, "reserved": 200}:
                r.failure(f"{tokens} tokens streamed, last line {last!r}")

    @task(1)
    def balance(self) -> None:
        self.client.get("/balance", headers=self.headers, name="/balance")


@events.init.add_listener
def http_scenario_only_when_named(environment: Environment, **_: Any) -> None:
    """Without class names on the command line locust runs every User class: leave out
    ExampleApiUser then (it needs the example app running), so a plain run stays the library
    scenario. Naming it, or picking it with --class-picker, runs it."""
    named = getattr(environment.parsed_options, "user_classes", None) or []
    classes = environment.user_classes
    if ExampleApiUser.__name__ not in named and ExampleApiUser in classes and len(classes) > 1:
        classes.remove(ExampleApiUser)


@events.test_start.add_listener
def announce(environment: Environment, **_: Any) -> None:
    if CreditsWorker in environment.user_classes:
        print(f"credici load test: {REDIS_URL}, namespace {NAMESPACE}", flush=True)
    if ExampleApiUser in environment.user_classes:
        print(f"credici load test: the example app at {environment.host}", flush=True)


@events.quitting.add_listener
def clean_up(environment: Environment, **_: Any) -> None:
    """A namespace made up here would be found by nobody: delete it. A named one stays."""
    client.close()
    if not library_used or NAMED_NAMESPACE or os.environ.get("CREDICI_KEEP") == "1":
        return
    r = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(r.scan_iter(match=f"{NAMESPACE}:*", count=1000))
        for i in range(0, len(keys), 500):
            r.unlink(*keys[i : i + 500])
    finally:
        r.close()
