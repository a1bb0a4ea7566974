"""A FastAPI app selling API calls by credits (walkthrough: examples/README.md).

    uvicorn --factory --app-dir examples fastapi_app:create_app

- ``POST /signup``: 1,000 credits a month, renewing by itself (a free route);
- ``POST /topup`` ``{"amount": N}``: N more credits, never expiring (free; in a real app this is
  the payment provider's webhook, not something a caller can do for itself);
- ``GET /v1/echo?text=...``: 1 credit, the middleware's default price;
- ``POST /v1/summarize``: 5 credits (``Depends(charge(5))``), shows the charge in its answer;
- ``POST /v1/generate`` ``{"prompt": ..., "max_tokens": N}``: a fake LLM streaming its answer one
  token a line (NDJSON), 1 credit per token, metered by usage (``Depends(meter(200))``): 200
  credits are reserved before it runs, the tokens streamed are captured after, the rest comes
  back;
- ``GET /balance``: the balance and the current cycle (free).

The caller is the ``X-User`` header: a stand-in for real authentication (an API key looked up
by an async ``user(scope)`` function, a JWT...), fine for a demo, never for production.

Settings from the environment: ``CREDICI_REDIS_URL`` (default ``memory://``, the embedded
store), ``CREDICI_NAMESPACE`` (default ``credici-example``), ``CREDICI_ON_STORAGE_ERROR``
(``closed``, the default, or ``open``), ``CREDICI_TIMEOUT`` (seconds, default 0.5),
``CREDICI_TOKEN_DELAY`` (seconds between two generated tokens, default 0.02).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, cast

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from credici_redis import AsyncCrediciClient, InvalidInputError, StorageUnavailableError
from credici_redis.asgi import (
    Charge,
    CreditMiddleware,
    Meter,
    StorageErrorPolicy,
    charge,
    meter,
    priced,
    user_from_header,
)

MONTHLY_CREDITS = 1000
MAX_TOKENS = 200
"""The longest answer of /v1/generate, in tokens: what it reserves (1 credit per token)."""


class TopUp(BaseModel):
    amount: int = Field(gt=0, le=1_000_000)


class Text(BaseModel):
    text: str = Field(max_length=10_000)


class Prompt(BaseModel):
    prompt: str = Field(min_length=1, max_length=10_000)
    max_tokens: int = Field(default=50, ge=1, le=MAX_TOKENS)


def fake_model(prompt: str, max_tokens: int) -> list[str]:
    """The "model": it answers with the prompt's words, at most `max_tokens` of them."""
    return prompt.split()[:max_tokens]


def paid(charged: Charge | None) -> Charge:
    """The charge of a metered route; no charge means no X-User header was sent."""
    if charged is None:
        raise HTTPException(401, "send an X-User header")
    return charged


def caller(request: Request) -> str:
    """The X-User of a free route."""
    user = request.headers.get("x-user", "").strip()
    if not user:
        raise HTTPException(401, "send an X-User header")
    return user


def create_app(
    redis_url: str | None = None,
    namespace: str | None = None,
    *,
    on_storage_error: StorageErrorPolicy | None = None,
    timeout: float | None = None,
    token_delay: float | None = None,
) -> FastAPI:
    """The app, with its settings from the arguments, else the environment."""
    policy = on_storage_error or os.environ.get("CREDICI_ON_STORAGE_ERROR", "closed")
    delay = (
        token_delay
        if token_delay is not None
        else float(os.environ.get("CREDICI_TOKEN_DELAY", "0.02"))
    )
    credici = AsyncCrediciClient.from_url(
        redis_url or os.environ.get("CREDICI_REDIS_URL", "memory://"),
        namespace=namespace or os.environ.get("CREDICI_NAMESPACE", "credici-example"),
        timeout=timeout or float(os.environ.get("CREDICI_TIMEOUT", "0.5")),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await credici.aclose()

    app = FastAPI(title="credits example", lifespan=lifespan)
    # The five lines are the two above (client) and this one: every request with an X-User
    # header costs 1 credit unless its route says otherwise.
    app.add_middleware(
        CreditMiddleware,
        client=credici,
        user=user_from_header("X-User"),
        cost=1,
        on_storage_error=cast(StorageErrorPolicy, policy),  # the middleware checks it
    )

    @app.exception_handler(StorageUnavailableError)
    async def storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "credits_unavailable"}, status_code=503)

    @app.exception_handler(InvalidInputError)
    async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": "invalid_request", "detail": str(exc)}, status_code=400)

    @app.post("/signup")
    @priced(0)
    async def signup(user: Annotated[str, Depends(caller)]) -> dict[str, object]:
        # The idempotency key makes two racing signups start one cycle, not two.
        if await credici.get_cycle(user) is not None:
            raise HTTPException(409, "already signed up")
        cycle = await credici.start_cycle(
            MONTHLY_CREDITS, "month", user, renew=True, idempotency_key="signup"
        )
        return {"user": user, "credits": cycle.granted, "renews_at": cycle.ends_at.isoformat()}

    @app.post("/topup")
    @priced(0)
    async def topup(
        body: TopUp, request: Request, user: Annotated[str, Depends(caller)]
    ) -> dict[str, object]:
        key = request.headers.get("idempotency-key")
        added = await credici.add(
            user, body.amount, idempotency_key=None if key is None else f"topup:{key}"
        )
        return {"user": user, "added": body.amount, "balance": added.balance_after}

    @app.get("/balance")
    @priced(0)
    async def balance(user: Annotated[str, Depends(caller)]) -> dict[str, object]:
        cycle = await credici.get_cycle(user)
        return {
            "user": user,
            "balance": await credici.get_balance(user),
            "cycle": None
            if cycle is None
            else {
                "status": cycle.status,
                "granted": cycle.granted,
                "used": cycle.used,
                "ends_at": cycle.ends_at.isoformat(),
            },
        }

    @app.get("/v1/echo")
    async def echo(
        text: str, charged: Annotated[Charge | None, Depends(charge())]
    ) -> dict[str, str]:
        paid(charged)
        return {"echo": text}

    @app.post("/v1/summarize")
    async def summarize(
        body: Text, charged: Annotated[Charge | None, Depends(charge(5))]
    ) -> dict[str, object]:
        spent = paid(charged)
        words = body.text.split()
        return {
            "summary": " ".join(words[:12]) + (" ..." if len(words) > 12 else ""),
            "cost": spent.cost,
            "remaining": spent.remaining,
        }

    @app.post("/v1/generate")
    async def generate(
        body: Prompt, usage: Annotated[Meter, Depends(meter(MAX_TOKENS))]
    ) -> StreamingResponse:
        # 200 credits are reserved before this runs (402 if the user has fewer); each token
        # streamed is reported, and after the response the middleware captures what was
        # reported and gives the rest back. If the client hangs up, StreamingResponse stops
        # this generator and the tokens reported so far are charged.
        if usage.user_id is None:
            raise HTTPException(401, "send an X-User header")
        usage.report(0)  # from here on, a response with no token costs nothing

        async def tokens() -> AsyncIterator[str]:
            for token in fake_model(body.prompt, min(body.max_tokens, usage.left)):
                await asyncio.sleep(delay)  # the model "thinking"
                usage.add(1)
                yield json.dumps({"token": token}) + "\n"
            done = {"done": True, "tokens": usage.used or 0, "reserved": usage.reserved}
            yield json.dumps(done) + "\n"

        return StreamingResponse(tokens(), media_type="application/x-ndjson")

    return app
