"""What the Redis storages share and what has no I/O: constants, driver errors and what they
mean, WAIT bookkeeping, NOSCRIPT resends, the archive protocols and `_RedisStorageBase`.

The storages themselves: `_async_storage.AsyncRedisStorage` (the source) and
`_sync_storage.RedisStorage` (generated from it); `credici_redis.storage` is where to import them.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any, Literal, Protocol, TypeVar, get_args

from redis import exceptions as redis_errors
from redis.backoff import EqualJitterBackoff

from credici_redis._core.operation import Operation
from credici_redis._core.protocol import Call, Ledger
from credici_redis._core.requests import generated_key
from credici_redis._core.schedule import zone
from credici_redis._core.time import duration_ms
from credici_redis._storages.interface import Batch as Batch
from credici_redis._storages.interface import R as R
from credici_redis._storages.outcomes import DRIVER_ERRORS as DRIVER_ERRORS
from credici_redis._storages.outcomes import acknowledged, not_replicated
from credici_redis._storages.outcomes import errors_in_place as errors_in_place
from credici_redis._storages.outcomes import storage_error as storage_error
from credici_redis.errors import (
    CrediciError,
    EvictionPolicyError,
    InvalidOptionError,
    InvalidTimeZoneError,
    UnsafeClientError,
)

T = TypeVar("T")

DEFAULT_NAMESPACE = "credici"
DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)
DEFAULT_KEEP = timedelta(days=7)
"""Archived entries stay in Redis this long after they were made: reverse and audit without the
archive need them; older ones are trimmed once PostgreSQL holds them (`credici_redis.archive`)."""

Durability = Literal["primary", "replica"]
"""When a write is acknowledged: once the primary applied it (Redis's default), or once a
replica too has it (``WAIT 1``), so that a failover does not lose it."""
DEFAULT_REPLICA_TIMEOUT = 1.0
"""Seconds a write waits for a replica's acknowledgement (``durability="replica"``)."""


BATCH_CALLS = 512
"""Most calls per auto-batched pipeline; more go out as further pipelines at the same time."""

# A retry of one of these may re-send a command Redis already ran.
_RESENT_AFTER = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    ConnectionError,
    TimeoutError,
    OSError,
)


def check_retry_policy(client: Any) -> None:
    """Refuse a redis-py client that retries a command after a timeout or a lost connection:
    a write whose first attempt reached Redis would be applied twice (redis-py 6+ retries by
    default). fakeredis, in process, never loses a reply."""
    if is_in_process(client):
        return
    retry = _effective_retry(client)
    retries = getattr(retry, "_retries", 0) if retry is not None else 0
    errors = getattr(retry, "_supported_errors", ()) if retry is not None else ()
    resent = [e for e in errors if isinstance(e, type) and issubclass(e, _RESENT_AFTER)]
    if retries and resent:
        names = ", ".join(sorted({e.__name__ for e in resent}))
        raise UnsafeClientError(
            f"this redis-py client retries a command up to {retries} times after {names}: a "
            "charge whose first attempt reached Redis would be applied twice. Build the client "
            "with retry=Retry(NoBackoff(), 0) (redis.asyncio.retry.Retry for asyncio) and "
            "retry_on_timeout=False, and let credici retry safely with retries=N; or use "
            "CrediciClient.from_url, which does this for you"
        )


def _effective_retry(client: Any) -> Any:
    """The retry policy a command of this client runs under: its connections' (what redis-py
    builds from retry=, retry_on_timeout= and its defaults), or a cluster client's own."""
    pool: Any = getattr(client, "connection_pool", None)
    connection_class = getattr(pool, "connection_class", None)
    if connection_class is None:
        return getattr(client, "retry", None)
    with warnings.catch_warnings():  # a connection is made, never connected, to be looked at
        warnings.simplefilter("ignore")
        connection = connection_class(**pool.connection_kwargs)
    return getattr(connection, "retry", None)


def is_in_process(client: Any) -> bool:
    """fakeredis (``memory://``, PostgresStorage's scripts): no network, no eviction."""
    return type(client).__module__.startswith("fakeredis")


