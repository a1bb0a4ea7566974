"""One asyncio client per event loop (asyncio only).

An asyncio connection belongs to the event loop that opened it. A client built outside a loop
and used under two ``asyncio.run()`` calls, or by pytest-asyncio's per-test loops, would write
its request on the first loop's socket and fail while waiting for the reply: a write applied but
reported as ``RuntimeError: Event loop is closed``. So the storage asks `LoopClients` for the
current loop's client before anything is sent: a storage made by ``from_url`` makes a new client
for each new loop (and drops the connections of loops that are closed); a storage built on a
client you made refuses with `EventLoopError`, before sending anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from credici_redis.errors import EventLoopError


class LoopClients:
    """The client of each event loop a storage has run in."""

    def __init__(self, first: Any, connect: Callable[[], Any] | None) -> None:
        self._first = first
        self._connect = connect
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def current(self) -> Any:
        """The running loop's client; made on the loop's first call."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is not None:
            return client
        if not self._clients:  # the first loop takes the client the storage was built with
            self._clients[loop] = self._first
            return self._first
        if self._connect is None:
            raise EventLoopError(
                "this storage's redis-py client was first used under another event loop; an "
                "asyncio connection cannot serve two loops, so nothing was sent. Build the client "
                "inside the loop that uses it, one per loop, or use AsyncCrediciClient.from_url, "
                "whose storage makes a client for each loop"
            )
        for old in [old for old in self._clients if old.is_closed()]:
            abandon(self._clients.pop(old))
        client = self._clients[loop] = self._connect()
        return client

    async def aclose(self) -> None:
        """Close the running loop's client; drop the connections of every other loop's."""
        loop = asyncio.get_running_loop()
        clients, self._clients = self._clients, {}
        for owner, client in clients.items():
            if owner is loop:
                await client.aclose()
            else:
                abandon(client)
        if not clients:
            await self._first.aclose()


def abandon(client: Any) -> None:
    """Drop a client's connections whose loop is closed, without that loop: close the sockets
    and forget the streams. (`transport.close()` would schedule a callback on the closed loop,
    which raises; so the socket is closed here and the transport marked closed, as its own
    close would have, so that it does not warn of an unclosed transport when collected.)"""
    for conn in _connections(client):
        writer = getattr(conn, "_writer", None)
        transport: Any = getattr(writer, "transport", None)
        sock = getattr(transport, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            transport._sock = None
            transport._closing = True
        if writer is not None:
            conn._writer = conn._reader = None


def _connections(client: Any) -> Iterator[Any]:
    pools = [getattr(client, "connection_pool", None)]
    manager = getattr(client, "nodes_manager", None)  # a cluster client: a pool per node
    nodes = getattr(manager, "nodes_cache", {}) or {}
    for node in nodes.values():
        yield from list(getattr(node, "_connections", ()))
    for pool in pools:
        if pool is None:
            continue
        yield from list(getattr(pool, "_available_connections", ()))
        yield from list(getattr(pool, "_in_use_connections", ()))
    single = getattr(client, "connection", None)
    if single is not None:
        yield single
