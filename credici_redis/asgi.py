"""Meter an ASGI app (FastAPI, Starlette, any ASGI 3 app) in credits, charged before the handler.

    from credici_redis import AsyncCrediciClient
    from credici_redis.asgi import CreditMiddleware, user_from_header

    credici = AsyncCrediciClient.from_url("redis://127.0.0.1:6379/0", namespace="api", timeout=0.5)
    app.add_middleware(CreditMiddleware, client=credici, user=user_from_header("X-User"), cost=1)

For each HTTP request the middleware finds the price (the route's, else `cost`) and the user
(`user(scope)`); if either is 0 / None the request passes untouched. Otherwise it charges the
price in one atomic `subtract` *before* calling the app:

- paid: the app runs; its response (streamed or not) gets ``X-Credits-Remaining`` (the balance
  right after the charge) and ``X-Credits-Cost``; the `Charge` is in ``scope["credici.charge"]``;
- not enough credits: ``402 {"error": "insufficient_credits", "required": N, "available": M}``
  (with the two headers: the price and the balance) and the app never runs;
- an ``Idempotency-Key`` header makes the charge idempotent for that user (stored as
  ``http:<key>``, kept 24 h): a retry is charged once and sees the first ``X-Credits-Remaining``.
  The handler does run again: responses are not replayed. The same key on a different request
  (method, path or price) answers ``422 {"error": "idempotency_conflict", ...}``, as the IETF
  Idempotency-Key draft recommends; an empty or too long key ``400``;
- the storage is down or too slow (`StorageError`): ``on_storage_error="closed"`` (default)
  answers ``503 {"error": "credits_unavailable"}``, ``"open"`` runs the app unpaid with no credit
  headers; both are logged (`logger`, default ``credici_redis.asgi``). Give the client a short
  ``timeout=``: a request waits that long before either.

Per-route prices, for Starlette and FastAPI apps (the middleware reads them before the app runs,
by matching the request against the app's routes the way its router does, mounts and included
routers included):

- ``@priced(5)`` on an endpoint (``@priced(0)``: free), for either framework;
- ``Depends(charge(5))`` in a FastAPI route or router; called, it returns the request's `Charge`
  (None when the request was not charged), and fails loudly if the middleware did not price the
  route with it. ``charge()`` gives the default price and the `Charge`.

The endpoint's ``@priced`` wins over dependencies; among dependencies the innermost (the route's
own, over its router's and the app's) wins. Requests no route matches (404, 405) and apps
without routes pay the middleware's `cost`. Only ``http`` requests are metered; websocket and
lifespan scopes pass through.

A charge is final: a handler that fails afterwards (500) keeps it.

Not here: usage known only after the response (e.g. LLM tokens) needs holds (reserve a
maximum, then capture the actual amount or release it), which the library does not have yet;
holds would also let a failed handler give its credits back.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from credici_redis import _web
from credici_redis._web import Charge, StorageErrorPolicy
from credici_redis.client import AsyncCrediciClient, UserId
from credici_redis.errors import CrediciError

try:
    from starlette.requests import Request
    from starlette.routing import Host, Match, Mount
except ImportError:  # the "web" extra is not installed: plain ASGI apps, no per-route prices
    _STARLETTE = False
else:
    _STARLETTE = True

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UserLookup = Callable[[Scope], "UserId | Awaitable[UserId | None] | None"]
"""`user(scope)`: the user to charge, or None (not metered); sync or async."""
Price = int | Callable[[Scope], "int | Awaitable[int]"]
"""Credits per request: an int >= 0 (0: free) or `cost(scope)` returning one, sync or async."""

CHARGE_KEY = "credici.charge"
"""Scope key of the request's `Charge` (None when the request was not charged)."""
ROUTE_PRICES_KEY = "credici.route_prices"
"""Scope key of the `charge()` dependencies the middleware found on the request's route."""
_PRICE_ATTR = "__credici_price__"

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "CHARGE_KEY",
    "ASGIApp",
    "Charge",
    "CreditMiddleware",
    "Message",
    "Price",
    "Receive",
    "Scope",
    "Send",
    "StorageErrorPolicy",
    "UserLookup",
    "charge",
    "current_charge",
    "priced",
    "user_from_header",
]


@dataclass(frozen=True)
class _RoutePrice:
    cost: Price | None  # None: the middleware's default


def _check_price(cost: object) -> Price:
    if callable(cost):
        return cost
    return _web.check_cost(cost)


async def _price_value(price: Callable[[Scope], int | Awaitable[int]], scope: Scope) -> int:
    value = price(scope)
    if inspect.isawaitable(value):
        value = await value
    return _web.check_cost(value)


def priced(cost: Price) -> Callable[[F], F]:
    """Mark an endpoint with its price: ``@priced(5)``, ``@priced(0)`` for a free route.

    Read by `CreditMiddleware` for Starlette and FastAPI routes; put it under or over the route
    decorator, both work. It marks the function itself (and returns it unchanged): one function
    serving several routes has one price.
    """
    price = _RoutePrice(_check_price(cost))

    def mark(endpoint: F) -> F:
        setattr(endpoint, _PRICE_ATTR, price)
        return endpoint

    return mark


