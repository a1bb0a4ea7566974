"""Usage: `get_usage` (lua/usage.lua) reads the rollups that every change updates in the same
script (lua/_ledger.lua, "Usage rollups"): per UTC hour (kept 7 days) and per day in the
storage's `usage_tz` (kept 400 days); months are sums of days.

The client names the records to read (H<hour>, D<day>); the reply adds the running slot, whose
counts are still in the user's state hash. A query that reaches before the records begin
raises UsageUnavailableError; days or months in another zone than the days were counted in,
UsageZoneError.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import cast, get_args

from credici_redis._core import requests as check
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.schedule import zone
from credici_redis._core.scripts import load
from credici_redis._core.time import from_ms, to_ms, to_ms_ceil
from credici_redis.errors import InvalidPeriodError, UsageUnavailableError, UsageZoneError
from credici_redis.models import Granularity, UsagePoint

HOUR_MS = 3_600_000
KEEP_HOURS = 168
"""Hour records are kept this many hours back from the newest (as lua/_ledger.lua)."""
KEEP_DAYS = 400
"""Day records are kept this many days back from the newest (as lua/_ledger.lua)."""
MAX_RECORDS = 1000
_EPOCH_DAY = date(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class UsageRequest:
    user_id: str
    fields: str
    now_ms: int | None
    granularity: Granularity = "day"
    tz: str = "UTC"
    periods: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """Each point: its start (ms) and the hour or day numbers it sums."""


def _months(first: date, last: date) -> list[date]:
    out, month = [], first.replace(day=1)
    while month <= last:
        out.append(month)
        month = (month.replace(day=28) + timedelta(days=4)).replace(day=1)
    return out


def _midnight(day: date, tz: str) -> int:
    return to_ms(datetime.combine(day, datetime.min.time(), tzinfo=zone(tz)))


def build_usage(
    user: object, from_: object, to_: object, granularity: object, tz: object, now_ms: int | None
) -> UsageRequest:
    uid = check.user_id(user)
    if granularity not in get_args(Granularity):
        raise InvalidPeriodError(f"granularity must be one of {get_args(Granularity)}")
    if not isinstance(tz, str):
        raise InvalidPeriodError(f"tz must be a time zone name, not {tz!r}")
    zone(tz)  # InvalidTimeZoneError
    for name, value in (("from_", from_), ("to_", to_)):
        if not isinstance(value, datetime):
            raise InvalidPeriodError(f"{name} must be a datetime, not {type(value).__name__}")
    assert isinstance(from_, datetime) and isinstance(to_, datetime)
    try:
        low, high = to_ms(from_), to_ms_ceil(to_)
    except OverflowError as exc:
        raise InvalidPeriodError(f"from_ {from_} or to_ {to_} is out of range") from exc
    if low >= high:
        raise InvalidPeriodError(f"from_ ({from_}) must be before to_ ({to_})")
    periods: list[tuple[int, tuple[int, ...]]] = []
    if granularity == "hour":
        first, last = low // HOUR_MS, (high - 1) // HOUR_MS
        if last - first >= MAX_RECORDS:
            raise InvalidPeriodError(f"a usage query reads at most {MAX_RECORDS} hours")
        periods = [(h * HOUR_MS, (h,)) for h in range(first, last + 1)]
        names = [f"H{h}" for _, (h,) in periods]
    else:
        first_day = from_ms(low).astimezone(zone(tz)).date()
        last_day = from_ms(high - 1).astimezone(zone(tz)).date()
        if (last_day - first_day).days > KEEP_DAYS + 31:
            raise InvalidPeriodError(f"a usage query spans at most {KEEP_DAYS} days")
        if granularity == "day":
            days = [first_day + timedelta(days=i) for i in range((last_day - first_day).days + 1)]
            periods = [(_midnight(d, tz), ((d - _EPOCH_DAY).days,)) for d in days]
        else:
            for month in _months(first_day, last_day):
                after = (month.replace(day=28) + timedelta(days=4)).replace(day=1)
                numbers = range((month - _EPOCH_DAY).days, (after - _EPOCH_DAY).days)
                periods.append((_midnight(month, tz), tuple(numbers)))
        names = [f"D{n}" for _, numbers in periods for n in numbers]
    if len(names) > MAX_RECORDS:
        raise InvalidPeriodError(
            f"a usage query reads at most {MAX_RECORDS} day records ({KEEP_DAYS} days are kept)"
        )
    kind = cast(Granularity, granularity)
    return UsageRequest(uid, " ".join(names), now_ms, kind, tz, tuple(periods))


def _counts(record: str) -> tuple[int, int, int, int]:
    if not record:
        return (0, 0, 0, 0)
    s, g, x, c = record.split(":")
    return (int(s), int(g), int(x), int(c))


def _usage(req: UsageRequest, r: Reply) -> list[UsagePoint]:
    daily = req.granularity != "hour"
    counted = r["zone"] or "UTC"
    if daily and r["day"] and counted != req.tz:
        raise UsageZoneError(req.user_id, req.tz, counted)
    records = dict(zip(req.fields.split(), (_counts(v) for v in r.tail()), strict=True))
    running = (int(r["spent"] or 0), int(r["granted"] or 0), int(r["expired"] or 0),
               int(r["charges"] or 0))  # fmt: skip
    slot = r["day"] if daily else r["hour"]
    first_start, first_numbers = req.periods[0]
    dropped = r["days_dropped"] if daily else r["hours_dropped"]
    if dropped and first_numbers[0] <= int(dropped):
        after = int(dropped) + 1
        available = (
            _midnight(_EPOCH_DAY + timedelta(days=after), counted) if daily else after * HOUR_MS
        )
        raise UsageUnavailableError(req.user_id, from_ms(available).astimezone(zone(req.tz)))
    began = r["counted_from"]
    if began and int(began) > first_start:
        raise UsageUnavailableError(req.user_id, from_ms(int(began)).astimezone(zone(req.tz)))
    prefix = "D" if daily else "H"
    points = []
    for start, numbers in req.periods:
        total = [0, 0, 0, 0]
        for n in numbers:
            for i, v in enumerate(records[f"{prefix}{n}"]):
                total[i] += v
            if slot and int(slot) == n:
                for i, v in enumerate(running):
                    total[i] += v
        points.append(
            UsagePoint.model_construct(
                start=from_ms(start).astimezone(zone(req.tz)),
                spent=total[0],
                granted=total[1],
                expired=total[2],
                charges=total[3],
            )
        )
    return points


USAGE: Operation[UsageRequest, list[UsagePoint]] = Operation(
    "usage",
    UsageRequest,
    load("usage", effect=False, write=False),
    argv=("fields",),
    reply=(
        "OK",
        "zone",
        "hour",
        "day",
        "spent",
        "granted",
        "expired",
        "charges",
        "hours_dropped",
        "days_dropped",
        "counted_from",
        "*records",
    ),
    parse=_usage,
)
