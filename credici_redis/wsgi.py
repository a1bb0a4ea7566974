"""Meter a WSGI app (Flask, Django, any PEP 3333 app) in credits: a price charged before the app
runs, or a reservation before it and the usage it reports captured after the response.

    from credici_redis import CrediciClient
    from credici_redis.wsgi import CreditMiddleware, user_from_header

    credici = CrediciClient.from_url("redis://127.0.0.1:6379/0", namespace="api", timeout=0.5)
    app.wsgi_app = CreditMiddleware(app.wsgi_app, client=credici, user=user_from_header("X-User"))
    # Django: application = CreditMiddleware(get_wsgi_application(), client=..., user=...)

The same behaviour as `credici_redis.asgi` with the sync client (safe to share between the
server's threads): the price is `cost` (an int, or `cost(environ)`; 0 is free), the user
`user(environ)` (None: not metered); a paid response gets ``X-Credits-Remaining`` and
``X-Credits-Cost`` and the `Charge` is in ``environ["credici.charge"]``; not enough credits
answers ``402 {"error": "insufficient_credits", "required": N, "available": M}`` without
running the app; the user's limits (`set_limits`, or the client's `default_limits`) answer
``429`` without running it, with ``Retry-After`` and ``RateLimit: "rate";r=0;t=S`` or
``RateLimit: "budget";r=R;t=S`` (bodies ``{"error": "rate_limited", ...}`` and
``{"error": "budget_exceeded", ...}``, no ``Retry-After`` for a price over the rate's burst,
which never passes: all as in `credici_redis.asgi`); ``Idempotency-Key`` makes the charge
idempotent per user (422 on a conflicting reuse, 400 on an empty or too long key); a storage
failure answers 503 (``on_storage_error="closed"``, the default) or runs the app unpaid
(``"open"``), logged to ``credici_redis.wsgi``.

Per-view prices: WSGI has no routing the middleware could read before the app runs (Flask and
Django resolve the view inside the app), and the charge must come first, so there is no view
decorator; price by path with `cost(environ)`, e.g. ``cost=lambda environ: 5 if
environ["PATH_INFO"].startswith("/v1/generate") else 1``. Where the views are WSGI apps of
their own (a path dispatcher), wrap each one: ``CreditMiddleware(view, ..., cost=5)``.

A charge is final: an app that fails afterwards keeps it.

Metered by usage (the cost is known only after the response), as in `credici_redis.asgi`:
``reserve=200`` (or ``reserve(environ)`` returning an int, or None for a request charged its
fixed `cost`) reserves that much before the app runs (402 and the app never runs when the user
has less, 429 when the user's limits refuse it; `on_storage_error` applies). The response
gets ``X-Credits-Reserved``; the app finds the `Meter` in ``environ["credici.meter"]``
(`current_meter(environ or request)`) and reports with ``meter.add(n)`` or
``meter.report(total)`` / ``report_usage(request, total)``, from the view or from the response
iterable while it streams. When the server closes the response iterable
the hold is settled by the same rules: a complete response with a status < 500 captures the
usage reported (more than reserved: the reservation, logged; nothing reported: all of it for a
status < 400, nothing for a 4xx); status >= 500 or an exception releases everything; a
response closed before its end (the client went away: the server could not write) captures
the usage reported so far with ``on_disconnect="capture"`` (default) or releases everything
with ``"release"``. ``Idempotency-Key`` works as for ASGI (one hold per key, a retry of a
captured request runs unbilled, one of a released request reserves again).

    def generate(environ, start_response):
        usage = current_meter(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        for token in model(max_tokens=usage.left):
            usage.add(1)
            yield token.encode()

    app = CreditMiddleware(generate, client=credici, user=user_from_header("X-User"), reserve=200)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Protocol, TypeVar

from credici_redis._web import metering as _web
from credici_redis._web.metering import Charge, DisconnectPolicy, Meter, StorageErrorPolicy
from credici_redis.client import CrediciClient, UserId
from credici_redis.errors import CrediciError

if sys.version_info >= (3, 11):
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment
else:  # pragma: no cover

    class StartResponse(Protocol):
        def __call__(
            self,
            status: str,
            headers: list[tuple[str, str]],
            exc_info: tuple[type[BaseException], BaseException, TracebackType]
            | tuple[None, None, None]
            | None = ...,
            /,
        ) -> Callable[[bytes], object]: ...

    WSGIEnvironment = dict[str, Any]
    WSGIApplication = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]

T = TypeVar("T")

UserLookup = Callable[[WSGIEnvironment], "UserId | None"]
"""`user(environ)`: the user to charge, or None (not metered)."""
Price = int | Callable[[WSGIEnvironment], int]
"""Credits per request: an int >= 0 (0: free) or `cost(environ)` returning one."""

Reserve = int | Callable[[WSGIEnvironment], "int | None"]
"""Credits to reserve for a request metered by usage (0: free), or `reserve(environ)` returning
them, or None for a request charged its fixed `cost` instead."""

CHARGE_KEY = "credici.charge"
"""Environ key of the request's `Charge` (None when the request was not charged)."""
METER_KEY = "credici.meter"
"""Environ key of the request's `Meter` (None when the request is not metered by usage)."""

__all__ = [
    "CHARGE_KEY",
    "METER_KEY",
    "Charge",
    "CreditMiddleware",
    "DisconnectPolicy",
    "Meter",
    "Price",
    "Reserve",
    "StartResponse",
    "StorageErrorPolicy",
    "UserLookup",
    "WSGIApplication",
    "WSGIEnvironment",
    "current_meter",
    "report_usage",
    "user_from_header",
]


