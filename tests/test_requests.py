"""Argument validation and request building (no server needed)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from credici_redis._core import requests as _requests
from credici_redis._core.time import from_ms, to_ms, to_ms_ceil
from credici_redis._ops import charge, cycles
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
    a = charge.build_subtract("u", 5, "k", None, None)
    b = charge.build_subtract("u", 5, "k", {"x": "y"}, None)
    c = charge.build_subtract("u", 6, "k", None, None)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.fingerprint == charge.build_subtract("u", 5, "k", None, None).fingerprint
    assert ":" not in a.fingerprint  # the idempotency record splits on the first ':'
    added = charge.build_add("u", 5, None, timedelta(seconds=1), "k", None, None)
    assert added.fingerprint != a.fingerprint
    assert charge.build_subtract("u", 5, None, None, None).fingerprint == ""


def test_metadata_is_canonical_json() -> None:
    assert _requests.metadata({"b": "2", "a": "1"}) == '{"a":"1","b":"2"}'
    assert _requests.metadata({}) == ""
    assert _requests.metadata(None) == ""


def test_start_cycle_without_user_makes_a_uuid4() -> None:
    req = cycles.build_start_cycle(
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


def test_fingerprints_are_those_stored_records_were_made_with() -> None:
    """An idempotency record keeps its request's fingerprint for a day: the operations' specs
    must make exactly the fingerprints the previous code did, or a retry across an upgrade is
    refused as a conflict (values computed by the code before issue 16's operation specs)."""
    from credici_redis._ops import holds, reverse

    assert charge.build_subtract("u", 5, "k", {"x": "y"}, None).fingerprint == (
        "190fd10668ef3ecbecdfea9b325a7305"
    )
    added = charge.build_add("u", 5, None, timedelta(seconds=1), "k", None, None, 3)
    assert added.fingerprint == "7ad2acbc7d42fe0a26f2a88f2a3d508c"
    reserved = holds.build_reserve("u", 5, timedelta(seconds=9), "k", None, None)
    assert reserved.fingerprint == "a3c5600e85bf6449c7b75dd653e32123"
    # A member (issue 19) makes another request; without one, the fingerprint stays.
    as_member = charge.build_subtract("u", 5, "k", {"x": "y"}, None, member="alice")
    assert as_member.fingerprint not in ("", "190fd10668ef3ecbecdfea9b325a7305")
    held = holds.build_reserve("u", 5, timedelta(seconds=9), "k", None, None, member="alice")
    assert held.fingerprint not in ("", "a3c5600e85bf6449c7b75dd653e32123")
    assert holds.build_capture("h3@u", 2, "k", None).fingerprint == (
        "fd9c1cced89b6474c9c0c5ec3fbbbc8f"
    )
    assert reverse.build_reverse("17-0@u", "k", None).fingerprint == (
        "6e432d786bc209f57ef951e455dbbbbe"
    )
    cycle = cycles.build_start_cycle(
        5, 30, "u", rollover_=None, renew=True, tz="UTC", key="k", now_ms=None
    )
    assert cycle.fingerprint == "bb3cebeedc0c6750ba4a326cc1cd6c0c"
