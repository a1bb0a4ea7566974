"""Every error credici-redis raises. One root, facts as attributes.

    CrediciError
    ├── InvalidInputError (also a ValueError): bad input, nothing was sent or changed
    │   ├── InvalidUserIdError
    │   ├── InvalidAmountError
    │   │   └── CaptureExceedsHoldError
    │   ├── InvalidExpiryError
    │   ├── InvalidCycleError
    │   │   └── InvalidTimeZoneError
    │   ├── InvalidPeriodError       from_/to_ of a history or usage query
    │   │   └── UsageZoneError       usage days asked in another zone than they were counted in
    │   ├── InvalidLimitError        a RateLimit or Budget that cannot work
    │   ├── InvalidPriorityError
    │   ├── InvalidIdempotencyKeyError
    │   ├── InvalidMetadataError
    │   ├── InvalidOptionError       an unknown or wrong option of from_url or a storage
    │   ├── InvalidURLError          a storage URL that cannot be right
    │   └── UnsafeClientError        a hand-built redis-py client that re-sends writes on retry
    ├── MissingExtraError (also an ImportError): a feature whose pip extra is not installed
    ├── EventLoopError (also a RuntimeError): a client used where it cannot be; nothing was sent
    ├── EvictionPolicyError           the Redis may evict keys (maxmemory-policy), or will not say
    ├── InsufficientCreditsError      subtract asked for more than the user has
    ├── LimitExceededError            a charge refused by the user's limits (set_limits)
    │   ├── RateLimitedError          ... calling faster than the rate allows (.retry_after)
    │   └── BudgetExceededError       ... past the spending budget of the period (.resets_at)
    ├── IdempotencyConflictError      a key reused for a different request
    ├── CycleNotFoundError            cancel_cycle on a user with no running cycle
    ├── HoldNotFoundError             no such hold (or it ended more than a day ago)
    ├── HoldFinishedError             the hold was already captured, released or expired
    ├── TransactionNotFoundError      reverse of an unknown transaction
    │   └── TransactionArchivedError  ... or of one trimmed from Redis (archive, retention)
    ├── NotReversibleError            reverse of an entry that is not a subtract, capture or add
    ├── AlreadyReversedError          a transaction is reversed once
    ├── UsageUnavailableError         usage asked for before its records begin (.available_from)
    ├── TransferRefusedError          the destination refused a transfer: its credits went back
    ├── TransferUnresolvedError       a transfer unsettled past what any script can prove
    ├── NotSupportedError             an operation this storage cannot do (transfers on PostgreSQL)
    └── StorageError                  Redis answered something the library cannot use (a bug)
        ├── InconsistentStateError    a user's keys were changed or removed outside credici-redis
        └── StorageUnavailableError   connection failure or timeout; chained to the driver error
            └── OutcomeUnknownError   a request was sent but no reply came: it may have applied
                └── ReplicationTimeoutError  applied on the primary, no replica confirmed it in time

Domain outcomes come back from the Lua scripts as coded replies and become these exceptions in
one table (`credici_redis._core.codes.REFUSALS`). What a Redis error reply or a connection
failure means (not applied, maybe applied, not replicated) is one table too
(`credici_redis._storages.outcomes`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from credici_redis.models import Budget, RateLimit


class CrediciError(Exception):
    """Root of every error raised by credici-redis."""


class InvalidInputError(CrediciError, ValueError):
    """An argument was rejected before anything changed."""


class InvalidUserIdError(InvalidInputError):
    """user_id is not a non-empty str (or UUID) of at most 256 UTF-8 bytes."""

    def __init__(self, message: str, *, user_id: object) -> None:
        super().__init__(message)
        self.user_id = user_id


class InvalidAmountError(InvalidInputError):
    """amount is not an int in 1..2**53-1, or the balance would pass 2**53-1."""

    def __init__(self, message: str, *, amount: object) -> None:
        super().__init__(message)
        self.amount = amount


class CaptureExceedsHoldError(InvalidAmountError):
    """capture asked for more than the hold holds; nothing changed."""

    def __init__(self, hold_id: str, amount: int, held: int) -> None:
        super().__init__(
            f"hold {hold_id!r} holds {held} credits, {amount} were asked", amount=amount
        )
        self.hold_id = hold_id
        self.held = held


class InvalidExpiryError(InvalidInputError):
    """expire_at/ttl is malformed, both were given, or the expiry is not in the future."""


class InvalidCycleError(InvalidInputError):
    """A cycle argument is wrong: time_delta, rollover, renew or tz."""


class InvalidPeriodError(InvalidInputError):
    """from_/to_ of a history or usage query are not datetimes, or not a span it can read."""


class UsageZoneError(InvalidPeriodError):
    """Usage days or months asked for in a time zone other than the one the user's days were
    counted in (the storage's usage_tz): they cannot be re-cut."""

    def __init__(self, user_id: str, asked: str, counted: str) -> None:
        super().__init__(
            f"the usage days of {user_id!r} are counted in {counted!r}, not {asked!r}: ask with"
            f" tz={counted!r}, or hours (UTC hours fit any zone's labels)"
        )
        self.user_id, self.asked, self.counted = user_id, asked, counted


class InvalidLimitError(InvalidInputError):
    """A RateLimit or Budget that cannot work (amount < 1, a period under 1 ms, ...)."""


class InvalidTimeZoneError(InvalidCycleError):
    """tz is not a known IANA time zone name."""


class InvalidPriorityError(InvalidInputError):
    """priority is not an int from -1,000,000 to 1,000,000."""


class InvalidIdempotencyKeyError(InvalidInputError):
    """idempotency_key is not a non-empty str of at most 256 characters."""


class InvalidMetadataError(InvalidInputError):
    """metadata is not a small dict[str, str]."""


class InvalidMemberError(InvalidInputError):
    """A pool member's id that is not a non-empty str (at most 256 UTF-8 bytes) or a UUID."""


class InvalidOptionError(InvalidInputError):
    """A keyword option nobody takes (a typo), or a value an option cannot have."""

    def __init__(self, message: str, *, option: str) -> None:
        super().__init__(message)
        self.option = option


class InvalidURLError(InvalidInputError):
    """A storage URL that is malformed or has no scheme credici-redis knows."""

    def __init__(self, message: str, *, url: object) -> None:
        super().__init__(message)
        self.url = url


class UnsafeClientError(InvalidInputError):
    """A redis-py client whose retry policy re-sends a command after a timeout or a lost
    connection: a write that reached Redis the first time would be applied twice."""


class MissingExtraError(CrediciError, ImportError):
    """A feature needs a pip extra that is not installed: ``pip install 'credici-redis[EXTRA]'``."""

    def __init__(self, feature: str, extra: str, missing: str) -> None:
        super().__init__(
            f"{feature} needs the {extra!r} extra ({missing} is not installed): "
            f"pip install 'credici-redis[{extra}]'"
        )
        self.feature = feature
        self.extra = extra
        self.missing = missing


class EventLoopError(CrediciError, RuntimeError):
    """An asyncio client was used where it cannot work (a client built on a connection you
    made, under another event loop than the one it first ran in). Nothing was sent."""


class EvictionPolicyError(CrediciError):
    """The Redis may evict keys to free memory (any ``maxmemory-policy`` but ``noeviction``):
    a user's buckets, history or idempotency records could vanish without a word, and a retried
    keyed request apply twice. Raised before the first command of a storage is sent; ``policy``
    is None when the policy could not be read (INFO denied by an ACL)."""

    def __init__(self, message: str, *, policy: str | None, node: str | None) -> None:
        super().__init__(message)
        self.policy = policy
        self.node = node


class InsufficientCreditsError(CrediciError):
    """The user's available balance is lower than the amount asked; nothing changed."""

    def __init__(self, user_id: str, requested: int, available: int) -> None:
        super().__init__(f"user {user_id!r} has {available} credits, {requested} were requested")
        self.user_id = user_id
        self.requested = requested
        self.available = available


class LimitExceededError(CrediciError):
    """A charge (subtract, reserve, a batch item) refused by the user's limits: rate or budget
    (`set_limits`, or the client's `default_limits`). Nothing changed: no credits, no rate and
    no budget were used."""

    def __init__(self, message: str, *, user_id: str, requested: int) -> None:
        super().__init__(message)
        self.user_id = user_id
        self.requested = requested


class RateLimitedError(LimitExceededError):
    """Calling faster than the user's RateLimit allows. `retry_after`: when the same charge
    would pass (None: never, the amount is larger than the rate's burst)."""

    def __init__(
        self,
        user_id: str,
        requested: int,
        retry_after: timedelta | None,
        *,
        limit: RateLimit | None = None,
    ) -> None:
        when = "never (more than the burst)" if retry_after is None else f"in {retry_after}"
        super().__init__(
            f"user {user_id!r} is rate limited: {requested} credits pass {when}",
            user_id=user_id,
            requested=requested,
        )
        self.retry_after = retry_after
        self.limit = limit
        """The rate that refused (None when not known)."""


class BudgetExceededError(LimitExceededError):
    """The charge would pass the user's Budget for the period, or its member's cap (`member`
    set: a pool's member charging beyond `set_member_cap`): `remaining` credits may still be
    spent until `resets_at`."""

    def __init__(
        self,
        user_id: str,
        requested: int,
        remaining: int,
        resets_at: datetime,
        *,
        retry_after: timedelta | None = None,
        limit: Budget | None = None,
        member: str | None = None,
    ) -> None:
        who = f"user {user_id!r}" if member is None else f"member {member!r} of {user_id!r}"
        super().__init__(
            f"{who} may spend {remaining} more credits until {resets_at.isoformat()},"
            f" {requested} were requested",
            user_id=user_id,
            requested=requested,
        )
        self.member = member
        """The member whose cap refused (None: the user's own budget)."""
        self.remaining = remaining
        self.resets_at = resets_at
        self.retry_after = retry_after
        """resets_at less the storage's clock when it refused (None when not known)."""
        self.limit = limit
        """The budget that refused (None when not known)."""


class IdempotencyConflictError(CrediciError):
    """The idempotency key was already used for a different request; nothing changed."""

    def __init__(self, user_id: str, idempotency_key: str) -> None:
        super().__init__(
            f"idempotency key {idempotency_key!r} of user {user_id!r} "
            "was used for a different request"
        )
        self.user_id = user_id
        self.idempotency_key = idempotency_key


class CycleNotFoundError(CrediciError):
    """The user has no cycle that is still running; nothing changed."""

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id!r} has no running cycle")
        self.user_id = user_id


