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

from credici_redis._ops import OPERATIONS
from credici_redis._storages.batcher import _Batcher
from credici_redis._storages.interface import AsyncStorage, Storage
from credici_redis._storages.redis_async import AsyncRedisStorage
from credici_redis._storages.redis_base import (
    BATCH_CALLS,
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_KEEP,
    DEFAULT_NAMESPACE,
    DEFAULT_REPLICA_TIMEOUT,
    DRIVER_ERRORS,
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

READ_SCRIPTS = frozenset(op.script.name for op in OPERATIONS.values() if not op.script.write)
"""Scripts that only read (what they write, expiry and renewal, any later call writes again): no
WAIT follows them (`Script.write`). Every other script is a write a caller was told about."""
