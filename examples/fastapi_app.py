"""A FastAPI app selling API calls by credits (walkthrough: examples/README.md).

    uvicorn --factory --app-dir examples fastapi_app:create_app

- ``POST /signup``: 1,000 credits a month, renewing by itself (a free route);
- ``POST /topup`` ``{"amount": N}``: N more credits, never expiring (free; in a real app this is
  the payment provider's webhook, not something a caller can do for itself);
- ``GET /v1/echo?text=...``: 1 credit, the middleware's default price;
- ``POST /v1/summarize``: 5 credits (``Depends(charge(5))``), shows the charge in its answer;
- ``GET /balance``: the balance and the current cycle (free).

The caller is the ``X-User`` header: a stand-in for real authentication (an API key looked up
by an async ``user(scope)`` function, a JWT...), fine for a demo, never for production.

Settings from the environment: ``CREDICI_REDIS_URL`` (default ``memory://``, the embedded
store), ``CREDICI_NAMESPACE`` (default ``credici-example``), ``CREDICI_ON_STORAGE_ERROR``
(``closed``, the default, or ``open``), ``CREDICI_TIMEOUT`` (seconds, default 0.5).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, cast

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from credici_redis import AsyncCrediciClient, InvalidInputError, StorageUnavailableError
from credici_redis.asgi import (
    Charge,
    CreditMiddleware,
    StorageErrorPolicy,
    charge,
    priced,
    user_from_header,
)

MONTHLY_CREDITS = 1000


class TopUp(BaseModel):
    amount: int = Field(gt=0, le=1_000_000)


class Text(BaseModel):
    text: str = Field(max_length=10_000)


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
) -> FastAPI:
    """The app, with its settings from the arguments, else the environment."""
    policy = on_storage_error or os.environ.get("CREDICI_ON_STORAGE_ERROR", "closed")
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

    return app
