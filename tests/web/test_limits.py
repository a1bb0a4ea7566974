"""Limits over HTTP: a charge or reservation refused by the user's rate or budget (its own, or
the client's `default_limits`) is a 429 with ``Retry-After`` and the ``RateLimit`` field of
draft-ietf-httpapi-ratelimit-headers, and the handler never runs; not enough credits stays a 402.

Each test runs on both servers (the contract app of `tests/web/contract.py`) and on both Redis
backends (the real Redis, memory://). The clients share an injected clock, so the waits are
exact: a rate of 2 per minute frees one credit every 30 s.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from credici_redis import CrediciClient
from credici_redis._web.metering import refusal_for, wait_seconds
from credici_redis.errors import BudgetExceededError, RateLimitedError
from credici_redis.models import Budget, Limits, RateLimit
from tests.conftest import FakeClock
from tests.web.conftest import credit_headers, fresh_user, holds, settled, subtracts
from tests.web.contract import KINDS, RESERVE, Served, serve_contract

Serve = Callable[..., AbstractContextManager[Served]]

PER_MINUTE_2 = RateLimit(2, timedelta(minutes=1))
MINUTE_AND_A_HALF = timedelta(seconds=90)
_SERVICE_LIMIT = re.compile(r'"(?P<policy>[a-z]+)";r=(?P<r>\d+)(?:;t=(?P<t>\d+))?')


@pytest.fixture(params=KINDS)
def serve(request: pytest.FixtureRequest, url: str, namespace: str, clock: FakeClock) -> Serve:
    """``serve(**client_options)``: the contract app of this test's server on this test's
    backend, its client on the test's clock (and given `client_options`: default_limits)."""
    kind: str = request.param

    def start(**client_options: Any) -> AbstractContextManager[Served]:
        options = {"clock": clock, **client_options}
        return serve_contract(kind, url, namespace, timeout=5.0, client_options=options)

    return start


@pytest.fixture
def credits(url: str, namespace: str, clock: FakeClock) -> Iterator[CrediciClient]:
    """A client on the same credits and clock as the served app's, to set up and check."""
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as client:
        yield client


def service_limit(response: httpx.Response) -> tuple[str, int, int | None]:
    """The ``RateLimit`` field of a response, parsed: (policy, r, t)."""
    match = _SERVICE_LIMIT.fullmatch(response.headers["ratelimit"])
    assert match is not None, response.headers["ratelimit"]
    t = match["t"]
    return match["policy"], int(match["r"]), None if t is None else int(t)


def assert_rate_limited(
    r: httpx.Response, wait: int, required: int = 1, policy: str = '"rate";q=2;w=60'
) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "rate_limited", "required": required, "retry_after": wait}
    assert int(r.headers["retry-after"]) == wait
    assert service_limit(r) == ("rate", 0, wait)
    assert r.headers["ratelimit-policy"] == policy


def assert_never_passes(r: httpx.Response, required: int) -> None:
    assert r.status_code == 429, r.text
    body = r.json()
    assert body.pop("detail").endswith("this request can never pass")
    assert body == {"error": "rate_limited", "required": required, "retry_after": None}
    assert "retry-after" not in r.headers and "ratelimit" not in r.headers


def assert_over_budget(
    r: httpx.Response,
    required: int,
    remaining: int,
    resets_at: datetime,
    now: datetime,
    policy: str = '"budget";q=12;w=3600',
) -> None:
    wait = max(math.ceil((resets_at - now) / timedelta(seconds=1)), 1)  # rounded up, >= 1
    assert r.status_code == 429, r.text
    assert r.json() == {
        "error": "budget_exceeded",
        "required": required,
        "remaining": remaining,
        "resets_at": resets_at.isoformat(),
        "retry_after": wait,
    }
    assert int(r.headers["retry-after"]) == wait
    assert service_limit(r) == ("budget", remaining, wait)
    assert r.headers["ratelimit-policy"] == policy


