"""What both clients share: the types of their arguments and the clock they may be given."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from credici_redis._core.protocol import entry_key
from credici_redis._core.time import to_ms
from credici_redis.models import Transaction

Clock = Callable[[], datetime]
UserId = str | UUID
SubtractItem = tuple[UserId, int] | Mapping[str, Any]
AddItem = tuple[UserId, int] | tuple[UserId, int, datetime | None] | Mapping[str, Any]


class ClientBase:
    def __init__(self, clock: Clock | None) -> None:
        self._clock = clock

    def _now(self) -> int | None:
        """None: the storage's own clock (Redis TIME). A clock is for tests and simulations."""
        return None if self._clock is None else to_ms(self._clock())


def merge(recent: list[Transaction], archived: list[Transaction]) -> list[Transaction]:
    """One history, newest first: what Redis returned, and what only PostgreSQL holds."""
    if not archived:
        return recent
    seen = {tx.transaction_id for tx in recent}
    both = recent + [tx for tx in archived if tx.transaction_id not in seen]
    both.sort(key=lambda tx: entry_key(tx.transaction_id.partition("@")[0]), reverse=True)
    return both
