"""What a call's outcome is, for every Redis reply and connection state it can meet: one table.

A caller must know whether its request may have been applied. Each state is classified by that:

    state (how redis-py shows it)                       applied?        error
    not connected: refused, "Timeout connecting",       no              StorageUnavailableError
      no connection free in the pool
    LOADING (BusyLoadingError), BUSY (another           no              StorageUnavailableError
      client's script), READONLY (a demoted primary),
      MASTERDOWN, CLUSTERDOWN, TRYAGAIN / MOVED / ASK
      still redirected when the timeout passed, OOM,
      NOSCRIPT (after the resend by source), a cluster
      with no node for the key
    connection reset or timeout with a write on the     maybe           OutcomeUnknownError
      wire (a read: StorageUnavailableError)
    WAIT after an applied write: no replica in time     on the primary  ReplicationTimeoutError
    WAIT after an applied write: the connection         maybe (lost?)   OutcomeUnknownError
      failed, or Redis answered an error (UNBLOCKED:
      the primary was demoted while waiting; a replica
      now: the write may have been thrown away)
    WAIT refused by the ACL (NOPERM)                    on the primary  StorageError (settings)
    NOPERM on anything else                             no              StorageError (settings)
    any other error reply                               no              StorageError (a bug)

StorageUnavailableError means "not applied": `retries=N` retries it, and so may the caller. Both
other outcomes say "retry with the same idempotency key", which applies a request once. Messages
say only what is known: "may have been applied", never "was applied" unless it was.
"""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors

from credici_redis._core.protocol import Call
from credici_redis.errors import (
    CrediciError,
    OutcomeUnknownError,
    ReplicationTimeoutError,
    StorageError,
    StorageUnavailableError,
)

DRIVER_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException)
"""What redis-py raises; a cluster client's own failures are not RedisErrors."""

NOT_APPLIED = (
    redis_errors.ConnectionError,  # includes BusyLoadingError (LOADING)
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica after failover, until the client follows the master
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.AskError,  # MOVED too: the cluster routing follows them until its timeout
    redis_errors.MasterDownError,
    redis_errors.NoScriptError,  # even after the resend by source: the script did not run
    redis_errors.RedisClusterException,  # e.g. no node of the cluster could be reached
)
"""Error replies and failures that mean the command did not run (a connection failure only
when nothing was on the wire, `maybe_applied`)."""

_NOT_SENT = (
    "connecting to",
    "Timeout connecting",
    "No connection available",
    "Too many connections",
)
"""redis-py's words for a connection failure before anything was sent."""


def maybe_applied(exc: Exception, calls: list[Call]) -> bool:
    """A write was on the wire when the connection failed: Redis may have run it."""
    lost = isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError) and not (
        isinstance(exc, redis_errors.BusyLoadingError) or any(w in str(exc) for w in _NOT_SENT)
    )
    return lost and any(call.script is not None and call.script.effect for call in calls)


def _busy(exc: Exception) -> bool:
    """BUSY: another client's script runs past lua-time-limit; Redis refused before running."""
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("BUSY ")


def storage_error(exc: Exception, calls: list[Call]) -> CrediciError:
    """The CrediciError a driver error means; the caller chains it (`raise ... from exc`)."""
    if _busy(exc):
        return StorageUnavailableError(f"Redis is busy running another script; not applied: {exc}")
    if maybe_applied(exc, calls):
        return OutcomeUnknownError(
            f"the connection failed before Redis answered; the request may have been applied: "
            f"retry it with the same idempotency key ({exc})"
        )
    if isinstance(exc, redis_errors.NoScriptError):
        return StorageUnavailableError(
            f"Redis lost the credici scripts while the call was resent (SCRIPT FLUSH, a "
            f"failover); not applied: {exc}"
        )
    if isinstance(exc, NOT_APPLIED):
        return StorageUnavailableError(f"Redis is unavailable; not applied: {exc}")
    if isinstance(exc, redis_errors.NoPermissionError):
        return StorageError(f"Redis refused a credici command (the ACL user lacks it): {exc}")
    return StorageError(f"Redis refused a credici command: {exc}")


def errors_in_place(calls: list[Call], replies: list[Any]) -> list[Any]:
    """Each error reply of a pipeline becomes its CrediciError, in its place: one call's failure
    is that call's, and the flow decides (a batch keeps it per item, other flows raise it)."""
    out = []
    for call, reply in zip(calls, replies, strict=True):
        if isinstance(reply, redis_errors.RedisError):
            error = storage_error(reply, [call])
            error.__cause__ = reply
            reply = error
        out.append(reply)
    return out


def acknowledged(ack: Any) -> bool:
    """A WAIT reply that says a replica has the writes before it."""
    return isinstance(ack, int) and ack >= 1


def not_replicated(ack: Any, timeout: float) -> CrediciError:
    """The outcome of a write the primary applied, whose WAIT answered `ack` (not a replica)."""
    error: CrediciError
    if isinstance(ack, int):
        return ReplicationTimeoutError(
            f"the write was applied on the primary, but no replica acknowledged it within "
            f"{timeout:g} s: a failover now could lose it; retry it with the same idempotency key",
            replicas=ack,
            timeout=timeout,
        )
    if isinstance(ack, redis_errors.NoPermissionError):
        error = StorageError(
            f"the write was applied on the primary, but Redis refused WAIT ({ack}): "
            "durability='replica' needs WAIT (+wait in the ACL) and a replica"
        )
    elif isinstance(ack, redis_errors.ConnectionError | redis_errors.TimeoutError):
        error = OutcomeUnknownError(
            f"the write reached the primary, but the connection failed while waiting for a "
            f"replica ({ack}): it may have been applied, and lost in a failover; retry it with "
            "the same idempotency key"
        )
    else:  # UNBLOCKED (demoted while waiting), a replica refusing WAIT...
        error = OutcomeUnknownError(
            f"the write reached the primary, but its wait for a replica ended with {ack!s}: the "
            "primary may have been demoted and the write thrown away; retry it with the same "
            "idempotency key"
        )
    error.__cause__ = ack if isinstance(ack, BaseException) else None
    return error
