"""credici_redis.asgi metered by usage, where ASGI differs: the example app, route marks, async
`reserve`. What both middlewares promise is in test_contract.py."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis.asgi import (
    CreditMiddleware,
    Meter,
    current_meter,
    meter,
    priced,
    report_usage,
    user_from_header,
)
from tests.conftest import REDIS_URL
from tests.web.conftest import credit_headers, fresh_user, load_example, serve_asgi, settled

example = load_example()
RESERVE = 10


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
