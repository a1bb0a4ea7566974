"""A transfer cut short between its steps (the process died: here its flow is stopped after the
k-th script ran) leaves no credits taken from one side and not given to the other after recovery,
nor given twice: `recover_transfers`, or a keyed retry, finishes it; a destination's answer
(took them, refused them) is kept, so a late or racing second finisher changes nothing. On the
Redis backends; killed processes in tests/faults/test_transfer_kills.py."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from credici_redis import (
    CrediciClient,
    InconsistentStateError,
    OutcomeUnknownError,
    Transfer,
    TransferRecovery,
    TransferRefusedError,
)
from credici_redis._core import keys as _keys
from credici_redis._core.protocol import Flow
from credici_redis._ops import transfers
from tests.conftest import REDIS_URL, FakeClock

pytestmark = pytest.mark.usefixtures("local_zone_not_utc")

NOW = timedelta(0)


def cut(flow: Flow[Any], scripts: int) -> Flow[Any]:
    """`flow`, stopped once `scripts` of its script calls have run (their replies are lost)."""
    calls = next(flow)
    ran = 0
    while True:
        replies = yield calls
        ran += sum(
            1 for c, r in zip(calls, replies, strict=True) if c.script is not None and applied(r)
        )
        if ran >= scripts:
            return None
        try:
            calls = flow.send(replies)
        except StopIteration as done:
            return done.value


def applied(reply: Any) -> bool:
    """Not a reply asking to be sent again (a catch-up step, a calendar the client computes)."""
    first = reply[0] if isinstance(reply, list) and reply else b""
    return first not in (b"CATCHUP", b"SCHEDULE", b"ZONE", b"PERIOD")


@pytest.fixture
def client(backend: str, namespace: str, clock: FakeClock) -> Iterator[CrediciClient]:
    url = REDIS_URL if backend == "redis" else f"memory://{namespace}"
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as made:
        yield made


def die_after(client: CrediciClient, scripts: int, source: str, dest: str, amount: int,
              key: str | None = None) -> transfers.TransferRequest:  # fmt: skip
    """Begin a transfer and stop after its first `scripts` scripts ran."""
    req = transfers.build_transfer(source, dest, amount, None, key, None, client._now())
    storage: Any = client.storage
    storage.run(cut(storage.ledger.execute(transfers.TRANSFER, req), scripts))
    return req


def balances(client: CrediciClient, *users: str) -> list[int]:
    return [client.get_balance(u) for u in users]


def kinds(client: CrediciClient, user: str) -> list[str]:
    return [t.kind for t in client.get_all_user_transactions(user)]


@pytest.mark.parametrize("scripts", [1, 2])
def test_recovery_finishes_a_transfer_cut_after_each_step(
    client: CrediciClient, user: str, scripts: int
) -> None:
    dest = user + "-to"
    client.add(user, 100)
    die_after(client, scripts, user, dest, 30)
    assert balances(client, user)[0] == 70  # out of the source
    assert balances(client, dest)[0] == (30 if scripts == 2 else 0)
    assert client.recover_transfers(older_than=NOW) == TransferRecovery(completed=1)
    assert balances(client, user, dest) == [70, 30]
    assert kinds(client, dest) == ["transfer_in"]  # given once, however often it was run
    assert client.recover_transfers(older_than=NOW) == TransferRecovery()  # nothing left
    assert client.audit(user).ok and client.audit(dest).ok


def test_a_settled_transfer_is_not_recovered(client: CrediciClient, user: str) -> None:
    client.add(user, 10)
    die_after(client, 3, user, user + "-to", 4)  # all three ran; only the reply was lost
    assert client.recover_transfers(older_than=NOW) == TransferRecovery()
    assert balances(client, user, user + "-to") == [6, 4]


def test_recovery_leaves_young_transfers_alone(
    client: CrediciClient, user: str, clock: FakeClock
) -> None:
    client.add(user, 10)
    die_after(client, 1, user, user + "-to", 4)
    assert client.recover_transfers() == TransferRecovery()  # may still be on its way (30 s)
    clock.advance(timedelta(seconds=31))
    assert client.recover_transfers() == TransferRecovery(completed=1)
    assert balances(client, user, user + "-to") == [6, 4]


def test_a_keyed_retry_finishes_the_transfer_it_began(client: CrediciClient, user: str) -> None:
    dest = user + "-to"
    client.add(user, 100)
    die_after(client, 1, user, dest, 30, key="k")
    done = client.transfer(user, dest, 30, idempotency_key="k")
    assert isinstance(done, Transfer) and done.status == "completed"
    assert balances(client, user, dest) == [70, 30]
    assert client.transfer(user, dest, 30, idempotency_key="k") == done
    assert client.recover_transfers(older_than=NOW) == TransferRecovery()
    assert kinds(client, user) == ["transfer_out", "add"]


def test_a_transfer_left_a_day_goes_back_and_a_late_finisher_cannot_give_it(
    client: CrediciClient, user: str, clock: FakeClock, namespace: str
) -> None:
    dest = user + "-to"
    client.add(user, 100)
    req = die_after(client, 1, user, dest, 30)
    storage: Any = client.storage
    record = storage.redis.hget(_keys.transfer_records(namespace, user), req.record_id)
    late = transfers.pending_of(record.decode())  # what a stalled process still holds
    clock.advance(timedelta(days=1, seconds=1))
    assert client.recover_transfers() == TransferRecovery(refunded=1)
    assert balances(client, user, dest) == [100, 0]
    assert kinds(client, user) == ["reverse", "transfer_out", "add"]
    with pytest.raises(TransferRefusedError) as refused:  # it wakes up: the marker refuses
        storage.run(transfers.finish(storage.ledger, late, client._now()))
    assert refused.value.reason == "STALE"
    assert balances(client, user, dest) == [100, 0]
    assert client.audit(user).ok and client.audit(dest).ok


def test_a_refusal_is_kept_even_when_the_destination_has_room_later(
    client: CrediciClient, user: str
) -> None:
    dest = user + "-to"
    client.add(user, 100)
    client.add(dest, 2**53 - 50)
    die_after(client, 2, user, dest, 60)  # the destination refused; the source was not told
    client.subtract(dest, 1000)  # now it would fit
    assert client.recover_transfers(older_than=NOW) == TransferRecovery(refunded=1)
    assert balances(client, user, dest) == [100, 2**53 - 1050]  # back home, never given


def test_a_transfer_unsettled_past_a_week_is_left_to_an_operator(
    client: CrediciClient, user: str, clock: FakeClock
) -> None:
    client.add(user, 100)
    req = die_after(client, 1, user, user + "-to", 30)
    clock.advance(timedelta(days=7))
    assert client.recover_transfers() == TransferRecovery(unresolved=[req.transfer_id])
    assert balances(client, user, user + "-to") == [70, 0]  # nothing guessed


def test_recovery_runs_on_the_asyncio_client_too(user: str, namespace: str) -> None:
    import asyncio

    from credici_redis import AsyncCrediciClient

    async def main() -> TransferRecovery:
        async with AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace) as aclient:
            await aclient.add(user, 10)
            req = transfers.build_transfer(user, user + "-to", 4, None, None, None, None)
            storage: Any = aclient.storage
            await storage.run(cut(storage.ledger.execute(transfers.TRANSFER, req), 1))
            got = await aclient.recover_transfers(older_than=NOW)
            assert await aclient.get_balance(user + "-to") == 4
            return got

    assert asyncio.run(main()) == TransferRecovery(completed=1)


def test_a_key_used_again_after_its_record_expired_is_a_new_transfer(
    client: CrediciClient, user: str, namespace: str
) -> None:
    """The idempotency record expires (here: deleted, as its ttl would): the same key then
    makes a new transfer, which the destination takes too; the first transfer's marker, still
    there, must not answer for it (the credits would leave the source and arrive nowhere)."""
    dest = user + "-to"
    client.add(user, 100)
    first = client.transfer(user, dest, 30, idempotency_key="k")
    storage: Any = client.storage
    storage.redis.delete(_keys.idempotency_key(namespace, user, "k"))
    second = client.transfer(user, dest, 30, idempotency_key="k")
    assert second.transfer_id != first.transfer_id
    assert balances(client, user, dest) == [40, 60]
    assert kinds(client, dest) == ["transfer_in", "transfer_in"]


def break_user(client: CrediciClient, namespace: str, user: str) -> None:
    """A bucket amount without its place in the burn order: a state no script leaves."""
    storage: Any = client.storage
    storage.redis.hset(_keys.user_keys(namespace, user).amounts, "999999999999999000000000099", 5)


def mend_user(client: CrediciClient, namespace: str, user: str) -> None:
    storage: Any = client.storage
    storage.redis.hdel(_keys.user_keys(namespace, user).amounts, "999999999999999000000000099")


def test_a_destination_that_cannot_run_leaves_the_transfer_to_recovery(
    client: CrediciClient, user: str, namespace: str
) -> None:
    """Its credits left the source: the caller hears OutcomeUnknownError, never a plain
    failure; recovery reports the transfer and goes on with the others, and finishes it once
    the destination is mended."""
    broken, fine = user + "-broken", user + "-fine"
    client.add(user, 100)
    client.add(broken, 1)
    break_user(client, namespace, broken)
    with pytest.raises(OutcomeUnknownError) as info:
        client.transfer(user, broken, 30)
    assert isinstance(info.value.__cause__, InconsistentStateError)
    die_after(client, 1, user, fine, 20)
    recovered = client.recover_transfers(older_than=NOW)
    assert (recovered.completed, len(recovered.failed)) == (1, 1)
    assert "keys" in recovered.failed[0] or "bucket" in recovered.failed[0]
    assert balances(client, user, fine) == [50, 20]
    mend_user(client, namespace, broken)
    assert client.recover_transfers(older_than=NOW) == TransferRecovery(completed=1)
    assert balances(client, user, broken) == [50, 31]


def test_a_refund_after_its_transfer_out_was_trimmed_still_audits(
    backend: str, namespace: str, clock: FakeClock, user: str
) -> None:
    """History retention may take the transfer_out entry before a cut-short transfer is given
    back (a day later): the reverse entry carries the parts itself, so the audit adds up."""
    url = REDIS_URL if backend == "redis" else f"memory://{namespace}"
    with CrediciClient.from_url(
        url, namespace=namespace, clock=clock, history_retention=timedelta(hours=12)
    ) as client:
        client.add(user, 100)
        die_after(client, 1, user, user + "-to", 30)
        clock.advance(timedelta(days=1, hours=1))
        assert client.trim_history(user).trimmed == 2  # the add and the transfer_out
        assert client.recover_transfers() == TransferRecovery(refunded=1)
        assert balances(client, user) == [100]
        report = client.audit(user)
        assert report.ok, report.problems
