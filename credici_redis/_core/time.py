"""The one place where datetimes become integer milliseconds (as Redis stores them) and back."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

NEVER_MS = 999_999_999_999_999
"""The expiry of a bucket that never expires (15 nines: bucket ids start with their expiry)."""


def as_utc(moment: datetime) -> datetime:
    """A naive datetime is read as UTC (as in the seed README); an aware one is converted."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, rounded down."""
    return (as_utc(moment) - _EPOCH) // timedelta(milliseconds=1)


def to_ms_ceil(moment: datetime) -> int:
    """Milliseconds since the epoch, rounded up (the first ms not before `moment`)."""
    return -((_EPOCH - as_utc(moment)) // timedelta(milliseconds=1))


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def duration_ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)
