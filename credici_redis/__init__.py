"""credici-redis: prepaid and subscription credits in Redis.

Buckets of credits (amount, expiry) per user, changed only by atomic Lua scripts, every change
recorded in a per-user Redis Stream. `CrediciClient` (sync) and `AsyncCrediciClient` (asyncio)
share one implementation; ``from_url("memory://")`` runs the same scripts in process.

The errors are imported at once; everything else when first asked for (PEP 562), so that
``import credici_redis`` does not pay for redis-py, pydantic and the extras until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from credici_redis.errors import (
    AlreadyReversedError,
    BudgetExceededError,
    CaptureExceedsHoldError,
    CrediciError,
    CycleNotFoundError,
    EventLoopError,
    EvictionPolicyError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InconsistentStateError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidCycleError,
    InvalidExpiryError,
    InvalidIdempotencyKeyError,
    InvalidInputError,
    InvalidLimitError,
    InvalidMemberError,
    InvalidMetadataError,
    InvalidOptionError,
    InvalidPeriodError,
    InvalidPriorityError,
    InvalidTimeZoneError,
    InvalidURLError,
    InvalidUserIdError,
    LimitExceededError,
    MissingExtraError,
    NotReversibleError,
    NotSupportedError,
    OutcomeUnknownError,
    RateLimitedError,
    ReplicationTimeoutError,
    StorageError,
    StorageUnavailableError,
    TransactionNotFoundError,
    TransferRefusedError,
    TransferUnresolvedError,
    UnsafeClientError,
    UsageUnavailableError,
    UsageZoneError,
)

if TYPE_CHECKING:
    from credici_redis.client import AsyncCrediciClient, CrediciClient
    from credici_redis.models import (
        ActiveHolds,
        AuditReport,
        BalanceDetails,
        BalanceEvent,
        Bucket,
        Budget,
        Cycle,
        Decision,
        Hold,
        Limits,
        RateLimit,
        Transaction,
        Transfer,
        TransferRecovery,
        TrimReport,
        UsagePoint,
    )
    from credici_redis.postgres import AsyncPostgresStorage, PostgresStorage
    from credici_redis.storage import AsyncRedisStorage, AsyncStorage, RedisStorage, Storage

__version__ = "0.1.0"

_LAZY = {
    "AsyncCrediciClient": "credici_redis.client",
    "CrediciClient": "credici_redis.client",
    "AuditReport": "credici_redis.models",
    "BalanceDetails": "credici_redis.models",
    "BalanceEvent": "credici_redis.models",
    "Bucket": "credici_redis.models",
    "Budget": "credici_redis.models",
    "Limits": "credici_redis.models",
    "MemberUsage": "credici_redis.models",
    "RateLimit": "credici_redis.models",
    "Cycle": "credici_redis.models",
    "Decision": "credici_redis.models",
    "Hold": "credici_redis.models",
    "ActiveHolds": "credici_redis.models",
    "Transaction": "credici_redis.models",
    "Transfer": "credici_redis.models",
    "TransferRecovery": "credici_redis.models",
    "UsagePoint": "credici_redis.models",
    "TrimReport": "credici_redis.models",
    "AsyncPostgresStorage": "credici_redis.postgres",  # the "postgres" extra
    "PostgresStorage": "credici_redis.postgres",
    "AsyncRedisStorage": "credici_redis.storage",
    "AsyncStorage": "credici_redis.storage",
    "RedisStorage": "credici_redis.storage",
    "Storage": "credici_redis.storage",
}
"""Public name -> the module that defines it, imported on first access."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'credici_redis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ActiveHolds",
    "AlreadyReversedError",
    "AsyncCrediciClient",
    "AsyncPostgresStorage",
    "AsyncRedisStorage",
    "AsyncStorage",
    "AuditReport",
    "BalanceDetails",
    "BalanceEvent",
    "Bucket",
    "Budget",
    "BudgetExceededError",
    "CaptureExceedsHoldError",
    "CrediciClient",
    "CrediciError",
    "Cycle",
    "CycleNotFoundError",
    "Decision",
    "EventLoopError",
    "EvictionPolicyError",
    "Hold",
    "HoldFinishedError",
    "HoldNotFoundError",
    "IdempotencyConflictError",
    "InconsistentStateError",
    "InsufficientCreditsError",
    "InvalidAmountError",
    "InvalidCycleError",
    "InvalidExpiryError",
    "InvalidIdempotencyKeyError",
    "InvalidInputError",
    "InvalidLimitError",
    "InvalidMemberError",
    "InvalidMetadataError",
    "InvalidOptionError",
    "InvalidPeriodError",
    "InvalidPriorityError",
    "InvalidTimeZoneError",
    "InvalidURLError",
    "InvalidUserIdError",
    "LimitExceededError",
    "Limits",
    "MemberUsage",
    "MissingExtraError",
    "NotReversibleError",
    "NotSupportedError",
    "OutcomeUnknownError",
    "PostgresStorage",
    "RateLimit",
    "RateLimitedError",
    "RedisStorage",
    "ReplicationTimeoutError",
    "Storage",
    "StorageError",
    "StorageUnavailableError",
    "Transaction",
    "TransactionNotFoundError",
    "Transfer",
    "TransferRecovery",
    "TransferRefusedError",
    "TransferUnresolvedError",
    "TrimReport",
    "UnsafeClientError",
    "UsagePoint",
    "UsageUnavailableError",
    "UsageZoneError",
    "__version__",
]
