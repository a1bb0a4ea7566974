"""Real servers for the web tests: uvicorn (ASGI) and wsgiref (WSGI) on free loopback ports.

Each runs in a thread of the test process, so a test can look at its app's state (a counter of
handler calls) as well as at Redis. The example app lives in examples/ (not a package): it is
loaded from its file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest
import uvicorn

from credici_redis import CrediciClient
from credici_redis._web.metering import Meter
from tests.conftest import REDIS_URL

T = TypeVar("T")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app.py"
DOWN_URL = "redis://127.0.0.1:1/0"
"""A Redis URL nothing listens on: every connection is refused at once."""


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("credici_fastapi_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Runs `app` under uvicorn (lifespan on) until the block ends; yields its base URL."""
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP,
    # and with Nagle on, the response's second write waits for a delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", ws="none", log_config=None, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.005)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request, joined on close (so a test ends with no request running)."""

    daemon_threads = False
    request_queue_size = 128  # socketserver's 5 drops bursts of connections (1 s SYN retries)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """Runs `app` under a threaded wsgiref server until the block ends; yields its base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.fixture
def credici(namespace: str) -> Iterator[CrediciClient]:
    """A sync client on the test's namespace of the real Redis, to set up and check credits."""
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        yield client


def eventually(read: Callable[[], T], until: Callable[[T], bool], timeout: float = 5.0) -> T:
    """`read()` again until `until(value)`; the last value. A metered request is settled after
    its last byte went out, so the client may look before the capture or release is done."""
    deadline = time.monotonic() + timeout
    value = read()
    while not until(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout} s")
        time.sleep(0.01)
        value = read()
    return value


def fresh_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def credit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-credits-")}


def subtracts(credici: CrediciClient, user: str) -> list[Any]:
    return [t for t in credici.get_all_user_transactions(user) if t.kind == "subtract"]


def charged_by(usage: Meter) -> int | None:
    """What the middleware charged once it settled (it does so after the response ended)."""
    return eventually(lambda: usage.charged, lambda charged: charged is not None)


def settled(credici: CrediciClient, user: str, balance: int) -> None:
    """Wait until the user's hold is settled and the balance is `balance`."""
    details = eventually(
        lambda: credici.get_balance_details(user),
        lambda d: d.held == 0 and d.balance == balance,
    )
    assert (details.balance, details.held) == (balance, 0)


def holds(credici: CrediciClient, user: str) -> list[tuple[str, int, int | None]]:
    """(kind, amount, captured) of the user's hold entries, oldest first."""
    history = reversed(credici.get_all_user_transactions(user))
    return [(t.kind, t.amount, t.captured) for t in history if t.hold_id is not None]
