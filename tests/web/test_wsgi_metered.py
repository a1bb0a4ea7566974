"""credici_redis.wsgi metered by usage (reserve, then capture or release) under threaded wsgiref."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from credici_redis import CrediciClient
from credici_redis.wsgi import (
    CHARGE_KEY,
    CreditMiddleware,
    Meter,
    StartResponse,
    WSGIEnvironment,
    current_meter,
    report_usage,
    user_from_header,
)
from tests.conftest import REDIS_URL
from tests.web.conftest import DOWN_URL, eventually, serve_wsgi

RESERVE = 10


class App:
    """A stdlib WSGI app streaming ``n`` chunks of 1 credit each (``/stream?n=&delay=``), or
    answering ``/status/<code>?used=`` at once, or failing (``/raise``); it keeps the meters."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.meters: list[Meter] = []
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        usage = current_meter(environ)
        with self._lock:
            self.calls[path] += 1
            if usage is not None:
                self.meters.append(usage)
        if path == "/fixed":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"charged %d" % environ[CHARGE_KEY].cost]
        assert usage is not None
        if path == "/raise":
            usage.add(2)
            raise RuntimeError("the view failed")
        if path.startswith("/status/"):
            if "used" in query:
                report_usage(environ, int(query["used"]))
            start_response(f"{path[8:]} Whatever", [("Content-Type", "text/plain")])
            return [b"status"]
        n, delay = int(query.get("n", "3")), float(query.get("delay", "0"))
        fail_after = int(query["fail_after"]) if "fail_after" in query else None
        usage.report(0)
        return self._stream(usage, start_response, n, delay, fail_after)

    @staticmethod
    def _stream(
        usage: Meter, start_response: StartResponse, n: int, delay: float, fail_after: int | None
    ) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])  # late, from the iterable
        for i in range(n):
            if i == fail_after:
                raise RuntimeError("the model crashed")
            usage.add(1)
            yield b"%d\n" % i
            time.sleep(delay)


def fresh_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def credit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-credits-")}


def charged_by(usage: Meter) -> int | None:
    """What the middleware charged once it settled (it does so after the response ended)."""
    return eventually(lambda: usage.charged, lambda charged: charged is not None)


def settled(credici: CrediciClient, user: str, balance: int) -> None:
    details = eventually(
        lambda: credici.get_balance_details(user),
        lambda d: d.held == 0 and d.balance == balance,
    )
    assert (details.balance, details.held) == (balance, 0)


@contextlib.contextmanager
def metered_server(url: str, namespace: str, **options: Any) -> Iterator[tuple[httpx.Client, App]]:
    app = App()
    with CrediciClient.from_url(url, namespace=namespace, timeout=0.5) as client:
        wrapped = CreditMiddleware(
            app,
            client=client,
            user=user_from_header("X-User"),
            cost=2,
            reserve=lambda environ: None if environ["PATH_INFO"] == "/fixed" else RESERVE,
            **options,
        )
        with serve_wsgi(wrapped) as base, httpx.Client(base_url=base, timeout=10) as http:
            yield http, app


@pytest.fixture
def served(namespace: str) -> Iterator[tuple[httpx.Client, App]]:
    with metered_server(REDIS_URL, namespace) as server:
        yield server


def test_a_stream_is_charged_what_it_reported(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, app = served
    user = fresh_user()
    credici.add(user, 100)
    r = http.get("/stream", params={"n": 4}, headers={"X-User": user})
    assert (r.text, credit_headers(r)) == ("0\n1\n2\n3\n", {"x-credits-reserved": "10"})
    settled(credici, user, 96)
    usage = app.meters[-1]
    assert charged_by(usage) == 4
    assert usage.transaction is not None and usage.transaction.captured == 4
    capture, reserve = credici.get_all_user_transactions(user)[:2]
    assert (reserve.amount, reserve.metadata) == (-10, {"method": "GET", "path": "/stream"})
    assert (capture.captured, capture.amount) == (4, 6)

    # reserve(environ) returning None: the fixed cost, as before.
    r = http.get("/fixed", headers={"X-User": user})
    assert r.text == "charged 2" and credit_headers(r)["x-credits-cost"] == "2"
    # Not enough credits for the reservation: 402, the app never runs.
    poor = fresh_user()
    credici.add(poor, 9)
    r = http.get("/stream", headers={"X-User": poor})
    assert r.json() == {"error": "insufficient_credits", "required": 10, "available": 9}
    assert credit_headers(r) == {"x-credits-remaining": "9", "x-credits-reserved": "10"}
    assert app.calls["/stream"] == 1
    # No user: not metered, the meter is there to report to anyway.
    assert http.get("/stream", params={"n": 2}).text == "0\n1\n"
    assert (app.meters[-1].user_id, app.meters[-1].used, app.meters[-1].billed) == (None, 2, False)


def test_what_is_captured_or_released_after_the_response(
    served: tuple[httpx.Client, App], credici: CrediciClient, caplog: pytest.LogCaptureFixture
) -> None:
    http, app = served
    cases = [
        ("/stream?n=0", 0),
        ("/status/200", RESERVE),  # nothing reported, 2xx: the whole reservation
        ("/status/404", 0),  # nothing reported, 4xx: nothing
        ("/status/409?used=3", 3),
        ("/status/500?used=3", 0),  # 5xx: released
        ("/stream?n=5&fail_after=2", 0),  # an exception mid-stream: released
        ("/raise", 0),  # an exception before the response: released
        ("/status/200?used=11", RESERVE),  # over the reservation: the reservation, logged
    ]
    with caplog.at_level(logging.WARNING, logger="credici_redis.wsgi"):
        for path, charged in cases:
            user = fresh_user()
            credici.add(user, 100)
            try:
                http.get(path, headers={"X-User": user})
            except httpx.RemoteProtocolError:  # the stream broke off
                assert "fail_after" in path
            settled(credici, user, 100 - charged)
            assert charged_by(app.meters[-1]) == charged, path
            kinds = [t.kind for t in credici.get_all_user_transactions(user)]
            assert kinds[:2] == ["capture" if charged else "release", "reserve"], path
    (overuse,) = [r for r in caplog.records if "more than the" in r.getMessage()]
    assert "reported 11 credits used, more than the 10 reserved" in overuse.getMessage()


@pytest.mark.parametrize("on_disconnect", ["capture", "release"])
def test_a_client_leaving_mid_stream_pays_what_was_reported_or_nothing(
    namespace: str, credici: CrediciClient, on_disconnect: str
) -> None:
    user = fresh_user()
    credici.add(user, 100)
    with metered_server(REDIS_URL, namespace, on_disconnect=on_disconnect) as (http, app):
        with http.stream(
            "GET", "/stream", params={"n": 1000, "delay": 0.01}, headers={"X-User": user}
        ) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(3)] == ["0", "1", "2"]
        # The server's next writes fail; it closes the response iterable, which settles.
        usage = app.meters[-1]
        charged_by(usage)
    assert usage.used is not None and 3 <= usage.used < RESERVE
    expected = usage.used if on_disconnect == "capture" else 0
    assert usage.charged == expected
    settled(credici, user, 100 - expected)


