"""An asyncio client used under more than one event loop: two ``asyncio.run()`` calls (what many
scripts and Django do), and pytest-asyncio's per-test loops. It used to write a request on the
first loop's socket and then fail with a plain ``RuntimeError: Event loop is closed`` after Redis
had applied it. Now a ``from_url`` client makes connections per loop, and a client on a
connection you built refuses before sending anything."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from credici_redis import AsyncCrediciClient, AsyncRedisStorage, CrediciClient, EventLoopError
from tests.conftest import REDIS_URL, delete_namespace


@pytest.mark.parametrize("batching", [False, True])
@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_one_client_under_successive_asyncio_runs(
    backend: str, batching: bool, namespace: str
) -> None:
    url = REDIS_URL if backend == "redis" else f"memory://{namespace}"
    client = AsyncCrediciClient.from_url(url, namespace=namespace, batching=batching)

    async def add() -> int:
        return (await client.add("u", 10)).balance_after

    assert [asyncio.run(add()) for _ in range(3)] == [10, 20, 30]

    async def check_and_close() -> None:
        assert await client.get_balance("u") == 30
        assert len(await client.get_all_user_transactions("u")) == 3
        await client.aclose()

    asyncio.run(check_and_close())
    gc.collect()  # a connection of a closed loop left unclosed would warn here (an error)


def test_a_loop_the_client_left_and_came_back_to(namespace: str) -> None:
    """Two loops taking turns, neither closed: each keeps its own connections."""
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        for loop in (first, second, first, second):
            loop.run_until_complete(client.add("u", 1))
        assert second.run_until_complete(client.get_balance("u")) == 4
        second.run_until_complete(client.aclose())
    finally:
        first.close()
        second.close()
    gc.collect()


def test_a_client_on_a_connection_you_built_refuses_another_loop(namespace: str) -> None:
    own = redis.asyncio.Redis.from_url(REDIS_URL, retry=AsyncRetry(NoBackoff(), 0))
    client = AsyncCrediciClient(AsyncRedisStorage(own, namespace))
    home = asyncio.new_event_loop()
    try:
        assert home.run_until_complete(client.add("u", 10)).balance_after == 10
        with pytest.raises(EventLoopError, match="nothing was sent"):
            asyncio.run(client.add("u", 10))
        with CrediciClient.from_url(REDIS_URL, namespace=namespace) as check:
            assert check.get_balance("u") == 10  # the refused add was not applied
            assert len(check.get_all_user_transactions("u")) == 1
        home.run_until_complete(own.aclose())
    finally:
        home.close()


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[AsyncCrediciClient, str]]:
    """One client for the module, made outside any loop; every test below runs in a loop of
    its own (pytest-asyncio's default)."""
    namespace = "loops-module-" + __name__.replace(".", "-")
    delete_namespace(namespace)
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)
    yield client, namespace
    asyncio.run(client.aclose())
    delete_namespace(namespace)


@pytest.mark.parametrize("step", range(3))
async def test_a_module_client_in_per_test_loops(
    shared: tuple[AsyncCrediciClient, str], step: int
) -> None:
    client, _ = shared
    before = await client.get_balance("u")
    assert (await client.add("u", 5)).balance_after == before + 5
    assert await client.get_balance("u") == before + 5
