"""One app, twice: the same routes and prices as an ASGI app (FastAPI, priced by route marks)
and as a WSGI app (stdlib, priced by the middleware's `cost` / `reserve` functions), so that one
test can check one promise of the middleware on both servers (`tests/web/test_contract.py`).

Routes (each counts its calls in `State.calls`, by route; metered ones keep their `Meter`):

- fixed price, answering ``{"path": ..., "charged": cost or null}``: ``/echo`` (the middleware's
  default, 1), ``/expensive`` (5: ``@priced(5)`` / ``cost``), ``/free`` (0), ``/fixed`` (2:
  ``Depends(charge(2))`` / ``cost``); WSGI only: ``/late`` (1, calls ``start_response`` from
  its response iterable);
- metered by usage, reserving `RESERVE`: ``/stream?n=&delay=&fail_after=`` (``n`` chunks of 1
  credit each, ``"i\\n"``), ``/status/<code>?used=`` (answers that status at once), ``/raise``
  (reports 2, then fails before any response), ``/flaky`` (reports 4; 503 on its first call,
  ``{"used": 4}`` after; ``Depends(meter(RESERVE))`` on ASGI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qs

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from credici_redis import AsyncCrediciClient, CrediciClient, asgi, wsgi
from credici_redis._web.metering import Meter
from tests.web.conftest import serve_asgi, serve_wsgi

RESERVE = 10
PRICES = {"/free": 0, "/expensive": 5, "/fixed": 2}
METERED = ("/stream", "/status", "/raise", "/flaky")
KINDS = ("asgi", "wsgi")


def route_of(path: str) -> str:
    return "/status" if path.startswith("/status/") else path


@dataclass
class State:
    """What the app saw: handler calls by route, the meters of metered requests."""

    calls: Counter[str] = field(default_factory=Counter)
    meters: list[Meter] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, route: str, usage: Meter | None = None) -> None:
        with self._lock:
            self.calls[route] += 1
            if usage is not None:
                self.meters.append(usage)


@dataclass
class Served:
    """A contract app under its server: the HTTP client, what the app saw, its logger."""

    kind: str
    http: httpx.Client
    state: State

    @property
    def calls(self) -> Counter[str]:
        return self.state.calls

    @property
    def meters(self) -> list[Meter]:
        return self.state.meters

    @property
    def logger(self) -> str:
        return f"credici_redis.{self.kind}"


def asgi_app(
    url: str,
    namespace: str,
    timeout: float,
    client_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> tuple[FastAPI, State]:
    client = AsyncCrediciClient.from_url(
        url, namespace=namespace, timeout=timeout, **(client_options or {})
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(
        asgi.CreditMiddleware, client=client, user=asgi.user_from_header("X-User"), **options
    )
    state = State()

    def answer(request: Request) -> dict[str, object]:
        state.saw(request.url.path)
        paid = asgi.current_charge(request.scope)
        return {"path": request.url.path, "charged": None if paid is None else paid.cost}

    @app.api_route("/echo", methods=["GET", "POST"])
    async def echo(request: Request) -> dict[str, object]:
        return answer(request)

    @app.api_route("/expensive", methods=["GET", "POST"])
    @asgi.priced(5)
    async def expensive(request: Request) -> dict[str, object]:
        return answer(request)

    @app.get("/free")
    @asgi.priced(0)
    async def free(request: Request) -> dict[str, object]:
        return answer(request)

    @app.get("/fixed", dependencies=[Depends(asgi.charge(2))])
    async def fixed(request: Request) -> dict[str, object]:
        assert asgi.current_meter(request) is None
        return answer(request)

    def seen(request: Request, route: str) -> Meter:
        usage = asgi.current_meter(request)
        assert usage is not None
        state.saw(route, usage)
        return usage

    async def chunks(usage: Meter, count: int, delay: float, fail_after: int | None) -> Any:
        for i in range(count):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("the model crashed")
            usage.add(1)
            yield f"{i}\n"
            await asyncio.sleep(delay)

    @app.get("/stream")
    @asgi.metered(RESERVE)
    async def stream(
        request: Request, n: int = 3, delay: float = 0.0, fail_after: int | None = None
    ) -> StreamingResponse:
        usage = seen(request, "/stream")
        usage.report(0)
        return StreamingResponse(chunks(usage, n, delay, fail_after))

    @app.get("/status/{code}")
    @asgi.metered(RESERVE)
    async def status(request: Request, code: int, used: int | None = None) -> JSONResponse:
        seen(request, "/status")
        if used is not None:
            asgi.report_usage(request, used)
        return JSONResponse({"code": code}, status_code=code)

    @app.get("/raise")
    @asgi.metered(RESERVE)
    async def fail(request: Request) -> None:
        seen(request, "/raise").add(2)
        raise RuntimeError("the handler failed")

    @app.get("/flaky")
    async def flaky(
        request: Request, usage: Annotated[Meter, Depends(asgi.meter(RESERVE))]
    ) -> dict[str, int]:
        seen(request, "/flaky")
        usage.add(4)
        if state.calls["/flaky"] == 1:
            raise HTTPException(503, "try again")
        return {"used": 4}

    return app, state


class WSGIApp:
    """The contract app in stdlib WSGI."""

    def __init__(self) -> None:
        self.state = State()

    def __call__(
        self, environ: wsgi.WSGIEnvironment, start_response: wsgi.StartResponse
    ) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        route = route_of(path)
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        usage = wsgi.current_meter(environ)
        self.state.saw(route, usage)
        if route not in METERED:
            assert usage is None
            paid = environ[wsgi.CHARGE_KEY]
            answer = {"path": path, "charged": None if paid is None else paid.cost}
            if route == "/late":
                return self._late(start_response, json.dumps(answer).encode())
            return self._json(start_response, "200 OK", answer)
        assert usage is not None
        if route == "/raise":
            usage.add(2)
            raise RuntimeError("the view failed")
        if route == "/status":
            if "used" in query:
                wsgi.report_usage(environ, int(query["used"]))
            return self._json(start_response, f"{path[8:]} Whatever", {"code": int(path[8:])})
        if route == "/flaky":
            usage.add(4)
            if self.state.calls["/flaky"] == 1:
                return self._json(start_response, "503 Service Unavailable", {"detail": "x"})
            return self._json(start_response, "200 OK", {"used": 4})
        n, delay = int(query.get("n", "3")), float(query.get("delay", "0"))
        fail_after = int(query["fail_after"]) if "fail_after" in query else None
        usage.report(0)
        return self._stream(usage, start_response, n, delay, fail_after)

    @staticmethod
    def _json(start_response: wsgi.StartResponse, status: str, answer: object) -> list[bytes]:
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]

    @staticmethod
    def _late(start_response: wsgi.StartResponse, body: bytes) -> Iterator[bytes]:
        # start_response called late, from inside the iterable, as PEP 3333 allows.
        start_response("200 OK", [("Content-Type", "application/json")])
        yield body[:5]
        yield body[5:]

    @staticmethod
    def _stream(
        usage: Meter,
        start_response: wsgi.StartResponse,
        n: int,
        delay: float,
        fail_after: int | None,
    ) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])  # late, from the iterable
        for i in range(n):
            if i == fail_after:
                raise RuntimeError("the model crashed")
            usage.add(1)
            yield b"%d\n" % i
            time.sleep(delay)


def wsgi_cost(environ: wsgi.WSGIEnvironment) -> int:
    return PRICES.get(environ["PATH_INFO"], 1)


def wsgi_reserve(environ: wsgi.WSGIEnvironment) -> int | None:
    return RESERVE if route_of(environ["PATH_INFO"]) in METERED else None  # None: the cost


@contextlib.contextmanager
def serve_contract(
    kind: str,
    url: str,
    namespace: str,
    *,
    timeout: float = 0.5,
    client_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Iterator[Served]:
    """The contract app of `kind` ("asgi" or "wsgi") under its server, with the middleware's
    `options`, on the credits at `url` (a client made with `client_options` besides the
    `timeout`: a ``clock``, ``default_limits``)."""
    if kind == "asgi":
        app, state = asgi_app(url, namespace, timeout, client_options, **options)
        with serve_asgi(app) as base, httpx.Client(base_url=base, timeout=10) as http:
            yield Served(kind, http, state)
        return
    assert kind == "wsgi"
    wsgi_app = WSGIApp()
    with CrediciClient.from_url(
        url, namespace=namespace, timeout=timeout, **(client_options or {})
    ) as client:
        wrapped = wsgi.CreditMiddleware(
            wsgi_app,
            client=client,
            user=wsgi.user_from_header("X-User"),
            cost=wsgi_cost,
            reserve=wsgi_reserve,
            **options,
        )
        with serve_wsgi(wrapped) as base, httpx.Client(base_url=base, timeout=10) as http:
            yield Served(kind, http, wsgi_app.state)