def next_hour(now: datetime) -> datetime:
    """The end of the fixed one-hour window (counted from the Unix epoch) holding `now`."""
    return datetime.fromtimestamp((int(now.timestamp()) // 3600 + 1) * 3600, timezone.utc)


def next_midnight(now: datetime) -> datetime:
    day = now.astimezone(timezone.utc).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def test_a_rate_limited_request_is_429_until_it_may_pass(
    serve: Serve, credits: CrediciClient, clock: FakeClock
) -> None:
    user = fresh_user()
    credits.add(user, 100)
    credits.set_limits(user, rate=PER_MINUTE_2)
    with serve() as served:
        http, headers = served.http, {"X-User": user}
        for _ in range(2):
            assert http.get("/echo", headers=headers).status_code == 200
        r = http.get("/echo", headers=headers)
        assert_rate_limited(r, 30)
        assert credit_headers(r) == {"x-credits-cost": "1"}
        assert served.calls == {"/echo": 2}  # the handler did not run...
        assert credits.get_balance(user) == 98 and len(subtracts(credits, user)) == 2  # ...unpaid

        # 10.5 s later the wait is 19.5 s: said as 20 (rounded up, so never too early).
        clock.advance(timedelta(seconds=10.5))
        keyed = {**headers, "Idempotency-Key": "after-the-wait"}
        assert_rate_limited(http.get("/echo", headers=keyed), 20)
        # More than the burst never passes: no Retry-After to give.
        assert_never_passes(http.get("/expensive", headers=headers), 5)
        clock.advance(timedelta(seconds=19.5))
        r = http.get("/echo", headers=keyed)  # the refusal did not use up the key
        assert r.status_code == 200 and r.headers["x-credits-remaining"] == "97"
        assert_rate_limited(http.get("/echo", headers=headers), 30)
        assert served.calls == {"/echo": 3}
    (paid, *_) = subtracts(credits, user)
    assert paid.idempotency_key == "http:after-the-wait"
    assert credits.get_balance(user) == 97

    # Not enough credits is still a 402, limits or not (credits are checked first).
    poor = fresh_user()
    credits.add(poor, 3)
    credits.set_limits(poor, rate=PER_MINUTE_2)
    with serve() as served:
        r = served.http.get("/expensive", headers={"X-User": poor})
        assert (r.status_code, r.json()) == (
            402,
            {"error": "insufficient_credits", "required": 5, "available": 3},
        )
        assert "retry-after" not in r.headers and "ratelimit" not in r.headers
        assert served.calls == {}


def test_a_rate_limited_reservation_is_429_and_nothing_is_held(
    serve: Serve, credits: CrediciClient
) -> None:
    user = fresh_user()
    credits.add(user, 100)
    credits.set_limits(user, rate=RateLimit(2 * RESERVE, timedelta(minutes=1)))
    with serve() as served:
        http, headers = served.http, {"X-User": user}
        for balance in (97, 94):
            assert http.get("/stream", params={"n": 3}, headers=headers).status_code == 200
            settled(credits, user, balance)
        # A reservation uses the rate it reserves (10 credits: 30 s of this one).
        r = http.get("/stream", params={"n": 3}, headers=headers)
        assert_rate_limited(r, 30, required=RESERVE, policy='"rate";q=20;w=60')
        assert credit_headers(r) == {"x-credits-reserved": str(RESERVE)}
        assert served.calls == {"/stream": 2}
        kinds = [kind for kind, _, _ in holds(credits, user)]
        assert kinds == ["reserve", "capture", "reserve", "capture"]  # no third hold
        assert credits.get_balance_details(user).held == 0

        # A reservation larger than the burst never passes.
        small = fresh_user()
        credits.add(small, 100)
        credits.set_limits(small, rate=RateLimit(RESERVE - 1, timedelta(minutes=1)))
        r = http.get("/stream", headers={"X-User": small})
        assert_never_passes(r, RESERVE)
        assert credit_headers(r) == {"x-credits-reserved": str(RESERVE)}
        assert served.calls == {"/stream": 2} and holds(credits, small) == []


def test_a_request_over_budget_is_429_until_the_period_ends(
    serve: Serve, credits: CrediciClient, clock: FakeClock
) -> None:
    user = fresh_user()
    credits.add(user, 100)
    credits.set_limits(user, budget=Budget(12, timedelta(hours=1)))
    resets_at = next_hour(clock.now)
    with serve() as served:
        http, headers = served.http, {"X-User": user}
        assert http.get("/expensive", headers=headers).status_code == 200  # 5 spent
        # A reservation counts in full: 5 + 10 is over 12.
        r = http.get("/stream", headers=headers)
        assert_over_budget(r, RESERVE, 7, resets_at, clock.now)
        assert credit_headers(r) == {"x-credits-reserved": str(RESERVE)}
        assert http.get("/expensive", headers=headers).status_code == 200  # 10 spent
        r = http.get("/expensive", headers=headers)
        assert_over_budget(r, 5, 2, resets_at, clock.now)
        assert credit_headers(r) == {"x-credits-cost": "5"}
        for _ in range(2):
            assert http.get("/echo", headers=headers).status_code == 200  # 12 spent
        assert_over_budget(http.get("/echo", headers=headers), 1, 0, resets_at, clock.now)
        assert served.calls == {"/expensive": 2, "/echo": 2}
        assert credits.get_balance(user) == 100 - 12 and len(subtracts(credits, user)) == 4
        assert holds(credits, user) == []

        # Half a second before the period ends: Retry-After 1 (rounded up, never 0).
        clock.now = resets_at - timedelta(milliseconds=500)
        r = http.get("/echo", headers=headers)
        assert_over_budget(r, 1, 0, resets_at, clock.now)
        assert r.headers["retry-after"] == "1"
        clock.now = resets_at
        assert http.get("/echo", headers=headers).status_code == 200
        assert http.get("/stream", params={"n": 2}, headers=headers).status_code == 200
        settled(credits, user, 100 - 12 - 1 - 2)


def test_the_clients_default_limits_refuse_users_without_their_own(
    serve: Serve, credits: CrediciClient, clock: FakeClock
) -> None:
    # A free plan: every user without limits of its own gets these, with no call per user.
    plan = Limits(rate=PER_MINUTE_2, budget=Budget(4, "day"))
    user, paying, broke = fresh_user(), fresh_user(), fresh_user()
    credits.add(user, 100)
    credits.add(paying, 100)
    credits.set_limits(paying, rate=RateLimit(100, timedelta(minutes=1)))  # its own win
    with serve(default_limits=plan) as served:
        http, headers = served.http, {"X-User": user}
        for _ in range(2):
            assert http.get("/echo", headers=headers).status_code == 200
        r = http.get("/echo", headers=headers)
        assert_rate_limited(r, 30)
        # Budget before rate: 2 spent of 4 today, 5 more is over; resets at midnight UTC.
        r = http.get("/expensive", headers=headers)
        assert_over_budget(r, 5, 2, next_midnight(clock.now), clock.now, '"budget";q=4;w=86400')
        assert credit_headers(r) == {"x-credits-cost": "5"}

        for _ in range(3):
            assert http.get("/expensive", headers={"X-User": paying}).status_code == 200
        # No credits is a 402 before any limit.
        r = http.get("/echo", headers={"X-User": broke})
        assert (r.status_code, r.json()["error"]) == (402, "insufficient_credits")
        assert served.calls == {"/echo": 2, "/expensive": 3}
    own = credits.get_limits(user)  # this client has no default_limits: the user's own
    assert (own.rate, own.budget) == (None, None)
    assert credits.get_balance(user) == 98 and credits.get_balance(paying) == 85


def test_refusal_headers_and_rounding() -> None:
    """The exact fields, without a server: a refusal's wait is rounded up, and at least 1."""

    def refuse(exc: Exception, reserving: bool = False, **kwargs: Any) -> Any:
        refusal = refusal_for(
            exc,  # type: ignore[arg-type]
            user_id="alice", cost=3, policy="closed", logger=logging.getLogger("t"),
            method="GET", path="/", reserving=reserving, **kwargs,
        )  # fmt: skip
        assert refusal is not None and refusal.status_line == "429 Too Many Requests"
        return refusal

    assert [wait_seconds(timedelta(seconds=s)) for s in (-5, 0, 0.001, 1, 29.001, 30)] == [
        1, 1, 1, 1, 30, 30,
    ]  # fmt: skip
    rate = refuse(RateLimitedError("alice", 3, timedelta(seconds=29, milliseconds=1)))
    assert rate.headers == (
        ("Retry-After", "30"),
        ("RateLimit", '"rate";r=0;t=30'),
        ("X-Credits-Cost", "3"),
    )
    assert rate.payload() == b'{"error":"rate_limited","required":3,"retry_after":30}'
    never = refuse(RateLimitedError("alice", 3, None), reserving=True)
    assert never.headers == (("X-Credits-Reserved", "3"),)
    assert never.body["retry_after"] is None

    now = datetime(2030, 1, 1, 23, 0, 0, 250_000, tzinfo=timezone.utc)
    midnight = datetime(2030, 1, 2, tzinfo=timezone.utc)
    budget = refuse(BudgetExceededError("alice", 3, 2, midnight), now=lambda: now)
    assert budget.headers == (
        ("Retry-After", "3600"),  # 3599.75 s, rounded up
        ("RateLimit", '"budget";r=2;t=3600'),
        ("X-Credits-Cost", "3"),
    )
    assert budget.body == {
        "error": "budget_exceeded",
        "required": 3,
        "remaining": 2,
        "resets_at": "2030-01-02T00:00:00+00:00",
        "retry_after": 3600,
    }
    late = refuse(BudgetExceededError("alice", 3, 0, midnight), now=lambda: midnight)
    assert late.headers[:2] == (("Retry-After", "1"), ("RateLimit", '"budget";r=0;t=1'))
    # The storage's count wins, even a wait of 0 (its period ends now), over this clock's.
    due = BudgetExceededError("alice", 3, 0, midnight, retry_after=timedelta(0))
    assert refuse(due, now=lambda: now).headers[0] == ("Retry-After", "1")

    # With the limit the script names: its quota policy; the wait as the storage counted it.
    ny = ZoneInfo("America/New_York")
    march = datetime(2030, 3, 1, tzinfo=ny)  # February 2030: 28 days in New York
    monthly = BudgetExceededError(
        "alice", 3, 1, march, retry_after=timedelta(seconds=10.5),
        limit=Budget(50, "month", "America/New_York"),
    )  # fmt: skip
    assert refuse(monthly, now=lambda: now).headers == (
        ("Retry-After", "11"),
        ("RateLimit", '"budget";r=1;t=11'),
        ("RateLimit-Policy", '"budget";q=50;w=2419200'),
        ("X-Credits-Cost", "3"),
    )
    limited = RateLimitedError(
        "alice", 3, timedelta(seconds=2), limit=RateLimit(10, MINUTE_AND_A_HALF)
    )
    assert refuse(limited).headers == (
        ("Retry-After", "2"),
        ("RateLimit", '"rate";r=0;t=2'),
        ("RateLimit-Policy", '"rate";q=10;w=90'),
        ("X-Credits-Cost", "3"),
    )
