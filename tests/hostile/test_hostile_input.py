"""Hostile input: arbitrary values thrown at every public method, on every backend and client.

Each call either does what the README says or raises the typed `CrediciError` the README names:
never another exception type, never a raw redis error, never `StorageError` (that means a bug).
A rejected call changes nothing: not the balance, the history or the cycle, and when the input
itself was bad, not a single key of the namespace. An accepted call has exactly its documented
effect and keeps the README's invariants (balance == sum of the history, the newest entry's
balance_after == the balance); a retry with its idempotency key returns the same result and
changes nothing, and the same key with another request is a conflict.

The expected outcome of every call is computed here from the README alone, from the state read
just before the call. The injected FakeClock only moves where a test moves it (before the call),
so no bucket expires and no cycle renews behind a call's back.

Covered: add (with priority), subtract, start_cycle, get_cycle, cancel_cycle, get_balance, both
history reads, reserve / capture / release, reverse, set_credit_limit, get_balance_details,
add_many / subtract_many, and hostile user ids against all of them. Then each documented limit is
tested at its boundary and one past it, and each bug found here (fixed) stays a test at the end.

More, random examples: CREDICI_HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/hostile
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import math
import os
import uuid
from collections import OrderedDict, UserDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from credici_redis import CrediciError, Cycle, Hold, Transaction
from credici_redis._core.keys import user_tag
from credici_redis.errors import (
    AlreadyReversedError,
    CaptureExceedsHoldError,
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
    StorageError,
    TransactionNotFoundError,
)
from tests.conftest import FakeClock

# The README's limits, written down again here so the tests do not trust the library's constants.
MAX_CREDITS = 2**53 - 1
MAX_USER_ID_BYTES = 256
MAX_KEY_CHARS = 256
MAX_METADATA_ITEMS = 64
MAX_METADATA_BYTES = 4096
# Not in the README (docs/security.md): the longest ttl and cycle period, 1000 years of 365 days.
MAX_DURATION = timedelta(days=365_000)
MS = timedelta(milliseconds=1)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UTC = timezone.utc

LONG = os.environ.get("CREDICI_HYPOTHESIS_PROFILE", "ci") == "long"


def hostile_settings(examples: int) -> settings:
    # The `client` fixture is function-scoped, so hypothesis runs all the examples of a test
    # inside one fixture instance: one fresh namespace (deleted afterwards), one client, one
    # FakeClock. That is safe because every example works on user ids no earlier example touched
    # (a new uuid each time, or a hostile id whose keys are deleted first) and predicts its outcome
    # from the state it reads just before its call.
    return settings(
        max_examples=examples * 10 if LONG else examples,
        deadline=None,  # real round trips to Redis
        derandomize=not LONG,  # CI runs a fixed set of examples
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


# --- what the README says ------------------------------------------------------------------


def valid_user(value: object) -> str | None:
    """The user id a value stands for, or None if the README says it is rejected."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return None
    return value if size <= MAX_USER_ID_BYTES else None


def valid_amount(value: object, *, zero: bool = False) -> bool:
    # An int, not a bool (nor any other int subclass: an IntEnum is not a number of credits).
    return type(value) is int and (0 if zero else 1) <= value <= MAX_CREDITS


