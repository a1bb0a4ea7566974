"""Meter an ASGI app (FastAPI, Starlette, any ASGI 3 app) in credits: a price charged before the
handler, or a reservation before it and the usage it reports captured after the response.

    from credici_redis import AsyncCrediciClient
    from credici_redis.asgi import CreditMiddleware, user_from_header

    credici = AsyncCrediciClient.from_url("redis://127.0.0.1:6379/0", namespace="api", timeout=0.5)
    app.add_middleware(CreditMiddleware, client=credici, user=user_from_header("X-User"), cost=1)

For each HTTP request the middleware finds the price (the route's, else `cost`) and the user
(`user(scope)`); if either is 0 / None the request passes untouched. Otherwise it charges the
price in one atomic `subtract` *before* calling the app (requests metered by usage: below):

- paid: the app runs; its response (streamed or not) gets ``X-Credits-Remaining`` (the balance
  right after the charge) and ``X-Credits-Cost``; the `Charge` is in ``scope["credici.charge"]``;
- not enough credits: ``402 {"error": "insufficient_credits", "required": N, "available": M}``
  (with the two headers: the price and the balance) and the app never runs;
- refused by the user's limits (its own, `set_limits`, or the client's `default_limits`):
  ``429`` and the app never runs; nothing is charged, an ``Idempotency-Key`` is not used up.
  A rate too fast: ``{"error": "rate_limited", "required": N, "retry_after": S}`` with
  ``Retry-After: S`` (whole seconds, rounded up, at least 1) and ``RateLimit: "rate";r=0;t=S``
  (the field of the IETF draft-ietf-httpapi-ratelimit-headers); a price larger than the rate's
  burst never passes: ``"retry_after": null`` and a ``"detail"``, no ``Retry-After`` nor
  ``RateLimit``. Over the budget: ``{"error": "budget_exceeded", "required": N, "remaining":
  R, "resets_at": "<ISO 8601>", "retry_after": S}`` with ``Retry-After: S`` and ``RateLimit:
  "budget";r=R;t=S``, S the seconds until the budget's period ends (by the storage's clock).
  Both carry ``X-Credits-Cost`` (``X-Credits-Reserved`` for a reservation) and
  ``RateLimit-Policy`` naming the limit that refused (``"rate";q=60;w=60``,
  ``"budget";q=1000;w=86400``: the refusing script reports it, no extra call);
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

Metered by usage (the cost is known only after the response: LLM tokens, bytes streamed):

    app.add_middleware(CreditMiddleware, client=credici, user=user_from_header("X-User"),
                       reserve=200)          # or per route: @metered(200), Depends(meter(200))

    @app.post("/v1/generate")
    async def generate(usage: Annotated[Meter, Depends(meter(200))]) -> StreamingResponse:
        async def tokens() -> AsyncIterator[str]:
            async for token in model(max_tokens=usage.left):
                usage.add(1)  # or report_usage(request, total)
                yield token
        return StreamingResponse(tokens())

Before the app runs the middleware reserves the maximum: a route's ``@metered(n)`` or
``Depends(meter(n))`` (``meter()``: the middleware's `reserve`), else the middleware's `reserve`
(an int, or ``reserve(scope)``, sync or async, returning one, or None for the fixed `cost`). The
endpoint's decorator (``@priced`` or ``@metered``) wins, then the innermost dependency
(``charge`` or ``meter``), then `reserve`, then `cost`. Not enough credits answers
the same ``402`` as a charge, the user's limits the same ``429`` (a reservation uses the rate
and budget of all it reserves; what a capture does not take goes back to the budget, not to
the rate), and the app never runs; a storage failure follows `on_storage_error` as for a
charge. The response then carries ``X-Credits-Reserved: n`` (the
cost is not known yet when streaming starts; trailers are not used) and the app finds the
`Meter` in ``scope["credici.meter"]`` (`current_meter`, or ``Depends(meter(...))``). The handler
reports what it used, with ``meter.add(n)`` as it goes or ``meter.report(total)`` /
``report_usage(request, total)`` (``meter.report(0)`` first, so that an answer using nothing
costs nothing). When the app returns the hold is settled (`settlement` in
``credici_redis._web.metering``):

- response complete, status < 500: the usage reported is captured and the rest of the
  reservation comes back; more than reserved captures the reservation (logged as a warning);
  nothing reported captures the whole reservation for a status < 400, nothing for a 4xx;
- status >= 500, or the app raised before the response was complete: everything is released;
- the client disconnected before the end (the app received ``http.disconnect``, as Starlette's
  `StreamingResponse` does, or `send` raised OSError): ``on_disconnect="capture"`` (default)
  captures the usage reported so far, ``"release"`` releases everything. Releasing would let a
  client read a stream and hang up before its end to pay nothing; stop generating when the
  client leaves, and what was reported is what is charged.

Capture and release happen after the last byte went out, so they add no latency; if they fail
(storage down) it is logged and the hold is released by its ttl (`hold_ttl`, 5 minutes: make it
longer than the slowest response, a hold that expires first is not charged). The `Meter` says
afterwards what was charged (`Meter.charged`, `Meter.transaction`).

With an ``Idempotency-Key`` the reservation is made under ``http:<key>`` and the capture under a
key derived from the hold: a retry finds the same hold, and its usage is captured once. A retry
of a request already captured runs the handler again unbilled (`Meter.replayed`); a retry of a
request whose hold was released (it failed, or the client left before using anything) reserves
again under a key derived from that hold, so duplicates still share one hold. This costs a
second Redis call per keyed request (the library has no call that reads a hold's status; the
middleware asks for a capture larger than the hold, which changes nothing).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from credici_redis._web import metering as _web
from credici_redis._web.metering import Charge, DisconnectPolicy, Meter, StorageErrorPolicy
from credici_redis.client import AsyncCrediciClient, UserId
from credici_redis.errors import CrediciError, MissingExtraError

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
Reserve = int | Callable[[Scope], "int | Awaitable[int | None] | None"]
"""The middleware's `reserve`: credits to reserve (0: free), or `reserve(scope)` returning them,
or None for a request charged its fixed `cost` instead; sync or async."""

CHARGE_KEY = "credici.charge"
"""Scope key of the request's `Charge` (None when the request was not charged)."""
METER_KEY = "credici.meter"
"""Scope key of the request's `Meter` (None when the request is not metered by usage)."""
ROUTE_PRICES_KEY = "credici.route_prices"
"""Scope key of the `charge()` dependencies the middleware found on the request's route."""
_PRICE_ATTR = "__credici_price__"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

