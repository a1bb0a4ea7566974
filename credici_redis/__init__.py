"""credici-redis: prepaid and subscription credits in Redis.

Buckets of credits (amount, expiry) per user, changed only by atomic Lua scripts, every change
recorded in a per-user Redis Stream. `CrediciClient` (sync) and `AsyncCrediciClient` (asyncio)
share one implementation; ``from_url("memory://")`` runs the same scripts in process.
"""

from credici_redis.client import AsyncCrediciClient, CrediciClient
from credici_redis.errors import (
    AlreadyReversedError,
    CaptureExceedsHoldError,
    CrediciError,
    CycleNotFoundError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidCycleError,
    InvalidExpiryError,
    InvalidIdempotencyKeyError,
    InvalidInputError,
    InvalidMetadataError,
    InvalidPeriodError,
    InvalidPriorityError,
    InvalidTimeZoneError,
    InvalidUserIdError,
    NotReversibleError,
    OutcomeUnknownError,
    ReplicationTimeoutError,
    StorageError,
    StorageUnavailableError,
    TransactionNotFoundError,
)
from credici_redis.models import (
    AuditReport,
    BalanceDetails,
    BalanceEvent,
    Bucket,
    Cycle,
    Hold,
    Transaction,
)
from credici_redis.postgres import AsyncPostgresStorage, PostgresStorage
from credici_redis.storage import AsyncRedisStorage, AsyncStorage, RedisStorage, Storage

__version__ = "0.1.0"

__all__ = [
    "AlreadyReversedError",
    "AsyncCrediciClient",
    "AsyncPostgresStorage",
    "AsyncRedisStorage",
    "AsyncStorage",
    "AuditReport",
    "BalanceDetails",
    "BalanceEvent",
    "Bucket",
    "CaptureExceedsHoldError",
    "CrediciClient",
    "CrediciError",
    "Cycle",
    "CycleNotFoundError",
    "Hold",
    "HoldFinishedError",
    "HoldNotFoundError",
    "IdempotencyConflictError",
    "InsufficientCreditsError",
    "InvalidAmountError",
    "InvalidCycleError",
    "InvalidExpiryError",
    "InvalidIdempotencyKeyError",
    "InvalidInputError",
    "InvalidMetadataError",
    "InvalidPeriodError",
    "InvalidPriorityError",
    "InvalidTimeZoneError",
    "InvalidUserIdError",
    "NotReversibleError",
    "OutcomeUnknownError",
    "PostgresStorage",
    "RedisStorage",
    "ReplicationTimeoutError",
    "Storage",
    "StorageError",
    "StorageUnavailableError",
    "Transaction",
    "TransactionNotFoundError",
    "__version__",
]
