"""The asyncio Redis storage. `_storages/redis_sync.py` is generated from this file by
tools/async_to_sync.py: edit here, then run the tool (a test fails while the two differ).

Import the storages from `credici_redis.storage`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from credici_redis._core.observe import QUIET, Observer
from credici_redis._core.operation import Operation
from credici_redis._core.protocol import Call, Flow, newest_first
from credici_redis._core.requests import EventReading
from credici_redis._core.scripts import LIBRARY
from credici_redis._ops import transfers
from credici_redis._storages import cluster as _cluster
from credici_redis._storages.batcher import _Batcher  # async only
from credici_redis._storages.loops import LoopClients  # async only
from credici_redis._storages.redis_base import (
    BATCH_CALLS,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_NAMESPACE,
    DEFAULT_REPLICA_TIMEOUT,
    DRIVER_ERRORS,
    Batch,
    Durability,
    R,
    T,
    _RedisStorageBase,
    _scripts_of,
    by_sha,
    by_source,
    check_eviction_policy,
    check_retry_policy,
    errors_in_place,
    eval_refused,
    fcall_refused,
    function_missing,
    is_in_process,
    no_functions,
    storage_error,
    to_resend,
)
from credici_redis.errors import CrediciError, StorageError, StorageUnavailableError
from credici_redis.models import BalanceEvent, TransferRecovery

if TYPE_CHECKING:
    import redis.asyncio
    import redis.asyncio.cluster


async def poll_events(
    read: Callable[[int | None], Awaitable[list[BalanceEvent]]],
    ack: Callable[[list[BalanceEvent]], Awaitable[Any]],
    reading: EventReading,
    observer: Observer = QUIET,
) -> AsyncIterator[BalanceEvent]:
    """The polling loop of every storage's `events()`: `read(claim)` returns the next events
    (with `claim`, also those a dead consumer left unacknowledged for that many ms), `ack(events)`
    acknowledges them. What the caller has seen is acknowledged when it comes back for more, or
    stops; with nothing new for `idle_timeout` seconds the loop ends. `observer` hears of both."""
    claimed = -float("inf")
    quiet_since = time.monotonic()
    done: list[BalanceEvent] = []
    try:
        while True:
            claim = None
            if time.monotonic() - claimed >= reading.claim_after:
                claim, claimed = int(reading.claim_after * 1000), time.monotonic()
            events = await read(claim)
            observer.events_read([event.kind for event in events])
            for event in events:
                yield event
                done.append(event)
            if done:
                await ack(done)
                observer.events_acknowledged(len(done))
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
            await ack(done)
            observer.events_acknowledged(len(done))


class AsyncRedisStorage(_RedisStorageBase):
    """The ledger on a `redis.asyncio.Redis` (or fakeredis) client, or a
    `redis.asyncio.cluster.RedisCluster`.

    The storage closes the client on `aclose()` only if it created it (``from_url``).
    durability="replica": a write returns once a replica acknowledged it (``WAIT 1``, up to
    `replica_timeout` seconds), else raises ReplicationTimeoutError.
    batching=True (asyncio only): concurrent operations issued in the same event-loop moment share
    one pipeline (same semantics, errors and idempotency; fewer round trips under load).
    Before its first command, the storage reads the eviction policy of the Redis (of every
    primary of a cluster) and raises EvictionPolicyError unless it is ``noeviction``;
    ``allow_eviction=True`` skips that.
    usage_tz: the time zone of the usage days and months (`get_usage`); UTC hours regardless.
    history_retention: history entries older than this are removed by `trim_history` (after a
    checkpoint the audit replays from); None keeps them until the archiver moves them.
    An asyncio connection serves one event loop: with `connect` (what ``from_url`` passes: makes
    a client like `redis`) the storage makes a client for each loop it runs in; without, a call
    under another loop than the first raises EventLoopError before sending anything.
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        batching: bool = False,  # async only
        owns_connection: bool = False,
        durability: Durability = "primary",
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
        allow_eviction: bool = False,
        connect: Callable[[], Any] | None = None,  # async only
        usage_tz: str = "UTC",
        history_retention: timedelta | None = None,
    ) -> None:
        super().__init__(
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            retry_backoff=retry_backoff,
            owns_connection=owns_connection,
            durability=durability,
            replica_timeout=replica_timeout,
            usage_tz=usage_tz,
            history_retention=history_retention,
        )
        check_retry_policy(redis)
        if not isinstance(allow_eviction, bool):
            raise ValueError("allow_eviction must be a bool")
        # Checked before the first command is sent (`_check_server`).
        self._server_checked = allow_eviction or is_in_process(redis)
        self.redis = redis
        self._execute: Callable[..., Awaitable[Any]] = redis.execute_command
        self._loops = LoopClients(redis, connect)  # async only
        self._cluster = _cluster.is_cluster(redis)
        self._batcher = _Batcher(self._round_trip, BATCH_CALLS) if batching else None  # async only

    async def execute(self, op: Operation[R, T], req: R) -> T:
        """Carry out one operation (`credici_redis._ops`) on a validated request."""
        req = self._retry_safe(op, req)
        return await self.retrying(lambda: self.ledger.execute(op, req))

    async def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]:
        """Many requests of one operation in one round trip; each result, or its error, in order.
        Items that met an outage are run anew up to `retries` times."""
        reqs = self._batch_safe(op, reqs)
        results: list[T | CrediciError] = [
            r if isinstance(r, CrediciError) else StorageError("not sent") for r in reqs
        ]
        pending = [i for i, r in enumerate(reqs) if not isinstance(r, CrediciError)]
        for attempt in itertools.count():
            try:
                got = await self.run(self.ledger.execute_many(op, [reqs[i] for i in pending]))
            except StorageUnavailableError as outage:
                got = [outage] * len(pending)
            for i, result in zip(pending, got, strict=True):
                results[i] = result
            pending = [i for i in pending if isinstance(results[i], StorageUnavailableError)]
            if not pending or attempt >= self.retries:
                return results
            self.ledger.observer.retry()
            await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

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
        self._bind_loop()  # async only
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

    def _event_streams(self) -> AsyncIterator[list[str]]:
        return self._scanning(partial(self.ledger.find_event_streams, count=1000))

    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]:
        """Low-balance events of every user of the namespace, as consumer `consumer` of group
        `group` (each event goes to one consumer of a group). An event is acknowledged once the
        caller comes back for the next one, or stops: at least once, never lost; one a dead
        consumer read but never acknowledged is taken over after `claim_after` seconds."""
        streams: list[str] = []
        looked = -float("inf")

        async def read(claim: int | None) -> list[BalanceEvent]:
            nonlocal looked
            if time.monotonic() - looked >= reading.discover_every:  # new users' slots
                async for found in self._event_streams():
                    new = [stream for stream in found if stream not in streams]
                    if new:
                        await self.run(self.ledger.join_group(new, group))
                        streams.extend(new)
                looked = time.monotonic()
            if not streams:
                return []
            return await self.retrying(
                partial(self.ledger.read_events, streams, group, consumer, reading.batch, claim)
            )

        return poll_events(
            read,
            lambda done: self.run(self.ledger.ack_events(done, group)),
            reading,
            self.ledger.observer,
        )

    async def recent_events(self, count: int) -> list[BalanceEvent]:
        """The namespace's `count` newest events, newest first, read from the end of every
        slot's stream (found by SCAN): no group joins, nothing is acknowledged."""
        newest: list[BalanceEvent] = []
        async for streams in self._event_streams():
            found = await self.retrying(partial(self.ledger.last_events, streams, count))
            newest = newest_first([*newest, *found], count)
        return newest

    async def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        """Finish the transfers left unsettled (`credici_redis._ops.transfers.recover`)."""
        return await self.retrying(partial(transfers.recover, self.ledger, now_ms, older_than_ms))

    async def aclose(self) -> None:
        if self._owns_connection:
            await self._loops.aclose()  # async only
            # sync only: self.redis.close()

    def _bind_loop(self) -> None:  # async only
        """Use the running event loop's client (`credici_redis._storages.loops`)."""  # async only
        client = self._loops.current()  # async only
        if client is not self.redis:  # async only
            self.redis, self._execute = client, client.execute_command  # async only

    async def retrying(self, make_flow: Callable[[], Flow[T]], node: Any = None) -> T:
        """Run a flow; after an outage, run it anew up to `retries` times (requests are keyed)."""
        for attempt in itertools.count():
            try:
                return await self.run(make_flow(), node)
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                self.ledger.observer.retry()
                await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    async def run(self, flow: Flow[T], node: Any = None) -> T:
        """Drive a flow: send each batch it yields, hand back the replies, return its result.
        `node`: a cluster node to send every call to (a SCAN step); None routes by key."""
        self._bind_loop()  # async only
        if not self._server_checked:
            await self._check_server()
        try:
            calls = next(flow)
            while True:
                calls = flow.send(await self._send(calls, node))
        except StopIteration as done:
            result: T = done.value
            return result

    async def _check_server(self) -> None:
        """Refuse a Redis that may evict keys: INFO memory of the server, or of each primary."""
        try:
            for node in await _cluster.async_primaries(self.redis):
                if node is None:
                    info = await self._execute("INFO", "memory")
                else:
                    info = await self._execute("INFO", "memory", target_nodes=node)
                check_eviction_policy(info, None if node is None else node.name)
        except redis_errors.NoPermissionError as exc:
            check_eviction_policy(None, None, refusal=str(exc))
        except DRIVER_ERRORS as exc:
            raise storage_error(exc, []) from exc
        self._server_checked = True

    async def _send(self, calls: list[Call], node: Any = None) -> list[Any]:
        """One round trip (a pipeline if several calls), resending scripts on NOSCRIPT.
        A lost connection raises; an error reply comes back in its call's place."""
        if self._batcher is not None and node is None:  # async only
            return await self._batcher.send(calls)  # async only
        try:
            replies = await self._round_trip(calls, node)
        except DRIVER_ERRORS as exc:
            raise storage_error(exc, calls) from exc
        return errors_in_place(calls, replies)

    async def _round_trip(self, calls: list[Call], node: Any = None) -> list[Any]:
        """Send calls; those whose script the server lacked (function not found, NOSCRIPT), and
        the reads after them, go again in one more round trip: by FCALL once the library is
        loaded, else each script by its source (`by_source`). A script that ran is never sent
        again."""
        replies = await self._pipeline(calls, node)
        resend = to_resend(calls, replies)
        if not resend:
            return replies
        if any(fcall_refused(replies[i]) for i in resend):
            self.ledger.functions = False  # an ACL for scripts only: EVALSHA from now on
        retry = [calls[i] for i in resend]
        if any(function_missing(replies[i]) for i in resend) and await self._load_library():
            again = await self._pipeline(retry)
            late = to_resend(retry, again)  # a failover to a primary that missed the load
            for k, reply in zip(late, await self._by_source([retry[k] for k in late]), strict=True):
                again[k] = reply
        else:
            again = await self._by_source(retry)
        for i, reply in zip(resend, again, strict=True):
            replies[i] = reply
        return replies

    async def _by_source(self, calls: list[Call]) -> list[Any]:
        """Each script by its source (EVAL); where an ACL refuses EVAL (one of EVALSHA and
        SCRIPT LOAD), the scripts are loaded and sent by SHA."""
        if not calls:
            return []
        again = await self._pipeline([by_source(call) for call in calls])
        if eval_refused(again):
            for source in _scripts_of(calls):
                await self.redis.script_load(source)
            again = await self._pipeline([by_sha(call) for call in calls])
        return again

    async def _load_library(self) -> bool:
        """Load the Functions library on the server (on each primary of a cluster); True once
        every one has it. On a Redis before 7 calls go by EVALSHA from then on; any other
        failure (an ACL without FUNCTION LOAD, an outage) is met again by the next call."""
        for node in await _cluster.async_primaries(self.redis):
            target = {} if node is None else {"target_nodes": node}
            try:
                await self._execute("FUNCTION", "LOAD", LIBRARY.source, **target)
            except redis_errors.ResponseError as exc:
                if no_functions(exc):
                    self.ledger.functions = False
                    return False
                if "already exists" not in str(exc):
                    return False
            except DRIVER_ERRORS:
                return False
        return True

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
