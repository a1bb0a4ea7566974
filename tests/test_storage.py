"""The Redis storages themselves: scripts, keys, idempotency records, outages."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import key_slot

from credici_redis import (
    AsyncCrediciClient,
    CrediciClient,
    InsufficientCreditsError,
    StorageUnavailableError,
)
from credici_redis._core import keys as _keys
from credici_redis._core.scripts import LIBRARY
from tests.conftest import REDIS_URL, FakeClock, SyncAsAsync, free_port


def raw(client: Any) -> Any:
    """The redis-py (or fakeredis) client under a test client."""
    inner = client.sync if isinstance(client, SyncAsAsync) else client
    return inner.storage.redis


async def call(client: Any, method: str, *args: Any) -> Any:
    result = getattr(raw(client), method)(*args)
    return await result if asyncio.iscoroutine(result) else result


async def test_all_keys_of_a_user_share_one_slot(
    client: Any, namespace: str, clock: FakeClock
) -> None:
    users = ["plain", "a:b", "{x}", "}{", "ü 🙂"]
    for uid in users:
        await client.add(uid, 10, ttl=timedelta(days=1), idempotency_key="k{1}")
        await client.subtract(uid, 1)
        await client.start_cycle(5, 30, uid)
    keys = [k.decode() for k in await _scan(client, f"{namespace}:*")]
    by_user: dict[str, set[int]] = {}
    shared: set[int] = set()  # a slot's event stream and archive outbox, shared by its users
    for key in keys:
        assert key.startswith(namespace + ":")
        if key.startswith(namespace + ":{%S"):
            shared.add(key_slot(key.encode()))
            continue
        by_user.setdefault(_keys.user_from_key(namespace, key), set()).add(key_slot(key.encode()))
    assert set(by_user) == set(users)
    assert all(len(slots) == 1 for slots in by_user.values())
    assert shared == {_keys.user_slot(u) for u in users}  # each user's outbox is in its slot


async def _scan(client: Any, pattern: str) -> list[bytes]:
    r = raw(client)
    if isinstance(r, redis.Redis):
        return list(r.scan_iter(match=pattern))
    return [k async for k in r.scan_iter(match=pattern)]


async def test_equal_expiry_burns_oldest_bucket_first(
    client: Any, namespace: str, user: str, clock: FakeClock
) -> None:
    amounts_key = _keys.user_keys(namespace, user).amounts

    async def buckets() -> dict[bytes, int]:
        return {k: int(v) for k, v in (await call(client, "hgetall", amounts_key)).items()}

    at = clock.now + timedelta(days=1)
    await client.add(user, 10, at)
    (older_expiring,) = await buckets()
    await client.add(user, 10, at)
    (younger_expiring,) = set(await buckets()) - {older_expiring}
    await client.add(user, 10)
    (older_never,) = set(await buckets()) - {older_expiring, younger_expiring}
    await client.add(user, 10)
    (younger_never,) = set(await buckets()) - {older_expiring, younger_expiring, older_never}

    await client.subtract(user, 15)
    assert await buckets() == {younger_expiring: 5, older_never: 10, younger_never: 10}
    await client.subtract(user, 11)
    assert await buckets() == {older_never: 4, younger_never: 10}


async def test_idempotency_record_is_kept_for_the_retention_time(
    make_client: Any, namespace: str, user: str
) -> None:
    client = make_client(idempotency_ttl=timedelta(hours=30))
    await client.add(user, 5, idempotency_key="grant")
    pttl = await call(client, "pttl", _keys.idempotency_key(namespace, user, "grant"))
    assert (
        timedelta(hours=30) - timedelta(minutes=1)
        < timedelta(milliseconds=pttl)
        <= timedelta(hours=30)
    )


async def test_idempotency_key_is_forgotten_after_retention(make_client: Any, user: str) -> None:
    client = make_client(idempotency_ttl=timedelta(seconds=1))
    first = await client.add(user, 5, idempotency_key="grant")
    assert await client.add(user, 5, idempotency_key="grant") == first
    await asyncio.sleep(1.2)
    second = await client.add(user, 5, idempotency_key="grant")
    assert second.transaction_id != first.transaction_id
    assert await client.get_balance(user) == 10


async def test_failed_subtract_writes_nothing(client: Any, namespace: str, user: str) -> None:
    with pytest.raises(InsufficientCreditsError):
        await client.subtract(user, 1, idempotency_key="k")
    assert await _scan(client, f"{namespace}:*") == []


# --- outages -------------------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_refused_connection_is_storage_unavailable(api: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        if api == "sync":
            with CrediciClient.from_url(url, timeout=1.0) as c:
                c.subtract("u", 1)
        else:
            async with AsyncCrediciClient.from_url(url, timeout=1.0) as ac:
                await ac.subtract("u", 1)
    assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_silent_server_times_out(api: str, silent_server: int) -> None:
    url = f"redis://127.0.0.1:{silent_server}/0"
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        if api == "sync":
            with CrediciClient.from_url(url, timeout=0.3) as c:
                c.get_balance("u")
        else:
            async with AsyncCrediciClient.from_url(url, timeout=0.3) as ac:
                await ac.get_balance("u")
    assert isinstance(info.value.__cause__, redis.TimeoutError | redis.ConnectionError)
    assert time.monotonic() - started < 1.5


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    """A redis-server of this test's own, and a function that (re)starts it."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp_path),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        for _ in range(100):
            try:
                redis.Redis(port=port, socket_connect_timeout=0.1).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    start()
    yield port, start
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_client_recovers_when_redis_comes_back(api: str, own_redis: tuple[int, Any]) -> None:
    port, start = own_redis
    url = f"redis://127.0.0.1:{port}/0"
    client: Any = (
        SyncAsAsync(CrediciClient.from_url(url, timeout=0.5))
        if api == "sync"
        else AsyncCrediciClient.from_url(url, timeout=0.5)
    )
    await client.add("u", 5)
    redis.Redis(port=port).shutdown(nosave=True)
    with pytest.raises(StorageUnavailableError):
        await client.get_balance("u")
    start()  # an empty server: no data, no scripts
    await client.add("u", 2)
    assert await client.get_balance("u") == 2
    if api == "sync":
        client.sync.close()
    else:
        await client.aclose()


