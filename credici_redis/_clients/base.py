"""What both clients share: the types of their arguments and the clock they may be given."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from credici_redis._core.limit_spec import encode_limits
from credici_redis._core.time import to_ms
from credici_redis.errors import InvalidOptionError

Clock = Callable[[], datetime]
UserId = str | UUID
SubtractItem = tuple[UserId, int] | Mapping[str, Any]
AddItem = tuple[UserId, int] | tuple[UserId, int, datetime | None] | Mapping[str, Any]


class ClientBase:
    def __init__(self, clock: Clock | None, default_limits: object = None) -> None:
        self._clock = clock
        self._limits = encode_limits(default_limits)
        self.default_limits = default_limits
        """The limits of users that have none of their own (None: no limits)."""

    def _usage_tz(self) -> str:
        """The zone the storage counts usage days in (UTC for a storage without the setting)."""
        ledger = getattr(getattr(self, "storage", None), "ledger", None)
        return str(getattr(ledger, "usage_tz", "UTC"))

    def _retention_ms(self) -> int:
        """The storage's history_retention (ms); InvalidOptionError if it has none."""
        retention = getattr(getattr(self, "storage", None), "history_retention_ms", None)
        if not isinstance(retention, int):
            raise InvalidOptionError(
                "trim_history needs a storage with history_retention (from_url(...,"
                " history_retention=timedelta(days=30)) or the Redis storages' option)",
                option="history_retention",
            )
        return retention

    def _now(self) -> int | None:
        """None: the storage's own clock (Redis TIME). A clock is for tests and simulations."""
        return None if self._clock is None else to_ms(self._clock())
