"""The checks of every public argument, made before anything is sent (pure code).

Each operation's request type and builder are in its family module (`credici_redis._ops`); the
builders check each argument with the functions here. A request that leaves a builder is well
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from credici_redis._core.keys import parse_hold_id
from credici_redis._core.schedule import CALENDAR_PERIODS
from credici_redis._core.time import duration_ms, to_ms
from credici_redis.errors import (
    InvalidAmountError,
    InvalidCycleError,
    InvalidExpiryError,
    InvalidIdempotencyKeyError,
    InvalidInputError,
    InvalidMemberError,
    InvalidMetadataError,
    InvalidPriorityError,
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
class UserRequest:
    """An operation on a user that takes nothing else (a read: balance, cycle, details, audit)."""

    user_id: str
    now_ms: int | None


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


def member(value: object) -> str:
    """A pool member's id ('' for None: the account itself), with a user id's rules."""
    if value is None:
        return ""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str) or not value:
        raise InvalidMemberError(f"member must be a non-empty str, a UUID or None, not {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidMemberError("member is not valid Unicode text") from exc
    if size > MAX_USER_ID_BYTES:
        raise InvalidMemberError(f"member is {size} UTF-8 bytes, at most {MAX_USER_ID_BYTES}")
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


def read_limit(value: object) -> int:
    """How many items one bounded read may return (recent_events, get_holds)."""
    if type(value) is not int or not 1 <= value <= 1000:
        raise InvalidInputError(f"limit must be an int from 1 to 1000, got {value!r}")
    return value


def fingerprint(*parts: Any) -> str:
    """What makes two requests "the same" for an idempotency key."""
    text = "\x1f".join("" if part is None else str(part) for part in parts)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def generated_key() -> str:
    """For automatic retries of a call given no key: made once per call, so retries apply once."""
    return f"auto:{uuid.uuid4().hex}"


def hold(value: object) -> tuple[str, str]:
    """(user id, hold id within the user) of a hold id."""
    if not isinstance(value, str):
        raise InvalidInputError(f"hold_id must be a str, not {type(value).__name__}")
    uid, local = parse_hold_id(value)
    return user_id(uid), local


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