def charge(cost: Price | None = None) -> Callable[[Request], Awaitable[Charge | None]]:
    """A FastAPI dependency pricing its route: ``Depends(charge(5))``; returns the `Charge`.

    Works in ``dependencies=[...]`` of a route, a router or the app, or as a parameter
    (``charged: Annotated[Charge | None, Depends(charge(5))]``). The charge itself is made by
    `CreditMiddleware` before the app runs; the dependency returns it (None when the request was
    not charged: no user, or a free route) and raises RuntimeError when no middleware priced the
    route with it, so a misconfigured route fails instead of being served free.
    """
    if not _STARLETTE:  # pragma: no cover
        raise ImportError("charge() needs starlette (pip install 'credici-redis[web]')")
    price = _RoutePrice(None if cost is None else _check_price(cost))

    async def credits_charged(request: Request) -> Charge | None:
        scope = request.scope
        if CHARGE_KEY not in scope:
            raise RuntimeError(
                "charge() is used on a route but CreditMiddleware is not installed on the app"
            )
        if credits_charged not in scope.get(ROUTE_PRICES_KEY, ()):
            raise RuntimeError(
                f"CreditMiddleware could not find the route of {scope.get('path')!r}, so its "
                "charge() price was not applied; use the middleware's cost= for this route"
            )
        return current_charge(scope)

    setattr(credits_charged, _PRICE_ATTR, price)
    return credits_charged


def current_charge(scope: Scope) -> Charge | None:
    """The `Charge` the middleware made for this request (None: not charged)."""
    value = scope.get(CHARGE_KEY)
    return value if isinstance(value, Charge) else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def user_from_header(name: str) -> Callable[[Scope], str | None]:
    """``user=`` reading the user id from a request header (missing or empty: not metered).

    Only where a trusted proxy sets that header after authenticating the caller; otherwise look
    the user up from the credentials (an API key...) in a function of your own, sync or async.
    """
    key = name.lower().encode("latin-1")

    def user(scope: Scope) -> str | None:
        value = _header(scope, key)
        return value.strip() or None if value is not None else None

    return user


@functools.cache
def _route_candidates() -> Callable[[Sequence[Any]], Iterable[Any]]:
    """How to list an app's routes: FastAPI's own view when it has one (routers it includes are
    resolved lazily, behind one route each), else the routes as they are."""
    try:
        from fastapi import routing as fastapi_routing
    except ImportError:
        return iter
    contexts: Callable[[Sequence[Any]], Iterable[Any]] | None = getattr(
        fastapi_routing, "iter_route_contexts", None
    )
    return contexts if contexts is not None else iter


def _matched_route(routes: Sequence[Any], scope: Scope) -> Any | None:
    """The route the router will run for `scope`, as the router picks it (first full match)."""
    for route in _route_candidates()(routes):
        match, child = route.matches(scope)
        if match is not Match.FULL:
            continue
        if isinstance(getattr(route, "original_route", route), (Mount, Host)):
            inner = route.routes
            return _matched_route(inner, {**scope, **child}) if isinstance(inner, list) else None
        return route
    return None


def _dependency_prices(dependant: Any) -> Iterator[tuple[object, _RoutePrice]]:
    """`charge()` dependencies of a FastAPI route, outermost first (app, router, route)."""
    for sub in getattr(dependant, "dependencies", ()):
        call = getattr(sub, "call", None)
        price = getattr(call, _PRICE_ATTR, None)
        if isinstance(price, _RoutePrice):
            yield call, price
        yield from _dependency_prices(sub)


class CreditMiddleware:
    """Charges each HTTP request its price in credits before the app runs (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: AsyncCrediciClient,
        user: UserLookup,
        cost: Price = 1,
        on_storage_error: StorageErrorPolicy = "closed",
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.client = client
        self.user = user
        self.cost = _check_price(cost)
        self.on_storage_error = _web.check_policy(on_storage_error)
        self.logger = logger if logger is not None else logging.getLogger(__name__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        price, dependencies = self._route_price(scope)
        scope[ROUTE_PRICES_KEY] = dependencies
        scope[CHARGE_KEY] = None
        cost = price if isinstance(price, int) else await _price_value(price, scope)
        user = self.user(scope) if cost else None
        if inspect.isawaitable(user):
            user = await user
        if user is None:
            await self.app(scope, receive, send)
            return

        method, path = scope["method"], scope["path"]
        try:
            transaction = await self.client.subtract(
                user,
                cost,
                idempotency_key=_web.idempotency_key(_header(scope, b"idempotency-key")),
                metadata=_web.charge_metadata(method, path),
            )
        except CrediciError as exc:
            refusal = _web.refusal_for(
                exc, user_id=str(user), cost=cost, policy=self.on_storage_error,
                logger=self.logger, method=method, path=path,
            )  # fmt: skip
            if refusal is None:
                await self.app(scope, receive, send)
            else:
                await _send_refusal(send, refusal)
            return

        paid = Charge(transaction.user_id, cost, transaction)
        scope[CHARGE_KEY] = paid
        credit_headers = _encode_headers(_web.charge_headers(paid))

        async def send_with_credits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *credit_headers]}
            await send(message)

        await self.app(scope, receive, send_with_credits)

    def _route_price(self, scope: Scope) -> tuple[Price, tuple[object, ...]]:
        """The price of the route `scope` goes to, and the `charge()` dependencies found on it."""
        routes = getattr(scope.get("app", self.app), "routes", None)
        if not _STARLETTE or not isinstance(routes, list):
            return self.cost, ()
        route = _matched_route(routes, dict(scope))
        if route is None:
            return self.cost, ()
        found = list(_dependency_prices(getattr(route, "dependant", None)))
        dependencies = tuple(call for call, _ in found)
        endpoint_price = getattr(getattr(route, "endpoint", None), _PRICE_ATTR, None)
        if isinstance(endpoint_price, _RoutePrice) and endpoint_price.cost is not None:
            return endpoint_price.cost, dependencies
        for _, price in reversed(found):
            if price.cost is not None:
                return price.cost, dependencies
        return self.cost, dependencies


def _encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _send_refusal(send: Send, refusal: _web.Refusal) -> None:
    payload = refusal.payload()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode("latin-1")),
        *_encode_headers(refusal.headers),
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