def test_each_unnamed_memory_url_is_a_store_of_its_own() -> None:
    # No URL is no store: from_url needs one (tests/test_setup.py).
    with CrediciClient.from_url("memory://") as c:
        c.add("u", 3)
        assert c.get_balance("u") == 3
    with CrediciClient.from_url("memory://") as fresh:
        assert fresh.get_balance("u") == 0  # each memory:// is a store of its own


def test_named_memory_stores_are_shared_in_process() -> None:
    with (
        CrediciClient.from_url("memory://shared-test") as a,
        CrediciClient.from_url("memory://shared-test") as b,
    ):
        a.add("u", 3)
        assert b.get_balance("u") == 3


def test_from_url_turns_off_redis_py_retries() -> None:
    with CrediciClient.from_url(REDIS_URL) as c:
        retry = c.storage.redis.get_retry()  # type: ignore[attr-defined]
        assert retry is not None and retry.get_retries() == 0


# -- the Functions library ------------------------------------------------------------------------


@pytest.fixture(params=["own-redis", "memory"])
def flushable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A URL whose server this test may flush (never the shared Redis), and its admin client."""
    if request.param == "memory":
        url = f"memory://flush-{time.monotonic_ns()}"
        with CrediciClient.from_url(url) as probe:
            yield url, probe.storage.redis
        return
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    admin = redis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}", admin
    finally:
        admin.close()
        proc.kill()
        proc.wait()


def libraries(admin: Any) -> list[str]:
    """The names of the server's Functions libraries (FUNCTION LIST, RESP2 or a dict)."""
    names = []
    for lib in admin.function_list():
        fields = lib if isinstance(lib, dict) else dict(zip(lib[::2], lib[1::2], strict=True))
        name = fields.get(b"library_name", fields.get("library_name"))
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_calls_go_on_after_the_library_and_the_scripts_are_flushed(
    flushable: tuple[str, Any], api: str
) -> None:
    url, admin = flushable
    client: Any = (
        SyncAsAsync(CrediciClient.from_url(url))
        if api == "sync"
        else AsyncCrediciClient.from_url(url)
    )
    try:
        assert (await client.add("u", 10)).balance_after == 10  # first use: the library loads
        assert (
            client.storage.ledger.functions
            if api != "sync"
            else client.sync.storage.ledger.functions
        )
        assert libraries(admin) == [LIBRARY.name]
        admin.function_flush()
        await client.subtract("u", 1, idempotency_key="k")  # a single FCALL, found missing
        admin.function_flush()
        admin.script_flush()
        history = await client.get_all_user_transactions("u")  # a pipeline: FCALL, XREVRANGE
        assert [t.amount for t in history] == [-1, 10]
        admin.function_flush()
        again = await client.subtract("u", 1, idempotency_key="k")  # the retry: once
        assert (again.amount, await client.get_balance("u")) == (-1, 9)
        assert libraries(admin) == [LIBRARY.name]
    finally:
        if api == "sync":
            client.sync.close()
        else:
            await client.aclose()


