"""From a URL to a storage: ``redis://``, ``rediss://``, ``unix://``, the embedded ``memory://``,
and ``postgresql://`` (PostgreSQL alone, `credici_redis.postgres`).

``cluster=True`` makes a Redis Cluster client of a ``redis://`` or ``rediss://`` URL (any node of
the cluster: the others are discovered).
``memory://`` runs the same Lua scripts in process on fakeredis (the ``embedded`` extra): each
``memory://`` URL is a new, private store; ``memory://NAME`` is shared by every client of this
process that names it.

Everything is checked before anything connects: the URL (`InvalidURLError`) and every keyword
option (`InvalidOptionError`: one that no part of the chosen client takes is a typo, never
silently ignored). An asyncio storage made here gets a client per event loop (`connect=`).
"""

from __future__ import annotations

import difflib
import inspect
import threading
from collections.abc import Callable, Iterable
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import SplitResult, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from credici_redis._core.extras import need_embedded
from credici_redis._storages.interface import AsyncStorage, Storage
from credici_redis._storages.packing import install as install_packer
from credici_redis._storages.redis_async import AsyncRedisStorage
from credici_redis._storages.redis_base import Durability
from credici_redis._storages.redis_sync import RedisStorage
from credici_redis.errors import (
    InvalidInputError,
    InvalidOptionError,
    InvalidURLError,
    StorageUnavailableError,
)

if TYPE_CHECKING:
    import fakeredis

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 64

ASYNC_ONLY_OPTIONS = frozenset({"batching"})
"""from_url options only the asyncio client takes."""
FROM_URL_OPTIONS = (
    "namespace",
    "timeout",
    "idempotency_ttl",
    "retries",
    "batching",
    "cluster",
    "durability",
    "clock",
    "archive_url",
    "max_connections",
    "allow_eviction",
    "usage_tz",
    "history_retention",
)
"""What ``from_url`` itself takes: a typo of one of these is named in the error."""

SCHEMES = ("redis", "rediss", "unix", "memory", "postgresql", "postgres")

_memory_lock = threading.Lock()
_memory_servers: dict[str, fakeredis.FakeServer] = {}


def _memory_server(url: str) -> fakeredis.FakeServer:
    fake = need_embedded("memory://")
    name = urlsplit(url).netloc + urlsplit(url).path
    if not name:
        server: fakeredis.FakeServer = fake.FakeServer(version=(7,))
        return server
    with _memory_lock:
        if name not in _memory_servers:
            _memory_servers[name] = fake.FakeServer(version=(7,))
        return _memory_servers[name]


