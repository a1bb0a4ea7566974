"""Configuration is checked before anything connects: URLs, keyword options, the retry policy of
a client you built; and no client constructor warns (redis-py 8.2 warns when an asyncio client
is handed a synchronous Retry)."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from credici_redis import (
    AsyncCrediciClient,
    AsyncRedisStorage,
    CrediciClient,
    InvalidInputError,
    InvalidOptionError,
    InvalidURLError,
    RedisStorage,
    UnsafeClientError,
)
from tests.conftest import REDIS_URL

UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens there: connecting would fail


@pytest.mark.parametrize("client_class", [CrediciClient, AsyncCrediciClient])
@pytest.mark.parametrize("url", [REDIS_URL, UNREACHABLE, "memory://", "unix:///tmp/none.sock"])
def test_a_misspelt_option_is_refused_with_the_name_it_meant(client_class: Any, url: str) -> None:
    with pytest.raises(InvalidOptionError, match="did you mean 'namespace'") as caught:
        client_class.from_url(url, namepsace="x")
    assert caught.value.option == "namepsace"
    assert isinstance(caught.value, InvalidInputError)


@pytest.mark.parametrize("client_class", [CrediciClient, AsyncCrediciClient])
def test_an_option_no_part_of_redis_py_takes_is_refused_on_a_cluster_too(
    client_class: Any,
) -> None:
    with pytest.raises(InvalidOptionError, match="socket_time_out"):
        client_class.from_url(UNREACHABLE, cluster=True, socket_time_out=3)


def test_memory_takes_no_driver_options() -> None:
    # They used to be ignored in silence.
    with pytest.raises(InvalidOptionError, match="memory:// takes no driver options"):
        CrediciClient.from_url("memory://", socket_timeout=3)


def test_a_real_redis_py_option_is_taken(namespace: str) -> None:
    with CrediciClient.from_url(
        REDIS_URL, namespace=namespace, socket_keepalive=True, client_name="credici-test"
    ) as client:
        assert client.add("u", 4).balance_after == 4


@pytest.mark.parametrize(
    "url",
    [
        "redis:/127.0.0.1:6379/3",  # one slash
        "redis://",
        "redis://127.0.0.1:port/0",
        "redis://127.0.0.1:6379/db0",
        "rediss:127.0.0.1",
        "unix://",
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "",
        b"redis://127.0.0.1",
    ],
)
@pytest.mark.parametrize("client_class", [CrediciClient, AsyncCrediciClient])
def test_a_malformed_url_is_refused(client_class: Any, url: Any) -> None:
    with pytest.raises(InvalidURLError) as caught:
        client_class.from_url(url)
    assert caught.value.url == url
    assert isinstance(caught.value, InvalidInputError)


@pytest.mark.parametrize("client_class", [CrediciClient, AsyncCrediciClient])
def test_the_url_is_required(client_class: Any) -> None:
    """No silent in-process store: forgetting the URL in production would lose every credit."""
    assert inspect.signature(client_class.from_url).parameters["url"].default is (
        inspect.Parameter.empty
    )
    with pytest.raises(TypeError, match="url"):
        client_class.from_url(namespace="x")


async def test_no_client_constructor_warns(namespace: str) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sync = CrediciClient.from_url(REDIS_URL, namespace=namespace)
        sync.add("u", 1)
        sync.close()
        for options in ({}, {"batching": True}, {"retries": 2}, {"durability": "replica"}):
            client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace, **options)
            if "durability" not in options:  # the shared Redis has no replica to wait for
                await client.add("u", 1)
            else:
                await client.get_balance("u")
            await client.aclose()
        memory = AsyncCrediciClient.from_url("memory://")
        await memory.add("u", 1)
        await memory.aclose()
        cluster = AsyncCrediciClient.from_url(UNREACHABLE, cluster=True)  # connects lazily
        await cluster.aclose()
    assert [str(w.message) for w in seen] == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: redis.Redis.from_url(REDIS_URL, retry=Retry(ExponentialBackoff(), 3)),
        lambda: redis.Redis.from_url(REDIS_URL, retry=None, retry_on_timeout=True),
        lambda: redis.asyncio.Redis.from_url(REDIS_URL, retry=AsyncRetry(ExponentialBackoff(), 2)),
    ],
    ids=["sync-3-retries", "sync-retry-on-timeout", "async-2-retries"],
)
def test_a_client_that_re_sends_writes_is_refused(make: Any) -> None:
    client = make()
    storage_class = AsyncRedisStorage if isinstance(client, redis.asyncio.Redis) else RedisStorage
    with pytest.raises(UnsafeClientError, match=r"retry=Retry\(NoBackoff\(\), 0\)"):
        storage_class(client, "ns")


def test_redis_py_s_default_client_is_refused() -> None:
    """redis-py 8's Redis(...) retries a command after a timeout or a lost connection by
    default (Redis.from_url's pool does not: its connections are taken)."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    with pytest.raises(UnsafeClientError):
        RedisStorage(client, "ns")
    client.close()
    from_url = redis.Redis.from_url(REDIS_URL)
    assert RedisStorage(from_url, "ns").redis is from_url
    from_url.close()


async def test_a_client_without_retries_is_taken(namespace: str) -> None:
    sync = redis.Redis.from_url(REDIS_URL, retry=Retry(NoBackoff(), 0))
    client = CrediciClient(RedisStorage(sync, namespace))
    assert client.add("u", 2).balance_after == 2
    sync.close()
    async_redis = redis.asyncio.Redis.from_url(REDIS_URL, retry=AsyncRetry(NoBackoff(), 0))
    async_client = AsyncCrediciClient(AsyncRedisStorage(async_redis, namespace))
    assert (await async_client.add("u", 2)).balance_after == 4
    await async_redis.aclose()


def test_retries_back_off_with_jitter() -> None:
    """Clients that met the same outage must not all come back at the same moment."""
    storage = RedisStorage(redis.Redis(retry=Retry(NoBackoff(), 0)), "ns", retry_backoff=0.05)
    first = [storage._pause(0) for _ in range(200)]
    assert all(0.025 <= p <= 0.05 for p in first)
    assert len(set(first)) > 100
    assert all(0.05 <= storage._pause(1) <= 0.1 for _ in range(50))
    assert all(storage._pause(20) <= 1.0 for _ in range(50))


@pytest.mark.parametrize("backoff", [-1, "0.1", 61])
def test_a_wrong_retry_backoff_is_refused(backoff: Any) -> None:
    with pytest.raises(ValueError, match="retry_backoff"):
        RedisStorage(redis.Redis(retry=Retry(NoBackoff(), 0)), "ns", retry_backoff=backoff)