def test_a_redis_without_functions_runs_the_scripts() -> None:
    """Redis before 7 has no FCALL: the first call is refused (nothing ran), goes again as a
    script, and every call after it goes as a script (EVALSHA) from then on."""
    import fakeredis

    from credici_redis.storage import RedisStorage

    six = fakeredis.FakeRedis(server=fakeredis.FakeServer(version=(6,)))
    with CrediciClient(RedisStorage(six, "old")) as client:
        assert client.add("u", 5).balance_after == 5
        assert client.storage.ledger.functions is False
        assert client.subtract("u", 2, idempotency_key="k").balance_after == 3
        assert client.subtract("u", 2, idempotency_key="k").balance_after == 3
        assert client.get_balance("u") == 3


async def test_a_reload_rereads_what_the_reloaded_script_wrote(
    flushable: tuple[str, Any], clock: FakeClock
) -> None:
    """The history read after a script in one pipeline sees what the script wrote, when the
    script had to go again (its function was missing)."""
    url, admin = flushable
    with CrediciClient.from_url(url, clock=clock) as client:
        client.add("u", 3, ttl=timedelta(minutes=1))
        clock.advance(timedelta(minutes=2))
        admin.function_flush()
        assert [t.kind for t in client.get_all_user_transactions("u")] == ["expire", "add"]


# -- packing commands ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("FCALL", "f", 2, "ns:{ü 🙂}:s", "ns:{ü 🙂}:o", "", 1, -5, 2**53 - 1, "{}"),
        ("SET", "k", 0.1),
        ("XADD", "s", "*", "a", b"\x00\xff"),
        ("CLIENT SETINFO", "LIB-NAME", "x"),  # redis-py sends some commands as one string
        (b"CLIENT SETINFO", "LIB-VER", "1"),
        ("SET", "k", memoryview(b"view")),  # not hiredis's: redis-py's own packer
    ],
)
def test_the_packer_sends_the_bytes_redis_py_would(args: tuple[Any, ...]) -> None:
    from redis._parsers.encoders import Encoder
    from redis.connection import Connection, PythonRespSerializer

    from credici_redis._storages.packing import PACKER

    python = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    assert b"".join(PACKER.pack(*args)) == b"".join(python.pack(*args))
    assert b"".join(PACKER.pack(*args)) == b"".join(Connection().pack_command(*args))


def test_the_packer_refuses_what_redis_py_refuses() -> None:
    from credici_redis._storages.packing import PACKER

    with pytest.raises(redis.DataError):
        PACKER.pack("SET", "k", True)
    with pytest.raises(redis.DataError):
        PACKER.pack("SET", "k", object())


@pytest.mark.parametrize("url", [REDIS_URL, "unix:///tmp/credici-none.sock", "rediss://x:1/0"])
async def test_storages_pack_with_hiredis_on_every_scheme(url: str) -> None:
    from credici_redis._storages.packing import PACKER

    sync = CrediciClient.from_url(url)
    asyn = AsyncCrediciClient.from_url(url)
    try:
        for client in (sync, asyn):
            pool = client.storage.redis.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            assert connection._command_packer is PACKER
        if url == REDIS_URL:  # and they work
            assert sync.get_balance("never-seen") == 0
            assert await asyn.get_balance("never-seen") == 0
    finally:
        sync.close()
        await asyn.aclose()
