"""What the ASGI and WSGI middlewares share: charges, meters, refusals, headers (no I/O).

Both middlewares do the same steps around one `subtract` (a fixed price) or one `reserve` then
`capture` / `release` (usage known after the response): decide the price and the user, charge or
reserve, then either run the app with the credit headers added or answer with a refusal built
here; a metered request is settled after its response by the rules of `settlement`. Only the
sending differs (`credici_redis.asgi`, `credici_redis.wsgi`).

The steps that call the credits client (charge, reserve, settle) are written once, in
`Metering`, as generators of `Call`s: a `Steps` hands out the calls, the middleware makes each
one (awaited for ASGI) and answers it with `Steps.reply` or `Steps.fail`, and reads
`Steps.result` at the end.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any, Generic, Literal, TypeVar

from credici_redis._clients.base import UserId
from credici_redis._core.keys import parse_hold_id
from credici_redis._core.requests import MAX_IDEMPOTENCY_KEY_CHARS
from credici_redis._core.schedule import calendar_period
from credici_redis._core.time import to_ms
from credici_redis._ops.holds import DEFAULT_HOLD_TTL as DEFAULT_HOLD_TTL  # asgi, wsgi
from credici_redis.errors import (
    BudgetExceededError,
    CrediciError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidIdempotencyKeyError,
    InvalidUserIdError,
    RateLimitedError,
    StorageError,
)
from credici_redis.models import Hold, Transaction

T = TypeVar("T")

StorageErrorPolicy = Literal["closed", "open"]
DisconnectPolicy = Literal["capture", "release"]

REMAINING_HEADER = "X-Credits-Remaining"
COST_HEADER = "X-Credits-Cost"
RESERVED_HEADER = "X-Credits-Reserved"
RETRY_AFTER_HEADER = "Retry-After"
RATELIMIT_HEADER = "RateLimit"
"""The service limit of draft-ietf-httpapi-ratelimit-headers (``"<policy>";r=<left>;t=<s>``),
sent with a 429."""
RATELIMIT_POLICY_HEADER = "RateLimit-Policy"
"""... and the quota policy that refused (``"<policy>";q=<quota>;w=<window s>``), from the limit
the refusal carries (the script that refused names it: no extra call)."""
RATE_POLICY = "rate"
BUDGET_POLICY = "budget"
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_PREFIX = "http:"
"""Keys from the header are stored as ``http:<header>``, so a client's key can never replay or
block a key the application itself uses for the same user (``add(..., idempotency_key=...)``)."""
MAX_IDEMPOTENCY_HEADER_CHARS = MAX_IDEMPOTENCY_KEY_CHARS - len(IDEMPOTENCY_PREFIX)
MAX_METADATA_PATH = 512
"""Characters of the path kept in a charge's metadata (metadata is at most 4 KiB of JSON)."""
CAPTURE_KEY_PREFIX = "http-capture:"
RETRY_KEY_PREFIX = "http-retry:"
"""Keys the middleware derives for a metered request with an ``Idempotency-Key``, from the hold
the key reserved: never ``http:...``, so no client header can take them first."""
MAX_RESERVATIONS = 5
"""Holds one ``Idempotency-Key`` may reserve in turn, each after the previous one was released
(a failed or abandoned attempt); past that a retry reserves without a key (logged)."""


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


def report(meter: Meter | None, used: int) -> bool:
    """`report_usage`: report `used` to `meter`; False (and nothing done) when there is none."""
    if meter is None:
        return False
    meter.report(used)
    return True


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


Clock = Callable[[], datetime]


