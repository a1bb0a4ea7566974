"""The operator console (issue 20): a user's credits in a browser, and the few actions an
operator needs, each through the public client API.

    create_app(client, *, read_only=False, authorize=...) -> an ASGI app (Starlette)
    credici-redis console --redis-url URL --namespace NS [--port 8080] [--read-only]

Pages are plain server-rendered HTML (Jinja2, autoescaped: user ids and metadata stay text),
inline CSS and an inline SVG chart: no build step, no CDN, usable offline and on a phone.

    GET  /                       search box (a user id, or a transaction id) and the namespace
    GET  /search?q=              -> the user's page (a transaction id: its user's)
    GET  /users/{user_id}        balance, available, held, debt, credit limit; buckets with their
                                 expiry; the cycle; limits; credits spent per day (30 days);
                                 history page by page (?before=, ?kind=, ?from=, ?to=), each
                                 entry with its balance after and metadata; holds in the page
    POST /users/{user_id}/grant  add         }  unless read_only; each needs a reason, kept in
    POST /users/{user_id}/charge subtract    }  the entry's metadata with the operator's name
    POST /users/{user_id}/release release    }  (from `authorize`); the form's one-time key is
    POST /users/{user_id}/reverse reverse    }  the call's idempotency key: a double-clicked
    POST /users/{user_id}/credit-limit       }  button applies once

`authorize(request)` returns the operator's name, or None to refuse (403); mount the app behind
the service's own authentication and make `authorize` read who logged in. Forms carry a token
made with a secret of the app's own (no cross-site form can post one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import parse_qs, quote

from credici_redis._core import extras
from credici_redis._core.keys import parse_transaction_id
from credici_redis.errors import CrediciError, InvalidInputError, UsageUnavailableError
from credici_redis.models import TransactionKind

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from credici_redis._archive.base import ArchiveLag
    from credici_redis.client import AsyncCrediciClient

Authorize = Callable[["Request"], "str | Awaitable[str | None] | None"]

PAGE = 50
"""History entries per page: the page's reads stay bounded whatever the history's length."""
BUCKETS_SHOWN = 200
EVENTS_SHOWN = 20
HOLDS_SHOWN = 100
USERS_COUNTED = 100_000
"""The overview's user count stops there (SCAN: 100 round trips of 1,000)."""
CHART_DAYS = 30
KINDS: tuple[str, ...] = get_args(TransactionKind)
_TEMPLATES = Path(__file__).resolve().parent / "templates"


def _anyone(request: Request) -> str:
    return "console"


