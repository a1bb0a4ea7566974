"""Fixtures shared by every test.

The contract suite runs each behaviour against every backend (the real Redis at REDIS_URL and the
embedded memory://) and every client (sync, asyncio, asyncio with auto-batching). Sync clients are
wrapped so that one async test body drives them all. Every test gets its own namespace; its keys
are deleted afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis

from credici_redis import AsyncCrediciClient, CrediciClient

REDIS_URL = os.environ.get("CREDICI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ("redis", "memory")
APIS = ("sync", "async", "async-batched")


def pytest_sessionstart(session: pytest.Session) -> None:
    # The real Redis is required, never skipped: `./run test` starts it when it is down.
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        raise pytest.UsageError(f"Redis is not reachable at {REDIS_URL}: {exc}") from exc


class FakeClock:
    """An injected clock: starts at the real time, moves only when told."""

    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


class SyncAsAsync:
    """Presents a sync client with awaitable methods, so one test body covers both clients."""

    def __init__(self, client: CrediciClient) -> None:
        self.sync = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.sync, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return attr(*args, **kwargs)

        return call


def delete_namespace(namespace: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        batch = list(r.scan_iter(match=f"{namespace}:*", count=1000))
        for i in range(0, len(batch), 500):
            r.unlink(*batch[i : i + 500])
    finally:
        r.close()


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield ns
    delete_namespace(ns)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(backend: str, namespace: str) -> str:
    # The shared real Redis (namespaced), or an embedded store of this test's own, shared by the
    # clients the test makes.
    return REDIS_URL if backend == "redis" else f"memory://{namespace}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeClient = Callable[..., Any]


@pytest.fixture
async def make_client(api: str, url: str, namespace: str) -> AsyncIterator[MakeClient]:
    """Builds clients of this test's backend and API; all are closed at the end."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
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


@pytest.fixture
def client(make_client: MakeClient, clock: FakeClock) -> Any:
    """A client of this test's backend and API on the injected clock."""
    return make_client(clock=clock)


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"
