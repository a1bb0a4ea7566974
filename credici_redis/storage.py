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
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from redis import exceptions as redis_errors

from credici_redis._protocol import Call, Flow, Ledger
from credici_redis._requests import (
    AddRequest,
    HistoryRequest,
    KeyedRequest,
    StartCycleRequest,
    SubtractRequest,
    generated_key,
    keyed,
)
from credici_redis._time import duration_ms
from credici_redis.errors import (
    CrediciError,
    OutcomeUnknownError,
    StorageError,
    StorageUnavailableError,
)
from credici_redis.models import AuditReport, Cycle, Transaction

if TYPE_CHECKING:
    import redis
    import redis.asyncio

T = TypeVar("T")

DEFAULT_NAMESPACE = "credici"
DEFAULT_IDEMPOTENCY_TTL = timedelta(hours=24)

_UNAVAILABLE = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica after failover, until the client follows the master
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
)


# redis-py's words for a failure before anything was sent.
_NOT_SENT = (
    "connecting to",
    "Timeout connecting",
    "No connection available",
    "Too many connections",
)


def _maybe_applied(exc: redis_errors.RedisError, calls: list[Call]) -> bool:
    """A request was on the wire when the connection failed: Redis may have run it."""
    lost = isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError) and not (
        isinstance(exc, redis_errors.BusyLoadingError) or any(w in str(exc) for w in _NOT_SENT)
    )
    return lost and any(call.script is not None and call.script.effect for call in calls)


def storage_error(exc: redis_errors.RedisError, calls: list[Call]) -> CrediciError:
    """The CrediciError a driver error means; the caller chains it (`raise ... from exc`)."""
    if _maybe_applied(exc, calls):
        return OutcomeUnknownError(
            f"the connection failed before Redis answered; the request may have been applied: "
            f"retry it with the same idempotency key ({exc})"
        )
    if isinstance(exc, _UNAVAILABLE):
        return StorageUnavailableError(f"Redis is unavailable: {exc}")
    return StorageError(f"Redis refused a credici command: {exc}")


class Storage(Protocol):
    """What `CrediciClient` needs from a storage. Requests arrive validated."""

    def add(self, req: AddRequest) -> Transaction: ...
    def subtract(self, req: SubtractRequest) -> Transaction: ...
    def balance(self, user_id: str, now_ms: int | None) -> int: ...
    def start_cycle(self, req: StartCycleRequest) -> Cycle: ...
    def get_cycle(self, user_id: str, now_ms: int | None) -> Cycle | None: ...
    def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Cycle: ...
    def history(self, req: HistoryRequest) -> list[Transaction]: ...
    def audit(self, user_id: str, now_ms: int | None) -> AuditReport: ...
    def scan_users(self, batch: int) -> Iterator[list[str]]: ...
    def close(self) -> None: ...


class AsyncStorage(Protocol):
    """What `AsyncCrediciClient` needs from a storage: `Storage`, awaitable."""

    async def add(self, req: AddRequest) -> Transaction: ...
    async def subtract(self, req: SubtractRequest) -> Transaction: ...
    async def balance(self, user_id: str, now_ms: int | None) -> int: ...
    async def start_cycle(self, req: StartCycleRequest) -> Cycle: ...
    async def get_cycle(self, user_id: str, now_ms: int | None) -> Cycle | None: ...
    async def cancel_cycle(self, user_id: str, forfeit: bool, now_ms: int | None) -> Cycle: ...
    async def history(self, req: HistoryRequest) -> list[Transaction]: ...
    async def audit(self, user_id: str, now_ms: int | None) -> AuditReport: ...
    def scan_users(self, batch: int) -> AsyncIterator[list[str]]: ...
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
    ) -> None:
        if idempotency_ttl < timedelta(seconds=1):
            raise ValueError("idempotency_ttl must be at least one second")
        if type(retries) is not int or retries < 0:
            raise ValueError("retries must be an int >= 0")
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

    def _pause(self, attempt: int) -> float:
        return float(min(self.retry_backoff * 2**attempt, 1.0))


def to_resend(calls: list[Call], replies: list[Any]) -> list[int]:
    """Which calls of a pipeline to send again once the missing scripts are loaded.

    Every call that got NOSCRIPT, and every read (non-script call) after the first of them, since
    a read may depend on a script earlier in the batch. A script that ran is never sent twice.
    Any other error reply is raised.
    """
    resend: list[int] = []
    for i, (call, reply) in enumerate(zip(calls, replies, strict=True)):
        if isinstance(reply, redis_errors.NoScriptError):
            resend.append(i)
        elif isinstance(reply, redis_errors.RedisError):
            raise reply
        elif resend and call.script is None:
            resend.append(i)
    return resend


def _expect_no_resend(calls: list[Call], replies: list[Any]) -> None:
    if to_resend(calls, replies):
        raise StorageError("Redis lost the credici scripts again right after loading them")


def _scripts_of(calls: list[Call], indices: list[int]) -> list[str]:
    sources = (calls[i].script for i in indices)
    return list({script.source: None for script in sources if script is not None})