def _environ_of(target: object) -> Mapping[str, Any]:
    """The environ itself, or that of a request object (Werkzeug's `.environ`, Django's
    `.META`)."""
    if isinstance(target, Mapping):
        return target
    for name in ("environ", "META"):
        value = getattr(target, name, None)
        if isinstance(value, Mapping):
            return value
    raise TypeError(f"not a WSGI environ nor a request with one: {type(target).__name__}")


def current_meter(target: object) -> Meter | None:
    """The request's `Meter` (None: not metered by usage); `target` is the environ or a request
    (Flask/Werkzeug, Django)."""
    value = _environ_of(target).get(METER_KEY)
    return value if isinstance(value, Meter) else None


def report_usage(target: object, used: int) -> bool:
    """Report the credits the request used in total so far (the last report counts); False
    (and nothing done) when the request is not metered."""
    return _web.report(current_meter(target), used)


def user_from_header(name: str) -> Callable[[WSGIEnvironment], str | None]:
    """``user=`` reading the user id from a request header (missing or empty: not metered).

    Only where a trusted proxy sets that header after authenticating the caller; otherwise look
    the user up from the credentials in a function of your own.
    """
    key = "HTTP_" + name.upper().replace("-", "_")

    def user(environ: WSGIEnvironment) -> str | None:
        value = environ.get(key)
        return value.strip() or None if isinstance(value, str) else None

    return user


class CreditMiddleware(_web.Metering):
    """Charges each request its price in credits before the app runs, or meters it by usage:
    reserve before, capture after (module docstring)."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        client: CrediciClient,
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
        self.cost = cost if callable(cost) else _web.check_cost(cost)
        self.reserve = reserve if reserve is None or callable(reserve) else _web.check_cost(reserve)
        self._configure(hold_ttl, on_disconnect, on_storage_error, logger, __name__)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[CHARGE_KEY] = None
        environ[METER_KEY] = None
        reserve = self.reserve(environ) if callable(self.reserve) else self.reserve
        if reserve is not None:
            return self._metered(environ, start_response, _web.check_cost(reserve))
        cost = self.cost if isinstance(self.cost, int) else _web.check_cost(self.cost(environ))
        user = self.user(environ) if cost else None
        if user is None:
            return self.app(environ, start_response)

        method, path = _method_and_path(environ)
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        paid = _run(self.client, self._charging(user, cost, key, method, path))
        if isinstance(paid, _web.Refusal):
            return _refuse(start_response, paid)
        if paid is not None:
            environ[CHARGE_KEY] = paid
            start_response = _adding_headers(start_response, _web.charge_headers(paid))
        return self.app(environ, start_response)

    def _metered(
        self, environ: WSGIEnvironment, start_response: StartResponse, reserve: int
    ) -> Iterable[bytes]:
        """Reserve `reserve`, run the app, then (when the server closes the response) capture
        what it reported or release."""
        user = self.user(environ) if reserve else None
        usage = Meter(None if user is None else str(user), reserve)
        environ[METER_KEY] = usage
        if user is None:
            return self.app(environ, start_response)
        method, path = _method_and_path(environ)
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        held = _run(self.client, self._reserving(usage, user, key, method, path))
        if isinstance(held, _web.Refusal):
            return _refuse(start_response, held)
        if held is None:  # failed open: the app runs, not billed
            return self.app(environ, start_response)

        exchange = held.exchange
        credit_headers = held.headers

        def start_watching(
            status: str,
            headers: list[tuple[str, str]],
            exc_info: Any = None,
        ) -> Callable[[bytes], object]:
            code = status.split(" ", 1)[0]
            exchange.status = int(code) if code.isdigit() else 500
            return start_response(status, [*headers, *credit_headers], exc_info)

        def settle() -> None:
            _run(self.client, self._settling(held))

        try:
            body = self.app(environ, start_watching)
        except BaseException:
            settle()
            raise
        return _MeteredBody(body, exchange, settle)


class _MeteredBody:
    """The app's response iterable, watched: exhausted means complete; closed before that, the
    server stopped sending (the client left); settles the hold once, on close."""

    def __init__(
        self, body: Iterable[bytes], exchange: _web.Exchange, settle: Callable[[], None]
    ) -> None:
        self._body = body
        self._exchange = exchange
        self._settle: Callable[[], None] | None = settle
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._body
        except GeneratorExit:
            raise
        except BaseException:
            self._failed = True
            raise
        self._exchange.complete = True

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            settle, self._settle = self._settle, None
            if settle is not None:
                if not self._exchange.complete and not self._failed:
                    self._exchange.disconnected = True
                settle()


def _method_and_path(environ: WSGIEnvironment) -> tuple[str, str]:
    method = environ.get("REQUEST_METHOD", "GET")
    return method, environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")


def _refuse(start_response: StartResponse, refusal: _web.Refusal) -> list[bytes]:
    payload = refusal.payload()
    start_response(
        refusal.status_line,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            *refusal.headers,
        ],
    )
    return [payload]


def _run(client: CrediciClient, steps: _web.Steps[T]) -> T:
    """Make the client calls of `steps`; what its flow returned."""
    for call in steps:
        try:
            steps.reply(call.on(client))
        except CrediciError as exc:
            steps.fail(exc)
    return steps.result


def _adding_headers(
    start_response: StartResponse, headers: Iterable[tuple[str, str]]
) -> StartResponse:
    """`start_response` adding `headers` to the response's."""
    added = list(headers)

    def start_with_credits(
        status: str,
        headers: list[tuple[str, str]],
        exc_info: Any = None,
    ) -> Callable[[bytes], object]:
        return start_response(status, [*headers, *added], exc_info)

    return start_with_credits
