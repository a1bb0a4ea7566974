"""The storage interface: what a client needs from a storage (`credici_redis.storage` exports it).

A storage carries out any operation (`credici_redis._ops`) on a validated request, one or many,
and walks the namespace (users, events, unsettled transfers). Adding an operation never widens
it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Protocol, TypeVar

from credici_redis._core.operation import Operation
from credici_redis._core.requests import EventReading
from credici_redis.errors import CrediciError
from credici_redis.models import BalanceEvent, TransferRecovery

R = TypeVar("R")
T = TypeVar("T")
Batch = list[R | CrediciError]
"""Requests of a batch; an item whose input was bad is already its error."""


class Storage(Protocol):
    """What `CrediciClient` needs from a storage: carry out any operation (`credici_redis._ops`)
    on a validated request, one or many, and walk the namespace. Adding an operation never
    widens it."""

    def execute(self, op: Operation[R, T], req: R) -> T: ...
    def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]: ...
    def scan_users(self, batch: int) -> Iterator[list[str]]: ...
    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> Iterator[BalanceEvent]: ...
    def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery: ...
    def recent_events(self, count: int) -> list[BalanceEvent]: ...
    def close(self) -> None: ...


class AsyncStorage(Protocol):
    """What `AsyncCrediciClient` needs from a storage: `Storage`, awaitable."""

    async def execute(self, op: Operation[R, T], req: R) -> T: ...
    async def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]: ...
    def scan_users(self, batch: int) -> AsyncIterator[list[str]]: ...
    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]: ...
    async def recover_transfers(
        self, now_ms: int | None, older_than_ms: int
    ) -> TransferRecovery: ...
    async def recent_events(self, count: int) -> list[BalanceEvent]: ...
    async def aclose(self) -> None: ...
