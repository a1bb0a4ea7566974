"""Storages: where a client's validated requests are carried out.

`Storage` / `AsyncStorage` are the interface a client needs (the seed's "storage interface");
`RedisStorage` / `AsyncRedisStorage` implement it over redis-py, or over fakeredis for the embedded
``memory://`` store. They only drive the flows of `credici_redis._protocol` (which build every
command and parse every reply): send a batch, reload a script on NOSCRIPT, turn driver errors into
`StorageUnavailableError`.

A connection failure or timeout while a request was in flight raises `OutcomeUnknownError`: it
may have applied. With ``retries=N`` the storage retries by itself, and a request the caller gave
no idempotency key gets one (``auto:<uuid>``), made once per call, so no retry applies it twice.

A redis-py client built by hand retries a command after a timeout by default (3 times in
redis-py 6+), without such a key: a charge whose first attempt did reach Redis is applied twice.
Clients built by ``CrediciClient.from_url`` turn that off; pass ``retry=Retry(NoBackoff(), 0)``
when you build your own.

``durability="replica"``: every round trip that carries a write ends with ``WAIT 1 <ms>`` on the
same connection (the node that ran the writes), and a write no replica acknowledged in time
raises `ReplicationTimeoutError` (applied on the primary, not known to be replicated).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, get_args

from redis import exceptions as redis_errors

from credici_redis import _cluster
from credici_redis._protocol import Call, Flow, Ledger
from credici_redis._requests import (
    AddRequest,
    CaptureRequest,
    EventReading,
    HistoryRequest,
    KeyedRequest,
    ReserveRequest,
    ReverseRequest,
    StartCycleRequest,
    SubtractRequest,
    generated_key,
    keyed,
)
from credici_redis._time import duration_ms
from credici_redis.errors import (
    CrediciError,
    OutcomeUnknownError,
    ReplicationTimeoutError,
    StorageError,
    StorageUnavailableError,
)
from credici_redis.models import (
    AuditReport,
    BalanceDetails,
    BalanceEvent,
    Cycle,
    Hold,
    Transaction,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

T = TypeVar("T")
R = TypeVar("R", AddRequest, SubtractRequest)
Batch = list[R | CrediciError]
"""Requests of a batch; an item whose input was bad is already its error."""

DEFAULT_NAMESPACE = "credici"
DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)

Durability = Literal["primary", "replica"]
"""When a write is acknowledged: once the primary applied it (Redis's default), or once a
replica too has it (``WAIT 1``), so that a failover does not lose it."""
DEFAULT_REPLICA_TIMEOUT = 1.0
"""Seconds a write waits for a replica's acknowledgement (``durability="replica"``)."""

READ_SCRIPTS = frozenset({"balance", "cycle", "audit", "details"})
"""Scripts that only read (what they write, expiry and renewal, any later call writes again): no
WAIT for them. Every other script is a write a caller was told about, and is waited for."""


BATCH_CALLS = 512
"""Most calls per auto-batched pipeline; more go out as further pipelines at the same time."""

_UNAVAILABLE = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica after failover, until the client follows the master
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    redis_errors.RedisClusterException,  # e.g. no node of the cluster could be reached
)

DRIVER_ERRORS = (redis_errors.RedisError, redis_errors.RedisClusterException)
"""What redis-py raises; a cluster client's own failures are not RedisErrors."""


# redis-py's words for a failure before anything was sent.
_NOT_SENT = (
    "connecting to",
    "Timeout connecting",
    "No connection available",
    "Too many connections",
)


def _maybe_applied(exc: Exception, calls: list[Call]) -> bool:
    """A request was on the wire when the connection failed: Redis may have run it."""
    lost = isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError) and not (
        isinstance(exc, redis_errors.BusyLoadingError) or any(w in str(exc) for w in _NOT_SENT)
    )
    return lost and any(call.script is not None and call.script.effect for call in calls)


def storage_error(exc: Exception, calls: list[Call]) -> CrediciError:
    """The CrediciError a driver error means; the caller chains it (`raise ... from exc`)."""
    if _maybe_applied(exc, calls):
        return OutcomeUnknownError(
            f"the connection failed before Redis answered; the request may have been applied: "
            f"retry it with the same idempotency key ({exc})"
        )
    if isinstance(exc, _UNAVAILABLE):
        return StorageUnavailableError(f"Redis is unavailable: {exc}")
    return StorageError(f"Redis refused a credici command: {exc}")


