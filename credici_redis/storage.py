"""Storages: where a client's validated requests are carried out.

`Storage` / `AsyncStorage` are the interface a client needs (the seed's "storage interface");
`RedisStorage` / `AsyncRedisStorage` implement it over redis-py, or over fakeredis for the embedded
``memory://`` store. They only drive the flows of `credici_redis._core.protocol` (which build every
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

The code: `_storages/redis_async.py` holds `AsyncRedisStorage`, from which tools/async_to_sync.py
generates `_storages/redis_sync.py` (`RedisStorage`); what they share without I/O is in
`_storages/redis_base.py`, auto-batching (asyncio only) in `_storages/batcher.py`. Import them
from here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from credici_redis._core.requests import (
    AddRequest,
    CaptureRequest,
    EventReading,
    HistoryRequest,
    ReserveRequest,
    ReverseRequest,
    StartCycleRequest,
    SubtractRequest,
)
from credici_redis._storages.batcher import _Batcher
from credici_redis._storages.redis_async import AsyncRedisStorage
from credici_redis._storages.redis_base import (
    BATCH_CALLS,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_KEEP,
    DEFAULT_NAMESPACE,
    DEFAULT_REPLICA_TIMEOUT,
    DRIVER_ERRORS,
    READ_SCRIPTS,
    ArchiveSource,
    AsyncArchiveSource,
    Batch,
    Durability,
    R,
    T,
    _RedisStorageBase,
    errors_in_place,
    storage_error,
    to_resend,
)
from credici_redis._storages.redis_sync import RedisStorage
from credici_redis.errors import CrediciError
from credici_redis.models import (
    AuditReport,
    BalanceDetails,
    BalanceEvent,
    Cycle,
    Hold,
    Transaction,
)

__all__ = [
    "BATCH_CALLS",
    "DEFAULT_IDEMPOTENCY_TTL",
    "DEFAULT_KEEP",
    "DEFAULT_NAMESPACE",
    "DEFAULT_REPLICA_TIMEOUT",
    "DRIVER_ERRORS",
    "READ_SCRIPTS",
    "ArchiveSource",
    "AsyncArchiveSource",
    "AsyncRedisStorage",
    "AsyncStorage",
    "Batch",
    "Durability",
    "R",
    "RedisStorage",
    "Storage",
    "T",
    "_Batcher",
    "_RedisStorageBase",
    "errors_in_place",
    "storage_error",
    "to_resend",
]


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
