"""Bounded history reads: `limit` and the cursor `before`, and iter_user_transactions, which
reads a history of any length page by page. Every backend, every client."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from credici_redis import InvalidInputError, Transaction
from tests.conftest import FakeClock, SyncAsAsync


async def _iterate(client: Any, user: str, **options: Any) -> list[Transaction]:
    if isinstance(client, SyncAsAsync):
        return list(client.sync.iter_user_transactions(user, **options))
    return [t async for t in client.iter_user_transactions(user, **options)]


async def _grant(client: Any, user: str, n: int) -> None:
    await client.add_many([(user, i + 1) for i in range(n)])


async def test_limit_and_before_page_through_the_whole_history(client: Any, user: str) -> None:
    await _grant(client, user, 23)
    everything = await client.get_all_user_transactions(user)
    assert len(everything) == 23
    pages: list[list[Transaction]] = []
    before = None
    while True:
        page = await client.get_all_user_transactions(user, limit=10, before=before)
        pages.append(page)
        if len(page) < 10:
            break
        before = page[-1].transaction_id
    assert [len(p) for p in pages] == [10, 10, 3]
    assert [t for page in pages for t in page] == everything
    assert await client.get_all_user_transactions(user, limit=1) == everything[:1]
    last = everything[-1].transaction_id
    assert await client.get_all_user_transactions(user, before=last) == []


async def test_the_iterator_reads_every_entry_once_in_order(client: Any, user: str) -> None:
    await _grant(client, user, 17)
    everything = await client.get_all_user_transactions(user)
    assert await _iterate(client, user, page_size=5) == everything
    assert await _iterate(client, user, page_size=17) == everything
    assert await _iterate(client, user) == everything


async def test_a_period_with_limit_and_before(
    make_client: Any, user: str, clock: FakeClock
) -> None:
    client = make_client(clock=clock)
    start = clock.now
    for i in range(12):
        await client.add(user, i + 1)
        clock.advance(timedelta(seconds=1))
    in_period = await client.get_user_transactions_for_period(
        user, start + timedelta(seconds=2), start + timedelta(seconds=9)
    )
    assert [t.amount for t in in_period] == [10, 9, 8, 7, 6, 5, 4, 3]
    first = await client.get_user_transactions_for_period(
        user, start + timedelta(seconds=2), start + timedelta(seconds=9), limit=3
    )
    assert first == in_period[:3]
    rest = await client.get_user_transactions_for_period(
        user,
        start + timedelta(seconds=2),
        start + timedelta(seconds=9),
        before=first[-1].transaction_id,
    )
    assert rest == in_period[3:]
    paged = await _iterate(
        client,
        user,
        from_=start + timedelta(seconds=2),
        to_=start + timedelta(seconds=9),
        page_size=3,
    )
    assert paged == in_period


@pytest.mark.parametrize("limit", [0, -1, 100_001, True, 1.5, "10"])
async def test_a_bad_limit_is_refused(client: Any, user: str, limit: Any) -> None:
    with pytest.raises(InvalidInputError, match="limit"):
        await client.get_all_user_transactions(user, limit=limit)


async def test_a_bad_cursor_is_refused(client: Any, user: str) -> None:
    other = (await client.add(user + "-other", 1)).transaction_id
    assert other is not None
    for before in ["nope", "1-1", 17, other]:
        with pytest.raises(InvalidInputError):
            await client.get_all_user_transactions(user, before=before)
    assert await client.get_balance(user) == 0  # nothing changed


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_limits_that_cross_redis_reads_of_a_thousand(client: Any, user: str) -> None:
    """One XREVRANGE reads at most 1,000 entries: a larger limit takes several reads."""
    for _ in range(5):
        await _grant(client, user, 500)
    everything = await client.get_all_user_transactions(user)
    assert len(everything) == 2500
    assert await client.get_all_user_transactions(user, limit=1500) == everything[:1500]
    rest = await client.get_all_user_transactions(user, before=everything[1499].transaction_id)
    assert rest == everything[1500:]
    assert await _iterate(client, user, page_size=1200) == everything
