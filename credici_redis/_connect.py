"""From a URL to a storage: ``redis://``, ``rediss://``, ``unix://`` and the embedded ``memory://``.

``memory://`` runs the same Lua scripts in process on fakeredis: each ``memory://`` URL is a new,
private store; ``memory://NAME`` is shared by every client of this process that names it.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import fakeredis
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from credici_redis.errors import InvalidInputError
from credici_redis.storage import AsyncRedisStorage, RedisStorage

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 64

_memory_lock = threading.Lock()
_memory_servers: dict[str, fakeredis.FakeServer] = {}


def _memory_server(url: str) -> fakeredis.FakeServer:
    name = urlsplit(url).netloc + urlsplit(url).path
    if not name:
        return fakeredis.FakeServer(version=(7,))
    with _memory_lock:
        if name not in _memory_servers:
            _memory_servers[name] = fakeredis.FakeServer(version=(7,))
        return _memory_servers[name]


def _scheme(url: str) -> str:
    if not isinstance(url, str):
        raise InvalidInputError(f"url must be a str, not {type(url).__name__}")
    scheme = urlsplit(url).scheme
    if scheme in {"postgres", "postgresql"}:
        raise InvalidInputError("PostgreSQL storage is not available yet in this version")
    if scheme not in {"memory", "redis", "rediss", "unix"}:
        raise InvalidInputError(f"unsupported storage URL scheme {scheme!r}")
    return scheme


def _redis_options(timeout: float, max_connections: int, options: dict[str, Any]) -> dict[str, Any]:
    # No automatic retry: a command retried after a timeout may already have been applied.
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": max_connections,
        **options,
    }


def open_storage(
    url: str,
    namespace: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    idempotency_ttl: timedelta,
    retries: int = 0,
    **options: Any,
) -> RedisStorage:
    if _scheme(url) == "memory":
        client: redis.Redis = fakeredis.FakeRedis(
            server=_memory_server(url),
            connection_pool_class=redis.BlockingConnectionPool,
            max_connections=max_connections,
        )
    else:
        pool = redis.BlockingConnectionPool.from_url(
            url, timeout=timeout, **_redis_options(timeout, max_connections, options)
        )
        client = redis.Redis.from_pool(pool)
    return RedisStorage(
        client, namespace, idempotency_ttl=idempotency_ttl, retries=retries, owns_connection=True
    )


def open_async_storage(
    url: str,
    namespace: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    idempotency_ttl: timedelta,
    retries: int = 0,
    batching: bool = False,
    **options: Any,
) -> AsyncRedisStorage:
    if _scheme(url) == "memory":
        client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(
            server=_memory_server(url),
            connection_pool_class=redis.asyncio.BlockingConnectionPool,
            max_connections=max_connections,
        )
    else:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, timeout=timeout, **_redis_options(timeout, max_connections, options)
        )
        client = redis.asyncio.Redis.from_pool(pool)
    return AsyncRedisStorage(
        client,
        namespace,
        idempotency_ttl=idempotency_ttl,
        retries=retries,
        batching=batching,
        owns_connection=True,
    )