class RedisStorage(_RedisStorageBase):
    """The ledger on a `redis.Redis` (or fakeredis) client.

    The storage closes the client on `close()` only if it created it (``from_url``).
    """

    def __init__(
        self,
        redis: redis.Redis,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        owns_connection: bool = False,
    ) -> None:
        super().__init__(
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            retry_backoff=retry_backoff,
            owns_connection=owns_connection,
        )
        self.redis = redis
        self._execute: Callable[..., Any] = redis.execute_command

    def add(self, req: AddRequest) -> Transaction:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.add(req))

    def subtract(self, req: SubtractRequest) -> Transaction:
        req = self._retry_safe(req)
        return self.retrying(lambda: self.ledger.subtract(req))

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

    def audit(self, user_id: str, now_ms: int | None) -> AuditReport:
        return self.retrying(lambda: self.ledger.audit(user_id, now_ms))

    def scan_users(self, batch: int) -> Iterator[list[str]]:
        """Every user of the namespace, in batches, by SCAN: Redis is never blocked for long."""
        cursor = 0
        while True:
            cursor, users = self.retrying(partial(self.ledger.scan_users, cursor, batch))
            if users:
                yield users
            if cursor == 0:
                return

    def close(self) -> None:
        if self._owns_connection:
            self.redis.close()

    def retrying(self, make_flow: Callable[[], Flow[T]]) -> T:
        """Run a flow; after an outage, run it anew up to `retries` times (requests are keyed)."""
        for attempt in itertools.count():
            try:
                return self.run(make_flow())
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                time.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    def run(self, flow: Flow[T]) -> T:
        """Drive a flow: send each batch it yields, hand back the replies, return its result."""
        try:
            calls = next(flow)
            while True:
                calls = flow.send(self._send(calls))
        except StopIteration as done:
            result: T = done.value
            return result

    def _send(self, calls: list[Call]) -> list[Any]:
        try:
            if len(calls) == 1:
                return [self._call(calls[0])]
            replies = self._pipeline(calls)
            resend = to_resend(calls, replies)
            if resend:
                for source in _scripts_of(calls, resend):
                    self.redis.script_load(source)
                again = self._pipeline([calls[i] for i in resend])
                _expect_no_resend([calls[i] for i in resend], again)
                for i, reply in zip(resend, again, strict=True):
                    replies[i] = reply
            return replies
        except redis_errors.RedisError as exc:
            raise storage_error(exc, calls) from exc

    def _pipeline(self, calls: list[Call]) -> list[Any]:
        pipe: Any = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        return replies

    def _call(self, call: Call) -> Any:
        try:
            return self._execute(*call.args)
        except redis_errors.NoScriptError:
            if call.script is None:
                raise
            self.redis.script_load(call.script.source)
            return self._execute(*call.args)


class AsyncRedisStorage(_RedisStorageBase):
    """The ledger on a `redis.asyncio.Redis` (or fakeredis async) client."""

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        retry_backoff: float = 0.05,
        owns_connection: bool = False,
    ) -> None:
        super().__init__(
            namespace,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            retry_backoff=retry_backoff,
            owns_connection=owns_connection,
        )
        self.redis = redis
        self._execute: Callable[..., Awaitable[Any]] = redis.execute_command

    async def add(self, req: AddRequest) -> Transaction:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.add(req))

    async def subtract(self, req: SubtractRequest) -> Transaction:
        req = self._retry_safe(req)
        return await self.retrying(lambda: self.ledger.subtract(req))

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

    async def audit(self, user_id: str, now_ms: int | None) -> AuditReport:
        return await self.retrying(lambda: self.ledger.audit(user_id, now_ms))

    async def scan_users(self, batch: int) -> AsyncIterator[list[str]]:
        """Every user of the namespace, in batches, by SCAN: Redis is never blocked for long."""
        cursor = 0
        while True:
            cursor, users = await self.retrying(partial(self.ledger.scan_users, cursor, batch))
            if users:
                yield users
            if cursor == 0:
                return

    async def aclose(self) -> None:
        if self._owns_connection:
            await self.redis.aclose()

    async def retrying(self, make_flow: Callable[[], Flow[T]]) -> T:
        """Run a flow; after an outage, run it anew up to `retries` times (requests are keyed)."""
        for attempt in itertools.count():
            try:
                return await self.run(make_flow())
            except StorageUnavailableError:
                if attempt >= self.retries:
                    raise
                await asyncio.sleep(self._pause(attempt))
        raise AssertionError("unreachable")

    async def run(self, flow: Generator[list[Call], list[Any], T]) -> T:
        """Drive a flow: send each batch it yields, hand back the replies, return its result."""
        try:
            calls = next(flow)
            while True:
                calls = flow.send(await self._send(calls))
        except StopIteration as done:
            result: T = done.value
            return result

    async def _send(self, calls: list[Call]) -> list[Any]:
        try:
            if len(calls) == 1:
                return [await self._call(calls[0])]
            replies = await self._pipeline(calls)
            resend = to_resend(calls, replies)
            if resend:
                for source in _scripts_of(calls, resend):
                    await self.redis.script_load(source)
                again = await self._pipeline([calls[i] for i in resend])
                _expect_no_resend([calls[i] for i in resend], again)
                for i, reply in zip(resend, again, strict=True):
                    replies[i] = reply
            return replies
        except redis_errors.RedisError as exc:
            raise storage_error(exc, calls) from exc

    async def _pipeline(self, calls: list[Call]) -> list[Any]:
        pipe: Any = self.redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _call(self, call: Call) -> Any:
        try:
            return await self._execute(*call.args)
        except redis_errors.NoScriptError:
            if call.script is None:
                raise
            await self.redis.script_load(call.script.source)
            return await self._execute(*call.args)
