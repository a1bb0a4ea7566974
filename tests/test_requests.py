"""Argument validation and request building (no server needed)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from credici_redis._core import requests as _requests
from credici_redis._core.time import from_ms, to_ms, to_ms_ceil
from credici_redis.errors import InvalidExpiryError


def test_time_conversions_are_exact_to_the_millisecond() -> None:
    moment = datetime(2026, 5, 1, 12, 0, 0, 123999, tzinfo=timezone.utc)
    assert from_ms(to_ms(moment)) == moment.replace(microsecond=123000)
    assert from_ms(to_ms_ceil(moment)) == moment.replace(microsecond=124000)
    exact = moment.replace(microsecond=123000)
    assert to_ms(exact) == to_ms_ceil(exact)
    assert to_ms(datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=timezone.utc)) == -1


def test_naive_datetimes_are_utc() -> None:
    assert to_ms(datetime(2030, 1, 1)) == to_ms(datetime(2030, 1, 1, tzinfo=timezone.utc))


def test_fingerprint_separates_requests() -> None:
    a = _requests.build_subtract("u", 5, "k", None, None)
    b = _requests.build_subtract("u", 5, "k", {"x": "y"}, None)
    c = _requests.build_subtract("u", 6, "k", None, None)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == _requests.build_subtract("u", 5, "k", None, None).fingerprint
    assert ":" not in a.fingerprint  # the idempotency record splits on the first ':'
    added = _requests.build_add("u", 5, None, timedelta(seconds=1), "k", None, None)
    assert added.fingerprint != a.fingerprint
    assert _requests.build_subtract("u", 5, None, None, None).fingerprint == ""


def test_metadata_is_canonical_json() -> None:
    assert _requests.metadata({"b": "2", "a": "1"}) == '{"a":"1","b":"2"}'
    assert _requests.metadata({}) == ""
    assert _requests.metadata(None) == ""


def test_start_cycle_without_user_makes_a_uuid4() -> None:
    req = _requests.build_start_cycle(
        0, 30, None, rollover_=0, renew=False, tz="UTC", key=None, now_ms=None
    )
    assert uuid.UUID(req.user_id).version == 4
    assert req.duration_ms == 30 * 86_400_000


def test_calendar_boundaries_clamp_to_the_month_and_follow_local_time() -> None:
    from credici_redis._core import schedule as _schedule

    jan31 = to_ms(datetime(2027, 1, 31, 10, tzinfo=timezone.utc))
    got = [from_ms(_schedule.boundary(jan31, "month", "UTC", k)).date() for k in range(4)]
    assert [d.isoformat() for d in got] == ["2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30"]
    # From a start in winter time, local midnight in summer is 22:00 UTC.
    berlin_mar = to_ms(datetime(2027, 2, 28, 23, tzinfo=timezone.utc))  # 2027-03-01 00:00 CET
    assert from_ms(_schedule.boundary(berlin_mar, "month", "Europe/Berlin", 1)) == datetime(
        2027, 3, 31, 22, tzinfo=timezone.utc
    )
    found = _schedule.boundaries_from(jan31, "month", "UTC", 1, jan31)
    assert len(found) == _schedule.AHEAD + 1 and found == sorted(found)


def test_expire_at_and_ttl_are_exclusive() -> None:
    with pytest.raises(InvalidExpiryError):
        _requests.expiry(datetime(2030, 1, 1), timedelta(days=1))
    assert _requests.expiry(None, timedelta(seconds=2)) == (None, 2000)