def test_concurrent_streams_of_one_user_never_overspend(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, _ = served
    user = fresh_user()
    credici.add(user, 40)

    def stream(_: int) -> httpx.Response:
        return http.get("/stream", params={"n": 6, "delay": 0.02}, headers={"X-User": user})

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(stream, range(12)))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 402} and statuses[200] >= 4
    assert statuses[200] * 6 <= 40
    settled(credici, user, 40 - statuses[200] * 6)
    assert credici.audit(user).ok


def test_a_retried_request_is_reserved_and_captured_once(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, app = served
    user = fresh_user()
    credici.add(user, 100)
    headers = {"X-User": user, "Idempotency-Key": "gen-1"}
    for _ in range(2):
        r = http.get("/stream", params={"n": 4}, headers=headers)
        assert (r.text, r.headers["x-credits-reserved"]) == ("0\n1\n2\n3\n", "10")
    assert app.calls["/stream"] == 2 and app.meters[-1].replayed
    settled(credici, user, 96)
    capture, reserve = credici.get_all_user_transactions(user)[:2]
    assert (reserve.idempotency_key, capture.kind) == ("http:gen-1", "capture")
    assert capture.idempotency_key == "http-capture:" + reserve.hold_id.partition("@")[0]  # type: ignore[union-attr]

    # A first attempt that failed was released: its retry reserves (and pays) again, once.
    # (The query string is not part of "the same request": method and path are.)
    headers = {"X-User": user, "Idempotency-Key": "fail-1"}
    with contextlib.suppress(httpx.RemoteProtocolError):  # wsgiref may end it as if complete
        http.get("/stream", params={"n": 5, "fail_after": 2}, headers=headers)
    settled(credici, user, 96)
    for _ in range(2):  # the retry, then a retry of that success
        assert http.get("/stream", params={"n": 5}, headers=headers).text == "0\n1\n2\n3\n4\n"
        settled(credici, user, 91)
    assert app.meters[-1].replayed and not app.meters[-2].replayed
    keys = [t.idempotency_key or "" for t in credici.get_all_user_transactions(user)[:4]]
    assert keys[3] == "http:fail-1" and keys[1].startswith("http-retry:")
    assert credici.audit(user).ok


def test_storage_down_fails_closed_or_open_for_reservations(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="credici_redis.wsgi"):
        with metered_server(DOWN_URL, namespace) as (http, app):
            r = http.get("/stream", headers={"X-User": "alice"})
            assert (r.status_code, r.json()) == (503, {"error": "credits_unavailable"})
            assert app.calls["/stream"] == 0
        with metered_server(DOWN_URL, namespace, on_storage_error="open") as (http, app):
            r = http.get("/stream", params={"n": 2}, headers={"X-User": "alice"})
            assert (r.status_code, r.text, credit_headers(r)) == (200, "0\n1\n", {})
            assert (app.meters[-1].billed, app.meters[-1].used) == (False, 2)
    error, warning = [r for r in caplog.records if r.name == "credici_redis.wsgi"]
    assert error.levelno == logging.ERROR and "without reserving" in warning.getMessage()


def test_meter_helpers_and_bad_configuration() -> None:
    class Request:  # a framework's request: Werkzeug keeps the environ in .environ
        def __init__(self, environ: WSGIEnvironment) -> None:
            self.environ = environ

    usage = Meter("alice", 5)
    request = Request({"credici.meter": usage})
    assert current_meter(request) is usage and report_usage(request, 4)
    assert (usage.used, usage.left) == (4, 1)
    assert current_meter({}) is None and not report_usage({}, 1)
    with pytest.raises(TypeError, match="environ"):
        current_meter(object())
    with CrediciClient.from_url("memory://") as client:
        for bad, error in ((-1, ValueError), (True, TypeError)):
            with pytest.raises(error):
                CreditMiddleware(App(), client=client, user=user_from_header("X"), reserve=bad)
        with pytest.raises(TypeError, match="timedelta"):
            CreditMiddleware(App(), client=client, user=user_from_header("X"), hold_ttl=60)  # type: ignore[arg-type]
        CreditMiddleware(
            App(), client=client, user=user_from_header("X"), hold_ttl=timedelta(hours=1)
        )