def check_eviction_policy(info: Any, node: str | None, refusal: str = "") -> None:
    """Refuse a Redis whose ``maxmemory-policy`` (from ``INFO memory``, which works where an
    ACL denies CONFIG) is not ``noeviction``. `info`: redis-py's parsed reply; `refusal`: why
    Redis would not answer INFO."""
    if isinstance(info, dict) and "maxmemory_policy" not in info:  # a cluster's {node: info}
        for name, one in info.items():
            check_eviction_policy(one, str(name))
        return
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    where = f"Redis at {node}" if node else "this Redis"
    if policy is None:
        raise EvictionPolicyError(
            f"{where} did not say its maxmemory-policy (INFO memory{': ' if refusal else ''}"
            f"{refusal}): credici-redis refuses to "
            "run where keys may be evicted; grant the ACL user +info, or pass "
            "allow_eviction=True if you know the policy is noeviction",
            policy=None,
            node=node,
        )
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy != "noeviction":
        raise EvictionPolicyError(
            f"{where} evicts keys when it is full (maxmemory-policy {policy}): a user's credits, "
            "history and idempotency records could vanish without a word, and a retried keyed "
            "request apply twice. Run credici-redis on a Redis with maxmemory-policy noeviction "
            "(CONFIG SET maxmemory-policy noeviction, and in redis.conf), where a full Redis "
            "refuses writes instead; or pass allow_eviction=True to accept losing data",
            policy=policy,
            node=node,
        )


class ArchiveSource(Protocol):
    """Where the history Redis no longer keeps is (`credici_redis.archive.ArchiveReader`)."""

    def entries_before(self, user_id: str, entry_id: str) -> list[tuple[str, dict[str, str]]]: ...


class AsyncArchiveSource(Protocol):
    async def entries_before(
        self, user_id: str, entry_id: str
    ) -> list[tuple[str, dict[str, str]]]: ...


def check_usage_tz(usage_tz: object) -> str:
    """The zone of the usage days (`get_usage`): an IANA name; InvalidTimeZoneError otherwise."""
    if not isinstance(usage_tz, str) or "|" in usage_tz or "=" in usage_tz:
        raise InvalidTimeZoneError(f"usage_tz must be an IANA time zone name, got {usage_tz!r}")
    zone(usage_tz)
    return "UTC" if usage_tz in ("UTC", "Etc/UTC") else usage_tz


def check_retention(retention: object) -> int | None:
    """history_retention in ms (None: none); InvalidOptionError unless a timedelta of at least
    a minute."""
    if retention is None:
        return None
    if not isinstance(retention, timedelta) or retention < timedelta(minutes=1):
        raise InvalidOptionError(
            f"history_retention must be a timedelta of at least a minute, got {retention!r}",
            option="history_retention",
        )
    return duration_ms(retention)


