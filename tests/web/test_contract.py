"""The promises both middlewares keep, checked on both servers: each test runs once with the
contract app (`tests/web/contract.py`) under a real uvicorn (ASGI) and once under a real threaded
wsgiref (WSGI), driven over HTTP with httpx. What only one protocol has (routing, ASGI
disconnects, a late WSGI start_response, the example app) is in test_asgi*.py / test_wsgi*.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import httpx
import pytest

from credici_redis import CrediciClient
from credici_redis._web.metering import MAX_RESERVATIONS
from tests.conftest import REDIS_URL
from tests.web.conftest import (
    DOWN_URL,
    charged_by,
    credit_headers,
    eventually,
    fresh_user,
    holds,
    settled,
    subtracts,
)
from tests.web.contract import KINDS, RESERVE, Served, serve_contract

Serve = Callable[..., AbstractContextManager[Served]]


@pytest.fixture(params=KINDS)
def serve(request: pytest.FixtureRequest, namespace: str) -> Serve:
    """``serve(url=REDIS_URL, **options)``: the contract app of this test's server, with the
    middleware's `options` (and the client's `timeout`), on the test's namespace."""
    kind: str = request.param

    def start(url: str = REDIS_URL, **options: Any) -> AbstractContextManager[Served]:
        return serve_contract(kind, url, namespace, **options)

    return start


@pytest.fixture
def served(serve: Serve) -> Iterator[Served]:
    with serve() as server:
        yield server


async def get_all(servers: list[Served], path: str, count: int, **kwargs: Any) -> list[Any]:
    """`count` GETs of `path` at once, spread over `servers`."""
    bases = [str(server.http.base_url) for server in servers]
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(
            *(http.get(f"{bases[i % len(bases)]}{path}", **kwargs) for i in range(count))
        )


# Fixed prices: one charge before the handler runs.


def test_requests_are_charged_their_price_before_the_app_runs(
    served: Served, credici: CrediciClient
) -> None:
    http = served.http
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

    assert served.calls == {"/echo": 2, "/expensive": 1, "/free": 1}
    assert credici.get_balance(user) == 4
    assert [t.metadata for t in subtracts(credici, user)] == [
        {"method": "POST", "path": "/expensive"},
        {"method": "GET", "path": "/echo"},
    ]


def test_out_of_credits_is_402_and_the_handler_never_runs(
    served: Served, credici: CrediciClient
) -> None:
    http, calls = served.http, served.calls
    user = fresh_user()
    credici.add(user, 3)

    r = http.get("/expensive", headers={"X-User": user})
    assert r.status_code == 402
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "insufficient_credits", "required": 5, "available": 3}
    assert credit_headers(r) == {"x-credits-remaining": "3", "x-credits-cost": "5"}
    assert calls["/expensive"] == 0
    assert credici.get_balance(user) == 3 and subtracts(credici, user) == []

    credici.add(user, 2)
    r = http.get("/expensive", headers={"X-User": user})
    assert r.status_code == 200 and calls["/expensive"] == 1
    assert credit_headers(r) == {"x-credits-remaining": "0", "x-credits-cost": "5"}

    r = http.get("/fixed", headers={"X-User": user})  # another price (ASGI: a charge() route)
    assert r.status_code == 402 and r.json()["required"] == 2
    assert calls["/fixed"] == 0 and credici.get_balance(user) == 0


