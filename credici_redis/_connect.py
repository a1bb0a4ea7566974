"""From a URL to a storage: ``redis://``, ``rediss://``, ``unix://``, the embedded ``memory://``,
and ``postgresql://`` (PostgreSQL alone, `credici_redis.postgres`).

``cluster=True`` makes a Redis Cluster client of a ``redis://`` or ``rediss://`` URL (any node of
the cluster: the others are discovered).
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
import redis.asyncio.cluster
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from credici_redis.errors import InvalidInputError, StorageUnavailableError
from credici_redis.storage import (
    AsyncRedisStorage,
    AsyncStorage,
    Durability,
    RedisStorage,
    Storage,
)

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
    if scheme not in {"memory", "redis", "rediss", "unix", "postgres", "postgresql"}:
        raise InvalidInputError(f"unsupported storage URL scheme {scheme!r}")
    return scheme


def _cluster_scheme(url: str, cluster: bool) -> str:
    scheme = _scheme(url)
    if cluster and scheme not in {"redis", "rediss"}:
        raise InvalidInputError(f"cluster=True needs a redis:// or rediss:// URL, not {scheme!r}")
    if urlsplit(url).path not in {"", "/", "/0"}:
        raise InvalidInputError("a Redis Cluster has only database 0")
    return scheme


def _cluster_options(
    timeout: float, max_connections: int, options: dict[str, Any]
) -> dict[str, Any]:
    # No retry (a command that may have run is never re-sent); MOVED, ASK and TRYAGAIN, which
    # mean the command did not run, are followed (by the storage's routing, `_cluster.Routing`).
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": max_connections,  # per node
        **options,
    }


def _durability(url: str, durability: Durability, timeout: float) -> dict[str, Any]:
    """durability="replica" needs a Redis with replicas; a write waits for one up to half of
    `timeout`, leaving the other half to the write itself."""
    if durability not in {"primary", "replica"}:
        raise InvalidInputError(f"durability must be 'primary' or 'replica', not {durability!r}")
    if durability == "replica" and _scheme(url) not in {"redis", "rediss", "unix"}:
        raise InvalidInputError("durability='replica' needs a Redis URL (redis://, rediss://)")
    return {"durability": durability, "replica_timeout": timeout / 2}


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
    cluster: bool = False,
    durability: Durability = "primary",
    **options: Any,
) -> Storage:
    waiting = _durability(url, durability, timeout)
    if _scheme(url) in {"postgres", "postgresql"} and not cluster:
        from credici_redis.postgres import PostgresStorage

        return PostgresStorage.from_url(
            url, namespace, timeout=timeout, idempotency_ttl=idempotency_ttl, retries=retries,
            **options,
        )  # fmt: skip
    if cluster:
        _cluster_scheme(url, cluster)
        try:  # the sync cluster client connects at once, to learn the cluster's layout
            nodes = redis.cluster.RedisCluster.from_url(
                url,
                connection_pool_class=redis.BlockingConnectionPool,
                **_cluster_options(timeout, max_connections, {"timeout": timeout, **options}),
            )
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise StorageUnavailableError(f"no node of the Redis Cluster answered: {exc}") from exc
        return RedisStorage(
            nodes,
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            owns_connection=True,
            **waiting,
        )
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
        client,
        namespace,
        idempotency_ttl=idempotency_ttl,
        retries=retries,
        owns_connection=True,
        **waiting,
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
    cluster: bool = False,
    durability: Durability = "primary",
    **options: Any,
) -> AsyncStorage:
    waiting = _durability(url, durability, timeout)
    if _scheme(url) in {"postgres", "postgresql"} and not cluster:
        from credici_redis.postgres import AsyncPostgresStorage

        return AsyncPostgresStorage.from_url(
            url, namespace, timeout=timeout, idempotency_ttl=idempotency_ttl, retries=retries,
            batching=batching, **options,
        )  # fmt: skip
    if cluster:
        _cluster_scheme(url, cluster)
        nodes = redis.asyncio.cluster.RedisCluster.from_url(
            url, **_cluster_options(timeout, max_connections, options)
        )
        return AsyncRedisStorage(
            nodes,
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            batching=batching,
            owns_connection=True,
            **waiting,
        )
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
        **waiting,
    )
