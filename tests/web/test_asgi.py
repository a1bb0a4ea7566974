"""credici_redis.asgi under a real uvicorn: the example app, per-route prices, plain ASGI apps.
What both middlewares promise (refusals, retries, outages, races) is in test_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.asgi import (
    Charge,
    CreditMiddleware,
    Receive,
    Scope,
    Send,
    charge,
    current_charge,
    priced,
    user_from_header,
)
from tests.conftest import REDIS_URL
from tests.web.conftest import (
    DOWN_URL,
    credit_headers,
    fresh_user,
    load_example,
    serve_asgi,
    subtracts,
)

example = load_example()


@contextlib.contextmanager
def example_server(
    url: str, namespace: str, **options: Any
) -> Iterator[tuple[httpx.Client, Counter[str]]]:
    """The example app, plus a route counting its calls (proof a handler did or did not run)."""
    app: FastAPI = example.create_app(url, namespace, **options)
    calls: Counter[str] = Counter()

    @app.get("/test/counted")
    @priced(7)
    async def counted() -> dict[str, bool]:
        calls["counted"] += 1
        return {"ok": True}

    with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=10) as http:
        yield http, calls


@pytest.fixture
def served(namespace: str) -> Iterator[tuple[httpx.Client, Counter[str]]]:
    with example_server(REDIS_URL, namespace) as server:
        yield server


def test_signup_gives_a_monthly_renewing_cycle_and_free_routes_charge_nothing(
    served: tuple[httpx.Client, Counter[str]], credici: CrediciClient
) -> None:
    http, _ = served
    user = fresh_user()
    r = http.post("/signup", headers={"X-User": user})
    assert r.status_code == 200 and r.json()["credits"] == 1000
    assert credit_headers(r) == {}
    cycle = credici.get_cycle(user)
    assert cycle is not None and (cycle.period, cycle.renew, cycle.amount) == ("month", True, 1000)
    assert http.post("/signup", headers={"X-User": user}).status_code == 409

    r = http.post("/topup", json={"amount": 50}, headers={"X-User": user, "Idempotency-Key": "t1"})
    assert r.json()["balance"] == 1050 and credit_headers(r) == {}
    r = http.post("/topup", json={"amount": 50}, headers={"X-User": user, "Idempotency-Key": "t1"})
    assert r.json()["balance"] == 1050  # the app's own idempotent add, not a charge

    r = http.get("/balance", headers={"X-User": user})
    assert r.json()["balance"] == 1050 and r.json()["cycle"]["granted"] == 1000
    assert credit_headers(r) == {} and subtracts(credici, user) == []


def test_metered_routes_charge_their_price_and_say_so_in_headers(
    served: tuple[httpx.Client, Counter[str]], credici: CrediciClient
) -> None:
    http, _ = served
    user = fresh_user()
    http.post("/signup", headers={"X-User": user})

    r = http.get("/v1/echo", params={"text": "hi"}, headers={"X-User": user})
    assert (r.status_code, r.json()) == (200, {"echo": "hi"})
    assert credit_headers(r) == {"x-credits-remaining": "999", "x-credits-cost": "1"}

    r = http.post("/v1/summarize", json={"text": "one two"}, headers={"X-User": user})
    assert r.json() == {"summary": "one two", "cost": 5, "remaining": 994}
    assert credit_headers(r) == {"x-credits-remaining": "994", "x-credits-cost": "5"}

    assert credici.get_balance(user) == 994
    echo, summarize = reversed(subtracts(credici, user))
    assert (echo.amount, echo.metadata) == (-1, {"method": "GET", "path": "/v1/echo"})
    assert (summarize.amount, summarize.metadata["path"]) == (-5, "/v1/summarize")


def test_requests_without_a_user_are_not_metered(
    served: tuple[httpx.Client, Counter[str]], credici: CrediciClient
) -> None:
    http, calls = served
    r = http.get("/test/counted")
    assert r.status_code == 200 and calls["counted"] == 1 and credit_headers(r) == {}
    r = http.get("/v1/echo", params={"text": "x"})  # the example wants a user on paid routes
    assert r.status_code == 401 and credit_headers(r) == {}
    r = http.get("/v1/echo", params={"text": "x"}, headers={"X-User": ""})
    assert r.status_code == 401


def test_the_example_refuses_what_it_cannot_charge_and_maps_outages(
    served: tuple[httpx.Client, Counter[str]], credici: CrediciClient, namespace: str
) -> None:
    http, _ = served
    user = fresh_user()
    credici.add(user, 3)
    r = http.post("/v1/summarize", json={"text": "x"}, headers={"X-User": user})
    assert r.status_code == 402 and r.json()["required"] == 5
    assert credici.get_balance(user) == 3 and subtracts(credici, user) == []

    # The same key for another request of this user: 422, nothing charged.
    headers = {"X-User": user, "Idempotency-Key": "req-1"}
    assert http.get("/v1/echo", params={"text": "x"}, headers=headers).status_code == 200
    r = http.post("/v1/summarize", json={"text": "x"}, headers=headers)
    assert r.status_code == 422
    assert r.json() == {"error": "idempotency_conflict", "idempotency_key": "req-1"}
    assert credici.get_balance(user) == 2

    # The example's own calls to the client map an outage to 503 as well.
    with example_server(DOWN_URL, namespace, timeout=0.5) as (down, _):
        assert down.get("/balance", headers={"X-User": "alice"}).status_code == 503


def test_route_prices_through_routers_mounts_and_dependencies(
    namespace: str, credici: CrediciClient
) -> None:
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    # The app's price (2) replaces the middleware's default (1).
    app = FastAPI(dependencies=[Depends(charge(2))], lifespan=lifespan)
    app.add_middleware(CreditMiddleware, client=client, user=user_from_header("X-User"))

    @app.get("/app-price")
    async def app_price(charged: Annotated[Charge | None, Depends(charge())]) -> int:
        assert charged is not None
        return charged.cost

    router = APIRouter(dependencies=[Depends(charge(3))])

    @router.get("/router-price/{item}")
    async def router_price(item: int) -> int:
        return item

    @router.get("/route-price", dependencies=[Depends(charge(5))])
    async def route_price() -> int:
        return 5

    @router.get("/endpoint-price", dependencies=[Depends(charge(5))])
    @priced(11)
    async def endpoint_price() -> int:
        return 11

    @router.get("/free")
    @priced(0)
    async def free(charged: Annotated[Charge | None, Depends(charge())]) -> bool:
        return charged is None

    app.include_router(router, prefix="/r")

    async def mounted(request: Request) -> JSONResponse:
        paid = current_charge(request.scope)
        return JSONResponse(None if paid is None else paid.cost)

    app.mount("/m", Starlette(routes=[Route("/priced", priced(13)(mounted))]))

    user = fresh_user()
    credici.add(user, 1000)
    expected = [
        ("/app-price", 2),
        ("/r/router-price/4", 3),
        ("/r/route-price", 5),
        ("/r/endpoint-price", 11),
        ("/m/priced", 13),
        ("/no-such-route", 1),  # no route, no dependency: a 404 pays the middleware's cost
    ]
    with serve_asgi(app) as base, httpx.Client(base_url=base) as http:
        for path, price in expected:
            r = http.get(path, headers={"X-User": user})
            assert r.headers["x-credits-cost"] == str(price), path
        r = http.get("/r/free", headers={"X-User": user})
        assert (r.json(), credit_headers(r)) == (True, {})
        assert http.get("/app-price", headers={"X-User": user}).json() == 2
        assert http.get("/m/priced", headers={"X-User": user}).json() == 13
    assert credici.get_balance(user) == 1000 - sum(p for _, p in expected) - 2 - 13


def test_route_prices_in_a_starlette_app(namespace: str, credici: CrediciClient) -> None:
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    def cost_of() -> Callable[[Request], Awaitable[JSONResponse]]:
        # A new function per route: @priced marks the function itself.
        async def endpoint(request: Request) -> JSONResponse:
            paid = current_charge(request.scope)
            return JSONResponse(None if paid is None else paid.cost)

        return endpoint

    api = Starlette(routes=[Route("/deep/{n:int}", priced(4)(cost_of()))])
    app = Starlette(
        routes=[
            Route("/cheap", cost_of()),
            Route("/dear", priced(lambda scope: 3)(cost_of()), methods=["POST"]),
            Mount("/api", app=api),
        ],
        lifespan=lifespan,
    )
    metered = CreditMiddleware(app, client=client, user=user_from_header("X-User"), cost=2)
    user = fresh_user()
    credici.add(user, 100)
    with serve_asgi(metered) as base, httpx.Client(base_url=base) as http:
        headers = {"X-User": user}
        assert http.get("/cheap", headers=headers).json() == 2
        assert http.post("/dear", headers=headers).json() == 3
        assert http.get("/api/deep/7", headers=headers).json() == 4
        r = http.get("/dear", headers=headers)  # 405: no route runs, the default price
        assert (r.status_code, r.headers["x-credits-cost"]) == (405, "2")
    assert credici.get_balance(user) == 100 - 2 - 3 - 4 - 2


def test_plain_asgi_app_with_async_user_and_cost_and_streaming(
    namespace: str, credici: CrediciClient
) -> None:
    gate, finished = threading.Event(), threading.Event()
    client = AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # A bare ASGI app (no framework) streaming two chunks; the second waits for the client.
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        paid = current_charge(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first,", "more_body": True})
        for _ in range(500):
            if gate.is_set():
                break
            await asyncio.sleep(0.01)
        finished.set()
        body = json.dumps(None if paid is None else paid.cost).encode()
        await send({"type": "http.response.body", "body": body})

    async def user(scope: Scope) -> str | None:
        await asyncio.sleep(0)
        return dict(scope["headers"]).get(b"x-api-key", b"").decode() or None

    async def cost(scope: Scope) -> int:
        return 4 if scope["path"].startswith("/big") else 1

    async def lifespan(receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await client.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    metered = CreditMiddleware(app, client=client, user=user, cost=cost)
    who = fresh_user()
    credici.add(who, 10)
    with serve_asgi(metered) as base, httpx.Client(base_url=base) as http:
        with http.stream("GET", "/big/stream", headers={"X-Api-Key": who}) as r:
            assert credit_headers(r) == {"x-credits-remaining": "6", "x-credits-cost": "4"}
            chunks = r.iter_bytes()
            assert next(chunks) == b"first,"
            assert not finished.is_set()  # the first chunk came while the handler still ran
            gate.set()
            assert b"".join(chunks) == b"4"
        r = http.get("/small", headers={"X-Api-Key": who})
        assert credit_headers(r) == {"x-credits-remaining": "5", "x-credits-cost": "1"}
        assert http.get("/small").content == b"first,null"
    assert credici.get_balance(who) == 5


async def test_charge_without_the_middleware_fails_loudly() -> None:
    app = FastAPI()

    @app.get("/paid", dependencies=[Depends(charge(5))])
    async def paid() -> bool:
        return True

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        with pytest.raises(RuntimeError, match="CreditMiddleware is not installed"):
            await http.get("/paid", headers={"X-User": "alice"})


async def test_bad_configuration_is_refused_at_once() -> None:
    client = AsyncCrediciClient.from_url("memory://")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        pass

    with pytest.raises(ValueError, match="on_storage_error"):
        CreditMiddleware(app, client=client, user=user_from_header("X"), on_storage_error="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        CreditMiddleware(app, client=client, user=user_from_header("X"), cost=-1)
    with pytest.raises(TypeError, match="int"):
        priced(1.5)  # type: ignore[arg-type]
    await client.aclose()
