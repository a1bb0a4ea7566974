"""Auto-batching for `AsyncRedisStorage` (asyncio only): concurrent operations of one event-loop
moment share a pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from credici_redis._core.protocol import Call
from credici_redis._storages.redis_base import DRIVER_ERRORS, errors_in_place, storage_error


class _Batcher:
    """Auto-batching: every batch of calls handed over in one event-loop moment (by any number of
    concurrent operations) goes out as one pipeline; each sender gets its own replies back, or
    its own error (an outage is judged per sender: only one that had a request in flight gets
    OutcomeUnknownError)."""

    def __init__(
        self, round_trip: Callable[[list[Call]], Awaitable[list[Any]]], max_calls: int
    ) -> None:
        self._round_trip = round_trip
        self._max_calls = max_calls
        self._queue: list[tuple[list[Call], asyncio.Future[list[Any]]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def send(self, calls: list[Call]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((calls, future))
        return await future

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        chunk: list[tuple[list[Call], asyncio.Future[list[Any]]]] = []
        size = 0
        for entry in queue:
            if chunk and size + len(entry[0]) > self._max_calls:
                self._start(chunk)
                chunk, size = [], 0
            chunk.append(entry)
            size += len(entry[0])
        if chunk:
            self._start(chunk)

    def _start(self, chunk: list[tuple[list[Call], asyncio.Future[list[Any]]]]) -> None:
        task = asyncio.ensure_future(self._pipeline(chunk))
        self._flushing.add(task)  # keep a reference until it is done
        task.add_done_callback(self._flushing.discard)

    async def _pipeline(self, chunk: list[tuple[list[Call], asyncio.Future[list[Any]]]]) -> None:
        calls = [call for sent, _ in chunk for call in sent]
        try:
            replies = errors_in_place(calls, await self._round_trip(calls))
        except DRIVER_ERRORS as exc:
            for sent, future in chunk:
                if not future.done():
                    error = storage_error(exc, sent)
                    error.__cause__ = exc
                    future.set_exception(error)
            return
        except BaseException as exc:  # cancelled, or a bug: nobody may wait forever
            for _, future in chunk:
                if not future.done():
                    future.set_exception(exc)
            raise
        at = 0
        for sent, future in chunk:
            if not future.done():
                future.set_result(replies[at : at + len(sent)])
            at += len(sent)
