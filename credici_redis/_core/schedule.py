"""Cycle periods: fixed lengths, and calendar periods in a time zone.

Fixed periods (an int of days, a timedelta) are plain milliseconds and the scripts compute their
boundaries. Calendar periods ("day", "week", "month", "year") are anchored on the cycle's start in
its IANA time zone: boundary k is the start's local wall time moved k periods on, the day clamped to
the month's length (Jan 31 -> Feb 28/29 -> Mar 31), then converted to UTC, so a cycle that starts at
local midnight ends at local midnight on both sides of a DST change. Lua has no time zone data, so
the client computes calendar boundaries here and hands the scripts a few at a time.
"""

from __future__ import annotations

import calendar
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from credici_redis._core.time import from_ms, to_ms
from credici_redis.errors import InvalidTimeZoneError

CALENDAR_PERIODS = ("day", "week", "month", "year")
AHEAD = 4
"""Calendar boundaries handed to a script beyond the one it needs: one extra round trip per few."""


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise InvalidTimeZoneError(f"unknown time zone {name!r}") from exc


def _shift(day: date, period: str, k: int) -> date:
    if period == "day":
        return day + timedelta(days=k)
    if period == "week":
        return day + timedelta(weeks=k)
    months = k * 12 if period == "year" else k
    year, month0 = divmod(day.year * 12 + day.month - 1 + months, 12)
    last = calendar.monthrange(year, month0 + 1)[1]
    return date(year, month0 + 1, min(day.day, last))


def boundary(anchor_ms: int, period: str, tz: str, k: int) -> int:
    """The start of period k (k = 0 is the anchor) in ms, for a calendar period."""
    local = from_ms(anchor_ms).astimezone(zone(tz))
    shifted = datetime.combine(_shift(local.date(), period, k), local.timetz())
    return to_ms(shifted)


def boundaries_from(anchor_ms: int, period: str, tz: str, first: int, now_ms: int) -> list[int]:
    """Boundaries first, first+1, ... up to the first one after now_ms, then AHEAD more."""
    found: list[int] = []
    k = first
    past_now = 0
    while past_now <= AHEAD:
        b = boundary(anchor_ms, period, tz, k)
        found.append(b)
        if b > now_ms:
            past_now += 1
        k += 1
    return found


# -- budget periods (credici_redis._ops.limits) ----------------------------------------------


def calendar_period(now_ms: int, period: str, tz: str) -> tuple[int, int]:
    """The calendar `period` containing now_ms in zone tz: (start, end) in ms. Days start at local
    midnight, weeks on Monday, months on the 1st, years on January 1st (a midnight that a DST
    change skips is the first instant after it)."""
    z = zone(tz)
    day = from_ms(now_ms).astimezone(z).date()
    if period == "week":
        day -= timedelta(days=day.weekday())
    elif period == "month":
        day = day.replace(day=1)
    elif period == "year":
        day = day.replace(month=1, day=1)
    if period == "day":
        after = day + timedelta(days=1)
    elif period == "week":
        after = day + timedelta(weeks=1)
    elif period == "month":
        after = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        after = day.replace(year=day.year + 1)

    def midnight(d: date) -> int:
        return to_ms(datetime.combine(d, time(0), tzinfo=z))

    return midnight(day), midnight(after)


def period_extension(reply: list[str], asked: str = "") -> str:
    """The answer to a PERIOD reply {'PERIOD', now, period, tz}, added to the periods `asked`
    before (a user's budget and a member's cap may both ask): "<period>:<tz>=<start>,<end>;..."
    (lua/_ledger.lua, asked_period)."""
    start, end = calendar_period(int(reply[1]), reply[2], reply[3])
    tag = f"{reply[2]}:{reply[3]}"
    kept = [p for p in asked.split(";") if p and not p.startswith(tag + "=")]
    return ";".join([*kept, f"{tag}={start},{end}"])


# -- usage days (lua/_ledger.lua "Usage rollups") ---------------------------------------------

ZONE_VALID_MS = 7 * 86_400_000
"""How long past the asked span a zone's offsets are sent for: a user asks again a week later."""
_DAY_MS = 86_400_000


def utc_offset_ms(ms: int, tz: str) -> int:
    offset = from_ms(ms).astimezone(zone(tz)).utcoffset()
    assert offset is not None
    return offset // timedelta(milliseconds=1)


def zone_offsets(tz: str, from_ms: int, to_ms: int) -> tuple[int, list[tuple[int, int]]]:
    """The UTC offsets of zone `tz` from `from_ms` until `to_ms` + ZONE_VALID_MS: (valid until,
    [(from ms, offset ms), ...]), the first from `from_ms`, then each change of offset. Found by
    day steps (a zone changes its offset at most once a day), each change to the millisecond."""
    until = to_ms + ZONE_VALID_MS
    found = [(from_ms, utc_offset_ms(from_ms, tz))]
    t = from_ms
    while t < until:
        step = min(t + _DAY_MS, until)
        if utc_offset_ms(step, tz) != found[-1][1]:
            low, high = t, step  # the offset changes in (low, high]
            while high - low > 1:
                mid = (low + high) // 2
                if utc_offset_ms(mid, tz) == found[-1][1]:
                    low = mid
                else:
                    high = mid
            found.append((high, utc_offset_ms(high, tz)))
        t = step
    return until, found


def zone_extension(reply: list[str]) -> str:
    """The answer to a ZONE reply {'ZONE', tz, from, to}: "<tz>=<until>;<from>:<offset>;..."."""
    tz, start, end = reply[1], int(reply[2]), int(reply[3])
    until, offsets = zone_offsets(tz, start, end)
    return f"{tz}={until};" + ";".join(f"{t}:{o}" for t, o in offsets)