def create_app(
    client: AsyncCrediciClient,
    *,
    read_only: bool = False,
    authorize: Authorize = _anyone,
    close_client: bool = False,
) -> Starlette:
    """The console over `client` (an AsyncCrediciClient), as an ASGI app to serve or mount.
    close_client: close the client when the app shuts down (the app made for it alone)."""
    extras.need("starlette", feature="the console", extra="console")
    jinja2 = extras.need("jinja2", feature="the console", extra="console")
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, RedirectResponse
    from starlette.routing import Route

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    secret = secrets.token_bytes(32)

    def token(key: str) -> str:
        return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()

    def form_key() -> dict[str, str]:
        key = uuid.uuid4().hex
        return {"key": key, "token": token(key)}

    async def operator(request: Request) -> str | None:
        name = authorize(request)
        if inspect.isawaitable(name):
            name = await name
        return name

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        root = request.scope.get("root_path", "")  # where the app is mounted
        page = env.get_template(name).render(read_only=read_only, root=root, **context)
        return HTMLResponse(page, status_code=status)

    def go(request: Request, path: str) -> Response:
        return RedirectResponse(request.scope.get("root_path", "") + path, status_code=303)

    async def index(request: Request) -> Response:
        if await operator(request) is None:
            return render(request, "error.html", 403, message="not allowed")
        (users, more), lag, events = await asyncio.gather(
            _count_users(client), _archive_lag(client), client.recent_events(EVENTS_SHOWN)
        )
        namespace = getattr(getattr(client.storage, "ledger", None), "namespace", "")
        return render(
            request, "index.html", namespace=namespace, users=users, more=more, lag=lag,
            events=events, archived=client.archive is not None,
        )  # fmt: skip

    async def search(request: Request) -> Response:
        q = request.query_params.get("q", "").strip()
        if not q:
            return go(request, "/")
        try:
            user, _ = parse_transaction_id(q)
            return go(request, f"/users/{quote(user, safe='')}?tx={quote(q)}")
        except InvalidInputError:
            return go(request, f"/users/{quote(q, safe='')}")

    async def user_page(request: Request) -> Response:
        who = await operator(request)
        if who is None:
            return render(request, "error.html", 403, message="not allowed")
        user_id = request.path_params["user_id"]
        params = request.query_params
        try:
            return render(request, "user.html", **(await _user_context(client, user_id, params)),
                          form=form_key, notice=params.get("notice", ""))  # fmt: skip
        except CrediciError as exc:
            return render(request, "error.html", 400, message=f"{type(exc).__name__}: {exc}")

    async def act(request: Request) -> Response:
        who = await operator(request)
        if who is None or read_only:
            return render(request, "error.html", 403, message="read-only" if who else "not allowed")
        user_id, action = request.path_params["user_id"], request.path_params["action"]
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        key, reason = form.get("key", ""), form.get("reason", "").strip()
        if not key or not hmac.compare_digest(token(key), form.get("token", "")):
            return render(request, "error.html", 403, message="this form is not the console's")
        if not reason:
            return render(
                request, "error.html", 400, message="a reason is required; nothing changed"
            )
        meta = {"reason": reason[:200], "operator": who[:100]}
        ikey = f"console:{key}"
        try:
            notice = await _do(client, action, user_id, form, meta, ikey)
        except CrediciError as exc:
            return render(request, "error.html", 400, message=f"{type(exc).__name__}: {exc}")
        return go(request, f"/users/{quote(user_id, safe='')}?notice={quote(notice)}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if close_client:
            await client.aclose()

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", index),
            Route("/search", search),
            Route("/users/{user_id:path}/{action:str}", act, methods=["POST"]),
            Route("/users/{user_id:path}", user_page),
        ],
    )


async def _count_users(client: AsyncCrediciClient) -> tuple[int, bool]:
    """Users of the namespace by SCAN, up to USERS_COUNTED (True: there are more)."""
    users = 0
    async for batch in client.scan_users(batch=1000):
        users += len(batch)
        if users >= USERS_COUNTED:
            return users, True
    return users, False


async def _archive_lag(client: AsyncCrediciClient) -> ArchiveLag | None:
    """The archiver's lag, where the console was given the archive (archive_url) and the
    ledger is on Redis; None otherwise (without an archiver, every user would be waiting)."""
    from credici_redis._storages.redis_async import AsyncRedisStorage

    storage: Any = client.storage
    if client.archive is None or not isinstance(
        getattr(storage, "inner", storage), AsyncRedisStorage
    ):
        return None
    from credici_redis._archive.archive_async import AsyncArchiver

    archiver = AsyncArchiver(
        storage=storage, postgres_url=client.archive.url, namespace=storage.ledger.namespace
    )
    return await archiver.lag()  # reads Redis only; the storage stays the client's


async def _do(
    client: AsyncCrediciClient,
    action: str,
    user_id: str,
    form: dict[str, str],
    meta: dict[str, str],
    ikey: str,
) -> str:
    """One action through the public API, under the form's idempotency key."""
    if action == "grant":
        tx = await client.add(user_id, _int(form, "amount"), idempotency_key=ikey, metadata=meta)
        return f"granted {tx.amount}: balance {tx.balance_after}"
    if action == "charge":
        tx = await client.subtract(
            user_id, _int(form, "amount"), idempotency_key=ikey, metadata=meta
        )
        return f"charged {-tx.amount}: balance {tx.balance_after}"
    if action == "reverse":
        tx = await client.reverse(
            form.get("transaction_id", ""), idempotency_key=ikey, metadata=meta
        )
        return f"reversed: {tx.amount:+d}, balance {tx.balance_after}"
    if action == "release":
        hold = await client.release(form.get("hold_id", ""), metadata=meta)
        return f"hold released: {hold.amount} back"
    if action == "credit-limit":
        await client.set_credit_limit(user_id, _int(form, "limit"), metadata=meta)
        return f"credit limit set to {form['limit']}"
    raise InvalidInputError(f"no such action: {action!r}")


def _int(form: dict[str, str], name: str) -> int:
    """A number field; its range is the client's to check (InvalidAmountError...)."""
    try:
        return int(form.get(name, ""))
    except ValueError:
        raise InvalidInputError(f"{name} must be a whole number") from None