__all__ = [
    "CHARGE_KEY",
    "METER_KEY",
    "ASGIApp",
    "Charge",
    "CreditMiddleware",
    "DisconnectPolicy",
    "Message",
    "Meter",
    "Price",
    "Receive",
    "Reserve",
    "Scope",
    "Send",
    "StorageErrorPolicy",
    "UserLookup",
    "charge",
    "current_charge",
    "current_meter",
    "meter",
    "metered",
    "priced",
    "report_usage",
    "user_from_header",
]


@dataclass(frozen=True)
class _RoutePrice:
    cost: Price | None  # None: the middleware's default (its cost, or its reserve if metered)
    metered: bool = False  # cost is then the reservation, settled by usage after the response


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
    return _mark(_RoutePrice(_check_price(cost)))


def _mark(price: _RoutePrice) -> Callable[[F], F]:
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
        raise MissingExtraError("charge()", "web", "starlette")
    price = _RoutePrice(None if cost is None else _check_price(cost))

    async def credits_charged(request: Request) -> Charge | None:
        return current_charge(
            _applied(request, credits_charged, "charge", "charge() price", "cost")
        )

    setattr(credits_charged, _PRICE_ATTR, price)
    return credits_charged


def metered(reserve: Price) -> Callable[[F], F]:
    """Mark an endpoint as metered by usage: ``@metered(200)`` reserves 200 credits before it
    runs, then captures what it reports (module docstring). Like `priced`, for Starlette and
    FastAPI routes, and it wins over dependencies."""
    return _mark(_RoutePrice(_check_price(reserve), metered=True))


