"""Bounded work per script, whatever the user's state (issue: one idle user could stop Redis).

A script applies at most MAX_EVENTS (64) of what fell due while the user was idle, and stops
sooner once 2 ms of the server's time went by (checked every CHECK_EVERY events: a slow or busy
server takes fewer per step), saves that step and replies CATCHUP; the client sends it again
until the user is up to now, and only then does the operation run. A renewing fixed-period
cycle idle for many periods is caught up in closed form: one cycle_start entry for all the
periods that started unseen.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import CrediciClient
from credici_redis._core.keys import user_keys
from credici_redis._core.protocol import Call, Ledger
from credici_redis._core.requests import UserRequest
from credici_redis._ops import account
from tests.conftest import URL_BACKENDS, FakeClock, raw_redis

MAX_EVENTS, CHECK_EVERY = 64, 8


def _one_balance_script(raw: Any, namespace: str, user: str, now_ms: int) -> Any:
    """One BALANCE script, sent once, as the client builds it: its raw reply."""
    ledger = Ledger(namespace, 86_400_000)
    flow = ledger.execute(account.BALANCE, UserRequest(user, now_ms))
    (call,) = next(flow)
    assert isinstance(call, Call) and call.script is account.BALANCE.script
    raw.script_load(account.BALANCE.script.source)
    return raw.execute_command(*call.args)


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_many_buckets_expiring_together_take_several_bounded_steps(
    url: str, namespace: str, clock: FakeClock
) -> None:
    client = CrediciClient.from_url(url, namespace=namespace, clock=clock)
    raw = raw_redis(url)
    try:
        buckets = 3 * MAX_EVENTS + 17
        client.add_many([("u", 1, clock.now + timedelta(hours=1)) for _ in range(buckets)])
        client.add("u", 5)
        clock.advance(timedelta(hours=2))
        now_ms = int(clock.now.timestamp() * 1000)
        history = user_keys(namespace, "u").history
        before = raw.xlen(history)
        # One script applies up to MAX_EVENTS expiries (fewer, by CHECK_EVERY, if they took
        # more than 2 ms), saves them, and asks to be sent again.
        assert _one_balance_script(raw, namespace, "u", now_ms) == [b"CATCHUP"]
        applied = raw.xlen(history) - before
        assert CHECK_EVERY <= applied <= MAX_EVENTS and applied % CHECK_EVERY == 0, applied
        # The client keeps sending until the user is up to now; then the operation runs.
        assert client.get_balance("u") == 5
        assert raw.xlen(history) == before + buckets
        expired = [t for t in client.get_all_user_transactions("u") if t.kind == "expire"]
        assert len(expired) == buckets and all(t.amount == -1 for t in expired)
        assert client.audit("u").ok
    finally:
        client.close()
        raw.close()


@pytest.mark.parametrize("backend", URL_BACKENDS)
def test_a_charge_runs_only_once_the_user_is_up_to_now(
    url: str, namespace: str, clock: FakeClock
) -> None:
    """A keyed charge behind a long catch-up applies once, after every expiry before it."""
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as client:
        client.add_many([("u", 2, clock.now + timedelta(minutes=1)) for _ in range(450)])
        client.add("u", 100)
        clock.advance(timedelta(minutes=5))
        charge = client.subtract("u", 30, idempotency_key="k")
        assert charge.balance_after == 70
        assert client.subtract("u", 30, idempotency_key="k") == charge
        kinds = [t.kind for t in client.get_all_user_transactions("u")]
        assert kinds[0] == "subtract" and kinds.count("expire") == 450
        assert client.audit("u").ok


@pytest.mark.parametrize("backend", URL_BACKENDS)
def test_a_tiny_renewing_period_idle_for_a_month_is_one_entry(
    url: str, namespace: str, clock: FakeClock
) -> None:
    """A 1 ms renewing cycle idle for 30 days used to write 2.6 million entries in one script."""
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as client:
        cycle = client.start_cycle(10, timedelta(milliseconds=1), "u", renew=True, rollover=None)
        client.subtract("u", 4)
        clock.advance(timedelta(days=30))
        assert client.get_balance("u") == 16  # 6 rolled over through every period, + 10
        history = client.get_all_user_transactions("u")
        assert [(t.kind, t.amount, t.periods) for t in history] == [
            ("cycle_start", 10, None),  # the period containing now
            ("cycle_start", 0, 30 * 86_400_000 - 1),  # every period that passed unseen
            ("subtract", -4, None),
            ("cycle_start", 10, None),
        ]
        assert history[1].created_at == cycle.ends_at
        now = client.get_cycle("u")
        assert now is not None and now.started_at == cycle.started_at + timedelta(days=30)
        assert client.audit("u").ok


@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_idle_periods_stop_at_another_event_and_resume_after_it(
    url: str, namespace: str, clock: FakeClock
) -> None:
    """A promo bucket expiring in the middle of the idle time expires in its place in time."""
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as client:
        start = client.start_cycle(5, timedelta(hours=1), "u", renew=True, rollover=0)
        client.add("u", 3, ttl=timedelta(hours=10, minutes=30))
        clock.advance(timedelta(days=1))
        history = client.get_all_user_transactions("u")[::-1]  # oldest first
        rows = [(t.kind, t.amount, t.periods, t.created_at - start.started_at) for t in history]
        hour = timedelta(hours=1)
        assert rows == [
            ("cycle_start", 5, None, timedelta(0)),
            ("add", 3, None, timedelta(0)),
            ("expire", -5, None, hour),  # rollover 0: the first grant expires
            ("cycle_start", 0, 10, hour),  # hours 1..10 start unseen, before the promo ends
            ("expire", -3, None, 10 * hour + 30 * timedelta(minutes=1)),
            ("cycle_start", 0, 13, 11 * hour),  # hours 11..23
            ("cycle_start", 5, None, 24 * hour),
        ]
        assert client.get_balance("u") == 5
        assert client.audit("u").ok
