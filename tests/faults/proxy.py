"""A TCP proxy in front of Redis that loses replies on demand: the faults a network really has."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to Redis.

    `lose_replies(n)`: the next n replies are read from Redis (so the request was applied) and
    thrown away, and the client's connection is cut. `delay`: seconds to hold every reply.
    """

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 6379)) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.lost = 0
        self._to_lose = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_replies(self, n: int = 1) -> None:
        with self._lock:
            self._to_lose += n

    def _take_loss(self) -> bool:
        with self._lock:
            if self._to_lose:
                self._to_lose -= 1
                self.lost += 1
                return True
            return False

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._sockets += [client, server]
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._replies, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        self._pump(client, server, replies=False)

    def _replies(self, server: socket.socket, client: socket.socket) -> None:
        self._pump(server, client, replies=True)

    def _pump(self, source: socket.socket, sink: socket.socket, *, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self._take_loss():
                    break  # Redis has answered: the request ran. The client never hears of it.
                if replies and self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        self._thread.join()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