class ArchiveSource(Protocol):
    """Where the history Redis no longer keeps is (`credici_redis.archive.ArchiveReader`)."""

    def entries_before(self, user_id: str, entry_id: str) -> list[tuple[str, dict[str, str]]]: ...


class AsyncArchiveSource(Protocol):
    async def entries_before(
        self, user_id: str, entry_id: str
    ) -> list[tuple[str, dict[str, str]]]: ...


class Storage(Protocol):
    """What `CrediciClient` needs from a storage. Requests arrive validated."""

    def add(self, req: AddRequest) -> Transaction: ...
    def subtract(self, req: SubtractRequest) -> Transaction: ...
    def add_many(self, reqs: Batch[AddRequest]) -> list[Transaction | CrediciError]: ...
    def subtract_many(self, reqs: Batch[SubtractRequest]) -> list[Transaction | CrediciError]: ...
    def balance(self, user_id: str, now_ms: int | None) -> int: ...
    def start_cycle(self, req: StartCycleRequest) -> Cycle: ...
    def get_cycle(self, user_id: str, now_ms: int | None) -> Cycle | None: ...
    def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Cycle: ...
    def history(self, req: HistoryRequest) -> list[Transaction]: ...
    def reserve(self, req: ReserveRequest) -> Hold: ...
    def capture(self, req: CaptureRequest) -> Transaction: ...
    def release(self, user_id: str, local_id: str, now_ms: int | None) -> Hold: ...
    def reverse(self, req: ReverseRequest) -> Transaction: ...
    def audit(
        self, user_id: str, now_ms: int | None, archive: ArchiveSource | None = None
    ) -> AuditReport: ...
    def balance_details(self, user_id: str, now_ms: int | None) -> BalanceDetails: ...
    def set_credit_limit(self, user_id: str, limit: int, now_ms: int | None) -> None: ...
    def scan_users(self, batch: int) -> Iterator[list[str]]: ...
    def set_low_balance_threshold(
        self, user_id: str, threshold: int | None, now_ms: int | None
    ) -> None: ...
    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> Iterator[BalanceEvent]: ...
    def close(self) -> None: ...