def test_a_retried_request_is_charged_once(served: Served, credici: CrediciClient) -> None:
    http, calls = served.http, served.calls
    user = fresh_user()
    credici.add(user, 100)
    headers = {"X-User": user, "Idempotency-Key": "req-1"}

    first = http.post("/expensive", headers=headers)
    retry = http.post("/expensive", headers=headers)
    assert first.status_code == retry.status_code == 200
    assert (
        credit_headers(first)
        == credit_headers(retry)
        == {"x-credits-remaining": "95", "x-credits-cost": "5"}
    )
    assert calls["/expensive"] == 2  # the charge is idempotent, the handler is not replayed
    (charged,) = subtracts(credici, user)
    assert charged.idempotency_key == "http:req-1"
    assert credici.get_balance(user) == 95

    # The same key for another request of this user: 422, nothing charged, handler not run.
    r = http.get("/echo", headers=headers)
    assert (r.status_code, r.json()) == (
        422,
        {"error": "idempotency_conflict", "idempotency_key": "req-1"},
    )
    # Keys are per user: another user may use the same one.
    other = fresh_user()
    credici.add(other, 10)
    assert http.post("/expensive", headers={**headers, "X-User": other}).status_code == 200

    for bad in ("", "k" * 252, "k" * 300):
        r = http.get("/echo", headers={**headers, "Idempotency-Key": bad})
        assert (r.status_code, r.json()["error"]) == (400, "invalid_idempotency_key")
    assert calls["/echo"] == 0 and calls["/expensive"] == 3
    assert credici.get_balance(user) == 95


def test_a_refused_request_does_not_use_up_its_key(served: Served, credici: CrediciClient) -> None:
    http = served.http
    user = fresh_user()
    headers = {"X-User": user, "Idempotency-Key": "after-topup"}
    assert http.get("/expensive", headers=headers).status_code == 402
    credici.add(user, 5)
    r = http.get("/expensive", headers=headers)
    assert r.status_code == 200 and r.headers["x-credits-remaining"] == "0"


async def test_concurrent_requests_of_one_user_never_overspend(
    serve: Serve, credici: CrediciClient
) -> None:
    # Two servers (two clients) and 50 requests at once on credits for 20.
    user = fresh_user()
    credici.add(user, 20)
    # The client fails fast (0.5 s) by default; 25 connections opened at once on a loaded CI
    # machine can take longer, and a 503 would hide what this test is about.
    with serve(timeout=10.0) as one, serve(timeout=10.0) as two:
        responses = await get_all([one, two], "/echo", 50, headers={"X-User": user})
        calls = one.calls["/echo"] + two.calls["/echo"]
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {200: 20, 402: 30}
    assert calls == 20 and credici.get_balance(user) == 0
    assert len(subtracts(credici, user)) == 20
    remaining = sorted(int(r.headers["x-credits-remaining"]) for r in responses if r.is_success)
    assert remaining == list(range(20))  # every balance from 19 down to 0, each seen once
    assert all(r.json()["available"] == 0 for r in responses if r.status_code == 402)