def _instant(text: str) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(f"not a date: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


async def _user_context(client: AsyncCrediciClient, user_id: str, params: Any) -> dict[str, Any]:
    """Everything the user page shows, from bounded reads only."""
    before = params.get("before") or None
    kind = params.get("kind", "")
    start, end = _instant(params.get("from", "")), _instant(params.get("to", ""))
    if start or end:
        start = start or datetime(1970, 1, 1, tzinfo=timezone.utc)
        end = end or datetime.now(timezone.utc) + timedelta(days=1)
        history = client.get_user_transactions_for_period(
            user_id, start, end, limit=PAGE, before=before
        )
    else:
        history = client.get_all_user_transactions(user_id, limit=PAGE, before=before)
    # Independent reads, sent together (one pipeline with a batching client).
    details, cycle, limits, page, chart, holds = await asyncio.gather(
        client.get_balance_details(user_id), client.get_cycle(user_id),
        client.get_limits(user_id), history, _spent_per_day(client, user_id),
        client.get_holds(user_id, HOLDS_SHOWN),
    )  # fmt: skip
    shown = [t for t in page if not kind or t.kind == kind]
    # A pool's member caps: those of the members the page's entries name (at most PAGE reads).
    members = sorted({t.member for t in page if t.member})
    usages = await asyncio.gather(*(client.get_member_usage(user_id, m) for m in members))
    return {
        "user_id": user_id,
        "details": details,
        "buckets": details.buckets[:BUCKETS_SHOWN],
        "timeline": _timeline(details.buckets[:BUCKETS_SHOWN]),
        "members": [u for u in usages if u.cap is not None or u.used],
        "more_buckets": max(len(details.buckets) - BUCKETS_SHOWN, 0),
        "cycle": cycle,
        "limits": limits,
        "history": shown,
        "next_before": page[-1].transaction_id if len(page) == PAGE else "",
        "kind": kind,
        "kinds": KINDS,
        "period": {"from": params.get("from", ""), "to": params.get("to", "")},
        "holds": holds.holds,
        "more_holds": holds.more,
        "chart": chart,
        "highlight": params.get("tx", ""),
    }


def _timeline(buckets: list[Any]) -> dict[str, Any]:
    """The buckets' expiries on a line from now to the last one (inline SVG, no script): a mark
    per bucket, its height by its credits; buckets that never expire are counted aside."""
    now = datetime.now(timezone.utc)
    dated = [b for b in buckets if b.expire_at is not None]
    never = sum(b.amount for b in buckets if b.expire_at is None)
    if not dated:
        return {"marks": [], "never": never}
    end = max(b.expire_at for b in dated)
    span = max((end - now).total_seconds(), 1.0)
    top = max(b.amount for b in dated) or 1
    marks = []
    for b in dated:
        x = 10 + 580 * min(max((b.expire_at - now).total_seconds(), 0.0) / span, 1.0)
        height = max(4.0, 40 * b.amount / top)
        marks.append({
            "x": round(x, 1), "y": round(50 - height, 1), "h": round(height, 1),
            "label": f"{b.amount} credits expire {b.expire_at:%Y-%m-%d %H:%M} UTC",
        })  # fmt: skip
    return {"marks": marks, "never": never, "end": f"{end:%Y-%m-%d %H:%M}"}


async def _spent_per_day(client: AsyncCrediciClient, user_id: str) -> dict[str, Any]:
    """Credits spent per day over the last CHART_DAYS days, as SVG bars (no script)."""
    now = datetime.now(timezone.utc)
    try:
        points = await client.get_usage(
            user_id, now - timedelta(days=CHART_DAYS - 1), now, granularity="day"
        )
    except UsageUnavailableError:
        return {"bars": [], "top": 0}
    top = max((p.spent for p in points), default=0)
    width = 600 / max(len(points), 1)
    bars = []
    for i, p in enumerate(points):
        height = 0 if top <= 0 else max(p.spent, 0) * 120 / top
        bars.append({
            "x": round(i * width + 1, 1), "y": round(130 - height, 1),
            "w": round(max(width - 2, 1), 1), "h": round(height, 1),
            "label": f"{p.start.date()}: {p.spent} spent",
        })  # fmt: skip
    return {"bars": bars, "top": top}