def valid_key(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_CHARS:
        return False
    return encodable(value)


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid_metadata(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or len(value) > MAX_METADATA_ITEMS:
        return False
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return False
    if not all(encodable(k) and encodable(v) for k, v in value.items()):
        return False
    return json_bytes(value) <= MAX_METADATA_BYTES


def json_bytes(value: dict[str, str]) -> int:
    """The size the README limits: the metadata as compact JSON, in UTF-8 (not ASCII-escaped)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def utc(moment: datetime) -> datetime:
    """A naive datetime is UTC (README); an aware one is converted."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def ms_of(moment: datetime) -> int:
    """Milliseconds since the epoch, rounded down: the precision the README promises."""
    return (utc(moment) - EPOCH) // MS


def at_ms(ms: int) -> datetime:
    return EPOCH + ms * MS


def valid_expiry(expire_at: object, ttl: object) -> bool:
    """Well formed (whether it is in the future is judged against the storage's clock)."""
    if expire_at is not None and ttl is not None:
        return False
    if expire_at is not None:
        return isinstance(expire_at, datetime)
    return ttl is None or (isinstance(ttl, timedelta) and MS <= ttl <= MAX_DURATION)


def valid_period(value: object) -> bool:
    if isinstance(value, str):
        return value in ("day", "week", "month", "year")
    if isinstance(value, timedelta):
        return MS <= value <= MAX_DURATION
    return type(value) is int and 1 <= value <= MAX_DURATION.days


def valid_tz(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ZoneInfo(value)
    except Exception:  # any failure to load the zone means "not an IANA time zone name"
        return False
    return True


def representable(moment: datetime) -> bool:
    """False for aware datetimes that are outside datetime's range once converted to UTC.

    The library raises a raw OverflowError for those (see
    test_out_of_range_aware_datetimes_raise_typed_errors); the generic strategies leave them out
    so that one bug does not hide every other finding.
    """
    try:
        utc(moment)
    except OverflowError:
        return False
    return True


# --- values to throw -----------------------------------------------------------------------


@dataclass(frozen=True)
class Near:
    """A time relative to the test's clock, which strategies cannot see."""

    delta: timedelta


@dataclass(frozen=True)
class Derived:
    """A user id built from the witness's id (see DERIVED), which strategies cannot see."""

    name: str


SURROGATES = st.characters(categories=["Cs"])
ANY_CHAR = st.one_of(st.characters(), SURROGATES, st.sampled_from("\x00{}:%*?[]\\@\"'\n "))
TEXT = st.text(st.one_of(st.characters(), st.sampled_from("\x00{}:%*?[]\\@\"'\n ")), max_size=30)


def any_text(*, min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(ANY_CHAR, min_size=min_size, max_size=max_size)


class Color(enum.IntEnum):
    ONE = 1


class Credits(int):
    pass


NOT_STR = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(max_size=8),
    st.builds(bytearray, st.binary(max_size=4)),
    st.lists(st.text(max_size=3), max_size=2),
    st.tuples(st.text(max_size=3)),
    st.just(object()),
)

# Each argument has a strategy of valid values (edges included) and one of anything at all; an
# example draws one argument (or all, or none) from the second, so most examples reach Redis.
VALID_AMOUNTS = st.one_of(
    st.integers(min_value=1, max_value=1000),
    st.integers(min_value=MAX_CREDITS - 3, max_value=MAX_CREDITS),
    st.integers(min_value=1, max_value=MAX_CREDITS),
)
AMOUNTS = st.one_of(
    VALID_AMOUNTS,
    st.integers(min_value=-3, max_value=0),
    st.integers(min_value=MAX_CREDITS + 1, max_value=MAX_CREDITS + 3),
    st.integers(),
    st.sampled_from([2**53, 2**63, 2**64, 10**100, -(2**63), -(2**53)]),
    st.booleans(),
    st.floats(),  # nan, inf, -0.0, 1.0 included
    st.sampled_from([1.0, 5.0, math.nan, math.inf, -math.inf, float(MAX_CREDITS)]),
    st.decimals(),  # NaN, sNaN, Infinity included
    st.fractions(),
    st.complex_numbers(max_magnitude=10),
    st.sampled_from([Color.ONE, Credits(5), Decimal(5), Fraction(5, 1), "5", b"5", None, [5]]),
)

FIXED_OFFSETS = st.builds(
    timezone,
    st.timedeltas(
        min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
    ),
)
DATETIMES = st.one_of(
    st.datetimes(),  # naive, so UTC: datetime.min to datetime.max
    st.datetimes(timezones=st.one_of(st.timezones(), FIXED_OFFSETS)).filter(representable),
    st.sampled_from(
        [
            datetime.min,
            datetime.max,
            datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(1, 1, 1, tzinfo=UTC),
            EPOCH,
            datetime(1969, 12, 31, 23, 59, 59, 999999),
        ]
    ),
)
NEAR = st.builds(
    Near,
    st.one_of(
        st.timedeltas(min_value=timedelta(days=-2), max_value=timedelta(days=2)),
        st.sampled_from([MS, -MS, timedelta(0), timedelta(microseconds=1), MS * 1.5]),
    ),
)
NOT_DATETIME = st.one_of(
    st.dates(), st.times(), st.sampled_from(["2030-01-01", 1893456000, 1893456000.0, None])
)
# (expire_at, ttl)
VALID_EXPIRIES = st.one_of(
    st.tuples(st.none(), st.none()),
    st.tuples(st.one_of(NEAR, DATETIMES), st.none()),  # past ones are refused by the storage
    st.tuples(st.none(), st.timedeltas(min_value=MS, max_value=MAX_DURATION)),
    st.tuples(st.none(), st.sampled_from([MS, timedelta(microseconds=1001), MAX_DURATION])),
)
EXPIRIES = st.one_of(
    VALID_EXPIRIES,
    st.tuples(NOT_DATETIME.filter(lambda v: v is not None), st.none()),
    st.tuples(st.none(), st.timedeltas()),
    st.tuples(
        st.none(), st.timedeltas(min_value=timedelta(seconds=-1), max_value=timedelta(seconds=1))
    ),
    st.tuples(
        st.none(),
        st.sampled_from(
            [
                timedelta(microseconds=999),
                MAX_DURATION + timedelta(microseconds=1),
                timedelta.max,
                timedelta.min,
                timedelta(0),
                60,
                60.0,
                "60",
            ]
        ),
    ),
    st.tuples(st.one_of(NEAR, DATETIMES), st.timedeltas(min_value=MS, max_value=MAX_DURATION)),
)

VALID_KEYS = st.one_of(
    st.none(),
    TEXT.filter(bool),
    st.text(min_size=250, max_size=256),
    st.sampled_from(
        [
            "k" * MAX_KEY_CHARS,
            "😀" * MAX_KEY_CHARS,
            ":",
            "a:b:c",
            "{",
            "}",
            "{k}",
            "k}:s",
            "}:i:{",
            "\x00",
            "*",
            "\u2028",
            '"',
            "\\",
            " ",
        ]
    ),
)
KEYS = st.one_of(
    VALID_KEYS,
    any_text(min_size=0, max_size=12),
    st.text(min_size=257, max_size=260),
    st.sampled_from(["", "k" * (MAX_KEY_CHARS + 1), "😀" * (MAX_KEY_CHARS + 1), "\ud800"]),
    NOT_STR,
)

VALID_METADATA = st.one_of(
    st.none(),
    st.dictionaries(TEXT, TEXT, max_size=6),
    st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.integers(60, 64)),
    st.builds(lambda n: {"big": "x" * n}, st.integers(4070, MAX_METADATA_BYTES - 10)),
    st.sampled_from(
        [
            {},
            {"k": "x" * (MAX_METADATA_BYTES - 8)},  # {"k":"xxx..."} is exactly 4096 bytes
            {"k": "é" * ((MAX_METADATA_BYTES - 8) // 2)},
            {"": ""},
            {"\x00": "\x00", "\u2028": "\u2029", "/": "\\", '"': "'"},
            {"emoji": "😀" * 100, "中": "文"},
            OrderedDict(b="2", a="1"),
        ]
    ),
)
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
METADATA = st.one_of(
    VALID_METADATA,
    st.dictionaries(any_text(max_size=12), any_text(max_size=30), max_size=6),
    st.dictionaries(st.text(max_size=5), JSONISH, min_size=1, max_size=3),
    st.dictionaries(
        st.one_of(st.integers(), st.floats(), st.binary(max_size=3), st.none()),
        st.text(max_size=3),
        min_size=1,
        max_size=2,
    ),
    st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.integers(65, 70)),
    st.builds(lambda n: {"big": "x" * n}, st.integers(MAX_METADATA_BYTES - 7, 4100)),
    st.sampled_from(
        [
            {"k": "x" * (MAX_METADATA_BYTES - 7)},
            {"k": '"' * ((MAX_METADATA_BYTES - 8) // 2 + 1)},  # an escaped quote is 2 bytes
            UserDict(a="1"),  # a mapping, not a dict
            {"nested": {"a": "b"}},
            {"list": ["a"]},
            {"n": 1},
            {1: "n"},
            {None: "n"},
            {"b": b"x"},
            {"\ud800": "x"},
            {"x": "\udfff"},
        ]
    ),
    st.text(max_size=5),
    st.lists(st.text(max_size=3), max_size=3),
    st.binary(max_size=5),
    st.integers(),
    st.tuples(st.text(max_size=2), st.text(max_size=2)),
)

VALID_PERIODS = st.one_of(
    st.integers(min_value=1, max_value=400),
    st.sampled_from([1, MAX_DURATION.days]),
    st.sampled_from(["day", "week", "month", "year"]),
    st.timedeltas(min_value=MS, max_value=timedelta(days=400)),
    st.sampled_from([MS, timedelta(microseconds=1001), MAX_DURATION]),
)
PERIODS = st.one_of(
    VALID_PERIODS,
    st.integers(min_value=-2, max_value=0),
    st.sampled_from([MAX_DURATION.days + 1, 10**9, -(10**9)]),
    st.sampled_from(["Month", "months", "", "30", "day ", "fortnight"]),
    st.timedeltas(max_value=MS - timedelta(microseconds=1)),
    st.sampled_from([timedelta(microseconds=999), MAX_DURATION + MS, timedelta.max]),
    st.sampled_from([True, False, 30.0, 1.5, math.nan, math.inf, Decimal(30), Fraction(30)]),
    st.sampled_from([None, b"month", Color.ONE, Credits(30)]),
)
VALID_ROLLOVERS = st.one_of(
    st.none(), st.integers(min_value=0, max_value=60), st.sampled_from([MAX_CREDITS])
)
ROLLOVERS = st.one_of(
    VALID_ROLLOVERS,
    st.integers(max_value=-1),
    st.sampled_from([MAX_CREDITS + 1, 2**64]),
    st.sampled_from([True, False, 10.0, math.nan, "10", Decimal(10), Credits(10)]),
)
FLAGS = st.one_of(st.booleans(), st.sampled_from([0, 1, None, "yes", "", 1.0, [True]]))
VALID_TIMEZONES = st.one_of(
    st.timezone_keys(),
    st.sampled_from(["UTC", "Europe/Berlin", "Pacific/Kiritimati", "Antarctica/Troll"]),
)
TIMEZONES = st.one_of(
    VALID_TIMEZONES,
    st.sampled_from(
        [
            "utc",
            "",
            "Mars/Olympus_Mons",
            "Europe",
            "../../../etc/passwd",
            "/etc/localtime",
            "UTC\x00",
            "\ud800",
            "a" * 300,
            "Europe/Berlin ",
        ]
    ),
    any_text(max_size=10),
    NOT_STR,
    st.none(),
    st.just(ZoneInfo("UTC")),
)
MAX_PRIORITY = 1_000_000  # README: "from -1,000,000 to 1,000,000"
VALID_PRIORITIES = st.one_of(
    st.just(0),
    st.integers(min_value=-MAX_PRIORITY, max_value=MAX_PRIORITY),
    st.sampled_from([-MAX_PRIORITY, MAX_PRIORITY]),
)
PRIORITIES = st.one_of(
    VALID_PRIORITIES,
    st.sampled_from([MAX_PRIORITY + 1, -MAX_PRIORITY - 1, 2**64, True, False, 1.0, math.nan]),
    st.sampled_from([None, "1", Decimal(1), Color.ONE, Credits(1)]),
)
VALID_FROM_TO = st.one_of(DATETIMES, NEAR)
FROM_TO = st.one_of(VALID_FROM_TO, NOT_DATETIME)


def arguments(**pairs: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]) -> Any:
    """Keyword arguments from (valid, anything) strategies: none, one or all of them hostile."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        names = list(pairs)
        hostile = draw(st.sampled_from(["none", "none", *names, "all"]))
        chosen = {
            name: draw(anything if hostile in (name, "all") else valid)
            for name, (valid, anything) in pairs.items()
        }
        return {"hostile": hostile, **chosen}

    return build()


def resolve(value: Any, clock: FakeClock) -> Any:
    """A Near placeholder becomes the clock's time plus its delta."""
    return clock.now + value.delta if isinstance(value, Near) else value


# --- reading and checking a user's state ---------------------------------------------------


@dataclass(frozen=True)
class Seen:
    balance: int
    history: list[Transaction]
    cycle: Cycle | None


async def look(client: Any, user: str) -> Seen:
    """The user's balance, history and cycle, checked against the README's invariants."""
    seen = Seen(
        await client.get_balance(user),
        await client.get_all_user_transactions(user),
        await client.get_cycle(user),
    )
    assert 0 <= seen.balance <= MAX_CREDITS
    running = 0
    for entry in reversed(seen.history):  # oldest first
        assert entry.user_id == user
        running += entry.amount
        assert entry.balance_after == running, "balance_after is not the running sum"
    assert running == seen.balance, "balance != sum of history"
    if seen.history:
        assert seen.history[0].balance_after == seen.balance
    times = [entry.created_at for entry in seen.history]
    assert times == sorted(times, reverse=True), "history is not newest first"
    assert len({entry.transaction_id for entry in seen.history}) == len(seen.history)
    return seen


async def audited(client: Any, user: str, seen: Seen) -> None:
    """The library's own audit agrees: balance and buckets rebuilt from the history match."""
    report = await client.audit(user)
    assert report.ok, report.problems
    assert report.balance == report.history_balance == seen.balance


def raw_redis(client: Any) -> tuple[Any, bool]:
    """The redis-py (or fakeredis) client under a credici client, and whether it is asyncio."""
    sync = getattr(client, "sync", None)  # tests.conftest.SyncAsAsync
    return (sync.storage.redis, False) if sync is not None else (client.storage.redis, True)


async def scan(client: Any, pattern: str) -> set[bytes]:
    r, is_async = raw_redis(client)
    if is_async:
        return {key async for key in r.scan_iter(match=pattern, count=1000)}
    return set(r.scan_iter(match=pattern, count=1000))


async def forget(client: Any, namespace: str, user: str) -> None:
    """Delete every key of `user`, so a hostile id hypothesis draws twice starts fresh."""
    keys = await scan(client, f"{namespace}:{{{user_tag(user)}}}:*")
    if keys:
        r, is_async = raw_redis(client)
        if is_async:
            await r.delete(*keys)
        else:
            r.delete(*keys)


async def attempt(call: Awaitable[Any]) -> Any:
    """The call's result, or the CrediciError it raised. Any other exception fails the test."""
    try:
        result = await call
    except CrediciError as exc:
        assert not isinstance(exc, StorageError), f"a bug or a raw Redis error: {exc!r}"
        result = exc
    if currently_in_test_context():  # counted by --hypothesis-show-statistics
        event(f"outcome: {type(result).__name__}")
    return result


async def expect_bad_input(
    client: Any,
    namespace: str,
    make_call: Callable[[], Awaitable[Any]],
    errors: list[type[InvalidInputError]],
    watched: list[str],
) -> InvalidInputError:
    """The call raises one of `errors` and changes nothing: no key of the namespace, no user."""
    keys = await scan(client, f"{namespace}:*")
    states = [await look(client, user) for user in watched]
    result = await attempt(make_call())
    assert isinstance(result, tuple(errors)), f"expected one of {errors}, got {result!r}"
    assert isinstance(result, ValueError)
    assert await scan(client, f"{namespace}:*") == keys
    assert [await look(client, user) for user in watched] == states
    return result


def fresh() -> str:
    return f"h-{uuid.uuid4().hex}"


async def seeded(client: Any, credits: int, cycle: bool) -> str:
    """A new user with `credits` never-expiring credits and, optionally, a running cycle of 10."""
    user = fresh()
    if cycle:
        await client.start_cycle(10, 30, user, renew=True)
        credits = min(credits, MAX_CREDITS - 10)
    if credits:
        await client.add(user, credits)
    return user


SEED_CREDITS = st.sampled_from([0, 1, 100, MAX_CREDITS - 1, MAX_CREDITS])


def with_usage(cycle: Cycle | None, field: str, amount: int) -> Cycle | None:
    if cycle is None or cycle.status == "ended":
        return cycle
    return cycle.model_copy(update={field: getattr(cycle, field) + amount})


# --- add -------------------------------------------------------------------------------------


@hostile_settings(100)
@given(
    credits=SEED_CREDITS,
    cycle=st.booleans(),
    args=arguments(
        amount=(VALID_AMOUNTS, AMOUNTS),
        expiry=(VALID_EXPIRIES, EXPIRIES),
        key=(VALID_KEYS, KEYS),
        metadata=(VALID_METADATA, METADATA),
        priority=(VALID_PRIORITIES, PRIORITIES),
    ),
)
async def test_add(
    client: Any, clock: FakeClock, namespace: str, credits: int, cycle: bool, args: dict[str, Any]
) -> None:
    event(f"hostile: {args['hostile']}")
    amount, key, metadata = args["amount"], args["key"], args["metadata"]
    user = await seeded(client, credits, cycle)
    expire_at, ttl = resolve(args["expiry"][0], clock), args["expiry"][1]

    priority = args["priority"]

    def call(n: Any = amount) -> Awaitable[Any]:
        return client.add(
            user, n, expire_at, ttl=ttl, idempotency_key=key, metadata=metadata, priority=priority
        )

    bad: list[type[InvalidInputError]] = []
    if not valid_amount(amount):
        bad.append(InvalidAmountError)
    if not valid_expiry(expire_at, ttl):
        bad.append(InvalidExpiryError)
    if not valid_key(key):
        bad.append(InvalidIdempotencyKeyError)
    if not valid_metadata(metadata):
        bad.append(InvalidMetadataError)
    if not (type(priority) is int and -MAX_PRIORITY <= priority <= MAX_PRIORITY):
        bad.append(InvalidPriorityError)
    if bad:
        error = await expect_bad_input(client, namespace, call, bad, [user])
        if isinstance(error, InvalidAmountError):
            assert error.amount is amount
        return

    now = clock.now
    expires = at_ms(ms_of(expire_at)) if expire_at is not None else None
    if ttl is not None:
        expires = at_ms(ms_of(now) + ttl // MS)
    before = await look(client, user)
    result = await attempt(call())
    if expires is not None and expires <= at_ms(ms_of(now)):
        assert isinstance(result, InvalidExpiryError), result  # "not in the future"
        assert await look(client, user) == before
        return
    if before.balance + amount > MAX_CREDITS:
        assert isinstance(result, InvalidAmountError), result  # the balance limit
        assert await look(client, user) == before
        return
    assert isinstance(result, Transaction), result
    assert result.kind == "add"
    assert result.user_id == user
    assert result.amount == amount
    assert result.balance_after == before.balance + amount
    assert result.created_at == at_ms(ms_of(now))
    assert result.expire_at == expires
    assert result.idempotency_key == key
    assert result.metadata == dict(metadata or {})
    after = await look(client, user)
    assert after.balance == before.balance + amount
    assert after.history == [result, *before.history]
    assert after.cycle == with_usage(before.cycle, "added", amount)
    await audited(client, user, after)

    if key is not None:
        assert await call() == result  # a retry: the same transaction, nothing changes
        assert await look(client, user) == after
        conflict = await attempt(call(amount - 1 if amount > 1 else 2))
        assert isinstance(conflict, IdempotencyConflictError), conflict
        assert (conflict.user_id, conflict.idempotency_key) == (user, key)
        assert await look(client, user) == after


# --- subtract --------------------------------------------------------------------------------


@hostile_settings(100)
@given(
    credits=SEED_CREDITS,
    cycle=st.booleans(),
    args=arguments(
        amount=(VALID_AMOUNTS, AMOUNTS),
        key=(VALID_KEYS, KEYS),
        metadata=(VALID_METADATA, METADATA),
    ),
)
async def test_subtract(
    client: Any, clock: FakeClock, namespace: str, credits: int, cycle: bool, args: dict[str, Any]
) -> None:
    event(f"hostile: {args['hostile']}")
    amount, key, metadata = args["amount"], args["key"], args["metadata"]
    user = await seeded(client, credits, cycle)

    def call(n: Any = amount) -> Awaitable[Any]:
        return client.subtract(user, n, idempotency_key=key, metadata=metadata)

    bad: list[type[InvalidInputError]] = []
    if not valid_amount(amount):
        bad.append(InvalidAmountError)
    if not valid_key(key):
        bad.append(InvalidIdempotencyKeyError)
    if not valid_metadata(metadata):
        bad.append(InvalidMetadataError)
    if bad:
        error = await expect_bad_input(client, namespace, call, bad, [user])
        if isinstance(error, InvalidAmountError):
            assert error.amount is amount
        return

    before = await look(client, user)
    result = await attempt(call())
    if amount > before.balance:
        assert isinstance(result, InsufficientCreditsError), result
        assert (result.user_id, result.requested, result.available) == (
            user,
            amount,
            before.balance,
        )
        assert await look(client, user) == before
        if key is not None and before.balance >= 1:
            # A request that failed does not use up its key.
            done = await call(1)
            assert isinstance(done, Transaction) and done.idempotency_key == key
        return
    assert isinstance(result, Transaction), result
    assert result.kind == "subtract"
    assert result.user_id == user
    assert result.amount == -amount
    assert result.balance_after == before.balance - amount
    assert result.created_at == at_ms(ms_of(clock.now))
    assert result.expire_at is None
    assert result.idempotency_key == key
    assert result.metadata == dict(metadata or {})
    after = await look(client, user)
    assert after.history == [result, *before.history]
    assert after.cycle == with_usage(before.cycle, "used", amount)
    await audited(client, user, after)

    if key is not None:
        assert await call() == result
        assert await look(client, user) == after
        conflict = await attempt(call(amount + 1 if amount < MAX_CREDITS else 1))
        assert isinstance(conflict, IdempotencyConflictError), conflict
        assert await look(client, user) == after


# --- start_cycle -----------------------------------------------------------------------------

NOMINAL = {
    "day": timedelta(days=1),
    "week": timedelta(weeks=1),
    "month": timedelta(days=30),
    "year": timedelta(days=365),
}
SLACK = {"day": 0, "week": 0, "month": 2, "year": 1}  # days a calendar period may differ by


@hostile_settings(100)
@given(
    who=st.sampled_from(["new", "fresh", "running"]),
    args=arguments(
        amount=(VALID_AMOUNTS | st.just(0), AMOUNTS),
        period=(VALID_PERIODS, PERIODS),
        rollover=(VALID_ROLLOVERS, ROLLOVERS),
        renew=(st.booleans(), FLAGS),
        tz=(VALID_TIMEZONES, TIMEZONES),
        key=(VALID_KEYS, KEYS),
    ),
)
async def test_start_cycle(
    client: Any, clock: FakeClock, namespace: str, who: str, args: dict[str, Any]
) -> None:
    event(f"hostile: {args['hostile']}")
    amount, period, rollover = args["amount"], args["period"], args["rollover"]
    renew, tz, key = args["renew"], args["tz"], args["key"]
    user: str | None = None if who == "new" else fresh()
    left = 0  # what the running cycle's grant has left
    if who == "running":
        await client.start_cycle(50, 30, user)
        await client.add(user, 7)
        await client.subtract(user, 20)  # from the grant: it expires first
        left = 30

    def call(n: Any = amount) -> Awaitable[Any]:
        return client.start_cycle(
            n, period, user, rollover=rollover, renew=renew, tz=tz, idempotency_key=key
        )

    bad: list[type[InvalidInputError]] = []
    if not valid_amount(amount, zero=True):
        bad.append(InvalidAmountError)
    if not valid_period(period):
        bad.append(InvalidCycleError)
    if not (rollover is None or valid_amount(rollover, zero=True)):
        bad.append(InvalidCycleError)
    if not isinstance(renew, bool):
        bad.append(InvalidCycleError)
    if not valid_tz(tz):
        bad.append(InvalidTimeZoneError)
    if not valid_key(key):
        bad.append(InvalidIdempotencyKeyError)
    watched = [] if user is None else [user]
    if bad:
        await expect_bad_input(client, namespace, call, bad, watched)
        return

    before = await look(client, user) if user is not None else Seen(0, [], None)
    result = await attempt(call())
    if before.balance + amount > MAX_CREDITS:
        assert isinstance(result, InvalidAmountError), result
        assert user is not None and await look(client, user) == before
        return
    assert isinstance(result, Cycle), result
    if user is None:
        assert uuid.UUID(result.user_id).version == 4  # a new user
        user = result.user_id
    carry = left if rollover is None else min(left, rollover)
    now = at_ms(ms_of(clock.now))
    assert result.user_id == user
    assert (result.amount, result.granted, result.used, result.added) == (
        amount,
        amount + carry,
        0,
        0,
    )
    assert (result.status, result.renew, result.rollover, result.tz) == (
        "active",
        renew,
        rollover,
        tz,
    )
    assert result.started_at == now
    if isinstance(period, str):
        assert result.period == period
        length = result.ends_at - result.started_at
        slack = timedelta(days=SLACK[period], hours=3)  # month lengths, DST and zone changes
        assert NOMINAL[period] - slack <= length <= NOMINAL[period] + slack, length
    else:
        length = timedelta(days=period) if isinstance(period, int) else (period // MS) * MS
        assert result.ends_at == now + length
        # The README says `period` is "as given" (the cycle's length is at ms precision).
        assert result.period == period

    after = await look(client, user)
    assert after.cycle == result
    assert after.balance == before.balance - (left - carry) + amount
    start = after.history[0]
    assert (start.kind, start.amount, start.transaction_id) == (
        "cycle_start",
        amount,
        result.cycle_id,
    )
    assert (start.expire_at, start.idempotency_key) == (result.ends_at, key)
    expired = after.history[1:2] if left > carry else []
    assert [(e.kind, e.amount) for e in expired] == [("expire", -(left - carry))] * len(expired)
    assert after.history == [start, *expired, *before.history]
    await audited(client, user, after)

    if key is not None and who != "new":
        assert await call() == result
        assert await look(client, user) == after
        conflict = await attempt(call(amount + 1 if amount < 100 else 1))
        assert isinstance(conflict, IdempotencyConflictError), conflict
        assert await look(client, user) == after


# --- cancel_cycle, get_cycle, history for a period -----------------------------------------


@hostile_settings(80)
@given(
    cycle=st.sampled_from(["none", "active", "renewing", "canceled", "ended"]),
    gaps=st.lists(st.integers(0, 6 * 3600 * 1000), min_size=3, max_size=3),
    args=arguments(
        forfeit=(st.booleans(), FLAGS),
        from_=(VALID_FROM_TO, FROM_TO),
        to_=(VALID_FROM_TO, FROM_TO),
    ),
)
async def test_cycle_reads_and_periods(
    client: Any,
    clock: FakeClock,
    namespace: str,
    cycle: str,
    gaps: list[int],
    args: dict[str, Any],
) -> None:
    event(f"hostile: {args['hostile']}")
    forfeit, from_, to_ = args["forfeit"], args["from_"], args["to_"]
    # A history spread over time: an add, maybe a cycle of 40 for a day, a subtract of 3 (taken
    # from the grant, which expires first), maybe a cancel, maybe the cycle's end.
    user = fresh()
    await client.add(user, 5)
    clock.advance(gaps[0] * MS)
    if cycle != "none":
        await client.start_cycle(40, timedelta(days=1), user, renew=cycle == "renewing")
    clock.advance(gaps[1] * MS)
    await client.subtract(user, 3)
    if cycle == "canceled":
        await client.cancel_cycle(user)
    if cycle == "ended":
        clock.advance(timedelta(days=1))
    clock.advance(gaps[2] * MS)
    before = await look(client, user)
    left = 37 if cycle in ("active", "renewing", "canceled") else 0
    assert before.balance == (2 if cycle == "none" else 5 + left)

    from_, to_ = resolve(from_, clock), resolve(to_, clock)
    period_call = lambda: client.get_user_transactions_for_period(user, from_, to_)  # noqa: E731
    if not (isinstance(from_, datetime) and isinstance(to_, datetime)):
        await expect_bad_input(client, namespace, period_call, [InvalidPeriodError], [user])
    else:
        found = await attempt(period_call())
        low, high = utc(from_), utc(to_)
        assert found == [t for t in before.history if low <= t.created_at <= high]
        assert await look(client, user) == before

    cancel_call = lambda: client.cancel_cycle(user, forfeit=forfeit)  # noqa: E731
    if not isinstance(forfeit, bool):
        await expect_bad_input(client, namespace, cancel_call, [InvalidCycleError], [user])
        return
    result = await attempt(cancel_call())
    if cycle in ("none", "ended"):
        assert isinstance(result, CycleNotFoundError), result
        assert result.user_id == user
        assert await look(client, user) == before
        return
    assert isinstance(result, Cycle), result
    assert before.cycle is not None
    assert (result.status, result.renew) == ("canceled", False)
    assert result.model_copy(
        update={"status": "active", "renew": False}
    ) == before.cycle.model_copy(update={"status": "active", "renew": False})
    after = await look(client, user)
    assert after.cycle == result
    if forfeit:
        assert after.balance == before.balance - left
        forfeited = after.history[0]
        assert (forfeited.kind, forfeited.amount) == ("expire", -left)
        assert after.history[1:] == before.history
    else:
        assert (after.balance, after.history) == (before.balance, before.history)
    await audited(client, user, after)


# --- holds, reverse, credit limits, balance details ----------------------------------------

VALID_HOLD_TTLS = st.one_of(
    st.just(timedelta(minutes=5)), st.timedeltas(min_value=MS, max_value=MAX_DURATION)
)
HOLD_TTLS = st.one_of(
    VALID_HOLD_TTLS,
    st.timedeltas(max_value=MS - timedelta(microseconds=1)),
    st.sampled_from([MAX_DURATION + MS, timedelta.max, None, 60, 60.0, "60"]),
)
# Hold and transaction ids that are not the real one: malformed, other users', unknown.
REFS = st.one_of(
    any_text(max_size=30),
    st.sampled_from(["", "@", "h@", "h1@", "h1@u", "hx@u", "h-1@u", "h1@%ZZ", "h1@" + "%41" * 300])
    | st.sampled_from(["1-0@", "1-0@u", "a-b@u", "1-0", "@u", "-@u", "0-0@u", "1-0@%ZZ"]),
    NOT_STR,
    st.none(),
)
REAL = "the real one"


@hostile_settings(60)
@given(
    args=arguments(
        limit=(st.one_of(st.integers(0, 50), st.just(MAX_CREDITS)), AMOUNTS),
        amount=(st.integers(1, 150), AMOUNTS),
        ttl=(VALID_HOLD_TTLS, HOLD_TTLS),
        key=(VALID_KEYS, KEYS),
        metadata=(VALID_METADATA, METADATA),
        capture=(st.one_of(st.none(), st.integers(1, 150)), AMOUNTS),
        hold_ref=(st.just(REAL), REFS),
        reverse_ref=(st.sampled_from(["add", "subtract", "capture", "reserve"]), REFS),
    )
)
async def test_holds_reversals_and_credit_limits(
    client: Any, clock: FakeClock, namespace: str, args: dict[str, Any]
) -> None:
    event(f"hostile: {args['hostile']}")
    user, bystander = fresh(), fresh()
    seed = await client.add(user, 100)  # one never-expiring bucket
    await client.add(bystander, 7)
    untouched = await look(client, bystander)

    limit = args["limit"]
    if not valid_amount(limit, zero=True):
        await expect_bad_input(
            client,
            namespace,
            lambda: client.set_credit_limit(user, limit),
            [InvalidAmountError],
            [user],
        )
        limit = 0
    else:
        before = await look(client, user)
        assert await client.set_credit_limit(user, limit) is None
        after = await look(client, user)
        if limit:  # a change: recorded, no credits moved
            change = after.history[0]
            assert (change.kind, change.amount, change.credit_limit) == ("credit_limit", 0, limit)
            after = dataclasses.replace(after, history=after.history[1:])
        assert after == before
    details = await client.get_balance_details(user)
    assert (details.balance, details.available, details.held, details.debt) == (
        100,
        100 + limit,
        0,
        0,
    )
    assert details.credit_limit == limit and [b.amount for b in details.buckets] == [100]

    # reserve
    amount, ttl, key, metadata = args["amount"], args["ttl"], args["key"], args["metadata"]

    def reserve() -> Awaitable[Any]:
        return client.reserve(user, amount, ttl=ttl, idempotency_key=key, metadata=metadata)

    bad: list[type[InvalidInputError]] = []
    if not valid_amount(amount):
        bad.append(InvalidAmountError)
    if not (isinstance(ttl, timedelta) and MS <= ttl <= MAX_DURATION):
        bad.append(InvalidExpiryError)
    if not valid_key(key):
        bad.append(InvalidIdempotencyKeyError)
    if not valid_metadata(metadata):
        bad.append(InvalidMetadataError)
    hold: Hold | None = None
    if bad:
        await expect_bad_input(client, namespace, reserve, bad, [user])
    else:
        before = await look(client, user)
        result = await attempt(reserve())
        if amount > 100:  # a hold never uses the credit limit
            assert isinstance(result, InsufficientCreditsError), result
            assert await look(client, user) == before
        else:
            assert isinstance(result, Hold), result
            hold = result
            assert (hold.user_id, hold.amount, hold.status, hold.captured) == (
                user,
                amount,
                "active",
                0,
            )
            assert hold.expires_at == at_ms(ms_of(clock.now) + ttl // MS)
            after = await look(client, user)
            assert after.balance == 100 - amount
            assert (after.history[0].kind, after.history[0].amount) == ("reserve", -amount)
            assert after.history[0].transaction_id == hold.transaction_id
            assert after.history[0].metadata == dict(metadata or {})
            assert after.history[1:] == before.history
            assert (await client.get_balance_details(user)).held == amount
            if key is not None:
                assert await reserve() == hold
                assert await look(client, user) == after

    # capture, then release, of the real hold or of anything else
    captured = 0
    ref = args["hold_ref"]
    if ref == REAL and hold is not None:
        cap = args["capture"]
        before = await look(client, user)
        if cap is not None and not valid_amount(cap):
            await expect_bad_input(
                client,
                namespace,
                lambda: client.capture(hold.hold_id, cap),
                [InvalidAmountError],
                [user],
            )
        elif cap is not None and cap > hold.amount:
            result = await attempt(client.capture(hold.hold_id, cap))
            assert isinstance(result, CaptureExceedsHoldError), result
            assert await look(client, user) == before
        else:
            captured = hold.amount if cap is None else cap
            result = await attempt(client.capture(hold.hold_id, cap))
            assert isinstance(result, Transaction), result
            assert (result.kind, result.captured, result.amount) == (
                "capture", captured, hold.amount - captured,
            )  # fmt: skip
            assert result.balance_after == 100 - captured == await client.get_balance(user)
            done = await look(client, user)
            for again in (client.capture(hold.hold_id), client.release(hold.hold_id)):
                finished = await attempt(again)
                assert isinstance(finished, HoldFinishedError), finished
                assert finished.status == "captured"
            assert await look(client, user) == done
    elif ref != REAL:
        before = await look(client, user)
        for call in (client.capture(ref), client.release(ref)):
            result = await attempt(call)
            assert isinstance(result, InvalidInputError | HoldNotFoundError), result
        assert await look(client, user) == before

    # reverse: a real entry of the user, or anything else
    ref = args["reverse_ref"]
    before = await look(client, user)
    kinds = {"add": seed.transaction_id}
    if hold is not None:
        kinds["reserve"] = hold.transaction_id or ""
    if captured:
        kinds["capture"] = before.history[0].transaction_id
    if ref == "subtract" and before.balance >= 1:
        kinds["subtract"] = (await client.subtract(user, 1)).transaction_id
        before = await look(client, user)
    if ref in ("add", "subtract", "capture", "reserve"):
        if ref not in kinds:
            return await finish(client, user, bystander, untouched)
        target = kinds[ref]
        left = sum(b.amount for b in (await client.get_balance_details(user)).buckets)
        result = await attempt(client.reverse(target))
        if ref == "reserve":
            assert isinstance(result, NotReversibleError), result
            assert await look(client, user) == before
            return await finish(client, user, bystander, untouched)
        assert isinstance(result, Transaction), result
        assert (result.kind, result.related_id) == ("reverse", target)
        back = {"add": -left, "subtract": 1, "capture": captured}[ref]
        assert result.amount == back and result.balance_after == before.balance + back
        after = await look(client, user)
        again = await attempt(client.reverse(target))
        assert isinstance(again, AlreadyReversedError), again
        assert await look(client, user) == after
    else:
        result = await attempt(client.reverse(ref))
        assert isinstance(result, InvalidInputError | TransactionNotFoundError), result
        assert await look(client, user) == before
    await finish(client, user, bystander, untouched)


async def finish(client: Any, user: str, bystander: str, untouched: Seen) -> None:
    seen = await look(client, user)
    await audited(client, user, seen)
    assert await look(client, bystander) == untouched


# --- batches ---------------------------------------------------------------------------------

ITEM_SHAPES = st.sampled_from(["tuple", "mapping", "hostile"])
HOSTILE_ITEMS = st.one_of(
    st.tuples(),
    st.tuples(st.just("u")),
    st.tuples(st.just("u"), st.just(1), st.just(None), st.just(None)),
    st.fixed_dictionaries({"user_id": st.just("u"), "amount": st.just(1), "colour": st.just("x")}),
    st.fixed_dictionaries({"amount": st.just(1)}),
    st.dictionaries(st.integers(), st.integers(), max_size=2),
    st.text(max_size=5),
    st.integers(),
    st.none(),
    st.binary(max_size=3),
)


@hostile_settings(60)
@given(
    adding=st.booleans(),
    items=st.lists(
        st.tuples(ITEM_SHAPES, st.one_of(VALID_AMOUNTS, AMOUNTS), METADATA, HOSTILE_ITEMS),
        max_size=6,
    ),
    container=st.sampled_from(["list", "tuple", "generator"]),
)
async def test_batches_of_anything(
    client: Any, namespace: str, adding: bool, items: list[Any], container: str
) -> None:
    """Each item gets its own result, in order: what a single call would return or raise."""
    user = await seeded(client, 50, False)
    built: list[Any] = []
    for shape, amount, metadata, hostile in items:
        if shape == "tuple":
            built.append((user, amount))
        elif shape == "mapping":
            built.append({"user_id": user, "amount": amount, "metadata": metadata})
        else:
            built.append(hostile)
    sent: Any = {"list": built, "tuple": tuple(built), "generator": iter(built)}[container]
    before = await look(client, user)
    results = await (client.add_many(sent) if adding else client.subtract_many(sent))
    assert len(results) == len(built)
    balance, history = before.balance, list(before.history)
    for item, (shape, amount, metadata, _), result in zip(built, items, results, strict=True):
        assert isinstance(result, Transaction | CrediciError), result
        assert not isinstance(result, StorageError), result
        if shape == "hostile":
            assert isinstance(result, InvalidInputError), (item, result)
            continue
        meta = metadata if shape == "mapping" else None
        if not valid_amount(amount):
            assert isinstance(result, InvalidAmountError), (item, result)
        elif not valid_metadata(meta):
            assert isinstance(result, InvalidMetadataError), (item, result)
        elif adding and balance + amount > MAX_CREDITS:
            assert isinstance(result, InvalidAmountError), (item, result)
        elif not adding and amount > balance:
            assert isinstance(result, InsufficientCreditsError), (item, result)
            assert result.available == balance
        else:
            balance += amount if adding else -amount
            assert isinstance(result, Transaction), (item, result)
            assert (result.amount, result.balance_after) == (amount if adding else -amount, balance)
            assert result.metadata == dict(meta or {})
            history.insert(0, result)
    after = await look(client, user)
    assert (after.balance, after.history) == (balance, history)
    await audited(client, user, after)


async def test_batches_refuse_what_is_not_a_list_of_items(client: Any, namespace: str) -> None:
    for items in ("u", b"u", {"user_id": "u", "amount": 1}, None, 1, 1.5):
        for call in (lambda i=items: client.add_many(i), lambda i=items: client.subtract_many(i)):
            await expect_bad_input(client, namespace, call, [InvalidInputError], [])


# --- user ids --------------------------------------------------------------------------------

WITNESS = "w-é-"  # plus a uuid; the é lets an NFD spelling be a different, valid id


# Ids built from the witness's id and the namespace: its key names, encodings, other spellings.
DERIVED: dict[str, Callable[[str, str], str]] = {
    "state key": lambda w, ns: f"{ns}:{{{user_tag(w)}}}:s",
    "history key": lambda w, ns: f"{ns}:{{{w}}}:h",
    "tag": lambda w, ns: "{" + w + "}",
    "encoded": lambda w, ns: user_tag(w),
    "double encoded": lambda w, ns: quote(user_tag(w), safe=""),
    "brace": lambda w, ns: w + "}",
    "suffix": lambda w, ns: w + "}:i:k",
    "nul": lambda w, ns: w + "\x00",
    "space": lambda w, ns: w + " ",
    "upper": lambda w, ns: w.upper(),
    "nfd": lambda w, ns: w.replace("é", "e\u0301"),
    "fullwidth": lambda w, ns: w.replace("w", "ｗ"),
    "at": lambda w, ns: w + "@" + user_tag(w),
    "other namespace": lambda w, ns: f"other:{{{w}}}:s",
    "glob": lambda w, ns: w[:-3] + "*",
}

HOSTILE_IDS = st.one_of(
    any_text(max_size=20),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["u", "é", "中", "😀", "{", "%"]), st.integers(60, 260)
    ),
    st.text(min_size=250, max_size=260),
    st.sampled_from(
        [
            "",
            "\x00",
            "{",
            "}",
            "{}",
            "}{",
            "ns:{x}:s",
            "%7B",
            "%",
            "*",
            "?",
            "[a-z]",
            "\\",
            " ",
            "\n",
            "@",
            "u" * MAX_USER_ID_BYTES,
            "u" * (MAX_USER_ID_BYTES + 1),
            "é" * 128,
            "é" * 129,
            "\ud800",
            "a\udfffb",
            "credici",
            "i:k",
        ]
    ),
    st.uuids(),
    NOT_STR,
    st.none(),
    st.builds(Derived, st.sampled_from(sorted(DERIVED))),
)


@hostile_settings(80)
@given(raw=HOSTILE_IDS)
async def test_user_ids(client: Any, clock: FakeClock, namespace: str, raw: Any) -> None:
    witness = WITNESS + uuid.uuid4().hex
    await client.add(witness, 11, idempotency_key="k", metadata={"who": "witness"})
    await client.start_cycle(5, 30, witness, idempotency_key="c")
    witnessed = await look(client, witness)

    if isinstance(raw, Derived):
        raw = DERIVED[raw.name](witness, namespace)
    user = valid_user(raw)
    start, end = EPOCH, datetime(9999, 1, 1)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.add(raw, 5, idempotency_key="k", metadata={"who": "hostile"}),
        lambda: client.subtract(raw, 2),
        lambda: client.get_balance(raw),
        lambda: client.get_cycle(raw),
        lambda: client.cancel_cycle(raw, forfeit=True),
        lambda: client.get_all_user_transactions(raw),
        lambda: client.get_user_transactions_for_period(raw, start, end),
    ]
    if raw is not None:  # None is "a new user" for start_cycle
        calls.append(lambda: client.start_cycle(3, 30, raw))

    if user is None:
        keys = await scan(client, f"{namespace}:*")
        for call in calls:
            error = await attempt(call())
            assert isinstance(error, InvalidUserIdError), error
            assert error.user_id is raw
        assert await scan(client, f"{namespace}:*") == keys  # nothing was written, anywhere
    else:
        assert user != witness
        await forget(client, namespace, user)
        assert await look(client, user) == Seen(0, [], None)  # users exist implicitly
        added = await client.add(raw, 5, idempotency_key="k", metadata={"who": "hostile"})
        assert (added.user_id, added.balance_after) == (user, 5)
        assert await client.add(raw, 5, idempotency_key="k", metadata={"who": "hostile"}) == added
        assert (await client.subtract(raw, 2)).balance_after == 3
        cycle = await client.start_cycle(3, 30, raw)
        assert cycle.user_id == user
        assert await client.get_cycle(raw) == cycle
        canceled = await client.cancel_cycle(raw, forfeit=True)
        assert canceled.status == "canceled"
        assert await client.get_balance(raw) == 3
        history = await client.get_all_user_transactions(raw)
        assert [(t.kind, t.amount) for t in history] == [
            ("expire", -3),
            ("cycle_start", 3),
            ("subtract", -2),
            ("add", 5),
        ]
        assert await client.get_user_transactions_for_period(raw, start, end) == history
        assert all(t.transaction_id.endswith("@" + user_tag(user)) for t in history)
        assert await look(client, user) == Seen(3, history, canceled)
        await audited(client, user, Seen(3, history, canceled))
        # Nothing of it is visible to, or taken from, the witness.
        assert await look(client, witness) == witnessed

    assert await look(client, witness) == witnessed


async def test_uuid_and_its_string_are_one_user(client: Any) -> None:
    user = uuid.uuid4()
    await client.add(user, 4)
    assert await client.get_balance(str(user)) == 4
    assert (await client.get_all_user_transactions(user))[0].user_id == str(user)


# --- the documented limits, at the boundary and one past it ----------------------------------


async def test_limit_user_id_is_256_utf8_bytes(client: Any, namespace: str) -> None:
    for at_limit, past in [
        ("u" * 256, "u" * 257),
        ("é" * 128, "é" * 128 + "u"),  # 2 bytes each
        ("中" * 85 + "u", "中" * 86),  # 3 bytes each: 256 and 258
        ("😀" * 64, "😀" * 64 + "u"),  # 4 bytes each
    ]:
        assert len(at_limit.encode()) == 256 and len(past.encode()) > 256
        added = await client.add(at_limit, 1)
        assert added.user_id == at_limit
        assert await client.get_balance(at_limit) == 1
        assert (await client.start_cycle(2, 30, at_limit)).user_id == at_limit
        assert [t.user_id for t in await client.get_all_user_transactions(at_limit)] == [
            at_limit,
            at_limit,
        ]
        error = await expect_bad_input(
            client, namespace, lambda u=past: client.add(u, 1), [InvalidUserIdError], [at_limit]
        )
        assert error.user_id == past  # type: ignore[attr-defined]
        await expect_bad_input(
            client, namespace, lambda u=past: client.get_balance(u), [InvalidUserIdError], []
        )


async def test_limit_idempotency_key_is_256_characters(client: Any, namespace: str) -> None:
    user = fresh()
    # Characters, not bytes: 256 emoji are 1024 bytes and still a valid key.
    for at_limit, past in [("k" * 256, "k" * 257), ("😀" * 256, "😀" * 257)]:
        added = await client.add(user, 2, idempotency_key=at_limit)
        assert added.idempotency_key == at_limit
        assert await client.add(user, 2, idempotency_key=at_limit) == added  # replayed
        cycle = await client.start_cycle(1, 30, fresh(), idempotency_key=at_limit)
        assert (await client.get_all_user_transactions(cycle.user_id))[
            0
        ].idempotency_key == at_limit
        for call in (
            lambda k=past: client.add(user, 1, idempotency_key=k),
            lambda k=past: client.subtract(user, 1, idempotency_key=k),
            lambda k=past: client.start_cycle(1, 30, user, idempotency_key=k),
        ):
            await expect_bad_input(client, namespace, call, [InvalidIdempotencyKeyError], [user])
    subtracted = await client.subtract(user, 1, idempotency_key="s" * 256)
    assert subtracted.idempotency_key == "s" * 256


async def test_limit_metadata_is_64_items(client: Any, namespace: str) -> None:
    user = fresh()
    at_limit = {f"k{i:02}": "v" for i in range(64)}
    past = {**at_limit, "k64": "v"}
    added = await client.add(user, 1, metadata=at_limit)
    assert added.metadata == at_limit
    assert (await client.subtract(user, 1, metadata=at_limit)).metadata == at_limit
    assert [t.metadata for t in await client.get_all_user_transactions(user)] == [at_limit] * 2
    for call in (
        lambda: client.add(user, 1, metadata=past),
        lambda: client.subtract(user, 1, metadata=past),
    ):
        await expect_bad_input(client, namespace, call, [InvalidMetadataError], [user])


def spread_over_64_items(size: int) -> dict[str, str]:
    """64 items whose compact JSON is `size` bytes: 577 bytes of keys and punctuation, values."""
    values = size - 577
    return {f"k{i:02}": "v" * (values // 64 + (i < values % 64)) for i in range(64)}


@pytest.mark.parametrize(
    "make",
    [
        lambda size: {"k": "x" * (size - 8)},  # {"k":"xx..."}
        lambda size: {"k": "é" * ((size - 8) // 2) + "x" * (size % 2)},  # é: 2 bytes in UTF-8
        lambda size: {"k": '"' * ((size - 8) // 2) + "x" * (size % 2)},  # escaped: \" is 2 bytes
        spread_over_64_items,
    ],
    ids=["ascii", "utf8", "escaped", "64 items"],
)
async def test_limit_metadata_is_4096_bytes_of_json(
    client: Any, namespace: str, make: Callable[[int], dict[str, str]]
) -> None:
    user = fresh()
    at_limit, past = make(MAX_METADATA_BYTES), make(MAX_METADATA_BYTES + 1)
    assert (json_bytes(at_limit), json_bytes(past)) == (4096, 4097)
    assert len(at_limit) <= 64 and len(past) <= 64
    added = await client.add(user, 1, metadata=at_limit, idempotency_key="m")
    assert added.metadata == at_limit
    assert await client.add(user, 1, metadata=at_limit, idempotency_key="m") == added  # replayed
    assert (await client.subtract(user, 1, metadata=at_limit)).metadata == at_limit
    assert [t.metadata for t in await client.get_all_user_transactions(user)] == [at_limit] * 2
    for call in (
        lambda: client.add(user, 1, metadata=past),
        lambda: client.subtract(user, 1, metadata=past),
    ):
        await expect_bad_input(client, namespace, call, [InvalidMetadataError], [user])


async def test_limit_amount_is_2_53_minus_1(client: Any, namespace: str) -> None:
    user, other = fresh(), fresh()
    past = MAX_CREDITS + 1
    for call in (
        lambda: client.add(user, past),
        lambda: client.subtract(user, past),
        lambda: client.start_cycle(past, 30, user),
    ):
        await expect_bad_input(client, namespace, call, [InvalidAmountError], [user])
    await expect_bad_input(
        client,
        namespace,
        lambda: client.start_cycle(1, 30, user, rollover=past),
        [InvalidCycleError],
        [user],
    )
    assert (await client.add(user, MAX_CREDITS)).balance_after == MAX_CREDITS
    # The balance limit: an add or a grant that would pass it is refused, nothing changes.
    full = await look(client, user)
    for amount in (1, MAX_CREDITS):
        assert isinstance(await attempt(client.add(user, amount)), InvalidAmountError)
        assert isinstance(await attempt(client.start_cycle(amount, 30, user)), InvalidAmountError)
        assert await look(client, user) == full
    assert (await client.start_cycle(0, 30, user, rollover=MAX_CREDITS)).granted == 0
    assert (await client.subtract(user, MAX_CREDITS)).balance_after == 0
    assert await client.get_balance(user) == 0
    cycle = await client.start_cycle(MAX_CREDITS, 30, other, rollover=MAX_CREDITS)
    assert (cycle.granted, await client.get_balance(other)) == (MAX_CREDITS, MAX_CREDITS)


async def test_limit_durations_are_1_ms_to_365000_days(client: Any, namespace: str) -> None:
    """Not in the README (docs/security.md lists them): ttl and cycle periods."""
    user = fresh()
    longest, shortest = MAX_DURATION, MS
    assert (await client.add(user, 1, ttl=longest)).expire_at is not None
    assert (await client.add(user, 1, ttl=shortest)).expire_at is not None
    assert (await client.start_cycle(1, MAX_DURATION.days, fresh())).period == MAX_DURATION.days
    assert (await client.start_cycle(1, longest, fresh())).period == longest
    assert (await client.start_cycle(1, shortest, fresh())).period == shortest
    for call in (
        lambda: client.add(user, 1, ttl=longest + timedelta(microseconds=1)),
        lambda: client.add(user, 1, ttl=shortest - timedelta(microseconds=1)),
    ):
        await expect_bad_input(client, namespace, call, [InvalidExpiryError], [user])
    for period in (MAX_DURATION.days + 1, longest + MS, shortest - timedelta(microseconds=1), 0):
        await expect_bad_input(
            client,
            namespace,
            lambda p=period: client.start_cycle(1, p, user),
            [InvalidCycleError],
            [user],
        )


# --- bugs this suite found (fixed): each stays as a test ---------------------------------


async def renew_with_rollover(client: Any, clock: FakeClock, user: str) -> None:
    grant = 2**52 + 1
    await client.start_cycle(grant, 1, user, renew=True, rollover=None)
    await client.add(user, MAX_CREDITS - grant)  # the balance is now exactly the limit
    clock.advance(timedelta(days=1))  # the unspent grant rolls over, plus a new one


async def reverse_a_charge(client: Any, clock: FakeClock, user: str) -> None:
    await client.add(user, MAX_CREDITS)
    charge = await client.subtract(user, 1)
    await client.add(user, 1)
    await client.reverse(charge.transaction_id)


async def release_a_hold(client: Any, clock: FakeClock, user: str) -> None:
    await client.add(user, MAX_CREDITS)
    hold = await client.reserve(user, 10)
    await client.add(user, 10)
    await client.release(hold.hold_id)


async def capture_part_of_a_hold(client: Any, clock: FakeClock, user: str) -> None:
    await client.add(user, MAX_CREDITS)
    hold = await client.reserve(user, 10)
    await client.add(user, 10)
    await client.capture(hold.hold_id, 1)


@pytest.mark.parametrize(
    "way", [renew_with_rollover, reverse_a_charge, release_a_hold, capture_part_of_a_hold]
)
async def test_the_balance_never_passes_the_limit(
    client: Any, clock: FakeClock, way: Callable[[Any, FakeClock, str], Awaitable[None]]
) -> None:
    user = fresh()
    await attempt(way(client, clock, user))  # refusing (a typed error) would be fine
    balance = await client.get_balance(user)
    assert balance <= MAX_CREDITS, f"balance {balance} passed 2**53-1"


async def test_out_of_range_aware_datetimes_raise_typed_errors(client: Any) -> None:
    user = fresh()
    latest = datetime.max.replace(tzinfo=timezone(timedelta(hours=-12)))
    earliest = datetime.min.replace(tzinfo=timezone(timedelta(hours=14)))
    for call in (
        lambda: client.add(user, 1, latest),
        lambda: client.add(user, 1, earliest),
        lambda: client.get_user_transactions_for_period(user, earliest, latest),
    ):
        result = await attempt(call())
        assert isinstance(result, Transaction | list | InvalidInputError), result


async def test_scan_users_lists_each_user_once_whatever_the_keys(client: Any) -> None:
    await client.add("alice", 5, idempotency_key="x}:s")
    await client.add("bob", 5)
    found = client.scan_users(100)
    if inspect.isawaitable(found):  # the sync client, presented as awaitable
        found = await found
    if hasattr(found, "__aiter__"):
        users = [user async for batch in found for user in batch]
    else:
        users = [user for batch in found for user in batch]
    assert sorted(users) == ["alice", "bob"]


async def test_reverse_of_a_malformed_transaction_id_is_a_typed_error(client: Any) -> None:
    user = fresh()
    await client.add(user, 5)
    before = await look(client, user)
    for entry in ("²-0", "1-١", "١٢٣-0", "99999999999999999999999-0", "1-99999999999999999999999"):
        result = await attempt(client.reverse(f"{entry}@{user_tag(user)}"))
        assert isinstance(result, InvalidInputError | TransactionNotFoundError), result
    assert await look(client, user) == before
