"""Meter a WSGI app (Flask, Django, any PEP 3333 app) in credits, charged before the app runs.

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
running the app; ``Idempotency-Key`` makes the charge idempotent per user (422 on a conflicting
reuse, 400 on an empty or too long key); a storage failure answers 503 (``on_storage_error=
"closed"``, the default) or runs the app unpaid (``"open"``), logged to ``credici_redis.wsgi``.

Per-view prices: WSGI has no routing the middleware could read before the app runs (Flask and
Django resolve the view inside the app), and the charge must come first, so there is no view
decorator; price by path with `cost(environ)`, e.g. ``cost=lambda environ: 5 if
environ["PATH_INFO"].startswith("/v1/generate") else 1``. Where the views are WSGI apps of
their own (a path dispatcher), wrap each one: ``CreditMiddleware(view, ..., cost=5)``.

A charge is final: an app that fails afterwards keeps it. Not here: usage known only after the
response needs holds (reserve, then capture or release), which the library does not have yet.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol

from credici_redis import _web
from credici_redis._web import Charge, StorageErrorPolicy
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

UserLookup = Callable[[WSGIEnvironment], "UserId | None"]
"""`user(environ)`: the user to charge, or None (not metered)."""
Price = int | Callable[[WSGIEnvironment], int]
"""Credits per request: an int >= 0 (0: free) or `cost(environ)` returning one."""

CHARGE_KEY = "credici.charge"
"""Environ key of the request's `Charge` (None when the request was not charged)."""

__all__ = [
    "CHARGE_KEY",
    "Charge",
    "CreditMiddleware",
    "Price",
    "StartResponse",
    "StorageErrorPolicy",
    "UserLookup",
    "WSGIApplication",
    "WSGIEnvironment",
    "user_from_header",
]


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


class CreditMiddleware:
    """Charges each request its price in credits before the app runs (module docstring)."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        client: CrediciClient,
        user: UserLookup,
        cost: Price = 1,
        on_storage_error: StorageErrorPolicy = "closed",
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.client = client
        self.user = user
        self.cost = cost if callable(cost) else _web.check_cost(cost)
        self.on_storage_error = _web.check_policy(on_storage_error)
        self.logger = logger if logger is not None else logging.getLogger(__name__)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ[CHARGE_KEY] = None
        cost = self.cost if isinstance(self.cost, int) else _web.check_cost(self.cost(environ))
        user = self.user(environ) if cost else None
        if user is None:
            return self.app(environ, start_response)

        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        try:
            transaction = self.client.subtract(
                user,
                cost,
                idempotency_key=_web.idempotency_key(environ.get("HTTP_IDEMPOTENCY_KEY")),
                metadata=_web.charge_metadata(method, path),
            )
        except CrediciError as exc:
            refusal = _web.refusal_for(
                exc, user_id=str(user), cost=cost, policy=self.on_storage_error,
                logger=self.logger, method=method, path=path,
            )  # fmt: skip
            if refusal is None:
                return self.app(environ, start_response)
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

        paid = Charge(transaction.user_id, cost, transaction)
        environ[CHARGE_KEY] = paid
        credit_headers = _web.charge_headers(paid)

        def start_with_credits(
            status: str,
            headers: list[tuple[str, str]],
            exc_info: Any = None,
        ) -> Callable[[bytes], object]:
            return start_response(status, [*headers, *credit_headers], exc_info)

        return self.app(environ, start_with_credits)
