"""Validated requests: every public argument is checked here, before anything is sent.

Pure code shared by both clients and every storage. A request that leaves this module is well
formed; what only the storage can judge (an expiry against the server's clock, the balance) is
judged inside the storage's atomic operation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from credici_redis._core.keys import parse_hold_id, parse_transaction_id
from credici_redis._core.schedule import CALENDAR_PERIODS, zone
from credici_redis._core.time import duration_ms, to_ms, to_ms_ceil
from credici_redis.errors import (
    CrediciError,
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
    StorageError,
)
from credici_redis.models import CalendarPeriod

MAX_CREDITS = 2**53 - 1
"""Largest amount and balance: Lua numbers are doubles, exact up to here."""
MAX_USER_ID_BYTES = 256
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_METADATA_ITEMS = 64
MAX_METADATA_BYTES = 4096
MAX_TTL = timedelta(days=365 * 1000)


@dataclass(frozen=True, slots=True)
class AddRequest:
    user_id: str
    amount: int
    expire_at_ms: int | None
    ttl_ms: int | None
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class SubtractRequest:
    user_id: str
    amount: int
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class StartCycleRequest:
    user_id: str
    amount: int
    period: str
    """The period as given, encoded: "days:N", "us:N", or a calendar period name."""
    duration_ms: int | None
    """Fixed periods only; None for a calendar period."""
    tz: str
    renew: bool
    rollover: int | None
    idempotency_key: str | None
    fingerprint: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    user_id: str
    amount: int
    ttl_ms: int
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    hold_id: str
    user_id: str
    local_id: str
    amount: int | None
    idempotency_key: str | None
    fingerprint: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class ReverseRequest:
    transaction_id: str
    user_id: str
    entry_id: str
    idempotency_key: str | None
    fingerprint: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class EventReading:
    """How `events()` reads: events per call and stream, seconds between polls when idle,
    seconds before another consumer's unacknowledged events are taken over, seconds between
    looks for new event streams, and seconds without events before it stops (None: never)."""

    batch: int = 100
    poll: float = 0.2
    claim_after: float = 60.0
    discover_every: float = 5.0
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """A history read, newest first: entries with from_ms <= time <= to_ms, older than the
    entry `before` (a history entry id, exclusive), at most `limit` of them (None: all)."""

    user_id: str
    from_ms: int | None
    to_ms: int | None
    now_ms: int | None
    limit: int | None = None
    before: str | None = None


def user_id(value: object) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str):
        raise InvalidUserIdError(
            f"user_id must be a str or UUID, not {type(value).__name__}", user_id=value
        )
    if not value:
        raise InvalidUserIdError("user_id must not be empty", user_id=value)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidUserIdError("user_id is not valid Unicode text", user_id=value) from exc
    if size > MAX_USER_ID_BYTES:
        raise InvalidUserIdError(
            f"user_id is {size} UTF-8 bytes, at most {MAX_USER_ID_BYTES} are allowed",
            user_id=value,
        )
    return value


def amount(value: object, *, allow_zero: bool = False) -> int:
    # bool is an int subclass; True is not "1 credit".
    if type(value) is not int:
        raise InvalidAmountError(f"amount must be an int, not {type(value).__name__}", amount=value)
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_CREDITS:
        raise InvalidAmountError(
            f"amount must be between {low} and {MAX_CREDITS}, got {value}", amount=value
        )
    return value


def idempotency_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidIdempotencyKeyError("idempotency_key must be a non-empty str")
    if len(value) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidIdempotencyKeyError(
            f"idempotency_key has {len(value)} characters, at most "
            f"{MAX_IDEMPOTENCY_KEY_CHARS} are allowed"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidIdempotencyKeyError("idempotency_key is not valid Unicode text") from exc
    return value


def metadata(value: object) -> str:
    """The metadata as canonical JSON ('' for none), the form stored in history."""
    if value is None:
        return ""
    if not isinstance(value, dict):
        raise InvalidMetadataError(f"metadata must be a dict, not {type(value).__name__}")
    if len(value) > MAX_METADATA_ITEMS:
        raise InvalidMetadataError(f"metadata has more than {MAX_METADATA_ITEMS} items")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidMetadataError("metadata keys and values must be str")
    if not value:
        return ""
    try:
        encoded = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        size = len(encoded.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidMetadataError("metadata is not valid Unicode text") from exc
    if size > MAX_METADATA_BYTES:
        raise InvalidMetadataError(
            f"metadata is {size} bytes as JSON, at most {MAX_METADATA_BYTES} are allowed"
        )
    return encoded


def expiry(expire_at: object, ttl: object) -> tuple[int | None, int | None]:
    """(expire_at_ms, ttl_ms); the storage checks expire_at against its own clock."""
    if expire_at is not None and ttl is not None:
        raise InvalidExpiryError("give expire_at or ttl, not both")
    if expire_at is not None:
        if not isinstance(expire_at, datetime):
            raise InvalidExpiryError(
                f"expire_at must be a datetime, not {type(expire_at).__name__}"
            )
        try:
            return to_ms(expire_at), None
        except OverflowError as exc:  # an aware time whose UTC is outside datetime's range
            raise InvalidExpiryError(f"expire_at {expire_at} is out of range") from exc
    if ttl is not None:
        if not isinstance(ttl, timedelta):
            raise InvalidExpiryError(f"ttl must be a timedelta, not {type(ttl).__name__}")
        if ttl > MAX_TTL:
            raise InvalidExpiryError(f"ttl must be at most {MAX_TTL}")
        ms = duration_ms(ttl)
        if ms < 1:
            raise InvalidExpiryError("ttl must be at least one millisecond")
        return None, ms
    return None, None


def cycle_period(time_delta: object) -> tuple[str, int | None]:
    """(encoded period, fixed length in ms or None for a calendar period)."""
    if isinstance(time_delta, str):
        if time_delta not in CALENDAR_PERIODS:
            raise InvalidCycleError(
                f"time_delta must be days, a timedelta or one of {CALENDAR_PERIODS}, "
                f"got {time_delta!r}"
            )
        return time_delta, None
    ms = cycle_duration(time_delta)
    if type(time_delta) is int:
        return f"days:{time_delta}", ms
    assert isinstance(time_delta, timedelta)
    return f"us:{time_delta // timedelta(microseconds=1)}", ms  # exact: Cycle.period as given


def decode_period(encoded: str) -> int | timedelta | CalendarPeriod:
    """The period as the caller gave it, from its encoded form."""
    kind, _, number = encoded.partition(":")
    if kind == "days":
        return int(number)
    if kind == "us":
        return timedelta(microseconds=int(number))
    if kind == "ms":
        return timedelta(milliseconds=int(number))
    if encoded not in CALENDAR_PERIODS:
        raise StorageError(f"unknown cycle period {encoded!r} in storage")
    return cast(CalendarPeriod, encoded)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidCycleError(f"{name} must be a bool, got {value!r}")
    return value


def rollover(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_CREDITS:
        raise InvalidCycleError(f"rollover must be None or an int from 0 to 2**53-1, got {value!r}")
    return value


def cycle_duration(time_delta: object) -> int:
    if isinstance(time_delta, timedelta):
        delta = time_delta
    elif type(time_delta) is int:
        if not 1 <= time_delta <= MAX_TTL.days:
            raise InvalidCycleError(
                f"time_delta must be between 1 and {MAX_TTL.days} days, got {time_delta}"
            )
        delta = timedelta(days=time_delta)
    elif isinstance(time_delta, float) and math.isfinite(time_delta) and time_delta > 0:
        raise InvalidCycleError("time_delta in days must be an int; use a timedelta for fractions")
    else:
        raise InvalidCycleError(
            f"time_delta must be an int number of days or a timedelta, got {time_delta!r}"
        )
    if delta > MAX_TTL:
        raise InvalidCycleError(f"time_delta must be at most {MAX_TTL}")
    ms = duration_ms(delta)
    if ms < 1:
        raise InvalidCycleError("time_delta must be at least one millisecond")
    return ms


MAX_PRIORITY = 1_000_000


def priority(value: object) -> int:
    if type(value) is not int or not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidPriorityError(
            f"priority must be an int from {-MAX_PRIORITY} to {MAX_PRIORITY}, got {value!r}"
        )
    return value


def credit_limit(value: object) -> int:
    return amount(value, allow_zero=True)


def batch_size(value: object) -> int:
    if type(value) is not int or not 1 <= value <= 100_000:
        raise InvalidInputError(f"batch must be an int from 1 to 100000, got {value!r}")
    return value


def fingerprint(*parts: Any) -> str:
    """What makes two requests "the same" for an idempotency key."""
    text = "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


KeyedRequest = TypeVar(
    "KeyedRequest",
    AddRequest,
    SubtractRequest,
    StartCycleRequest,
    ReserveRequest,
    CaptureRequest,
    ReverseRequest,
)


def keyed(req: KeyedRequest, key: str | None) -> KeyedRequest:
    """The request under idempotency key `key` (None: no key), with its fingerprint."""
    if key is None:
        return replace(req, idempotency_key=None, fingerprint="")
    if isinstance(req, AddRequest):
        fp = fingerprint(
            "add", req.amount, req.expire_at_ms, req.ttl_ms, req.metadata_json, req.priority
        )
    elif isinstance(req, SubtractRequest):
        fp = fingerprint("subtract", req.amount, req.metadata_json)
    elif isinstance(req, ReserveRequest):
        fp = fingerprint("reserve", req.amount, req.ttl_ms, req.metadata_json)
    elif isinstance(req, CaptureRequest):
        fp = fingerprint("capture", req.local_id, req.amount)
    elif isinstance(req, ReverseRequest):
        fp = fingerprint("reverse", req.entry_id)
    else:
        fp = fingerprint("start_cycle", req.amount, req.period, req.tz, req.renew, req.rollover)
    return replace(req, idempotency_key=key, fingerprint=fp)


def generated_key() -> str:
    """For automatic retries of a call given no key: made once per call, so retries apply once."""
    return f"auto:{uuid.uuid4().hex}"


def build_add(
    user: object,
    credits: object,
    expire_at: object,
    ttl: object,
    key: object,
    meta: object,
    now_ms: int | None,
    rank: object = 0,
) -> AddRequest:
    uid, n = user_id(user), amount(credits)
    exp_ms, ttl_ms = expiry(expire_at, ttl)
    ikey, meta_json = idempotency_key(key), metadata(meta)
    req = AddRequest(uid, n, exp_ms, ttl_ms, None, "", meta_json, now_ms, priority(rank))
    return keyed(req, ikey)


def build_subtract(
    user: object, credits: object, key: object, meta: object, now_ms: int | None
) -> SubtractRequest:
    uid, n = user_id(user), amount(credits)
    ikey, meta_json = idempotency_key(key), metadata(meta)
    return keyed(SubtractRequest(uid, n, None, "", meta_json, now_ms), ikey)


def build_start_cycle(
    credits: object,
    time_delta: object,
    user: object,
    *,
    rollover_: object,
    renew: object,
    tz: object,
    key: object,
    now_ms: int | None,
) -> StartCycleRequest:
    n = amount(credits, allow_zero=True)
    period, duration = cycle_period(time_delta)
    keep = rollover(rollover_)
    renews = flag("renew", renew)
    if not isinstance(tz, str):
        raise InvalidTimeZoneError(f"tz must be an IANA time zone name, got {tz!r}")
    zone(tz)
    uid = str(uuid.uuid4()) if user is None else user_id(user)
    ikey = idempotency_key(key)
    req = StartCycleRequest(uid, n, period, duration, tz, renews, keep, None, "", now_ms)
    return keyed(req, ikey)


MAX_HISTORY_LIMIT = 100_000
"""The most entries one history read returns when a limit is given; page on with `before`."""


def build_history(
    user: object,
    from_: object,
    to_: object,
    now_ms: int | None,
    *,
    period: bool,
    limit: object = None,
    before: object = None,
) -> HistoryRequest:
    uid = user_id(user)
    if limit is not None and (type(limit) is not int or not 1 <= limit <= MAX_HISTORY_LIMIT):
        raise InvalidInputError(f"limit must be an int from 1 to {MAX_HISTORY_LIMIT}, or None")
    entry = None
    if before is not None:
        if not isinstance(before, str):
            raise InvalidInputError("before must be a transaction id (str) of this user")
        owner, entry = parse_transaction_id(before)
        if owner != uid:
            raise InvalidInputError(f"before={before!r} is a transaction of another user")
    if not period:
        return HistoryRequest(uid, None, None, now_ms, limit, entry)
    for name, value in (("from_", from_), ("to_", to_)):
        if not isinstance(value, datetime):
            raise InvalidPeriodError(f"{name} must be a datetime, not {type(value).__name__}")
    assert isinstance(from_, datetime) and isinstance(to_, datetime)
    try:
        return HistoryRequest(uid, to_ms_ceil(from_), to_ms(to_), now_ms, limit, entry)
    except OverflowError as exc:  # an aware time whose UTC is outside datetime's range
        raise InvalidPeriodError(f"from_ {from_} or to_ {to_} is out of range") from exc


SUBTRACT_ITEM_KEYS = frozenset({"user_id", "amount", "idempotency_key", "metadata"})
ADD_ITEM_KEYS = frozenset(
    {"user_id", "amount", "expire_at", "ttl", "idempotency_key", "metadata", "priority"}
)


def _item_fields(item: object, keys: frozenset[str], positional: int) -> dict[str, Any]:
    if isinstance(item, Mapping):
        unknown = set(item) - keys
        if unknown:
            raise InvalidInputError(f"unknown item keys {sorted(map(str, unknown))}")
        return dict(item)
    if isinstance(item, tuple) and 2 <= len(item) <= positional:
        return dict(zip(("user_id", "amount", "expire_at"), item, strict=False))
    raise InvalidInputError(
        f"an item is a (user_id, amount) tuple or a mapping with keys from {sorted(keys)}"
    )


def build_subtract_item(item: object, now_ms: int | None) -> SubtractRequest:
    f = _item_fields(item, SUBTRACT_ITEM_KEYS, 2)
    return build_subtract(
        f.get("user_id"), f.get("amount"), f.get("idempotency_key"), f.get("metadata"), now_ms
    )


def build_add_item(item: object, now_ms: int | None) -> AddRequest:
    f = _item_fields(item, ADD_ITEM_KEYS, 3)
    return build_add(
        f.get("user_id"), f.get("amount"), f.get("expire_at"), f.get("ttl"),
        f.get("idempotency_key"), f.get("metadata"), now_ms, f.get("priority", 0),
    )  # fmt: skip


Built = TypeVar("Built", AddRequest, SubtractRequest)


def build_many(
    items: object, build: Callable[[object, int | None], Built], now_ms: int | None
) -> list[Built | CrediciError]:
    """One request per item; an item with bad input becomes its error, the others go ahead."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise InvalidInputError("items must be an iterable of items")
    built: list[Built | CrediciError] = []
    for item in items:
        try:
            built.append(build(item, now_ms))
        except InvalidInputError as error:
            built.append(error)
    return built