def meter(reserve: Price | None = None) -> Callable[[Request], Awaitable[Meter]]:
    """A FastAPI dependency metering its route by usage: ``Depends(meter(200))``; returns the
    request's `Meter`, to report the usage to.

    ``meter()`` reserves the middleware's `reserve`. Like `charge`, it works at the route, router
    or app level and raises RuntimeError when no middleware metered the route with it (not
    installed, route not found, or a fixed price won: an ``@priced`` endpoint or an inner
    ``charge()``). The `Meter` is there for requests that are not billed too (no user): check
    `Meter.user_id` / `Meter.billed`.
    """
    if not _STARLETTE:  # pragma: no cover
        raise MissingExtraError("meter()", "web", "starlette")
    price = _RoutePrice(None if reserve is None else _check_price(reserve), metered=True)

    async def credits_metered(request: Request) -> Meter:
        scope = _applied(request, credits_metered, "meter", "meter()", "reserve")
        found = current_meter(scope)
        if found is None:
            raise RuntimeError(
                f"{scope.get('path')!r} is charged a fixed price, not metered: an @priced "
                "endpoint or an inner charge() wins over meter()"
            )
        return found

    setattr(credits_metered, _PRICE_ATTR, price)
    return credits_metered


def _applied(request: Request, dependency: object, name: str, what: str, option: str) -> Scope:
    """The request's scope, once sure the middleware priced its route with `dependency`."""
    scope = request.scope
    if CHARGE_KEY not in scope:
        raise RuntimeError(
            f"{name}() is used on a route but CreditMiddleware is not installed on the app"
        )
    if dependency not in scope.get(ROUTE_PRICES_KEY, ()):
        raise RuntimeError(
            f"CreditMiddleware could not find the route of {scope.get('path')!r}, so its "
            f"{what} was not applied; use the middleware's {option}= for this route"
        )
    return scope


def current_charge(scope: Scope) -> Charge | None:
    """The `Charge` the middleware made for this request (None: not charged)."""
    value = scope.get(CHARGE_KEY)
    return value if isinstance(value, Charge) else None


class HasScope(Protocol):
    """A request object of a framework (Starlette's `Request`)."""

    @property
    def scope(self) -> Scope: ...


def _scope_of(target: Scope | HasScope) -> Scope:
    return target if isinstance(target, MutableMapping) else target.scope


def current_meter(target: Scope | HasScope) -> Meter | None:
    """The request's `Meter` (None: not metered by usage); `target` is the scope or a request."""
    value = _scope_of(target).get(METER_KEY)
    return value if isinstance(value, Meter) else None


def report_usage(target: Scope | HasScope, used: int) -> bool:
    """Report the credits the request used in total so far (the last report counts); `target`
    is the scope or a request. False (and nothing done) when the request is not metered."""
    return _web.report(current_meter(target), used)


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