def wait_seconds(delay: timedelta) -> int:
    """A wait as ``Retry-After`` says it: whole seconds, rounded up, at least 1 (so that a retry
    never comes before the time the refusal named)."""
    return max(-(-delay // timedelta(seconds=1)), 1)


def service_limit(policy: str, remaining: int, reset: int | None) -> str:
    """A ``RateLimit`` field value: ``"budget";r=3;t=3600`` (no ``t``: no reset to tell)."""
    value = f'"{policy}";r={max(remaining, 0)}'
    return value if reset is None else f"{value};t={reset}"


def quota_policy(exc: RateLimitedError | BudgetExceededError) -> str | None:
    """The ``RateLimit-Policy`` value of the limit that refused: the rate's amount per its
    window, the budget's amount per its period (a calendar one: the period that refused, DST
    included); None when the refusal does not carry its limit."""
    if isinstance(exc, RateLimitedError):
        rate = exc.limit
        if rate is None:
            return None
        return f'"{RATE_POLICY}";q={rate.amount};w={wait_seconds(rate.per)}'
    budget = exc.limit
    if budget is None:
        return None
    if isinstance(budget.period, timedelta):
        window = wait_seconds(budget.period)
    else:
        start, end = calendar_period(to_ms(exc.resets_at) - 1, budget.period, budget.tz)
        window = wait_seconds(timedelta(milliseconds=end - start))
    return f'"{BUDGET_POLICY}";q={budget.amount};w={window}'


def limit_refusal(
    exc: RateLimitedError | BudgetExceededError, price: tuple[str, str], now: Clock
) -> Refusal:
    """The 429 for a charge the user's limits refused; `price` is the cost (or reservation)
    header, as on a 402."""
    policy = quota_policy(exc)
    quota = () if policy is None else ((RATELIMIT_POLICY_HEADER, policy),)
    if isinstance(exc, BudgetExceededError):
        # The storage's own count of the wait (its clock); else this machine's against resets_at.
        left = exc.retry_after if exc.retry_after is not None else exc.resets_at - now()
        wait = wait_seconds(left)
        return Refusal(
            429,
            {
                "error": "budget_exceeded",
                "required": exc.requested,
                "remaining": exc.remaining,
                "resets_at": exc.resets_at.isoformat(),
                "retry_after": wait,
            },
            (
                (RETRY_AFTER_HEADER, str(wait)),
                (RATELIMIT_HEADER, service_limit(BUDGET_POLICY, exc.remaining, wait)),
                *quota,
                price,
            ),
        )
    if exc.retry_after is None:  # more than the burst: waiting does not help
        return Refusal(
            429,
            {
                "error": "rate_limited",
                "required": exc.requested,
                "retry_after": None,
                "detail": f"{exc.requested} credits are more than the rate limit lets through "
                "at once (its burst): this request can never pass",
            },
            (*quota, price),
        )
    wait = wait_seconds(exc.retry_after)
    return Refusal(
        429,
        {"error": "rate_limited", "required": exc.requested, "retry_after": wait},
        (
            (RETRY_AFTER_HEADER, str(wait)),
            (RATELIMIT_HEADER, service_limit(RATE_POLICY, 0, wait)),
            *quota,
            price,
        ),
    )


def check_disconnect_policy(value: object) -> DisconnectPolicy:
    if value == "capture":
        return "capture"
    if value == "release":
        return "release"
    raise ValueError(f"on_disconnect must be 'capture' or 'release', not {value!r}")


def check_hold_ttl(value: object) -> timedelta:
    if not isinstance(value, timedelta):
        raise TypeError(f"hold_ttl must be a timedelta, not {type(value).__name__}")
    if value <= timedelta(0):
        raise ValueError(f"hold_ttl must be positive, not {value}")
    return value


def check_usage(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"usage must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"usage must be >= 0, not {value}")
    return value


class Meter:
    """A request metered by usage: what was reserved, what the handler reports, the outcome.

    The handler reports with `add` (credits used by one more piece: a chunk, a token...) or
    `report` (the total so far; the last report counts). Reports are kept even when nothing is
    billed (no user, storage down with ``on_storage_error="open"``), so a handler can always
    report and may bound its work by `left`.
    """

    def __init__(self, user_id: str | None, reserved: int) -> None:
        self.user_id = user_id
        """The user billed; None: the request has no user (it is not billed)."""
        self.reserved = reserved
        """The most this request may cost: the credits reserved before the handler ran."""
        self.hold: Hold | None = None
        """The reservation; None when nothing was reserved (no user, free, or failed open)."""
        self.replayed = False
        """True for a retry (same ``Idempotency-Key``) of a request whose usage was already
        captured: this run is not charged again."""
        self.used: int | None = None
        """Credits reported so far; None: nothing reported."""
        self.charged: int | None = None
        """After the response: the credits captured (0: all released); None until settled, or
        when settling failed or was not needed (see `replayed`)."""
        self.transaction: Transaction | None = None
        """After the response: the capture (None when released)."""
        self._lock = threading.Lock()

    @property
    def billed(self) -> bool:
        """Whether this request's usage will be captured from a reservation of its own."""
        return self.hold is not None and not self.replayed

    @property
    def left(self) -> int:
        """Credits of the reservation not reported used yet (what more work may cost)."""
        return max(self.reserved - (self.used or 0), 0)

    def add(self, credits: int) -> int:
        """Report `credits` more used; returns the total reported."""
        check_usage(credits)
        with self._lock:
            self.used = (self.used or 0) + credits
            return self.used

    def report(self, used: int) -> None:
        """Report the credits used in total so far (replaces earlier reports)."""
        check_usage(used)
        with self._lock:
            self.used = used

    def settled(self, charged: int, transaction: Transaction | None) -> None:
        self.charged, self.transaction = charged, transaction

    def __repr__(self) -> str:
        return (
            f"Meter(user_id={self.user_id!r}, reserved={self.reserved}, used={self.used}, "
            f"billed={self.billed}, charged={self.charged})"
        )


def reservation_headers(meter: Meter) -> tuple[tuple[str, str], ...]:
    return ((RESERVED_HEADER, str(meter.reserved)),)


def hold_local_id(hold: Hold) -> str:
    return parse_hold_id(hold.hold_id)[1]


def capture_key(hold: Hold) -> str:
    """The capture's idempotency key, for a hold reserved under an ``Idempotency-Key``."""
    return CAPTURE_KEY_PREFIX + hold_local_id(hold)


def retry_key(released: Hold) -> str:
    """The key of the next reservation of an ``Idempotency-Key`` whose hold was released."""
    return RETRY_KEY_PREFIX + hold_local_id(released)


@dataclass
class Exchange:
    """How far the response of a metered request went."""

    status: int | None = None
    complete: bool = False
    """The last byte of the body was handed to the server."""
    disconnected: bool = False
    """The client left before that (the app received ``http.disconnect``, ``send`` raised
    OSError, or the WSGI server closed the body before its end)."""


@dataclass(frozen=True)
class Settlement:
    """What to do with a hold once its response ended: capture `credits` (0: release all)."""

    credits: int
    reason: str
    overused: bool = False
    """The handler reported more than was reserved: `credits` is the reservation."""


def settlement(meter: Meter, exchange: Exchange, on_disconnect: DisconnectPolicy) -> Settlement:
    """The rules, in order (the usage is what the handler reported, or None):

    1. response not complete: the client left and ``on_disconnect="capture"``: the usage so far
       (nothing reported: 0); otherwise (an exception, an abandoned response, or
       ``on_disconnect="release"``) 0;
    2. status >= 500: 0;
    3. nothing reported: all of the reservation for a status < 400, 0 for a 4xx;
    4. the usage, at most the reservation.
    """
    used = meter.used
    status = exchange.status if exchange.status is not None else 500
    if not exchange.complete:
        if exchange.disconnected and on_disconnect == "capture":
            credits, reason = used or 0, "client disconnected, usage so far"
        else:
            credits = 0
            reason = "client disconnected" if exchange.disconnected else "response not completed"
    elif status >= 500:
        credits, reason = 0, f"status {status}"
    elif used is None:
        credits = meter.reserved if status < 400 else 0
        reason = "no usage reported"
    else:
        credits, reason = used, "usage reported"
    if credits > meter.reserved:
        return Settlement(meter.reserved, reason, overused=True)
    return Settlement(credits, reason)


def log_settlement(
    logger: logging.Logger, meter: Meter, outcome: Settlement, method: str, path: str
) -> None:
    """Debug: how a metered request is settled; warning: it reported more than reserved."""
    if outcome.overused:
        log_overuse(logger, meter, method, path)
    logger.debug(
        "%s %s of user %r: %s (%s), %s %s of the %s credits reserved",
        method, path, meter.user_id, outcome.reason, meter.used,
        "capturing" if outcome.credits else "releasing all", outcome.credits, meter.reserved,
    )  # fmt: skip


def log_overuse(logger: logging.Logger, meter: Meter, method: str, path: str) -> None:
    logger.warning(
        "%s %s of user %r reported %s credits used, more than the %s reserved: charging %s",
        method, path, meter.user_id, meter.used, meter.reserved, meter.reserved,
    )  # fmt: skip


def log_settle_failure(
    logger: logging.Logger,
    exc: CrediciError,
    meter: Meter,
    credits: int,
    method: str,
    path: str,
) -> None:
    """A capture or release after the response failed: nothing can be refused any more, so say
    why in the log (the hold, if still active, is released by its ttl)."""
    hold = meter.hold
    assert hold is not None
    action = f"capture {credits} credits of" if credits else "release"
    where = f"{method} {path} of user {meter.user_id!r}"
    if isinstance(exc, IdempotencyConflictError) or (
        isinstance(exc, HoldFinishedError) and exc.status == "captured"
    ):
        # Another attempt with the same Idempotency-Key settled the hold first.
        logger.info("%s: hold %s was settled by another attempt", where, hold.hold_id)
    elif isinstance(exc, HoldFinishedError | HoldNotFoundError):
        if credits:  # a release finding the hold ended already has nothing to regret
            status = exc.status if isinstance(exc, HoldFinishedError) else "forgotten"
            why = (
                "released by another attempt with the same Idempotency-Key"
                if status == "released"
                else f"is hold_ttl={hold.expires_at - hold.created_at} shorter than the response?"
            )
            logger.warning(
                "%s: could not %s hold %s, already %s (%s): not charged",
                where, action, hold.hold_id, status, why,
            )  # fmt: skip
    elif isinstance(exc, StorageError):
        logger.error(
            "%s: could not %s hold %s (%s); it is released by its ttl at %s",
            where, action, hold.hold_id, exc, hold.expires_at.isoformat(),
        )  # fmt: skip
    else:
        logger.error("%s: could not %s hold %s: %r", where, action, hold.hold_id, exc)


def refusal_for(
    exc: CrediciError,
    *,
    user_id: str,
    cost: int,
    policy: StorageErrorPolicy,
    logger: logging.Logger,
    method: str,
    path: str,
    reserving: bool = False,
    now: Clock | None = None,
) -> Refusal | None:
    """The answer to a charge (or a reservation: `reserving`, `cost` is then the amount to
    reserve) that raised `exc`; None means fail open (run the handler unpaid). `now`: the time
    to count a budget refusal's wait from when the error does not carry it (None: this
    machine's clock; the storage's errors carry it, counted by the storage's clock).

    Not enough credits is a 402; the user's limits (rate, budget) a 429 (`limit_refusal`).
    Errors that are not the client's doing nor an outage (a bad `cost`, a bug) are re-raised.
    """
    price = (RESERVED_HEADER if reserving else COST_HEADER, str(cost))
    if isinstance(exc, InsufficientCreditsError):
        return Refusal(
            402,
            {
                "error": "insufficient_credits",
                "required": exc.requested,
                "available": exc.available,
            },
            ((REMAINING_HEADER, str(exc.available)), price),
        )
    if isinstance(exc, RateLimitedError | BudgetExceededError):
        return limit_refusal(exc, price, now or (lambda: datetime.now(timezone.utc)))
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
                "credits storage failed, serving %s %s to user %r without %s %s credits: %s",
                method, path, user_id, "reserving" if reserving else "charging", cost, exc,
            )  # fmt: skip
            return None
        logger.error(
            "credits storage failed, refusing %s %s of user %r with 503: %s",
            method, path, user_id, exc,
        )  # fmt: skip
        return Refusal(503, {"error": "credits_unavailable"})
    raise exc


@dataclass(frozen=True)
class Call:
    """One call to the credits client: ``client.<name>(*args, **kwargs)``."""

    name: Literal["subtract", "reserve", "capture", "release", "get_hold"]
    args: tuple[object, ...]
    kwargs: Mapping[str, object] = field(default_factory=dict)

    def on(self, client: object) -> Any:
        """Make the call on `client` (a coroutine for the async client)."""
        return getattr(client, self.name)(*self.args, **self.kwargs)


Flow = Generator[Call, Any, T]


class Steps(Generic[T]):
    """Iterates over the `Call`s of a flow; answer each one before asking for the next, with
    `reply` (what the call returned) or `fail` (the CrediciError it raised). Errors the flow does
    not handle come out of the iteration; after it, `result` is what the flow returned."""

    result: T

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self._reply: Any = None
        self._error: CrediciError | None = None

    def __iter__(self) -> Iterator[Call]:
        return self

    def __next__(self) -> Call:
        reply, error = self._reply, self._error
        self._reply, self._error = None, None
        try:
            return self._flow.send(reply) if error is None else self._flow.throw(error)
        except StopIteration as done:
            self.result = done.value
            raise

    def reply(self, value: object) -> None:
        self._reply = value

    def fail(self, error: CrediciError) -> None:
        self._error = error


@dataclass
class Reservation:
    """A metered request whose hold is reserved: what settling it after the response needs."""

    meter: Meter
    capture_key: str | None
    method: str
    path: str
    exchange: Exchange = field(default_factory=Exchange)

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return reservation_headers(self.meter)


Outcome = Refusal | None
"""A `Refusal` to answer instead of running the app, or None: run the app unpaid (failed open)."""


def hold_status(hold: Hold) -> Flow[str]:
    """The hold's status now: "active", "captured", "released" or "expired" (as is a hold
    finished so long ago that it is forgotten)."""
    try:
        found: Hold = yield Call("get_hold", (hold.hold_id,))
    except HoldNotFoundError:
        return "expired"
    return found.status


class Metering:
    """The policies of a middleware and its steps around the client's calls (no I/O)."""

    hold_ttl: timedelta
    on_disconnect: DisconnectPolicy
    on_storage_error: StorageErrorPolicy
    logger: logging.Logger

    def _configure(
        self,
        hold_ttl: object,
        on_disconnect: object,
        on_storage_error: object,
        logger: logging.Logger | None,
        default_logger: str,
    ) -> None:
        self.hold_ttl = check_hold_ttl(hold_ttl)
        self.on_disconnect = check_disconnect_policy(on_disconnect)
        self.on_storage_error = check_policy(on_storage_error)
        self.logger = logger if logger is not None else logging.getLogger(default_logger)

    def _refusal(
        self,
        exc: CrediciError,
        user: UserId,
        cost: int,
        method: str,
        path: str,
        reserving: bool = False,
    ) -> Outcome:
        return refusal_for(
            exc, user_id=str(user), cost=cost, policy=self.on_storage_error, logger=self.logger,
            method=method, path=path, reserving=reserving,
        )  # fmt: skip

    def _charging(
        self, user: UserId, cost: int, header: str | None, method: str, path: str
    ) -> Steps[Charge | Outcome]:
        """Charge `cost` (one `subtract`): the `Charge`, or the refusal for its error."""
        return Steps(self._charge(user, cost, header, method, path))

    def _charge(
        self, user: UserId, cost: int, header: str | None, method: str, path: str
    ) -> Flow[Charge | Outcome]:
        try:
            transaction: Transaction = yield Call(
                "subtract",
                (user, cost),
                {
                    "idempotency_key": idempotency_key(header),
                    "metadata": charge_metadata(method, path),
                },
            )
        except CrediciError as exc:
            return self._refusal(exc, user, cost, method, path)
        return Charge(transaction.user_id, cost, transaction)

    def _reserving(
        self, usage: Meter, user: UserId, header: str | None, method: str, path: str
    ) -> Steps[Reservation | Outcome]:
        """Reserve ``usage.reserved`` for `user`: the `Reservation` (`usage` then has its hold),
        or the refusal for the error."""
        return Steps(self._reserve_for(usage, user, header, method, path))

    def _reserve_for(
        self, usage: Meter, user: UserId, header: str | None, method: str, path: str
    ) -> Flow[Reservation | Outcome]:
        try:
            key = idempotency_key(header)
            hold, replayed = yield from self._reserve(user, usage.reserved, key, method, path)
        except CrediciError as exc:
            return self._refusal(exc, user, usage.reserved, method, path, reserving=True)
        usage.user_id, usage.hold, usage.replayed = hold.user_id, hold, replayed
        return Reservation(usage, None if key is None else capture_key(hold), method, path)

    def _reserve(
        self, user: UserId, amount: int, key: str | None, method: str, path: str
    ) -> Flow[tuple[Hold, bool]]:
        """The request's hold, and whether it was already captured (a retry of a served
        request). Under an Idempotency-Key a retry gets the hold of the first attempt; if that
        one was released, a new hold under a key derived from it (`retry_key`)."""
        metadata = charge_metadata(method, path)
        for _ in range(MAX_RESERVATIONS):
            hold: Hold = yield Call(
                "reserve",
                (user, amount),
                {"ttl": self.hold_ttl, "idempotency_key": key, "metadata": metadata},
            )
            if key is None:
                return hold, False
            status = yield from hold_status(hold)
            if status in ("active", "captured"):
                return hold, status == "captured"
            key = retry_key(hold)
        self.logger.warning(
            "%s %s of user %r: the Idempotency-Key's last %s holds were all released, "
            "reserving without a key",
            method, path, str(user), MAX_RESERVATIONS,
        )  # fmt: skip
        hold = yield Call("reserve", (user, amount), {"ttl": self.hold_ttl, "metadata": metadata})
        return hold, False

    def _settling(self, reservation: Reservation) -> Steps[None]:
        """Capture the usage or release the hold, by `settlement`; never raises a CrediciError
        (the response is over: failures are logged)."""
        return Steps(self._settle(reservation))

    def _settle(self, reservation: Reservation) -> Flow[None]:
        usage, method, path = reservation.meter, reservation.method, reservation.path
        hold = usage.hold
        if hold is None or usage.replayed:
            return
        outcome = settlement(usage, reservation.exchange, self.on_disconnect)
        log_settlement(self.logger, usage, outcome, method, path)
        try:
            if outcome.credits:
                tx: Transaction = yield Call(
                    "capture",
                    (hold.hold_id, outcome.credits),
                    {"idempotency_key": reservation.capture_key},
                )
                usage.settled(outcome.credits, tx)
            else:
                yield Call("release", (hold.hold_id,))
                usage.settled(0, None)
        except CrediciError as exc:
            log_settle_failure(self.logger, exc, usage, outcome.credits, method, path)
