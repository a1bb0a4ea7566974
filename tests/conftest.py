"""Fixtures shared by every test.

The contract suite (tests/contract, tests/test_concurrency.py) runs each behaviour against every
backend: the real Redis at REDIS_URL, the embedded memory://, PostgreSQL at POSTGRES_URL
(PostgresStorage), and a storage of your own named by CREDICI_TEST_STORAGE (docs/storage.md);
and with every client (sync, asyncio, asyncio with auto-batching). Other tests, which look at
Redis itself, run on the Redis backends (BACKENDS). Sync clients are wrapped so that one async
test body drives them all. Every test gets its own namespace; its keys and rows are deleted
afterwards.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.postgres import TABLES

REDIS_URL = os.environ.get("CREDICI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get(
    "CREDICI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CUSTOM_STORAGE = os.environ.get("CREDICI_TEST_STORAGE", "")
"""``module:callable`` making a storage of your own: the contract suite runs on it too, as the
backend "custom". See docs/storage.md."""

BACKENDS = ("redis", "memory")
"""The Redis backends: tests that read Redis itself run on these."""
URL_BACKENDS = (*BACKENDS, "postgres")
"""Backends a client can be made for with from_url."""
CONTRACT_BACKENDS = (*URL_BACKENDS, "custom") if CUSTOM_STORAGE else URL_BACKENDS
"""Every backend: the contract suite runs on each."""
_CONTRACT_PATHS = ("contract", "test_concurrency.py")
APIS = ("sync", "async", "async-batched")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis_server(directory: Path, *options: str) -> tuple[int, subprocess.Popen[bytes]]:
    """A redis-server of the test's own on a free port (no persistence), with extra `options`
    ("--name", "value", ...); returns once it answers. The caller kills it."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(directory), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            redis.Redis(port=port, socket_connect_timeout=0.1).ping()
            return port, process
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def raw_redis(url: str) -> Any:
    """A plain client on a test store, to look at (or break) its keys: the real Redis, or the
    in-process server behind a memory:// URL."""
    if url.startswith("memory://"):
        import fakeredis

        from credici_redis._storages import connect as _connect

        return fakeredis.FakeRedis(server=_connect._memory_server(url))
    return redis.Redis.from_url(url)


def uv_command() -> str:
    """uv, which builds and installs wheels in tests (./run installs it into .uv/)."""
    local = Path(__file__).resolve().parent.parent / ".uv" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        pytest.fail("uv is needed to build and install wheels: run the tests with ./run test")
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    # The real Redis and PostgreSQL are required, never skipped: `./run test` starts them when
    # they are down (and fails under CI=true).
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        raise pytest.UsageError(f"Redis is not reachable at {REDIS_URL}: {exc}") from exc
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
    except psycopg.Error as exc:
        raise pytest.UsageError(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}") from exc


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that needs a backend and does not name its own runs on every backend if it is part
    of the contract suite, on the Redis backends otherwise."""
    if "backend" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "backend" in (
            [n.strip() for n in names.split(",")] if isinstance(names, str) else names
        ):
            return
    path = Path(str(metafunc.definition.path))
    contract = any(part in _CONTRACT_PATHS for part in path.parts)
    metafunc.parametrize("backend", CONTRACT_BACKENDS if contract else BACKENDS)


def custom_factory() -> Any:
    """The callable CREDICI_TEST_STORAGE names."""
    module, _, name = CUSTOM_STORAGE.partition(":")
    return getattr(importlib.import_module(module), name)


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


def delete_postgres_namespace(namespace: str) -> None:
    """Every PostgreSQL row of the namespace and of namespaces named after it (a test's
    neighbour namespace is its name plus a suffix)."""
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('credici_user_state') IS NOT NULL").fetchone()
        if not (exists and exists[0]):
            return
        for table in TABLES:
            conn.execute(
                f"DELETE FROM {table} WHERE namespace LIKE %s",  # type: ignore[arg-type]
                (namespace + "%",),
            )


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    ns = f"t{uuid.uuid4().hex[:12]}"
    yield ns
    delete_namespace(ns)
    backend = (
        request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    )
    if backend == "postgres":
        delete_postgres_namespace(ns)
    elif backend == "custom":
        cleanup = getattr(custom_factory(), "delete_namespace", None)
        if cleanup is not None:
            cleanup(ns)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(backend: str, namespace: str) -> str:
    # The shared real Redis (namespaced), an embedded store of this test's own, shared by the
    # clients the test makes, or the shared PostgreSQL (namespaced).
    if backend == "custom":
        pytest.fail("the custom backend has no URL: parametrize this test over URL_BACKENDS")
    return {"redis": REDIS_URL, "postgres": POSTGRES_URL}.get(backend, f"memory://{namespace}")


@pytest.fixture
def local_zone_not_utc() -> Iterator[None]:
    """The machine's local zone pinned to one no code can mistake for UTC (Pacific/Chatham,
    +12:45/+13:45): time zone handling that leans on the local zone fails there. Modules that
    handle zones use it for every test (``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Chatham"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeClient = Callable[..., Any]


@pytest.fixture
async def make_client(api: str, backend: str, namespace: str) -> AsyncIterator[MakeClient]:
    """Builds clients of this test's backend and API; all are closed at the end."""
    made: list[Any] = []
    url = (
        {"redis": REDIS_URL, "postgres": POSTGRES_URL}.get(backend, f"memory://{namespace}")
        if backend != "custom"
        else ""
    )

    def make(**options: Any) -> Any:
        if api == "async-batched":
            options = {"batching": True, **options}
        # The client's own options; the rest are the storage's.
        client_options = {k: options.pop(k) for k in ("clock", "default_limits") if k in options}
        if api == "sync":
            if backend == "custom":
                storage = custom_factory()(namespace, asynchronous=False, **options)
                sync = CrediciClient(storage, **client_options)
            else:
                sync = CrediciClient.from_url(url, namespace=namespace, **client_options, **options)
            made.append(sync)
            return SyncAsAsync(sync)
        if backend == "custom":
            astorage = custom_factory()(namespace, asynchronous=True, **options)
            aclient = AsyncCrediciClient(astorage, **client_options)
        else:
            aclient = AsyncCrediciClient.from_url(
                url, namespace=namespace, **client_options, **options
            )
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


# A read-only script that keeps Redis busy for `ms` milliseconds.
SPIN = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - start > tonumber(ARGV[1]) then
    return 1
  end
end
"""


@pytest.fixture
def busy_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of the test's own that answers BUSY 20 ms into a long script."""
    port, process = start_redis_server(tmp_path, "--busy-reply-threshold", "20")
    yield port
    process.kill()
    process.wait()


def spin(port: int, ms: int) -> threading.Thread:
    """Keep the redis-server at `port` busy running a script for `ms` ms (from a thread)."""

    def run() -> None:
        with redis.Redis(port=port) as r:
            r.eval(SPIN, 0, ms)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.1)  # the script is running, past the threshold
    return thread