def check_url(url: object) -> str:
    """The URL's scheme, once the URL is known to be one a storage can be made of."""
    if not isinstance(url, str):
        raise InvalidURLError(f"the storage URL must be a str, not {type(url).__name__}", url=url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as exc:
        raise InvalidURLError(f"malformed storage URL {url!r}: {exc}", url=url) from exc
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise InvalidURLError(
            f"unsupported storage URL {url!r}: the scheme must be one of "
            + ", ".join(f"{s}://" for s in SCHEMES),
            url=url,
        )
    if scheme in {"redis", "rediss"}:
        _check_redis_url(url, parts)
    elif scheme == "unix" and not parts.path:
        raise InvalidURLError(f"a unix:// URL needs the socket's path: {url!r}", url=url)
    elif scheme in {"postgres", "postgresql"} and not (parts.netloc or parts.query):
        raise InvalidURLError(f"a {scheme}:// URL needs a host: {url!r}", url=url)
    return scheme


def _check_redis_url(url: str, parts: SplitResult) -> None:
    if not url.startswith(f"{parts.scheme}://") or not parts.hostname:
        raise InvalidURLError(
            f"malformed Redis URL {url!r}: expected {parts.scheme}://[user:password@]host[:port][/db]",
            url=url,
        )
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise InvalidURLError(f"the database of {url!r} must be a number, not {db!r}", url=url)


def _accepted(*callables: Callable[..., Any]) -> set[str]:
    """The keyword parameters these take, by name (what redis-py lets a user set)."""
    names: set[str] = set()
    for fn in callables:
        for name, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.add(name)
    return names - {"self"}


def _redis_option_names(scheme: str, cluster: bool, asyncio: bool) -> set[str]:
    """Every option redis-py takes for this kind of client, minus what the URL or we set."""
    lib: Any = redis.asyncio if asyncio else redis
    conn = lib.connection
    classes: list[Callable[..., Any]] = [conn.AbstractConnection.__init__]
    if scheme == "unix":
        classes.append(conn.UnixDomainSocketConnection.__init__)
    else:
        classes.append(conn.Connection.__init__)
    if scheme == "rediss" or cluster:
        classes.append(conn.SSLConnection.__init__)
    if cluster:
        classes.append((redis.asyncio.cluster if asyncio else redis.cluster).RedisCluster.__init__)
    set_by_us = {"host", "port", "path", "url", "startup_nodes", "max_connections", "kwargs"}
    return _accepted(*classes) - set_by_us


def check_options(
    scheme: str,
    options: dict[str, Any],
    *,
    cluster: bool,
    asyncio: bool,
    own: Iterable[str] = FROM_URL_OPTIONS,
) -> None:
    """Refuse an option nobody would take (a typo) before anything connects. `scheme`: the
    URL's, from `check_url`; `own`: the names the caller itself takes, to suggest the one a
    typo meant."""
    if not options:
        return
    for name in ASYNC_ONLY_OPTIONS & set(options):
        if not asyncio:
            raise InvalidOptionError(
                f"{name} is an option of the asyncio client only (AsyncCrediciClient.from_url): "
                "it shares pipelines between the calls of one event-loop moment",
                option=name,
            )
    if scheme == "memory":
        known: set[str] = set()
        takes = "memory:// takes no driver options"
    elif scheme in {"postgres", "postgresql"}:
        return  # checked by psycopg's conninfo parser (credici_redis.postgres), before connecting
    else:
        known = _redis_option_names(scheme, cluster, asyncio)
        takes = "not a credici-redis option, nor one redis-py takes for this URL"
    for name in options:
        if name not in known:
            near = difflib.get_close_matches(name, [*own, *known], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise InvalidOptionError(f"unknown option {name!r}: {takes}{hint}", option=name)


def _check_cluster(scheme: str, url: str) -> None:
    if scheme not in {"redis", "rediss"}:
        raise InvalidInputError(f"cluster=True needs a redis:// or rediss:// URL, not {scheme!r}")
    if urlsplit(url).path not in {"", "/", "/0"}:
        raise InvalidURLError("a Redis Cluster has only database 0", url=url)


def _no_retry(*, asyncio: bool) -> Retry | AsyncRetry:
    """No automatic retry, of the kind the client needs: a command retried after a timeout may
    already have been applied. redis-py's asyncio clients take an asyncio `Retry` (a synchronous
    one is converted, with a warning, since redis-py 8.2)."""
    return AsyncRetry(NoBackoff(), 0) if asyncio else Retry(NoBackoff(), 0)


def _client_options(
    timeout: float, max_connections: int, options: dict[str, Any], *, asyncio: bool
) -> dict[str, Any]:
    # On a cluster, MOVED, ASK and TRYAGAIN, which mean the command did not run, are followed by
    # the storage's routing (`_cluster.Routing`); max_connections is then per node.
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _no_retry(asyncio=asyncio),
        "max_connections": max_connections,
        **options,
    }


def _durability(scheme: str, durability: Durability, timeout: float) -> dict[str, Any]:
    """durability="replica" needs a Redis with replicas; a write waits for one up to half of
    `timeout`, leaving the other half to the write itself."""
    if durability not in {"primary", "replica"}:
        raise InvalidInputError(f"durability must be 'primary' or 'replica', not {durability!r}")
    if durability == "replica" and scheme not in {"redis", "rediss", "unix"}:
        raise InvalidInputError("durability='replica' needs a Redis URL (redis://, rediss://)")
    return {"durability": durability, "replica_timeout": timeout / 2}


def open_storage(url: str, namespace: str, **settings: Any) -> Storage:
    """The sync storage a URL names (what `CrediciClient.from_url` opens); `settings`: `_open`'s."""
    return cast(Storage, _open(url, namespace, asyncio=False, **settings))


def open_async_storage(url: str, namespace: str, **settings: Any) -> AsyncStorage:
    """The asyncio storage a URL names (what `AsyncCrediciClient.from_url` opens)."""
    return cast(AsyncStorage, _open(url, namespace, asyncio=True, **settings))


def _open(
    url: str,
    namespace: str,
    *,
    asyncio: bool,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    idempotency_ttl: timedelta,
    retries: int = 0,
    cluster: bool = False,
    durability: Durability = "primary",
    allow_eviction: bool = False,
    usage_tz: str = "UTC",
    history_retention: timedelta | None = None,
    **options: Any,
) -> Storage | AsyncStorage:
    """Both kinds of storage, opened the same way: check everything, then connect. `options`
    go to redis-py (or psycopg); an unknown one is refused before anything connects."""
    batching = options.pop("batching", False) if asyncio else False  # asyncio only
    scheme = check_url(url)
    check_options(scheme, options, cluster=cluster, asyncio=asyncio)
    waiting = _durability(scheme, durability, timeout)
    common: dict[str, Any] = {
        "idempotency_ttl": idempotency_ttl,
        "retries": retries,
        "usage_tz": usage_tz,
    }
    if scheme in {"postgres", "postgresql"} and not cluster:
        if history_retention is not None:
            raise InvalidOptionError(
                "history_retention trims Redis history; PostgreSQL storage keeps its history in"
                " PostgreSQL",
                option="history_retention",
            )
        from credici_redis._storages.postgres_async import AsyncPostgresStorage
        from credici_redis._storages.postgres_sync import PostgresStorage

        if asyncio:
            return AsyncPostgresStorage.from_url(
                url, namespace, timeout=timeout, batching=batching, **common, **options
            )
        return PostgresStorage.from_url(url, namespace, timeout=timeout, **common, **options)
    if cluster:
        _check_cluster(scheme, url)
    connect = _connector(url, scheme, cluster, timeout, max_connections, options, asyncio=asyncio)
    try:  # the sync cluster client connects at once, to learn the cluster's layout
        client = connect()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise StorageUnavailableError(f"no node of the Redis Cluster answered: {exc}") from exc
    common |= {
        "owns_connection": True,
        "allow_eviction": allow_eviction,
        "history_retention": history_retention,
        **waiting,
    }
    if asyncio:
        return AsyncRedisStorage(client, namespace, batching=batching, connect=connect, **common)
    return RedisStorage(client, namespace, **common)


def _connector(
    url: str,
    scheme: str,
    cluster: bool,
    timeout: float,
    max_connections: int,
    options: dict[str, Any],
    *,
    asyncio: bool,
) -> Callable[[], Any]:
    """Makes a new client of this configuration. An asyncio storage makes one for each event
    loop it runs in (an asyncio connection belongs to the loop that opened it)."""
    if cluster and not asyncio:  # its blocking pools wait up to `timeout` for a connection
        options = {"timeout": timeout, **options}
    settings = _client_options(timeout, max_connections, options, asyncio=asyncio)
    if cluster and asyncio:
        return partial(redis.asyncio.cluster.RedisCluster.from_url, url, **settings)
    if cluster:
        return partial(
            redis.cluster.RedisCluster.from_url,
            url,
            connection_pool_class=redis.BlockingConnectionPool,
            **settings,
        )
    if scheme == "memory":
        server = _memory_server(url)  # every client (every loop's) sees the same store
        fake = need_embedded("memory://")
        return partial(
            fake.FakeAsyncRedis if asyncio else fake.FakeRedis,
            server=server,
            connection_pool_class=(
                redis.asyncio.BlockingConnectionPool if asyncio else redis.BlockingConnectionPool
            ),
            max_connections=max_connections,
        )
    pool_class: Any = (
        redis.asyncio.BlockingConnectionPool if asyncio else redis.BlockingConnectionPool
    )
    client_class: Any = redis.asyncio.Redis if asyncio else redis.Redis

    def redis_client() -> Any:
        pool = pool_class.from_url(url, timeout=timeout, **settings)
        return install_packer(client_class.from_pool(pool))

    return redis_client
