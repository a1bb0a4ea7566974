"""Store bugs the model-based test found, each reduced to a few calls: regression tests.

A new bug the model finds goes here as a strict xfail first (it fails the run as soon as it
passes), saying what the README promises and what the store does instead; the model may follow the
store's wrong behaviour behind a KNOWN_BUG_* flag so the state machine can look for other
differences meanwhile. All six found so far are fixed; their tests stay as regression tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from credici_redis import CrediciClient
from credici_redis.errors import HoldNotFoundError, IdempotencyConflictError, InvalidAmountError
from tests.conftest import REDIS_URL, FakeClock, delete_namespace

START = datetime(2030, 1, 1, tzinfo=timezone.utc)
SECOND = timedelta(seconds=1)


@pytest.fixture
def clock() -> FakeClock:
    clock = FakeClock()
    clock.now = START
    return clock


@pytest.fixture(params=["redis", "memory"])
def client(request: pytest.FixtureRequest, clock: FakeClock) -> Iterator[CrediciClient]:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    url = REDIS_URL if request.param == "redis" else f"memory://{namespace}"
    client = CrediciClient.from_url(url, namespace=namespace, clock=clock)
    try:
        yield client
    finally:
        client.close()
        delete_namespace(namespace)


def history(client: CrediciClient, user: str) -> list[tuple[str, int, datetime, int]]:
    """(kind, amount, created_at, balance_after), oldest first."""
    return [
        (t.kind, t.amount, t.created_at, t.balance_after)
        for t in reversed(client.get_all_user_transactions(user))
    ]


# Was a known bug (fixed): what fell due while the user was idle was not processed in time order:
# holds whose ttl passed were settled before expired buckets were recorded, whatever their times.
def test_an_expiry_before_a_hold_timeout_is_recorded_at_its_expiry(
    client: CrediciClient, clock: FakeClock
) -> None:
    client.add("u", 10, ttl=10 * SECOND)
    client.reserve("u", 10, ttl=20 * SECOND)  # all of that bucket
    client.add("u", 3, ttl=5 * SECOND)  # expires first, not held
    clock.advance(30 * SECOND)
    assert client.get_balance("u") == 0
    # README: an expired bucket appears as an "expire" entry dated at its expiry. The store dated
    # the 3 credits' expiry at 0:00:20 (the hold's timeout) and recorded it after the release.
    assert history(client, "u")[3:] == [
        ("expire", -3, START + 5 * SECOND, 0),
        ("release", 10, START + 20 * SECOND, 10),
        ("expire", -10, START + 20 * SECOND, 0),  # back into a bucket expired meanwhile
    ]


# Was a known bug (fixed), same cause: renewals ran before the holds that timed out earlier.
def test_credits_of_a_hold_that_timed_out_before_a_renewal_roll_over(
    client: CrediciClient, clock: FakeClock
) -> None:
    client.start_cycle(100, 1, "u", renew=True, rollover=None)  # all unspent credits carry
    client.reserve("u", 30, ttl=timedelta(hours=1))
    clock.advance(timedelta(days=1, hours=2))
    # At 1:00 the 30 credits came back to the grant (README: "credits go back to the buckets
    # they came from"); at the day's end all 100 unspent ones carried into the next grant.
    # The store renewed first (carrying 70), then released the hold dated at the renewal and let
    # its 30 credits expire: balance 170, granted 170.
    assert client.get_balance("u") == 200
    cycle = client.get_cycle("u")
    assert cycle is not None and cycle.granted == 200


# Was a known bug (fixed): reserve and capture raised the conflict with user_id '' and
# idempotency_key '' (the protocol parses their replies with no user and no key).
def test_reserve_and_capture_conflicts_name_user_and_key(client: CrediciClient) -> None:
    client.add("u", 10)
    client.reserve("u", 1, idempotency_key="r")
    with pytest.raises(IdempotencyConflictError) as reserve:
        client.reserve("u", 2, idempotency_key="r")
    hold = client.reserve("u", 3)
    client.capture(hold.hold_id, 1, idempotency_key="c")
    with pytest.raises(IdempotencyConflictError) as capture:
        client.capture(hold.hold_id, 2, idempotency_key="c")
    assert (reserve.value.user_id, reserve.value.idempotency_key) == ("u", "r")
    assert (capture.value.user_id, capture.value.idempotency_key) == ("u", "c")


# Was a known bug (fixed): start_cycle's errors lost their facts: a key conflict has
# idempotency_key '', a grant past 2**53-1 has amount 0.
def test_start_cycle_errors_name_their_facts(client: CrediciClient) -> None:
    client.start_cycle(5, 30, "u", idempotency_key="c")
    with pytest.raises(IdempotencyConflictError) as conflict:
        client.start_cycle(6, 30, "u", idempotency_key="c")
    assert (conflict.value.user_id, conflict.value.idempotency_key) == ("u", "c")
    client.add("v", 2**53 - 1)
    with pytest.raises(InvalidAmountError) as too_much:
        client.start_cycle(1, 30, "v")
    assert too_much.value.amount == 1


# Was a known bug (fixed). README: "a hold is remembered a day after it ended, then
# HoldNotFoundError". A hold that timed out two days ago, looked at for the first time since,
# raised HoldFinishedError('expired'): the store released it (dated at its ttl) in that very
# operation and only forgot it in a later one.
def test_a_hold_that_timed_out_over_a_day_ago_is_unknown(
    client: CrediciClient, clock: FakeClock
) -> None:
    client.add("u", 1)
    hold = client.reserve("u", 1, ttl=timedelta(milliseconds=1))
    clock.advance(timedelta(days=2))
    with pytest.raises(HoldNotFoundError):
        client.release(hold.hold_id)


# Was a known bug (fixed), found by the long profile: a capture whose returned credits come from
# a bucket that expired while held records "capture" (+returned) then "expire" (-returned); the
# Transaction capture() returned carried the balance after the "expire" entry, so it differed
# from the very entry history holds.
def test_a_capture_returns_its_own_history_entry_when_the_rest_expired(
    client: CrediciClient, clock: FakeClock
) -> None:
    client.add("u", 10, ttl=10 * SECOND)
    hold = client.reserve("u", 10, ttl=60 * SECOND)
    clock.advance(20 * SECOND)  # the bucket expires while held
    captured = client.capture(hold.hold_id, 3)
    newest = client.get_all_user_transactions("u")
    assert [(t.kind, t.amount, t.balance_after) for t in newest[:2]] == [
        ("expire", -7, 0),
        ("capture", 7, 7),
    ]
    assert captured == newest[1]
    assert client.get_balance("u") == 0


# Was a known bug (fixed), found by the model once it learnt limits. check() answers "available:
# what can be charged now: balance + credit_limit", as get_balance_details does. check.lua added
# the two in Lua doubles: past 2**53 (a balance near the 2**53-1 cap plus a credit limit) the sum
# was rounded to an even number, here 2**53 + 40, one more than the exact answer.
def test_check_says_the_same_available_as_the_balance_details(client: CrediciClient) -> None:
    client.add("u", 2**53 - 1)
    client.set_credit_limit("u", 40)
    assert client.get_balance_details("u").available == 2**53 - 1 + 40
    assert client.check("u", 1).available == 2**53 - 1 + 40