class AsyncStorage(Protocol):
    """What `AsyncCrediciClient` needs from a storage: `Storage`, awaitable."""

    async def add(self, req: AddRequest) -> Transaction: ...
    async def subtract(self, req: SubtractRequest) -> Transaction: ...
    async def add_many(self, reqs: Batch[AddRequest]) -> list[Transaction | CrediciError]: ...
    async def subtract_many(
        self, reqs: Batch[SubtractRequest]
    ) -> list[Transaction | CrediciError]: ...
    async def balance(self, user_id: str, now_ms: int | None) -> int: ...
    async def start_cycle(self, req: StartCycleRequest) -> Cycle: ...
    async def get_cycle(self, user_id: str, now_ms: int | None) -> Cycle | None: ...
    async def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Cycle: ...
    async def history(self, req: HistoryRequest) -> list[Transaction]: ...
    async def reserve(self, req: ReserveRequest) -> Hold: ...
    async def capture(self, req: CaptureRequest) -> Transaction: ...
    async def release(self, user_id: str, local_id: str, now_ms: int | None) -> Hold: ...
    async def reverse(self, req: ReverseRequest) -> Transaction: ...
    async def audit(
        self, user_id: str, now_ms: int | None, archive: AsyncArchiveSource | None = None
    ) -> AuditReport: ...
    async def balance_details(self, user_id: str, now_ms: int | None) -> BalanceDetails: ...
    async def set_credit_limit(self, user_id: str, limit: int, now_ms: int | None) -> None: ...
    def scan_users(self, batch: int) -> AsyncIterator[list[str]]: ...
    async def set_low_balance_threshold(
        self, user_id: str, threshold: int | None, now_ms: int | None
    ) -> None: ...
    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]: ...
    async def aclose(self) -> None: ...


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
    ) -> None:
        if idempotency_ttl < timedelta(seconds=1):
            raise ValueError("idempotency_ttl must be at least one second")
        if type(retries) is not int or retries < 0:
            raise ValueError("retries must be an int >= 0")
        if durability not in get_args(Durability):
            raise ValueError(f"durability must be one of {get_args(Durability)}")
        if not isinstance(replica_timeout, int | float) or not 0.001 <= replica_timeout < 3600:
            raise ValueError("replica_timeout must be seconds, at least 0.001")
        self.durability = durability
        self.replica_timeout = float(replica_timeout)
        self.ledger = Ledger(namespace, duration_ms(idempotency_ttl))
        self.namespace = namespace
        self.retries = retries
        self.retry_backoff = retry_backoff
        self._owns_connection = owns_connection

    def _retry_safe(self, req: KeyedRequest) -> KeyedRequest:
        """With retries on, a request without a key gets one, once, before its first attempt."""
        if self.retries and req.idempotency_key is None:
            return keyed(req, generated_key())
        return req

    def _batch_safe(self, reqs: Batch[R]) -> Batch[R]:
        return [r if isinstance(r, CrediciError) else self._retry_safe(r) for r in reqs]

    def _pause(self, attempt: int) -> float:
        return float(min(self.retry_backoff * 2**attempt, 1.0))

    def _waits(self, calls: list[Call]) -> list[bool]:
        """Which calls a WAIT must follow: with durability="replica", every write."""
        replica = self.durability == "replica"
        return [
            replica and call.script is not None and call.script.name not in READ_SCRIPTS
            for call in calls
        ]

    @property
    def _wait_ms(self) -> int:
        return max(1, round(self.replica_timeout * 1000))  # WAIT 0 would wait forever

    def _wait_command(self) -> tuple[str | int, ...]:
        return ("WAIT", 1, self._wait_ms)

    def _replicated(self, replies: list[Any], acks: list[Any], waits: list[bool]) -> list[Any]:
        """A write whose WAIT saw no replica acknowledge it becomes ReplicationTimeoutError."""
        out = []
        for reply, ack, waited in zip(replies, acks, waits, strict=True):
            if waited and not isinstance(reply, Exception) and not _acknowledged(ack):
                reply = _not_replicated(ack, self.replica_timeout)
            out.append(reply)
        return out


def _acknowledged(ack: Any) -> bool:
    return isinstance(ack, int) and ack >= 1


def _not_replicated(ack: Any, timeout: float) -> CrediciError:
    if isinstance(ack, int):
        return ReplicationTimeoutError(
            f"the write was applied on the primary, but no replica acknowledged it within "
            f"{timeout:g} s: a failover now could lose it; retry it with the same idempotency key",
            replicas=ack,
            timeout=timeout,
        )
    error: CrediciError
    if isinstance(ack, redis_errors.ConnectionError | redis_errors.TimeoutError):
        error = OutcomeUnknownError(
            f"the write was applied on the primary, but the connection failed while waiting for "
            f"a replica ({ack}): retry it with the same idempotency key"
        )
        error.__cause__ = ack
        return error
    error = StorageError(
        f"the write was applied on the primary, but Redis refused WAIT ({ack}): "
        "durability='replica' needs WAIT and a replica"
    )
    error.__cause__ = ack if isinstance(ack, BaseException) else None
    return error


def to_resend(calls: list[Call], replies: list[Any]) -> list[int]:
    """Which calls of a pipeline to send again once the missing scripts are loaded.

    Every call that got NOSCRIPT, and every read (non-script call) after the first of them, since
    a read may depend on a script earlier in the batch. A script that ran is never sent twice.
    """
    resend: list[int] = []
    for i, (call, reply) in enumerate(zip(calls, replies, strict=True)):
        if isinstance(reply, redis_errors.NoScriptError) or (resend and call.script is None):
            resend.append(i)
    return resend


def errors_in_place(calls: list[Call], replies: list[Any]) -> list[Any]:
    """Each error reply of a pipeline becomes its CrediciError, in its place: one call's failure
    is that call's, and the flow decides (a batch keeps it per item, other flows raise it)."""
    out = []
    for call, reply in zip(calls, replies, strict=True):
        if isinstance(reply, redis_errors.NoScriptError):
            reply = StorageError("Redis lost the credici scripts again right after loading them")
        elif isinstance(reply, redis_errors.RedisError):
            error = storage_error(reply, [call])
            error.__cause__ = reply
            reply = error
        out.append(reply)
    return out


