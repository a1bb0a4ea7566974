"""credici_redis.asgi metered by usage (reserve, then capture or release) under a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.asgi import (
    CreditMiddleware,
    Meter,
    current_meter,
    meter,
    metered,
    priced,
    report_usage,
    user_from_header,
)
from tests.conftest import REDIS_URL
from tests.web.conftest import DOWN_URL, eventually, load_example, serve_asgi

example = load_example()
RESERVE = 10


def fresh_user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def credit_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-credits-")}


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


class Served:
    """A metered FastAPI app under uvicorn: the client, the meters its handlers saw, calls."""

    http: httpx.Client

    def __init__(self) -> None:
        self.meters: list[Meter] = []
        self.calls: Counter[str] = Counter()


def metered_app(namespace: str, url: str = REDIS_URL, **options: Any) -> tuple[FastAPI, Served]:
    client = AsyncCrediciClient.from_url(url, namespace=namespace, timeout=0.5)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(CreditMiddleware, client=client, user=user_from_header("X-User"), **options)
    served = Served()

    def seen(request: Request, name: str) -> Meter:
        usage = current_meter(request)
        assert usage is not None
        served.meters.append(usage)
        served.calls[name] += 1
        return usage

    async def chunks(usage: Meter, count: int, delay: float, fail_after: int | None) -> Any:
        for i in range(count):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("the model crashed")
            usage.add(1)
            yield f"{i}\n"
            await asyncio.sleep(delay)

    @app.get("/stream")
    @metered(RESERVE)
    async def stream(
        request: Request, n: int = 3, delay: float = 0.0, fail_after: int | None = None
    ) -> StreamingResponse:
        usage = seen(request, "stream")
        usage.report(0)
        return StreamingResponse(chunks(usage, n, delay, fail_after))

    @app.get("/status/{code}")
    @metered(RESERVE)
    async def status(request: Request, code: int, used: int | None = None) -> JSONResponse:
        seen(request, "status")
        if used is not None:
            report_usage(request, used)
        return JSONResponse({"code": code}, status_code=code)

    @app.get("/raise")
    @metered(RESERVE)
    async def fail(request: Request) -> None:
        seen(request, "raise").add(2)
        raise RuntimeError("the handler failed")

    @app.get("/flaky")
    async def flaky(
        request: Request, usage: Annotated[Meter, Depends(meter(RESERVE))]
    ) -> dict[str, int]:
        seen(request, "flaky")
        usage.add(4)
        if served.calls["flaky"] == 1:
            raise HTTPException(503, "try again")
        return {"used": 4}

    @app.get("/fixed")
    @priced(2)
    async def fixed(request: Request) -> dict[str, bool]:
        return {"metered": current_meter(request) is not None}

    return app, served


@contextlib.contextmanager
def serve(namespace: str, url: str = REDIS_URL, **options: Any) -> Iterator[Served]:
    app, served = metered_app(namespace, url, **options)
    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        served.http = http
        yield served


@pytest.fixture
def served(namespace: str) -> Iterator[Served]:
    with serve(namespace) as server:
        yield server


def test_the_example_streams_tokens_and_is_charged_exactly_their_number(
    namespace: str, credici: CrediciClient
) -> None:
    app = example.create_app(REDIS_URL, namespace, token_delay=0.0)
    user = fresh_user()
    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        http.post("/signup", headers={"X-User": user})
        words = "one two three four five six seven"
        prompt = {"prompt": words, "max_tokens": 50}
        with http.stream("POST", "/v1/generate", json=prompt, headers={"X-User": user}) as r:
            assert r.status_code == 200
            assert credit_headers(r) == {"x-credits-reserved": str(example.MAX_TOKENS)}
            lines = [json.loads(line) for line in r.iter_lines() if line]
        assert [line["token"] for line in lines[:-1]] == words.split()
        assert lines[-1] == {"done": True, "tokens": 7, "reserved": example.MAX_TOKENS}
        settled(credici, user, 1000 - 7)

        # max_tokens caps the answer, and so the charge.
        short = {"prompt": "a b c d e", "max_tokens": 2}
        assert len(http.post("/v1/generate", json=short, headers={"X-User": user}).text) > 0
        settled(credici, user, 1000 - 7 - 2)
        assert credici.get_cycle(user).used == 9  # type: ignore[union-attr]

        # Fewer credits than the reservation: 402, the model never runs.
        poor = fresh_user()
        credici.add(poor, 150)
        r = http.post("/v1/generate", json=short, headers={"X-User": poor})
        assert r.status_code == 402
        assert r.json() == {"error": "insufficient_credits", "required": 200, "available": 150}
        assert credit_headers(r) == {"x-credits-remaining": "150", "x-credits-reserved": "200"}
        assert http.post("/v1/generate", json=short).status_code == 401  # no user: not metered

    reserve, capture = [t for t in reversed(credici.get_all_user_transactions(user))][1:3]
    assert (reserve.kind, reserve.amount, reserve.metadata) == (
        "reserve",
        -200,
        {"method": "POST", "path": "/v1/generate"},
    )
    assert (capture.kind, capture.captured, capture.amount) == ("capture", 7, 193)
    assert capture.hold_id == reserve.hold_id and credici.audit(user).ok


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
        ("/status/503?used=3", 0),  # 5xx: released whatever was reported
        ("/stream?n=5&fail_after=2", 0),  # exception mid-stream: released
        ("/status/200?used=25", RESERVE),  # over the reservation: the reservation, logged
    ]
    with caplog.at_level(logging.WARNING, logger="credici_redis.asgi"):
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
            settled(credici, user, 100 - charged)
            assert charged_by(served.meters[-1]) == charged, path
            expected: list[tuple[str, int, int | None]] = [("reserve", -RESERVE, None)]
            if charged:
                expected.append(("capture", RESERVE - charged, charged))
            else:
                expected.append(("release", RESERVE, None))
            assert holds(credici, user) == expected, path

        # An exception before the response: the client gets a 500, the hold is released.
        user = fresh_user()
        credici.add(user, 100)
        assert http.get("/raise", headers={"X-User": user}).status_code == 500
        settled(credici, user, 100)
    (overuse,) = [r for r in caplog.records if "more than the" in r.getMessage()]
    assert "reported 25 credits used, more than the 10 reserved" in overuse.getMessage()


@pytest.mark.parametrize("on_disconnect", ["capture", "release"])
def test_a_client_leaving_mid_stream_pays_what_was_reported_or_nothing(
    namespace: str, credici: CrediciClient, on_disconnect: str
) -> None:
    user = fresh_user()
    credici.add(user, 100)
    with serve(namespace, on_disconnect=on_disconnect) as served:
        with served.http.stream(
            "GET", "/stream", params={"n": 1000, "delay": 0.01}, headers={"X-User": user}
        ) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(3)] == ["0", "1", "2"]
        # The client hung up; StreamingResponse sees it and stops the generator.
        usage = served.meters[-1]
        charged_by(usage)
    assert usage.used is not None and 3 <= usage.used < RESERVE
    expected = usage.used if on_disconnect == "capture" else 0
    assert usage.charged == expected
    settled(credici, user, 100 - expected)


async def test_concurrent_streams_of_one_user_never_overspend(
    namespace: str, credici: CrediciClient
) -> None:
    # Two servers, 12 streams at once, each reserving 10 and using 6, on 40 credits.
    user = fresh_user()
    credici.add(user, 40)
    with serve(namespace) as one, serve(namespace) as two:
        bases = [str(one.http.base_url), str(two.http.base_url)]
        async with httpx.AsyncClient(timeout=30) as http:
            responses = await asyncio.gather(
                *(
                    http.get(
                        f"{bases[i % 2]}/stream",
                        params={"n": 6, "delay": 0.02},
                        headers={"X-User": user},
                    )
                    for i in range(12)
                )
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
    assert first.text == retry.text and served.calls["stream"] == 2  # the handler ran again
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
    assert served.calls["status"] == 0

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

    # A key whose every attempt fails chains at most MAX_RESERVATIONS holds, then reserves
    # without a key (each attempt still has a hold of its own: nothing is served unreserved).
    headers = {"X-User": user, "Idempotency-Key": "always-503"}
    with caplog.at_level(logging.WARNING, logger="credici_redis.asgi"):
        for attempt in range(1, 8):
            assert http.get("/status/503", headers=headers).status_code == 503
            assert served.meters[-1].billed
            settled(credici, user, 92)
            exhausted = [r for r in caplog.records if "were all released" in r.getMessage()]
            assert len(exhausted) == max(attempt - 5, 0)
    assert credici.audit(user).ok


async def test_concurrent_duplicates_share_one_hold(namespace: str, credici: CrediciClient) -> None:
    user = fresh_user()
    credici.add(user, 100)
    headers = {"X-User": user, "Idempotency-Key": "dup"}
    with serve(namespace) as served:
        async with httpx.AsyncClient(base_url=str(served.http.base_url), timeout=10) as http:
            responses = await asyncio.gather(
                *(
                    http.get("/stream", params={"n": 5, "delay": 0.02}, headers=headers)
                    for _ in "ab"
                )
            )
        assert [r.status_code for r in responses] == [200, 200]
        settled(credici, user, 95)
    assert [kind for kind, _, _ in holds(credici, user)] == ["reserve", "capture"]


def test_storage_down_fails_closed_or_open_for_reservations(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="credici_redis.asgi"):
        with serve(namespace, url=DOWN_URL) as served:
            r = served.http.get("/stream", headers={"X-User": "alice"})
            assert (r.status_code, r.json()) == (503, {"error": "credits_unavailable"})
            assert served.calls["stream"] == 0
        with serve(namespace, url=DOWN_URL, on_storage_error="open") as served:
            r = served.http.get("/stream", params={"n": 2}, headers={"X-User": "alice"})
            assert (r.status_code, r.text, credit_headers(r)) == (200, "0\n1\n", {})
            (usage,) = served.meters
            assert (usage.user_id, usage.billed, usage.used, usage.charged) == (
                "alice",
                False,
                2,
                None,
            )
    error, warning = [r for r in caplog.records if r.name == "credici_redis.asgi"]
    assert error.levelno == logging.ERROR and "refusing GET /stream" in error.getMessage()
    assert "without reserving 10 credits" in warning.getMessage()


def test_a_hold_that_expires_before_the_end_is_not_charged(
    namespace: str, credici: CrediciClient, caplog: pytest.LogCaptureFixture
) -> None:
    user = fresh_user()
    credici.add(user, 100)
    with (
        caplog.at_level(logging.WARNING, logger="credici_redis.asgi"),
        serve(namespace, hold_ttl=timedelta(milliseconds=200)) as served,
    ):
        r = served.http.get("/stream", params={"n": 2, "delay": 0.2}, headers={"X-User": user})
        assert r.status_code == 200
        settled(credici, user, 100)
        records = eventually(
            lambda: [r for r in caplog.records if r.name == "credici_redis.asgi"], bool
        )
        assert served.meters[-1].charged is None
    (record,) = records
    assert "already expired" in record.getMessage() and "not charged" in record.getMessage()


def test_middleware_reserve_in_a_plain_starlette_app(
    namespace: str, credici: CrediciClient
) -> None:
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)

    async def generate(request: Request) -> PlainTextResponse:
        assert report_usage(request, 3)
        return PlainTextResponse("ok")

    async def fixed(request: Request) -> PlainTextResponse:
        assert current_meter(request) is None and not report_usage(request, 3)
        return PlainTextResponse("fixed")

    @priced(5)  # a function of its own: @priced marks the function
    async def dear(request: Request) -> PlainTextResponse:
        return await fixed(request)

    async def reserve(scope: Any) -> int | None:
        return 20 if scope["path"].startswith("/gen") else None  # None: the fixed cost

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(
        routes=[Route("/gen", generate), Route("/fixed", fixed), Route("/dear", dear)],
        lifespan=lifespan,
    )
    wrapped = CreditMiddleware(
        app, client=client, user=user_from_header("X-User"), cost=2, reserve=reserve
    )
    user = fresh_user()
    credici.add(user, 100)
    with serve_asgi(wrapped) as base, httpx.Client(base_url=base) as http:
        r = http.get("/gen", headers={"X-User": user})
        assert (r.text, credit_headers(r)) == ("ok", {"x-credits-reserved": "20"})
        settled(credici, user, 97)
        r = http.get("/fixed", headers={"X-User": user})
        assert credit_headers(r) == {"x-credits-remaining": "95", "x-credits-cost": "2"}
        r = http.get("/dear", headers={"X-User": user})  # @priced wins over the reserve
        assert credit_headers(r) == {"x-credits-remaining": "90", "x-credits-cost": "5"}


async def test_meter_misconfiguration_fails_loudly() -> None:
    client = AsyncCrediciClient.from_url("memory://")
    app = FastAPI()
    app.add_middleware(CreditMiddleware, client=client, user=user_from_header("X-User"))

    @app.get("/no-amount")
    async def no_amount(usage: Annotated[Meter, Depends(meter())]) -> int:
        return usage.reserved

    @app.get("/fixed-wins")
    @priced(3)
    async def fixed_wins(usage: Annotated[Meter, Depends(meter(5))]) -> int:
        return usage.reserved

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        with pytest.raises(RuntimeError, match="no reservation is known"):
            await http.get("/no-amount", headers={"X-User": "alice"})
        with pytest.raises(RuntimeError, match="fixed price"):
            await http.get("/fixed-wins")

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        pass

    user = user_from_header("X")
    with pytest.raises(ValueError, match="on_disconnect"):
        CreditMiddleware(bare, client=client, user=user, on_disconnect="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        CreditMiddleware(bare, client=client, user=user, hold_ttl=timedelta(0))
    with pytest.raises(ValueError, match=">= 0"):
        CreditMiddleware(bare, client=client, user=user, reserve=-1)
    usage = Meter("alice", 10)
    with pytest.raises(ValueError, match=">= 0"):
        usage.add(-1)
    with pytest.raises(TypeError):
        usage.report(1.5)  # type: ignore[arg-type]
    assert (usage.add(4), usage.add(3), usage.left) == (4, 7, 3)
    usage.report(12)
    assert (usage.used, usage.left, usage.billed) == (12, 0, False)
    await client.aclose()
