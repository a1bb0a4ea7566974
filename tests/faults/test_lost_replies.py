"""Lost replies and slow Redis: the outcome is reported as unknown, and retries apply once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from credici_redis import (
    AsyncCrediciClient,
    CrediciClient,
    OutcomeUnknownError,
    StorageUnavailableError,
)
from tests.conftest import SyncAsAsync
from tests.faults.proxy import FaultyProxy


@pytest.fixture
def proxy() -> Iterator[FaultyProxy]:
    with FaultyProxy() as p:
        yield p


@pytest.fixture(params=["sync", "async"])
async def via_proxy(request: pytest.FixtureRequest, proxy: FaultyProxy, namespace: str) -> Any:
    """Makes clients that talk to Redis through the proxy; closes them at the end."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        if request.param == "sync":
            sync = CrediciClient.from_url(proxy.url, namespace=namespace, **options)
            made.append(sync)
            return SyncAsAsync(sync)
        aclient = AsyncCrediciClient.from_url(proxy.url, namespace=namespace, **options)
        made.append(aclient)
        return aclient

    yield make
    for c in made:
        if isinstance(c, AsyncCrediciClient):
            await c.aclose()
        else:
            c.close()


async def test_lost_reply_is_an_unknown_outcome_and_a_keyed_retry_applies_once(
    via_proxy: Any, proxy: FaultyProxy, user: str
) -> None:
    client = via_proxy(timeout=2.0)
    await client.add(user, 100)
    proxy.lose_replies(1)
    with pytest.raises(OutcomeUnknownError) as info:
        await client.subtract(user, 30, idempotency_key="order-9")
    assert "idempotency key" in str(info.value)
    assert await client.get_balance(user) == 70  # it did apply
    tx = await client.subtract(user, 30, idempotency_key="order-9")  # the retry
    assert (tx.amount, tx.balance_after) == (-30, 70)
    assert await client.get_balance(user) == 70
    charges = [t for t in await client.get_all_user_transactions(user) if t.kind == "subtract"]
    assert [t.transaction_id for t in charges] == [tx.transaction_id]


async def test_lost_reply_of_an_add_and_of_a_cycle(
    via_proxy: Any, proxy: FaultyProxy, user: str
) -> None:
    client = via_proxy(timeout=2.0)
    await client.get_balance(user)  # scripts loaded; nothing to lose there
    proxy.lose_replies(1)
    with pytest.raises(OutcomeUnknownError):
        await client.add(user, 5, idempotency_key="grant")
    assert (await client.add(user, 5, idempotency_key="grant")).balance_after == 5
    proxy.lose_replies(1)
    with pytest.raises(OutcomeUnknownError):
        await client.start_cycle(10, 30, user, idempotency_key="plan")
    await client.start_cycle(10, 30, user, idempotency_key="plan")
    assert await client.get_balance(user) == 15
    assert [t.kind for t in await client.get_all_user_transactions(user)] == [
        "cycle_start",
        "add",
    ]


async def test_lost_reply_of_a_read_is_just_unavailable(
    via_proxy: Any, proxy: FaultyProxy, user: str
) -> None:
    client = via_proxy(timeout=2.0)
    await client.add(user, 1)
    proxy.lose_replies(1)
    with pytest.raises(StorageUnavailableError) as info:
        await client.get_balance(user)
    assert not isinstance(info.value, OutcomeUnknownError)
    assert await client.get_balance(user) == 1  # and the client reconnects by itself


async def test_automatic_retries_never_charge_twice(
    via_proxy: Any, proxy: FaultyProxy, user: str
) -> None:
    client = via_proxy(timeout=2.0, retries=3)
    await client.add(user, 100)
    for n, lost in enumerate((1, 2, 3), start=1):
        proxy.lose_replies(lost)  # the first `lost` attempts all apply, then lose their reply
        tx = await client.subtract(user, 10)  # no key given: one is made for the whole call
        assert tx.balance_after == 100 - 10 * n
        assert tx.idempotency_key is not None and tx.idempotency_key.startswith("auto:")
    assert proxy.lost == 6
    assert await client.get_balance(user) == 70
    charges = [t for t in await client.get_all_user_transactions(user) if t.kind == "subtract"]
    assert len(charges) == 3


async def test_retries_give_up_after_n(via_proxy: Any, proxy: FaultyProxy, user: str) -> None:
    client = via_proxy(timeout=2.0, retries=1)
    await client.add(user, 100)
    proxy.lose_replies(2)
    with pytest.raises(OutcomeUnknownError):
        await client.subtract(user, 10)
    assert await client.get_balance(user) == 90  # applied once, though two attempts ran


async def test_slow_redis_times_out_and_never_hangs(
    via_proxy: Any, proxy: FaultyProxy, user: str
) -> None:
    client = via_proxy(timeout=0.3)
    await client.add(user, 10)
    proxy.delay = 2.0
    started = time.monotonic()
    with pytest.raises(OutcomeUnknownError):
        await client.subtract(user, 1, idempotency_key="slow")
    with pytest.raises(StorageUnavailableError):
        await client.get_balance(user)
    assert time.monotonic() - started < 1.5
    proxy.delay = 0.0
    await asyncio.sleep(2.1)  # let the delayed replies drain
    assert (await client.subtract(user, 1, idempotency_key="slow")).balance_after == 9
    assert await client.get_balance(user) == 9


async def test_a_transfer_whose_replies_are_lost_moves_its_credits_once(
    via_proxy: Any, proxy: FaultyProxy, user: str
) -> None:
    """A lost reply at any step of a transfer: the automatic retry (the transfer gets a key, so
    the retry finds it) finishes it, once. Without retries the caller hears OutcomeUnknownError
    and `recover_transfers` (or its own keyed retry) finishes it."""
    dest = user + "-to"
    client = via_proxy(timeout=2.0, retries=3)
    await client.add(user, 100)
    for n, lost in enumerate((1, 2, 3), start=1):
        proxy.lose_replies(lost)  # the first `lost` script calls apply, then lose their reply
        done = await client.transfer(user, dest, 10)
        assert done.status == "completed"
        assert [await client.get_balance(user), await client.get_balance(dest)] == [
            100 - 10 * n,
            10 * n,
        ]
    one_shot = via_proxy(timeout=2.0)
    await one_shot.get_balance(user)  # connected and checked: the next reply lost is step 1's
    proxy.lose_replies(1)
    with pytest.raises(OutcomeUnknownError):
        await one_shot.transfer(user, dest, 5)
    assert await client.get_balance(user) == 65  # the first step applied
    recovered = await one_shot.recover_transfers(older_than=timedelta(0))
    assert recovered.completed == 1
    assert [await client.get_balance(user), await client.get_balance(dest)] == [65, 35]
    kinds = [t.kind for t in await client.get_all_user_transactions(dest)]
    assert kinds == ["transfer_in"] * 4