class HoldNotFoundError(CrediciError):
    """No such hold: never made, or finished more than a day ago."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"no hold {hold_id!r}")
        self.hold_id = hold_id


class HoldFinishedError(CrediciError):
    """The hold was already captured, released or expired: a second call has no effect."""

    def __init__(self, hold_id: str, status: str) -> None:
        super().__init__(f"hold {hold_id!r} is already {status}")
        self.hold_id = hold_id
        self.status = status


class TransactionNotFoundError(CrediciError):
    """No such transaction in the history kept in Redis."""

    def __init__(self, transaction_id: str) -> None:
        super().__init__(f"no transaction {transaction_id!r}")
        self.transaction_id = transaction_id


class TransactionArchivedError(TransactionNotFoundError):
    """The transaction is older than what Redis keeps of the history: archived to PostgreSQL and
    trimmed (after the archiver's ``keep`` time), or past the storage's history_retention
    (`trim_history`). It can no longer be reversed."""

    def __init__(self, transaction_id: str) -> None:
        CrediciError.__init__(
            self,
            f"transaction {transaction_id!r} is older than the history Redis keeps (archived to"
            " PostgreSQL, or past the history retention): it cannot be reversed",
        )
        self.transaction_id = transaction_id


class NotReversibleError(CrediciError):
    """Only a subtract, a capture or an add can be reversed."""

    def __init__(self, transaction_id: str, kind: str) -> None:
        super().__init__(f"transaction {transaction_id!r} is a {kind}, which cannot be reversed")
        self.transaction_id = transaction_id
        self.kind = kind


class AlreadyReversedError(CrediciError):
    """The transaction was reversed before; a reversal happens once."""

    def __init__(self, transaction_id: str, reversal_id: str) -> None:
        super().__init__(f"transaction {transaction_id!r} was reversed by {reversal_id!r}")
        self.transaction_id = transaction_id
        self.reversal_id = reversal_id


class TransferRefusedError(CrediciError):
    """The destination refused the transfer's credits (`reason` BALANCE_LIMIT: they would pass
    2^53-1), or it was not completed within a day of its start (`reason` STALE: a process died
    and nothing recovered it in time): the credits went back to the source, by the reverse entry
    `refund_id` (None when another call gave them back). A retry under the same idempotency key
    raises this again."""

    def __init__(self, transfer_id: str, reason: str, refund_id: str | None) -> None:
        why = {
            "BALANCE_LIMIT": "the destination's balance would pass 2**53-1",
            "STALE": "it was not completed within a day",
        }.get(reason, reason)
        super().__init__(f"transfer {transfer_id!r} was refused ({why}): the credits went back")
        self.transfer_id = transfer_id
        self.reason = reason
        self.refund_id = refund_id


class TransferUnresolvedError(CrediciError):
    """A transfer was left unsettled for longer than the destination's marker is kept (7 days):
    no script can prove whether the destination took it, so nothing is done; an operator decides
    (the histories of both accounts say it, `transfer_id` in their entries)."""

    def __init__(self, transfer_id: str) -> None:
        super().__init__(f"transfer {transfer_id!r} is unsettled past 7 days: decide by hand")
        self.transfer_id = transfer_id


class NotSupportedError(CrediciError):
    """This storage cannot carry out the operation (transfers need Redis: PostgresStorage
    keeps one user per transaction)."""


class UsageUnavailableError(CrediciError):
    """Usage asked for a period that begins before its records do: the hour or day records were
    dropped after their retention, or the user's usage was first counted later (its history
    began before this version of credici-redis)."""

    def __init__(self, user_id: str, available_from: datetime) -> None:
        super().__init__(
            f"usage of {user_id!r} at this granularity is available from {available_from}"
        )
        self.user_id, self.available_from = user_id, available_from


class StorageError(CrediciError):
    """The storage answered in a way the library does not expect (a bug or a misconfiguration)."""


class InconsistentStateError(StorageError):
    """A script found a user's keys in a state no credici script leaves them in (a key removed
    or changed from outside: an evicting Redis, a hand edit). Nothing was changed by the call;
    `audit` reports the user. Restore the user (archive, backup) before using it again."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"a user's credits in Redis are inconsistent ({reason}): keys were removed or changed "
            "outside credici-redis (an evicting Redis, a hand edit); nothing was changed. Run "
            "audit, and restore the user from the archive or a backup"
        )
        self.reason = reason


class StorageUnavailableError(StorageError):
    """The storage could not be reached or did not answer in time.

    For a write, the outcome is unknown: retry it with the same idempotency key.
    """


class OutcomeUnknownError(StorageUnavailableError):
    """A request reached (or may have reached) Redis, but the connection failed before its reply.

    It may or may not have been applied. Retry it with the same idempotency key: a retry applies it
    at most once. Clients made with ``retries=N`` do this by themselves.
    """


class ReplicationTimeoutError(OutcomeUnknownError):
    """``durability="replica"``: the primary applied the write, but no replica acknowledged it
    within the timeout (Redis ``WAIT``). It is not known to survive a failover: if the primary
    dies before its replica catches up, the write is lost.

    Retry it with the same idempotency key: the retry applies it at most once, and waits for a
    replica again. Clients made with ``retries=N`` do this by themselves.
    """

    def __init__(self, message: str, *, replicas: int, timeout: float) -> None:
        super().__init__(message)
        self.replicas = replicas
        self.timeout = timeout
