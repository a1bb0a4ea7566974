"""What the ASGI and WSGI middlewares share: the charge, the refusals, the headers (no I/O).

Both middlewares do the same three steps around one `subtract`: decide the price and the user,
charge, then either run the app with the credit headers added or answer with a refusal built
here. Only the sending differs (`credici_redis.asgi`, `credici_redis.wsgi`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from credici_redis._requests import MAX_IDEMPOTENCY_KEY_CHARS
from credici_redis.errors import (
    CrediciError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidIdempotencyKeyError,
    InvalidUserIdError,
    StorageError,
)
from credici_redis.models import Transaction

StorageErrorPolicy = Literal["closed", "open"]

REMAINING_HEADER = "X-Credits-Remaining"
COST_HEADER = "X-Credits-Cost"
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PREFIX = "http:"
"""Keys from the header are stored as ``http:<header>``, so a client's key can never replay or
block a key the application itself uses for the same user (``add(..., idempotency_key=...)``)."""
MAX_IDEMPOTENCY_HEADER_CHARS = MAX_IDEMPOTENCY_KEY_CHARS - len(IDEMPOTENCY_PREFIX)
MAX_METADATA_PATH = 512
"""Characters of the path kept in a charge's metadata (metadata is at most 4 KiB of JSON)."""


@dataclass(frozen=True)
class Charge:
    """The credits a request paid before its handler ran."""

    user_id: str
    cost: int
    transaction: Transaction

    @property
    def remaining(self) -> int:
        """The user's balance right after this charge (for a replayed retry: after the first)."""
        return self.transaction.balance_after


@dataclass(frozen=True)
class Refusal:
    """A JSON error answered instead of running the handler."""

    status: int
    body: dict[str, object]
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def status_line(self) -> str:
        """``"402 Payment Required"``: the status as WSGI wants it."""
        return f"{self.status} {HTTPStatus(self.status).phrase}"

    def payload(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


def check_policy(value: object) -> StorageErrorPolicy:
    if value == "closed":
        return "closed"
    if value == "open":
        return "open"
    raise ValueError(f"on_storage_error must be 'closed' or 'open', not {value!r}")


def check_cost(value: object) -> int:
    """A price: an int >= 0 (0: the request is free, nothing is charged)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a cost must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"a cost must be >= 0, not {value}")
    return value


def idempotency_key(header: str | None) -> str | None:
    """The library's idempotency key for an ``Idempotency-Key`` header value (None: no header)."""
    if header is None:
        return None
    value = header.strip()
    if not value:
        raise InvalidIdempotencyKeyError(f"the {IDEMPOTENCY_HEADER} header is empty")
    if len(value) > MAX_IDEMPOTENCY_HEADER_CHARS:
        raise InvalidIdempotencyKeyError(
            f"the {IDEMPOTENCY_HEADER} header has {len(value)} characters, "
            f"at most {MAX_IDEMPOTENCY_HEADER_CHARS} are allowed"
        )
    return IDEMPOTENCY_PREFIX + value


def charge_metadata(method: str, path: str) -> dict[str, str]:
    """Recorded with the charge; also part of what makes a retry "the same request"."""
    return {"method": method, "path": path[:MAX_METADATA_PATH]}


def charge_headers(charge: Charge) -> tuple[tuple[str, str], ...]:
    return ((REMAINING_HEADER, str(charge.remaining)), (COST_HEADER, str(charge.cost)))


def refusal_for(
    exc: CrediciError,
    *,
    user_id: str,
    cost: int,
    policy: StorageErrorPolicy,
    logger: logging.Logger,
    method: str,
    path: str,
) -> Refusal | None:
    """The answer to a charge that raised `exc`; None means fail open (run the handler unpaid).

    Errors that are not the client's doing nor an outage (a bad `cost`, a bug) are re-raised.
    """
    if isinstance(exc, InsufficientCreditsError):
        return Refusal(
            402,
            {
                "error": "insufficient_credits",
                "required": exc.requested,
                "available": exc.available,
            },
            ((REMAINING_HEADER, str(exc.available)), (COST_HEADER, str(cost))),
        )
    if isinstance(exc, IdempotencyConflictError):
        key = exc.idempotency_key.removeprefix(IDEMPOTENCY_PREFIX)
        return Refusal(422, {"error": "idempotency_conflict", "idempotency_key": key})
    if isinstance(exc, InvalidIdempotencyKeyError):
        return Refusal(400, {"error": "invalid_idempotency_key", "detail": str(exc)})
    if isinstance(exc, InvalidUserIdError):
        return Refusal(400, {"error": "invalid_user", "detail": str(exc)})
    if isinstance(exc, StorageError):
        if policy == "open":
            logger.warning(
                "credits storage failed, serving %s %s to user %r without charging %s credits: %s",
                method, path, user_id, cost, exc,
            )  # fmt: skip
            return None
        logger.error(
            "credits storage failed, refusing %s %s of user %r with 503: %s",
            method, path, user_id, exc,
        )  # fmt: skip
        return Refusal(503, {"error": "credits_unavailable"})
    raise exc