class _RedisStorageBase:
    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        owns_connection: bool = False,
        durability: Durability = "primary",
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
        usage_tz: str = "UTC",
        history_retention: timedelta | None = None,
    ) -> None:
        if idempotency_ttl < timedelta(seconds=1):
            raise ValueError("idempotency_ttl must be at least one second")
        if type(retries) is not int or retries < 0:
            raise ValueError("retries must be an int >= 0")
        if durability not in get_args(Durability):
            raise ValueError(f"durability must be one of {get_args(Durability)}")
        if not isinstance(replica_timeout, int | float) or not 0.001 <= replica_timeout < 3600:
            raise ValueError("replica_timeout must be seconds, at least 0.001")
        self.history_retention_ms = check_retention(history_retention)
        """History entries older than this go (`trim_history`, after a checkpoint); None: kept
        until the archiver moves them to PostgreSQL."""
        self.durability = durability
        self.replica_timeout = float(replica_timeout)
        self.ledger = Ledger(namespace, duration_ms(idempotency_ttl), check_usage_tz(usage_tz))
        self.namespace = namespace
        if not isinstance(retry_backoff, int | float) or not 0 <= retry_backoff <= 60:
            raise ValueError("retry_backoff must be seconds, 0 to 60")
        self.retries = retries
        self.retry_backoff = retry_backoff
        # Jitter (half fixed, half random): clients that met the same outage do not come back in
        # lockstep. Attempt n waits between half and all of retry_backoff * 2**n, at most 1 s.
        self._backoff = EqualJitterBackoff(cap=1.0, base=retry_backoff)
        self._owns_connection = owns_connection

    def _retry_safe(self, op: Operation[R, Any], req: R) -> R:
        """With retries on, a request of a keyed operation without a key gets one, once, before
        its first attempt."""
        if self.retries and op.keyed and getattr(req, "idempotency_key", None) is None:
            return op.with_key(req, generated_key())
        return req

    def _batch_safe(self, op: Operation[R, Any], reqs: Batch[R]) -> Batch[R]:
        return [r if isinstance(r, CrediciError) else self._retry_safe(op, r) for r in reqs]

    def _pause(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0 for the first retry)."""
        return float(self._backoff.compute(attempt))

    def _waits(self, calls: list[Call]) -> list[bool]:
        """Which calls a WAIT must follow: with durability="replica", every write."""
        replica = self.durability == "replica"
        return [replica and call.script is not None and call.script.write for call in calls]

    @property
    def _wait_ms(self) -> int:
        return max(1, round(self.replica_timeout * 1000))  # WAIT 0 would wait forever

    def _wait_command(self) -> tuple[str | int, ...]:
        return ("WAIT", 1, self._wait_ms)

    def _replicated(self, replies: list[Any], acks: list[Any], waits: list[bool]) -> list[Any]:
        """A write whose WAIT saw no replica acknowledge it becomes ReplicationTimeoutError."""
        out = []
        for reply, ack, waited in zip(replies, acks, waits, strict=True):
            if waited and not isinstance(reply, Exception) and not acknowledged(ack):
                reply = not_replicated(ack, self.replica_timeout)
            out.append(reply)
        return out


def function_missing(reply: Any) -> bool:
    """FCALL of a function the server does not have (the library was never loaded there, or
    was lost in a restart, a FUNCTION FLUSH or a failover): nothing ran."""
    return isinstance(reply, redis_errors.ResponseError) and str(reply).startswith(
        "Function not found"
    )


def fcall_refused(reply: Any) -> bool:
    """FCALL itself refused: by an ACL that does not grant it (one written for the scripts
    alone), or by a Redis before 7 (no Functions). Nothing ran; the storage runs the scripts by
    EVALSHA from then on."""
    if not isinstance(reply, redis_errors.ResponseError):
        return False
    text = str(reply).lower()
    return "'fcall'" in text and (
        isinstance(reply, redis_errors.NoPermissionError) or "unknown command" in text
    )


def to_resend(calls: list[Call], replies: list[Any]) -> list[int]:
    """Which calls of a pipeline to send again, by their scripts' source (`by_source`).

    Every call that got NOSCRIPT, "function not found" or an ACL refusal of FCALL, and every read
    (non-script call) after the first of them, since a read may depend on a script earlier in the
    batch. A script that ran is never sent twice.
    """
    resend: list[int] = []
    for i, (call, reply) in enumerate(zip(calls, replies, strict=True)):
        missing = (
            isinstance(reply, redis_errors.NoScriptError)
            or function_missing(reply)
            or fcall_refused(reply)
        )
        if missing or (resend and call.script is None):
            resend.append(i)
    return resend


def by_source(call: Call) -> Call:
    """The call as EVAL of its script's source instead of FCALL or EVALSHA: it runs wherever its
    key lives now, whatever that server holds (after a restart, a flush or a failover to a primary
    that never saw the script), and leaves the script cached there."""
    if call.script is None or call.args[0] not in ("EVALSHA", "FCALL"):
        return call
    return Call(("EVAL", call.script.source, *call.args[2:]), call.script, call.entry)


def by_sha(call: Call) -> Call:
    """The call as EVALSHA of its script (after the scripts were loaded by SCRIPT LOAD)."""
    if call.script is None or call.args[0] not in ("EVAL", "FCALL", "EVALSHA"):
        return call
    return Call(("EVALSHA", call.script.sha, *call.args[2:]), call.script, call.entry)


def no_functions(exc: BaseException) -> bool:
    """A server without Functions (a Redis before 7): the storage then runs the scripts by
    EVALSHA. (An ACL that refuses FUNCTION LOAD is not that: an administrator may load the
    library.)"""
    text = str(exc).lower()
    return isinstance(exc, redis_errors.ResponseError) and "unknown command" in text


def eval_refused(replies: list[Any]) -> bool:
    """An ACL that grants EVALSHA and SCRIPT LOAD but not EVAL (as the docs once said): the
    scripts are then loaded, and sent by SHA again."""
    return any(
        isinstance(r, redis_errors.NoPermissionError) and "'eval'" in str(r).lower()
        for r in replies
    )


def _scripts_of(calls: list[Call]) -> list[str]:
    sources = (call.script for call in calls)
    return list({script.source: None for script in sources if script is not None})