DEFAULT_HOLD_TTL = timedelta(minutes=5)


def build_reserve(
    user: object, credits: object, ttl: object, key: object, meta: object, now_ms: int | None
) -> ReserveRequest:
    uid, n = user_id(user), amount(credits)
    if not isinstance(ttl, timedelta):
        raise InvalidExpiryError(f"ttl must be a timedelta, not {type(ttl).__name__}")
    _, ttl_ms = expiry(None, ttl)
    assert ttl_ms is not None
    ikey, meta_json = idempotency_key(key), metadata(meta)
    return keyed(ReserveRequest(uid, n, ttl_ms, None, "", meta_json, now_ms), ikey)


def build_capture(hold: object, credits: object, key: object, now_ms: int | None) -> CaptureRequest:
    if not isinstance(hold, str):
        raise InvalidInputError(f"hold_id must be a str, not {type(hold).__name__}")
    uid, local = parse_hold_id(hold)
    n = None if credits is None else amount(credits)
    ikey = idempotency_key(key)
    return keyed(CaptureRequest(hold, user_id(uid), local, n, None, "", now_ms), ikey)


def hold(value: object) -> tuple[str, str]:
    """(user id, hold id within the user) of a hold id."""
    if not isinstance(value, str):
        raise InvalidInputError(f"hold_id must be a str, not {type(value).__name__}")
    uid, local = parse_hold_id(value)
    return user_id(uid), local