class CreditMiddleware(_web.Metering):
    """Charges each HTTP request its price in credits before the app runs, or meters it by
    usage: reserve before, capture after (module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: AsyncCrediciClient,
        user: UserLookup,
        cost: Price = 1,
        reserve: Reserve | None = None,
        hold_ttl: timedelta = _web.DEFAULT_HOLD_TTL,
        on_disconnect: DisconnectPolicy = "capture",
        on_storage_error: StorageErrorPolicy = "closed",
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.client = client
        self.user = user
        self.cost = _check_price(cost)
        self.reserve = None if reserve is None or callable(reserve) else _web.check_cost(reserve)
        self._reserve_of = reserve if callable(reserve) else None
        self._configure(hold_ttl, on_disconnect, on_storage_error, logger, __name__)
        self._settling_tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, dependencies = self._route_price(scope)
        scope[ROUTE_PRICES_KEY] = dependencies
        scope[CHARGE_KEY] = None
        scope[METER_KEY] = None
        price, is_metered = await self._price(route, scope)
        user = self.user(scope) if price else None
        if inspect.isawaitable(user):
            user = await user
        if is_metered:
            await self._metered(scope, receive, send, price, user)
            return
        if user is None:
            await self.app(scope, receive, send)
            return

        method, path = scope["method"], scope["path"]
        key = _header(scope, b"idempotency-key")
        paid = await _run(self.client, self._charging(user, price, key, method, path))
        if isinstance(paid, _web.Refusal):
            await _send_refusal(send, paid)
            return
        if paid is not None:
            scope[CHARGE_KEY] = paid
            send = _adding_headers(send, _web.charge_headers(paid))
        await self.app(scope, receive, send)

    async def _price(self, route: _RoutePrice | None, scope: Scope) -> tuple[int, bool]:
        """(credits, metered): the route's own price, else the middleware's reserve, else cost."""
        if route is not None and route.cost is not None:
            price = route.cost
        elif route is not None and route.metered:
            reserve = await self._middleware_reserve(scope)
            if reserve is None:
                raise RuntimeError(
                    f"{scope.get('path')!r} is metered with meter() but no reservation is "
                    "known: give meter(n) an amount, or the middleware reserve="
                )
            return reserve, True
        elif route is None and (reserve := await self._middleware_reserve(scope)) is not None:
            return reserve, True
        else:  # no price anywhere, or a charge() without one: the middleware's fixed cost
            price = self.cost
        value = price if isinstance(price, int) else await _price_value(price, scope)
        return value, route is not None and route.metered

    async def _middleware_reserve(self, scope: Scope) -> int | None:
        if self._reserve_of is None:
            return self.reserve
        value = self._reserve_of(scope)
        if inspect.isawaitable(value):
            value = await value
        return None if value is None else _web.check_cost(value)

    async def _metered(
        self, scope: Scope, receive: Receive, send: Send, reserve: int, user: UserId | None
    ) -> None:
        """Reserve `reserve`, run the app, then capture what it reported or release."""
        usage = Meter(None if user is None else str(user), reserve)
        scope[METER_KEY] = usage
        if user is None:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        key = _header(scope, b"idempotency-key")
        held = await _run(self.client, self._reserving(usage, user, key, method, path))
        if isinstance(held, _web.Refusal):
            await _send_refusal(send, held)
            return
        if held is None:  # failed open: the app runs, not billed
            await self.app(scope, receive, send)
            return

        exchange = held.exchange
        credit_headers = _encode_headers(held.headers)

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not exchange.complete:
                exchange.disconnected = True
            return message

        async def send_watching(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                exchange.status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", ()), *credit_headers]}
            try:
                await send(message)
            except OSError:  # ASGI 2.4 servers: the client is gone
                exchange.disconnected = True
                raise
            if kind == "http.response.pathsend" or (
                kind == "http.response.body" and not message.get("more_body", False)
            ):
                exchange.complete = True

        settle = functools.partial(_run, self.client, self._settling(held))
        try:
            await self.app(scope, receive_watching, send_watching)
        except asyncio.CancelledError:
            # Awaiting here could be cancelled again (a cancelled anyio scope): settle in a task
            # of its own, which the cancellation does not reach.
            task = asyncio.ensure_future(settle())
            self._settling_tasks.add(task)
            task.add_done_callback(self._settling_tasks.discard)
            raise
        except BaseException:
            await settle()
            raise
        await settle()

    def _route_price(self, scope: Scope) -> tuple[_RoutePrice | None, tuple[object, ...]]:
        """The price of the route `scope` goes to (None: the middleware's), and the `charge()`
        and `meter()` dependencies found on it."""
        routes = getattr(scope.get("app", self.app), "routes", None)
        if not _STARLETTE or not isinstance(routes, list):
            return None, ()
        route = _matched_route(routes, dict(scope))
        if route is None:
            return None, ()
        found = list(_dependency_prices(getattr(route, "dependant", None)))
        dependencies = tuple(call for call, _ in found)
        endpoint_price = getattr(getattr(route, "endpoint", None), _PRICE_ATTR, None)
        if isinstance(endpoint_price, _RoutePrice) and endpoint_price.cost is not None:
            return endpoint_price, dependencies
        for _, price in reversed(found):
            if price.cost is not None or price.metered:
                return price, dependencies
        # Only charge() without a price (or nothing): the middleware's cost, or None for its
        # default mode.
        return (found[-1][1] if found else None), dependencies


async def _run(client: AsyncCrediciClient, steps: _web.Steps[T]) -> T:
    """Make the client calls of `steps`, awaited; what its flow returned."""
    for call in steps:
        try:
            steps.reply(await call.on(client))
        except CrediciError as exc:
            steps.fail(exc)
    return steps.result


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


def _adding_headers(send: Send, headers: Iterable[tuple[str, str]]) -> Send:
    """`send` adding `headers` to the response's start."""
    encoded = _encode_headers(headers)

    async def send_with_credits(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *encoded]}
        await send(message)

    return send_with_credits
