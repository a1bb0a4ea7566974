"""Every coded reply of the Lua scripts that means an error, and the exception it becomes: one
table, read for every operation (an operation lists the codes its script may give, and
tests/test_contract_lua.py checks them against the script's header).

Each entry makes the error from the request (its facts: user, amount, hold, transaction) and
the reply's fields (f[0] is the code). A code not in the table is a bug: StorageError.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from credici_redis._core import keys as _keys
from credici_redis._core.limit_spec import decode
from credici_redis._core.time import from_ms
from credici_redis.errors import (
    AlreadyReversedError,
    BudgetExceededError,
    CaptureExceedsHoldError,
    CrediciError,
    CycleNotFoundError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    NotReversibleError,
    RateLimitedError,
    StorageError,
    TransactionArchivedError,
    TransactionNotFoundError,
    TransferRefusedError,
)
from credici_redis.models import TransactionKind

KINDS: dict[str, TransactionKind] = {
    "a": "add",
    "s": "subtract",
    "e": "expire",
    "c": "cycle_start",
    "r": "reserve",
    "p": "capture",
    "l": "release",
    "v": "reverse",
    "o": "transfer_out",
    "i": "transfer_in",
    "d": "credit_limit",
}
"""History entry kinds as the scripts write them."""


def _amount(req: Any) -> int:
    return getattr(req, "amount", None) or 0


REFUSALS: dict[str, Callable[[Any, list[str]], CrediciError]] = {
    "INSUFFICIENT": lambda req, f: InsufficientCreditsError(
        req.user_id,
        req.amount,
        sum(map(int, f[1:3])),  # balance (+ credit limit): exact
    ),
    "BUDGET": lambda req, f: BudgetExceededError(
        req.user_id,
        req.amount,
        int(f[1]),
        from_ms(int(f[2])),
        retry_after=timedelta(milliseconds=int(f[3])),
        limit=decode(f[4])[1],
        member=f[5] if len(f) > 5 and f[5] else None,
    ),
    "RATE": lambda req, f: RateLimitedError(
        req.user_id,
        req.amount,
        timedelta(milliseconds=int(f[1])) if f[1] else None,
        limit=decode(f[2])[0],
    ),
    "IDEM_CONFLICT": lambda req, f: IdempotencyConflictError(req.user_id, req.idempotency_key),
    "EXPIRY_PAST": lambda req, f: InvalidExpiryError(
        f"the expiry must be after the storage's current time ({from_ms(int(f[1]))})"
    ),
    "BALANCE_LIMIT": lambda req, f: InvalidAmountError(
        f"adding {_amount(req)} to a balance of {f[1]} would pass the limit of 2**53-1",
        amount=_amount(req),
    ),
    "NO_CYCLE": lambda req, f: CycleNotFoundError(req.user_id),
    "NO_HOLD": lambda req, f: HoldNotFoundError(req.hold_id),
    "HOLD_DONE": lambda req, f: HoldFinishedError(req.hold_id, f[1]),
    "HOLD_EXCEEDED": lambda req, f: CaptureExceedsHoldError(req.hold_id, _amount(req), int(f[1])),
    "NO_TX": lambda req, f: TransactionNotFoundError(req.transaction_id),
    "ARCHIVED": lambda req, f: TransactionArchivedError(req.transaction_id),
    "NOT_REVERSIBLE": lambda req, f: NotReversibleError(req.transaction_id, KINDS.get(f[1], "?")),
    "REFUNDED": lambda req, f: TransferRefusedError(f[2], f[1], f[3] or None),
    "REVERSED": lambda req, f: AlreadyReversedError(
        req.transaction_id, _keys.transaction_id(req.user_id, f[1])
    ),
}

PROGRESS = frozenset({"SCHEDULE", "ZONE", "CATCHUP", "INCONSISTENT"})
"""Replies every script may give, answered by the ledger itself (`credici_redis._core.protocol`):
SCHEDULE asks for a calendar cycle's boundaries, ZONE for the UTC offsets of the usage zone."""
LIMITS_PROGRESS = frozenset({"PERIOD"})
"""... and those the scripts that read limits (ARGV default_limits) may give too: PERIOD asks for
the calendar period of a budget, answered by the ledger like SCHEDULE."""


def refusal(req: Any, f: list[str]) -> CrediciError:
    """The error a script's coded reply `f` means for request `req`."""
    make = REFUSALS.get(f[0])
    if make is None:
        return StorageError(f"unexpected reply from a credici script: {f!r}")
    return make(req, f)