def build_reverse(transaction: object, key: object, now_ms: int | None) -> ReverseRequest:
    if not isinstance(transaction, str):
        raise InvalidInputError(f"transaction_id must be a str, not {type(transaction).__name__}")
    uid, entry = parse_transaction_id(transaction)
    ikey = idempotency_key(key)
    return keyed(ReverseRequest(transaction, user_id(uid), entry, None, "", now_ms), ikey)


def threshold(value: object) -> int | None:
    return None if value is None else amount(value, allow_zero=True)


def event_reading(
    batch: object, poll: object, claim_after: object, idle_timeout: object
) -> EventReading:
    """How events() reads; bad settings are an InvalidInputError."""
    if type(batch) is not int or not 1 <= batch <= 10_000:
        raise InvalidInputError(f"batch must be an int from 1 to 10000, got {batch!r}")
    for name, value in (("poll", poll), ("claim_after", claim_after)):
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise InvalidInputError(f"{name} must be a positive number of seconds")
    if idle_timeout is not None and (
        not isinstance(idle_timeout, int | float) or isinstance(idle_timeout, bool)
        or idle_timeout < 0
    ):  # fmt: skip
        raise InvalidInputError("idle_timeout must be None or a number of seconds >= 0")
    return EventReading(
        batch=batch,
        poll=float(cast(float, poll)),
        claim_after=float(cast(float, claim_after)),
        idle_timeout=None if idle_timeout is None else float(cast(float, idle_timeout)),
    )


def consumer_name(group: object, consumer: object) -> tuple[str, str]:
    """The group's name, and the consumer's (by default one of its own: host, process, random)."""
    if consumer is None:
        consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for name, value in (("group", group), ("consumer", consumer)):
        if not isinstance(value, str) or not 1 <= len(value) <= 256:
            raise InvalidInputError(f"{name} must be a str of 1 to 256 characters")
    return cast(str, group), cast(str, consumer)
