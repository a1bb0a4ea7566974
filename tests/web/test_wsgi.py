"""credici_redis.wsgi under a real threaded wsgiref server, driven over HTTP with httpx."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from credici_redis import CrediciClient
from credici_redis.wsgi import (
    CHARGE_KEY,
    CreditMiddleware,
    StartResponse,
    WSGIEnvironment,
    user_from_header,
)
from tests.conftest import REDIS_URL
from tests.web.conftest import DOWN_URL, serve_wsgi

PRICES = {"/free": 0, "/expensive": 5}


class App:
    """A stdlib WSGI app that counts its calls per path and says what it was charged."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        with self._lock:
            self.calls[path] += 1
        paid = environ[CHARGE_KEY]
        body = json.dumps({"path": path, "charged": None if paid is None else paid.cost}).encode()
        if path == "/stream":
            return self._stream(body, start_response)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    @staticmethod
    def _stream(body: bytes, start_response: StartResponse) -> Iterator[bytes]:
        # start_response called late, from inside the iterable, as PEP 3333 allows.
        start_response("200 OK", [("Content-Type", "application/json")])
        yield body[:5]
        yield body[5:]


def fresh_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def credit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-credits-")}


@contextlib.contextmanager
def metered_server(url: str, namespace: str, **options: Any) -> Iterator[tuple[httpx.Client, App]]:
    app = App()
    with CrediciClient.from_url(url, namespace=namespace, timeout=0.5) as client:
        metered = CreditMiddleware(
            app,
            client=client,
            user=user_from_header("X-User"),
            cost=lambda environ: PRICES.get(environ["PATH_INFO"], 1),
            **options,
        )
        with serve_wsgi(metered) as base, httpx.Client(base_url=base, timeout=10) as http:
            yield http, app


@pytest.fixture
def served(namespace: str) -> Iterator[tuple[httpx.Client, App]]:
    with metered_server(REDIS_URL, namespace) as server:
        yield server


def test_requests_are_charged_their_price_before_the_app_runs(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, app = served
    user = fresh_user()
    credici.add(user, 10)

    r = http.get("/echo", headers={"X-User": user})
    assert r.json() == {"path": "/echo", "charged": 1}
    assert credit_headers(r) == {"x-credits-remaining": "9", "x-credits-cost": "1"}
    r = http.post("/expensive", headers={"X-User": user})
    assert r.json()["charged"] == 5 and r.headers["x-credits-remaining"] == "4"
    r = http.get("/free", headers={"X-User": user})
    assert r.json()["charged"] is None and credit_headers(r) == {}
    r = http.get("/echo")  # no user: not metered
    assert r.json()["charged"] is None and credit_headers(r) == {}

    assert app.calls == {"/echo": 2, "/expensive": 1, "/free": 1}
    assert credici.get_balance(user) == 4
    history = [t for t in credici.get_all_user_transactions(user) if t.kind == "subtract"]
    assert [t.metadata for t in history] == [
        {"method": "POST", "path": "/expensive"},
        {"method": "GET", "path": "/echo"},
    ]


def test_streamed_response_with_late_start_response_gets_the_headers(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, _ = served
    user = fresh_user()
    credici.add(user, 2)
    r = http.get("/stream", headers={"X-User": user})
    assert r.json() == {"path": "/stream", "charged": 1}
    assert credit_headers(r) == {"x-credits-remaining": "1", "x-credits-cost": "1"}


def test_out_of_credits_is_402_and_the_app_never_runs(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, app = served
    user = fresh_user()
    credici.add(user, 3)
    r = http.get("/expensive", headers={"X-User": user})
    assert r.status_code == 402
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "insufficient_credits", "required": 5, "available": 3}
    assert credit_headers(r) == {"x-credits-remaining": "3", "x-credits-cost": "5"}
    assert app.calls["/expensive"] == 0 and credici.get_balance(user) == 3


def test_a_retried_request_is_charged_once(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, app = served
    user = fresh_user()
    credici.add(user, 10)
    headers = {"X-User": user, "Idempotency-Key": "req-1"}

    first = http.post("/expensive", headers=headers)
    retry = http.post("/expensive", headers=headers)
    assert first.status_code == retry.status_code == 200
    assert (
        credit_headers(first)
        == credit_headers(retry)
        == {
            "x-credits-remaining": "5",
            "x-credits-cost": "5",
        }
    )
    assert app.calls["/expensive"] == 2 and credici.get_balance(user) == 5

    r = http.get("/echo", headers=headers)  # the same key for another request
    assert (r.status_code, r.json()) == (
        422,
        {"error": "idempotency_conflict", "idempotency_key": "req-1"},
    )
    r = http.get("/echo", headers={**headers, "Idempotency-Key": "k" * 300})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_idempotency_key")
    assert app.calls["/echo"] == 0 and credici.get_balance(user) == 5


def test_concurrent_requests_of_one_user_never_overspend(
    served: tuple[httpx.Client, App], credici: CrediciClient
) -> None:
    http, app = served
    user = fresh_user()
    credici.add(user, 20)
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: http.get("/echo", headers={"X-User": user}), range(50)))
    assert Counter(r.status_code for r in responses) == {200: 20, 402: 30}
    assert app.calls["/echo"] == 20 and credici.get_balance(user) == 0
    remaining = sorted(int(r.headers["x-credits-remaining"]) for r in responses if r.is_success)
    assert remaining == list(range(20))


def test_storage_down_fails_closed_by_default(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="credici_redis.wsgi"),
        metered_server(DOWN_URL, namespace) as (http, app),
    ):
        r = http.get("/echo", headers={"X-User": "alice"})
        assert (r.status_code, r.json()) == (503, {"error": "credits_unavailable"})
        assert app.calls["/echo"] == 0 and credit_headers(r) == {}
    (record,) = [r for r in caplog.records if r.name == "credici_redis.wsgi"]
    assert record.levelno == logging.ERROR and "GET /echo" in record.getMessage()


def test_storage_down_fails_open_when_asked(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="credici_redis.wsgi"),
        metered_server(DOWN_URL, namespace, on_storage_error="open") as (http, app),
    ):
        r = http.get("/echo", headers={"X-User": "alice"})
        assert (r.status_code, r.json()) == (200, {"path": "/echo", "charged": None})
        assert app.calls["/echo"] == 1 and credit_headers(r) == {}
    (record,) = [r for r in caplog.records if r.name == "credici_redis.wsgi"]
    assert record.levelno == logging.WARNING and "without charging 1" in record.getMessage()


def test_bad_configuration_is_refused_at_once() -> None:
    with CrediciClient.from_url("memory://") as client:
        for bad, error in ((-1, ValueError), (True, TypeError), ("1", TypeError)):
            with pytest.raises(error):
                CreditMiddleware(App(), client=client, user=user_from_header("X"), cost=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="on_storage_error"):
            CreditMiddleware(
                App(),
                client=client,
                user=user_from_header("X"),
                on_storage_error="ajar",  # type: ignore[arg-type]
            )