def test_storage_down_fails_closed_by_default(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(DOWN_URL) as served, caplog.at_level(logging.WARNING, logger=served.logger):
        r = served.http.get("/echo", headers={"X-User": "alice"})
        assert (r.status_code, r.json()) == (503, {"error": "credits_unavailable"})
        assert served.calls["/echo"] == 0 and credit_headers(r) == {}
    (record,) = [r for r in caplog.records if r.name == served.logger]
    assert record.levelno == logging.ERROR and "GET /echo" in record.getMessage()


def test_storage_down_fails_open_when_asked(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    with (
        serve(DOWN_URL, on_storage_error="open") as served,
        caplog.at_level(logging.WARNING, logger=served.logger),
    ):
        r = served.http.get("/echo", headers={"X-User": "alice"})
        assert (r.status_code, r.json()) == (200, {"path": "/echo", "charged": None})
        assert served.calls["/echo"] == 1 and credit_headers(r) == {}
    (record,) = [r for r in caplog.records if r.name == served.logger]
    assert record.levelno == logging.WARNING
    assert "without charging 1 credits" in record.getMessage()


# Metered by usage: reserve before the handler runs, capture or release after the response.


def test_a_stream_is_charged_what_it_reported(served: Served, credici: CrediciClient) -> None:
    http = served.http
    user = fresh_user()
    credici.add(user, 100)
    r = http.get("/stream", params={"n": 4}, headers={"X-User": user})
    assert (r.text, credit_headers(r)) == ("0\n1\n2\n3\n", {"x-credits-reserved": "10"})
    settled(credici, user, 96)
    usage = served.meters[-1]
    assert charged_by(usage) == 4
    assert usage.transaction is not None and usage.transaction.captured == 4
    capture, reserve = credici.get_all_user_transactions(user)[:2]
    assert (reserve.amount, reserve.metadata) == (-10, {"method": "GET", "path": "/stream"})
    assert (capture.captured, capture.amount) == (4, 6)

    # A route not metered by usage: its fixed price, as before.
    r = http.get("/fixed", headers={"X-User": user})
    assert r.json()["charged"] == 2 and credit_headers(r)["x-credits-cost"] == "2"
    # Not enough credits for the reservation: 402, the app never runs.
    poor = fresh_user()
    credici.add(poor, 9)
    r = http.get("/stream", headers={"X-User": poor})
    assert r.json() == {"error": "insufficient_credits", "required": 10, "available": 9}
    assert credit_headers(r) == {"x-credits-remaining": "9", "x-credits-reserved": "10"}
    assert served.calls["/stream"] == 1
    # No user: not metered, the meter is there to report to anyway.
    assert http.get("/stream", params={"n": 2}).text == "0\n1\n"
    last = served.meters[-1]
    assert (last.user_id, last.used, last.billed) == (None, 2, False)


def test_what_is_captured_or_released_after_the_response(
    served: Served, credici: CrediciClient, caplog: pytest.LogCaptureFixture
) -> None:
    http = served.http
    cases: list[tuple[str, int]] = [  # (path, credits charged)
        ("/stream?n=4", 4),  # usage reported: captured, the rest comes back
        ("/stream?n=0", 0),  # reported 0: all released
        ("/status/200", RESERVE),  # 2xx with nothing reported: the whole reservation
        ("/status/404", 0),  # 4xx with nothing reported: nothing
        ("/status/409?used=3", 3),  # 4xx with usage: the usage
        ("/status/500?used=3", 0),  # 5xx: released whatever was reported
        ("/status/503?used=3", 0),
        ("/stream?n=5&fail_after=2", 0),  # exception mid-stream: released
        ("/status/200?used=11", RESERVE),  # over the reservation: the reservation, logged
        ("/status/200?used=25", RESERVE),
    ]

    def check(path: str, charged: int, user: str) -> None:
        settled(credici, user, 100 - charged)
        assert charged_by(served.meters[-1]) == charged, path
        expected: list[tuple[str, int, int | None]] = [("reserve", -RESERVE, None)]
        if charged:
            expected.append(("capture", RESERVE - charged, charged))
        else:
            expected.append(("release", RESERVE, None))
        assert holds(credici, user) == expected, path
        kinds = [t.kind for t in credici.get_all_user_transactions(user)]
        assert kinds[:2] == ["capture" if charged else "release", "reserve"], path

    with caplog.at_level(logging.WARNING, logger=served.logger):
        for path, charged in cases:
            user = fresh_user()
            credici.add(user, 100)
            try:
                r = http.get(path, headers={"X-User": user})
            except httpx.RemoteProtocolError:  # the stream broke off: the server closed it
                assert "fail_after" in path
            else:
                assert r.headers["x-credits-reserved"] == str(RESERVE), path
                assert "x-credits-cost" not in r.headers
            check(path, charged, user)

        # An exception before the response: the client gets a 500, the hold is released.
        user = fresh_user()
        credici.add(user, 100)
        assert http.get("/raise", headers={"X-User": user}).status_code == 500
        check("/raise", 0, user)
    overuse = [r.getMessage() for r in caplog.records if "more than the" in r.getMessage()]
    assert len(overuse) == 2
    assert "reported 11 credits used, more than the 10 reserved" in overuse[0]
    assert "reported 25 credits used, more than the 10 reserved" in overuse[1]


@pytest.mark.parametrize("on_disconnect", ["capture", "release"])
def test_a_client_leaving_mid_stream_pays_what_was_reported_or_nothing(
    serve: Serve, credici: CrediciClient, on_disconnect: str
) -> None:
    user = fresh_user()
    credici.add(user, 100)
    with serve(on_disconnect=on_disconnect) as served:
        with served.http.stream(
            "GET", "/stream", params={"n": 1000, "delay": 0.01}, headers={"X-User": user}
        ) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(3)] == ["0", "1", "2"]
        # The client hung up. ASGI: StreamingResponse sees it and stops the generator; WSGI:
        # the server's next writes fail, it closes the response iterable. Either settles.
        usage = served.meters[-1]
        charged_by(usage)
    assert usage.used is not None and 3 <= usage.used < RESERVE
    expected = usage.used if on_disconnect == "capture" else 0
    assert usage.charged == expected
    settled(credici, user, 100 - expected)


async def test_concurrent_streams_of_one_user_never_overspend(
    serve: Serve, credici: CrediciClient
) -> None:
    # Two servers, 12 streams at once, each reserving 10 and using 6, on 40 credits.
    user = fresh_user()
    credici.add(user, 40)
    with serve() as one, serve() as two:
        params = {"n": 6, "delay": 0.02}
        responses = await get_all(
            [one, two], "/stream", 12, params=params, headers={"X-User": user}
        )
    statuses = Counter(r.status_code for r in responses)
    paid = statuses[200]
    assert set(statuses) <= {200, 402} and paid >= 4  # 4 reservations fit at once
    assert all(r.text == "".join(f"{i}\n" for i in range(6)) for r in responses if r.is_success)
    assert paid * 6 <= 40  # what was captured fits in the credits...
    settled(credici, user, 40 - paid * 6)  # ...and is exactly what was used
    assert credici.audit(user).ok


def test_a_retried_request_is_reserved_and_captured_once(
    served: Served, credici: CrediciClient, caplog: pytest.LogCaptureFixture
) -> None:
    http = served.http
    user = fresh_user()
    credici.add(user, 100)
    headers = {"X-User": user, "Idempotency-Key": "gen-1"}

    first = http.get("/stream", params={"n": 4}, headers=headers)
    settled(credici, user, 96)
    retry = http.get("/stream", params={"n": 4}, headers=headers)
    assert first.text == retry.text == "0\n1\n2\n3\n"
    assert served.calls["/stream"] == 2  # the handler ran again
    assert credit_headers(first) == credit_headers(retry) == {"x-credits-reserved": "10"}
    assert served.meters[-1].replayed and served.meters[-1].charged is None
    history = list(reversed(credici.get_all_user_transactions(user)))
    assert [(t.kind, t.idempotency_key) for t in history if t.hold_id] == [
        ("reserve", "http:gen-1"),
        ("capture", "http-capture:" + history[1].hold_id.partition("@")[0]),  # type: ignore[union-attr]
    ]
    assert credici.get_balance(user) == 96

    # The same key for another request of this user: 422, nothing reserved.
    r = http.get("/status/200", headers=headers)
    assert (r.status_code, r.json()["error"]) == (422, "idempotency_conflict")
    assert served.calls["/status"] == 0

    # A first attempt that failed (503) was released: its retry is reserved again, once.
    headers = {"X-User": user, "Idempotency-Key": "flaky-1"}
    assert http.get("/flaky", headers=headers).status_code == 503
    settled(credici, user, 96)
    assert http.get("/flaky", headers=headers).json() == {"used": 4}
    settled(credici, user, 92)
    assert http.get("/flaky", headers=headers).json() == {"used": 4}  # a retry of that success
    settled(credici, user, 92)
    keys = [t.idempotency_key or "" for t in credici.get_all_user_transactions(user)[:4]]
    assert keys[3] == "http:flaky-1" and keys[1].startswith("http-retry:")

    # The same for a stream that failed midway.
    # (The query string is not part of "the same request": method and path are.)
    headers = {"X-User": user, "Idempotency-Key": "fail-1"}
    with contextlib.suppress(httpx.RemoteProtocolError):  # wsgiref may end it as if complete
        http.get("/stream", params={"n": 5, "fail_after": 2}, headers=headers)
    settled(credici, user, 92)
    for _ in range(2):  # the retry, then a retry of that success
        assert http.get("/stream", params={"n": 5}, headers=headers).text == "0\n1\n2\n3\n4\n"
        settled(credici, user, 87)
    assert served.meters[-1].replayed and not served.meters[-2].replayed
    keys = [t.idempotency_key or "" for t in credici.get_all_user_transactions(user)[:4]]
    assert keys[3] == "http:fail-1" and keys[1].startswith("http-retry:")

    # A key whose every attempt fails chains at most MAX_RESERVATIONS holds, then reserves
    # without a key (each attempt still has a hold of its own: nothing is served unreserved).
    headers = {"X-User": user, "Idempotency-Key": "always-503"}
    with caplog.at_level(logging.WARNING, logger=served.logger):
        for attempt in range(1, 8):
            assert http.get("/status/503", headers=headers).status_code == 503
            assert served.meters[-1].billed
            settled(credici, user, 87)
            exhausted = [r for r in caplog.records if "were all released" in r.getMessage()]
            assert len(exhausted) == max(attempt - MAX_RESERVATIONS, 0)
    assert credici.audit(user).ok


async def test_concurrent_duplicates_share_one_hold(serve: Serve, credici: CrediciClient) -> None:
    user = fresh_user()
    credici.add(user, 100)
    headers = {"X-User": user, "Idempotency-Key": "dup"}
    with serve() as served:
        params = {"n": 5, "delay": 0.02}
        responses = await get_all([served], "/stream", 2, params=params, headers=headers)
        assert [r.status_code for r in responses] == [200, 200]
        settled(credici, user, 95)
    assert [kind for kind, _, _ in holds(credici, user)] == ["reserve", "capture"]


def test_storage_down_fails_closed_or_open_for_reservations(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    with serve(DOWN_URL) as served, caplog.at_level(logging.WARNING, logger=served.logger):
        r = served.http.get("/stream", headers={"X-User": "alice"})
        assert (r.status_code, r.json()) == (503, {"error": "credits_unavailable"})
        assert served.calls["/stream"] == 0
    with (
        serve(DOWN_URL, on_storage_error="open") as served,
        caplog.at_level(logging.WARNING, logger=served.logger),
    ):
        r = served.http.get("/stream", params={"n": 2}, headers={"X-User": "alice"})
        assert (r.status_code, r.text, credit_headers(r)) == (200, "0\n1\n", {})
        (usage,) = served.meters
        assert (usage.user_id, usage.billed, usage.used, usage.charged) == (
            "alice",
            False,
            2,
            None,
        )
    error, warning = [r for r in caplog.records if r.name == served.logger]
    assert error.levelno == logging.ERROR and "refusing GET /stream" in error.getMessage()
    assert "without reserving 10 credits" in warning.getMessage()


def test_a_hold_that_expires_before_the_end_is_not_charged(
    serve: Serve, credici: CrediciClient, caplog: pytest.LogCaptureFixture
) -> None:
    user = fresh_user()
    credici.add(user, 100)
    with (
        serve(hold_ttl=timedelta(milliseconds=200)) as served,
        caplog.at_level(logging.WARNING, logger=served.logger),
    ):
        r = served.http.get("/stream", params={"n": 2, "delay": 0.2}, headers={"X-User": user})
        assert r.status_code == 200
        settled(credici, user, 100)
        records = eventually(lambda: [r for r in caplog.records if r.name == served.logger], bool)
        assert served.meters[-1].charged is None
    (record,) = records
    assert "already expired" in record.getMessage() and "not charged" in record.getMessage()