def _scripts_of(calls: list[Call], indices: list[int]) -> list[str]:
    sources = (calls[i].script for i in indices)
    return list({script.source: None for script in sources if script is not None})


class RedisStorage(_RedisStorageBase):
    """The ledger on a `redis.Redis` (or fakeredis) client, or a `redis.cluster.RedisCluster`.

    The storage closes the client on `close()` only if it created it (``from_url``).
    durability="replica": a write returns once a replica acknowledged it (``WAIT 1``, up to
    `replica_timeout` seconds), else raises ReplicationTimeoutError.
    """

    def __init__(
        self,
        redis: redis.Redis | redis.cluster.RedisCluster,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        owns_connection: bool = False,
        durability: Durability = "primary",
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
    ) -> None:
        super().__init__(
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            retry_backoff=retry_backoff,
            owns_connection=owns_connection,
            durability=durability,
            replica_timeout=replica_timeout,
        )
        self.redis = redis
        self._execute: Callable[..., Any] = redis.execute_command
        self._cluster = _cluster.is_cluster(redis)

    def add(self, req: AddRequest) -> Transaction:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.add(req))

    def subtract(self, req: SubtractRequest) -> Transaction:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.subtract(req))

    def add_many(self, reqs: Batch[AddRequest]) -> list[Transaction | CrediciError]:
        return self.retrying_many(self.ledger.add_many, self._batch_safe(reqs))

    def subtract_many(self, reqs: Batch[SubtractRequest]) -> list[Transaction | CrediciError]:
        return self.retrying_many(self.ledger.subtract_many, self._batch_safe(reqs))

    def retrying_many(
        self,
        make_flow: Callable[[Batch[R]], Flow[list[Transaction | CrediciError]]],
        reqs: Batch[R],
    ) -> list[Transaction | CrediciError]:
        """Run a batch; items that met an outage are run anew up to `retries` times."""
        results: list[Transaction | CrediciError] = [
            r if isinstance(r, CrediciError) else StorageError("not sent") for r in reqs
        ]
        pending = [i for i, r in enumerate(reqs) if not isinstance(r, CrediciError)]
        for attempt in itertools.count():
            try:
                got = self.run(make_flow([reqs[i] for i in pending]))
            except StorageUnavailableError as outage:
                got = [outage] * len(pending)
            for i, result in zip(pending, got, strict=True):
                results[i] = result
            pending = [i for i in pending if isinstance(results[i], StorageUnavailableError)]
            if not pending or attempt >= self.retries:
                return results
            time.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    def balance(self, user_id: str, now_ms: int | None) -> int:
        return self.retrying(lambda: self.ledger.balance(user_id, now_ms))

    def start_cycle(self, req: StartCycleRequest) -> Cycle:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.start_cycle(req))

    def get_cycle(self, user_id: str, now_ms: int | None) -> Cycle | None:
        return self.retrying(lambda: self.ledger.get_cycle(user_id, now_ms))

    def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Cycle:
        # Cancelling twice is the same as once: safe to retry without a key.
        return self.retrying(lambda: self.ledger.cancel_cycle(user_id, forfeit, now_ms))

    def history(self, req: HistoryRequest) -> list[Transaction]:
        return self.retrying(lambda: self.ledger.history(req))

    def reserve(self, req: ReserveRequest) -> Hold:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.reserve(req))

    def capture(self, req: CaptureRequest) -> Transaction:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.capture(req))

    def release(self, user_id: str, local_id: str, now_ms: int | None) -> Hold:
        return self.retrying(lambda: self.ledger.release(user_id, local_id, now_ms))

    def reverse(self, req: ReverseRequest) -> Transaction:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.reverse(req))

    def audit(
        self, user_id: str, now_ms: int | None, archive: ArchiveSource | None = None
    ) -> AuditReport:
        snapshot = self.retrying(lambda: self.ledger.audit_snapshot(user_id, now_ms))
        if archive is None or not snapshot.trimmed:
            return snapshot.report(())
        # Read after the snapshot: whatever Redis trimmed before it is in PostgreSQL by now.
        return snapshot.report(archive.entries_before(user_id, snapshot.trimmed))

    def balance_details(self, user_id: str, now_ms: int | None) -> BalanceDetails:
        return self.retrying(lambda: self.ledger.balance_details(user_id, now_ms))

    def set_credit_limit(self, user_id: str, limit: int, now_ms: int | None) -> None:
        return self.retrying(lambda: self.ledger.set_credit_limit(user_id, limit, now_ms))

    def scan_users(self, batch: int) -> Iterator[list[str]]:
        """Every user of the namespace, in batches, by SCAN: Redis is never blocked for long."""
        for users in self._scanning(partial(self.ledger.scan_users, count=batch)):
            if users:
                yield users

    def _scanning(self, step: Callable[[int], Flow[tuple[int, list[str]]]]) -> Iterator[list[str]]:
        """Run a SCAN flow from cursor 0 to 0: on each primary of a cluster (a cursor is a
        node's), on the server otherwise."""
        for node in _cluster.primaries(self.redis):
            cursor = 0
            while True:
                cursor, found = self.retrying(partial(step, cursor), node)
                yield found
                if cursor == 0:
                    break

    def set_low_balance_threshold(
        self, user_id: str, threshold: int | None, now_ms: int | None
    ) -> None:
        return self.retrying(
            lambda: self.ledger.set_low_balance_threshold(user_id, threshold, now_ms)
        )

    def _event_streams(self) -> Iterator[list[str]]:
        return self._scanning(partial(self.ledger.find_event_streams, count=1000))

    def events(self, group: str, consumer: str, reading: EventReading) -> Iterator[BalanceEvent]:
        """Low-balance events of every user of the namespace, as consumer `consumer` of group
        `group` (each event goes to one consumer of a group). An event is acknowledged once the
        caller comes back for the next one, or stops: at least once, never lost; one a dead
        consumer read but never acknowledged is taken over after `claim_after` seconds."""
        streams: list[str] = []
        looked = claimed = -float("inf")
        quiet_since = time.monotonic()
        done: list[BalanceEvent] = []
        try:
            while True:
                if time.monotonic() - looked >= reading.discover_every:
                    for found in self._event_streams():
                        new = [stream for stream in found if stream not in streams]
                        if new:
                            self.run(self.ledger.join_group(new, group))
                            streams += new
                    looked = time.monotonic()
                claim = None
                if time.monotonic() - claimed >= reading.claim_after:
                    claim, claimed = int(reading.claim_after * 1000), time.monotonic()
                batch: list[BalanceEvent] = []
                if streams:
                    batch = self.retrying(
                        partial(
                            self.ledger.read_events, streams, group, consumer, reading.batch, claim
                        )
                    )
                for event in batch:
                    yield event
                    done.append(event)
                if done:
                    self.run(self.ledger.ack_events(done, group))
                    done = []
                    quiet_since = time.monotonic()
                elif (
                    reading.idle_timeout is not None
                    and time.monotonic() - quiet_since >= reading.idle_timeout
                ):
                    return
                else:
                    time.sleep(reading.poll)
        finally:
            if done:  # the caller stopped: what it has seen is handled
                self.run(self.ledger.ack_events(done, group))

    def close(self) -> None:
        if self._owns_connection:
            self.redis.close()

    def retrying(self, make_flow: Callable[[], Flow[T]], node: Any = None) -> T:
        """Run a flow; after an outage, run it anew up to `retries` times (requests are keyed)."""
        for attempt in itertools.count():
            try:
                return self.run(make_flow(), node)
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                time.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    def run(self, flow: Flow[T], node: Any = None) -> T:
        """Drive a flow: send each batch it yields, hand back the replies, return its result.
        `node`: a cluster node to send every call to (a SCAN step); None routes by key."""
        try:
            calls = next(flow)
            while True:
                calls = flow.send(self._send(calls, node))
        except StopIteration as done:
            result: T = done.value
            return result

    def _send(self, calls: list[Call], node: Any = None) -> list[Any]:
        """One round trip (a pipeline if several calls), reloading scripts on NOSCRIPT.
        A lost connection raises; an error reply comes back in its call's place."""
        try:
            replies = self._pipeline(calls, node)
            resend = to_resend(calls, replies)
            if resend:
                for source in _scripts_of(calls, resend):
                    self.redis.script_load(source)
                again = self._pipeline([calls[i] for i in resend])
                for i, reply in zip(resend, again, strict=True):
                    replies[i] = reply
        except DRIVER_ERRORS as exc:
            raise storage_error(exc, calls) from exc
        return errors_in_place(calls, replies)

    def _pipeline(self, calls: list[Call], node: Any = None) -> list[Any]:
        if node is not None:
            return [
                _cluster.scan_reply(self._execute(*c.args, target_nodes=node), node) for c in calls
            ]
        waits = self._waits(calls)
        if self._cluster:
            replies, acks = _cluster.send(self.redis, [c.args for c in calls], waits, self._wait_ms)
            return self._replicated(replies, acks, waits)
        if len(calls) == 1 and not waits[0]:  # the hot path: no pipeline object
            try:
                return [self._execute(*calls[0].args)]
            except redis_errors.ResponseError as exc:
                return [exc]
        pipe: Any = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        if any(waits):  # on the connection that sent the writes, right after them
            pipe.execute_command(*self._wait_command())
        replies = pipe.execute(raise_on_error=False)
        if any(waits):
            ack = replies.pop()
            return self._replicated(replies, [ack] * len(replies), waits)
        return list(replies)


class _Batcher:
    """Auto-batching: every batch of calls handed over in one event-loop moment (by any number of
    concurrent operations) goes out as one pipeline; each sender gets its own replies back, or
    its own error (an outage is judged per sender: only one that had a request in flight gets
    OutcomeUnknownError)."""

    def __init__(
        self, round_trip: Callable[[list[Call]], Awaitable[list[Any]]], max_calls: int
    ) -> None:
        self._round_trip = round_trip
        self._max_calls = max_calls
        self._queue: list[tuple[list[Call], asyncio.Future[list[Any]]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def send(self, calls: list[Call]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((calls, future))
        return await future

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        chunk: list[tuple[list[Call], asyncio.Future[list[Any]]]] = []
        size = 0
        for entry in queue:
            if chunk and size + len(entry[0]) > self._max_calls:
                self._start(chunk)
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry[0])
        if chunk:
            self._start(chunk)

    def _start(self, chunk: list[tuple[list[Call], asyncio.Future[list[Any]]]]) -> None:
        task = asyncio.ensure_future(self._pipeline(chunk))
        self._flushing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._flushing.discard)

    async def _pipeline(self, chunk: list[tuple[list[Call], asyncio.Future[list[Any]]]]) -> None:
        calls = [call for sent, _ in chunk for call in sent]
        try:
            replies = errors_in_place(calls, await self._round_trip(calls))
        except DRIVER_ERRORS as exc:
            for sent, future in chunk:
                if not future.done():
                    error = storage_error(exc, sent)
                    error.__cause__ = exc
                    future.set_exception(error)
            return
        except BaseException as exc:  # cancelled, or a bug: nobody may wait forever
            for _, future in chunk:
                if not future.done():
                    future.set_exception(exc)
            raise
        at = 0
        for sent, future in chunk:
            if not future.done():
                future.set_result(replies[at : at + len(sent)])
            at += len(sent)


class AsyncRedisStorage(_RedisStorageBase):
    """The ledger on a `redis.asyncio.Redis` (or fakeredis async) client, or a
    `redis.asyncio.cluster.RedisCluster`.

    batching=True: concurrent operations issued in the same event-loop moment share one pipeline
    (same semantics, errors and idempotency; fewer round trips under load).
    durability="replica": as for `RedisStorage`.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        batching: bool = False,
        owns_connection: bool = False,
        durability: Durability = "primary",
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
    ) -> None:
        super().__init__(
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            retry_backoff=retry_backoff,
            owns_connection=owns_connection,
            durability=durability,
            replica_timeout=replica_timeout,
        )
        self.redis = redis
        self._execute: Callable[..., Awaitable[Any]] = redis.execute_command
        self._cluster = _cluster.is_cluster(redis)
        self._batcher = _Batcher(self._round_trip, BATCH_CALLS) if batching else None

    async def add(self, req: AddRequest) -> Transaction:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.add(req))

    async def subtract(self, req: SubtractRequest) -> Transaction:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.subtract(req))

    async def add_many(self, reqs: Batch[AddRequest]) -> list[Transaction | CrediciError]:
        return await self.retrying_many(self.ledger.add_many, self._batch_safe(reqs))

    async def subtract_many(self, reqs: Batch[SubtractRequest]) -> list[Transaction | CrediciError]:
        return await self.retrying_many(self.ledger.subtract_many, self._batch_safe(reqs))

    async def retrying_many(
        self,
        make_flow: Callable[[Batch[R]], Flow[list[Transaction | CrediciError]]],
        reqs: Batch[R],
    ) -> list[Transaction | CrediciError]:
        """Run a batch; items that met an outage are run anew up to `retries` times."""
        results: list[Transaction | CrediciError] = [
            r if isinstance(r, CrediciError) else StorageError("not sent") for r in reqs
        ]
        pending = [i for i, r in enumerate(reqs) if not isinstance(r, CrediciError)]
        for attempt in itertools.count():
            try:
                got = await self.run(make_flow([reqs[i] for i in pending]))
            except StorageUnavailableError as outage:
                got = [outage] * len(pending)
            for i, result in zip(pending, got, strict=True):
                results[i] = result
            pending = [i for i in pending if isinstance(results[i], StorageUnavailableError)]
            if not pending or attempt >= self.retries:
                return results
            await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    async def balance(self, user_id: str, now_ms: int | None) -> int:
        return await self.retrying(lambda: self.ledger.balance(user_id, now_ms))

    async def start_cycle(self, req: StartCycleRequest) -> Cycle:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.start_cycle(req))

    async def get_cycle(self, user_id: str, now_ms: int | None) -> Cycle | None:
        return await self.retrying(lambda: self.ledger.get_cycle(user_id, now_ms))

    async def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Cycle:
        # Cancelling twice is the same as once: safe to retry without a key.
        return await self.retrying(lambda: self.ledger.cancel_cycle(user_id, forfeit, now_ms))

    async def history(self, req: HistoryRequest) -> list[Transaction]:
        return await self.retrying(lambda: self.ledger.history(req))

    async def reserve(self, req: ReserveRequest) -> Hold:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.reserve(req))

    async def capture(self, req: CaptureRequest) -> Transaction:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.capture(req))

    async def release(self, user_id: str, local_id: str, now_ms: int | None) -> Hold:
        return await self.retrying(lambda: self.ledger.release(user_id, local_id, now_ms))

    async def reverse(self, req: ReverseRequest) -> Transaction:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.reverse(req))

    async def audit(
        self, user_id: str, now_ms: int | None, archive: AsyncArchiveSource | None = None
    ) -> AuditReport:
        snapshot = await self.retrying(lambda: self.ledger.audit_snapshot(user_id, now_ms))
        if archive is None or not snapshot.trimmed:
            return snapshot.report(())
        # Read after the snapshot: whatever Redis trimmed before it is in PostgreSQL by now.
        return snapshot.report(await archive.entries_before(user_id, snapshot.trimmed))

    async def balance_details(self, user_id: str, now_ms: int | None) -> BalanceDetails:
        return await self.retrying(lambda: self.ledger.balance_details(user_id, now_ms))

    async def set_credit_limit(self, user_id: str, limit: int, now_ms: int | None) -> None:
        return await self.retrying(lambda: self.ledger.set_credit_limit(user_id, limit, now_ms))

    async def scan_users(self, batch: int) -> AsyncIterator[list[str]]:
        """Every user of the namespace, in batches, by SCAN: Redis is never blocked for long."""
        async for users in self._scanning(partial(self.ledger.scan_users, count=batch)):
            if users:
                yield users

    async def _scanning(
        self, step: Callable[[int], Flow[tuple[int, list[str]]]]
    ) -> AsyncIterator[list[str]]:
        """Run a SCAN flow from cursor 0 to 0: on each primary of a cluster (a cursor is a
        node's), on the server otherwise."""
        try:
            nodes = await _cluster.async_primaries(self.redis)
        except DRIVER_ERRORS as exc:
            raise storage_error(exc, []) from exc
        for node in nodes:
            cursor = 0
            while True:
                cursor, found = await self.retrying(partial(step, cursor), node)
                yield found
                if cursor == 0:
                    break

    async def set_low_balance_threshold(
        self, user_id: str, threshold: int | None, now_ms: int | None
    ) -> None:
        return await self.retrying(
            lambda: self.ledger.set_low_balance_threshold(user_id, threshold, now_ms)
        )

    def _event_streams(self) -> AsyncIterator[list[str]]:
        return self._scanning(partial(self.ledger.find_event_streams, count=1000))

    async def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]:
        """Low-balance events of every user of the namespace, as consumer `consumer` of group
        `group` (each event goes to one consumer of a group). An event is acknowledged once the
        caller comes back for the next one, or stops: at least once, never lost; one a dead
        consumer read but never acknowledged is taken over after `claim_after` seconds."""
        streams: list[str] = []
        looked = claimed = -float("inf")
        quiet_since = time.monotonic()
        done: list[BalanceEvent] = []
        try:
            while True:
                if time.monotonic() - looked >= reading.discover_every:
                    async for found in self._event_streams():
                        new = [stream for stream in found if stream not in streams]
                        if new:
                            await self.run(self.ledger.join_group(new, group))
                            streams += new
                    looked = time.monotonic()
                claim = None
                if time.monotonic() - claimed >= reading.claim_after:
                    claim, claimed = int(reading.claim_after * 1000), time.monotonic()
                batch: list[BalanceEvent] = []
                if streams:
                    batch = await self.retrying(
                        partial(
                            self.ledger.read_events, streams, group, consumer, reading.batch, claim
                        )
                    )
                for event in batch:
                    yield event
                    done.append(event)
                if done:
                    await self.run(self.ledger.ack_events(done, group))
                    done = []
                    quiet_since = time.monotonic()
                elif (
                    reading.idle_timeout is not None
                    and time.monotonic() - quiet_since >= reading.idle_timeout
                ):
                    return
                else:
                    await asyncio.sleep(reading.poll)
        finally:
            if done:  # the caller stopped: what it has seen is handled
                await self.run(self.ledger.ack_events(done, group))

    async def aclose(self) -> None:
        if self._owns_connection:
            await self.redis.aclose()

    async def retrying(self, make_flow: Callable[[], Flow[T]], node: Any = None) -> T:
        """Run a flow; after an outage, run it anew up to `retries` times (requests are keyed)."""
        for attempt in itertools.count():
            try:
                return await self.run(make_flow(), node)
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    async def run(self, flow: Generator[list[Call], list[Any], T], node: Any = None) -> T:
        """Drive a flow: send each batch it yields, hand back the replies, return its result.
        `node`: a cluster node to send every call to (a SCAN step); None routes by key."""
        try:
            calls = next(flow)
            while True:
                calls = flow.send(await self._send(calls, node))
        except StopIteration as done:
            result: T = done.value
            return result

    async def _send(self, calls: list[Call], node: Any = None) -> list[Any]:
        """One round trip (a pipeline if several calls), reloading scripts on NOSCRIPT.
        A lost connection raises; an error reply comes back in its call's place."""
        if self._batcher is not None and node is None:
            return await self._batcher.send(calls)
        try:
            replies = await self._round_trip(calls, node)
        except DRIVER_ERRORS as exc:
            raise storage_error(exc, calls) from exc
        return errors_in_place(calls, replies)

    async def _round_trip(self, calls: list[Call], node: Any = None) -> list[Any]:
        replies = await self._pipeline(calls, node)
        resend = to_resend(calls, replies)
        if resend:
            for source in _scripts_of(calls, resend):
                await self.redis.script_load(source)
            again = await self._pipeline([calls[i] for i in resend])
            for i, reply in zip(resend, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: list[Call], node: Any = None) -> list[Any]:
        if node is not None:
            return [
                _cluster.scan_reply(await self._execute(*c.args, target_nodes=node), node)
                for c in calls
            ]
        waits = self._waits(calls)
        if self._cluster:
            replies, acks = await _cluster.async_send(
                self.redis, [c.args for c in calls], waits, self._wait_ms
            )
            return self._replicated(replies, acks, waits)
        if len(calls) == 1 and not waits[0]:  # the hot path: no pipeline object
            try:
                return [await self._execute(*calls[0].args)]
            except redis_errors.ResponseError as exc:
                return [exc]
        pipe: Any = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        if any(waits):  # on the connection that sent the writes, right after them
            pipe.execute_command(*self._wait_command())
        replies = await pipe.execute(raise_on_error=False)
        if any(waits):
            ack = replies.pop()
            return self._replicated(replies, [ack] * len(replies), waits)
        return list(replies)
