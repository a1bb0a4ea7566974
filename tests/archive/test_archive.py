"""The archive: Redis history -> PostgreSQL, one seamless history, lag, trimming, CLI.

Runs on the real Redis and on memory:// (the archiver then drives the same fakeredis server the
clients use), always against the real PostgreSQL.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis._core import keys as _keys
from credici_redis._storages import connect as _connect
from credici_redis.archive import (
    Archiver,
    ArchiveReader,
    AsyncArchiver,
    merge,
)
from credici_redis.cli import main
from credici_redis.errors import InvalidInputError, TransactionArchivedError
from credici_redis.storage import RedisStorage
from tests.conftest import REDIS_URL, FakeClock, raw_redis


@pytest.fixture
def raw(url: str) -> Any:
    """A plain Redis client on the test's store, to look at keys."""
    return raw_redis(url)


def archiver(url: str, namespace: str, postgres_url: str, **options: Any) -> Archiver:
    storage = _connect.open_storage(url, namespace, idempotency_ttl=timedelta(days=1))
    assert isinstance(storage, RedisStorage)
    return Archiver(storage=storage, postgres_url=postgres_url, namespace=namespace, **options)


def rows(pg: psycopg.Connection, namespace: str) -> list[tuple[Any, ...]]:
    return pg.execute(
        "SELECT transaction_id, user_id, amount, balance_after FROM credici_history"
        " WHERE namespace = %s ORDER BY user_id, created_at, entry_seq",
        (namespace,),
    ).fetchall()


def charge(client: CrediciClient, users: list[str], rounds: int) -> None:
    for r in range(rounds):
        for u in users:
            client.add(u, 10, metadata={"r": str(r)})
            client.subtract(u, 3)


def test_lag_reads_waiting_users_page_by_page(
    url: str, namespace: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lag holds a bounded number of waiting users at a time: with pages of 2 users and 3
    pages per round trip, seven users of one slot (one outbox) and five of others add up."""
    from credici_redis._archive import base

    monkeypatch.setattr(base, "LAG_PAGE", 2)
    monkeypatch.setattr(base, "LAG_CALLS", 3)
    slot = _keys.key_slot(_keys.user_tag("same-0").encode())
    same = [u for u in (f"same-{i}" for i in range(400_000))
            if _keys.key_slot(_keys.user_tag(u).encode()) == slot][:7]  # fmt: skip
    assert len(same) == 7
    users = [*same, *(f"other-{i}" for i in range(5))]
    plain = CrediciClient.from_url(url, namespace=namespace)
    for i, u in enumerate(users):
        for _ in range(i + 1):
            plain.add(u, 1)
    with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
        lag = job.lag()
    assert (lag.users_pending, lag.entries_pending) == (12, sum(range(1, 13)))


def test_a_pass_moves_every_entry_once_and_redis_forgets_them(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str, raw: Any
) -> None:
    users = [f"u{i}" for i in range(7)] + ["ü:{odd}\x00 id"]  # PostgreSQL text has no NUL
    plain = CrediciClient.from_url(url, namespace=namespace)
    charge(plain, users, 4)
    before = {u: plain.get_all_user_transactions(u) for u in users}
    with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
        lag = job.lag()
        assert lag.users_pending == len(users)
        assert lag.entries_pending == 8 * len(users)
        assert lag.oldest_unarchived == min(tx.created_at for h in before.values() for tx in h)
        stats = job.run_once()
        assert (stats.users, stats.entries, stats.trimmed) == (len(users), 64, 64)
        after = job.lag()
        assert (after.users_pending, after.entries_pending, after.oldest_unarchived) == (0, 0, None)
        again = job.run_once()
        assert (again.entries, again.trimmed) == (0, 0)
    found = rows(pg, namespace)
    assert len(found) == 64 == len({r[0] for r in found})
    assert {r[0] for r in found} == {tx.transaction_id for h in before.values() for tx in h}
    for u in users:
        assert raw.xlen(_keys.user_keys(namespace, u).history) == 0
    # Without the archive the history is what Redis still keeps; with it, all of it.
    assert plain.get_all_user_transactions(users[0]) == []
    assert not plain.audit(users[0]).ok
    with CrediciClient.from_url(url, namespace=namespace, archive_url=postgres_url) as client:
        for u in users:
            assert client.get_all_user_transactions(u) == before[u]
            assert client.audit(u).ok
            assert client.get_balance(u) == 28
    plain.close()


async def test_history_is_seamless_across_the_archive_and_redis(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str
) -> None:
    clock = FakeClock()
    clock.now = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=10)
    sync = CrediciClient.from_url(url, namespace=namespace, clock=clock)
    made: list[datetime] = []
    for day in range(6):  # days -10 .. -5: archived and trimmed
        made.append(sync.add("alice", 100 + day, metadata={"day": str(day)}).created_at)
        clock.advance(timedelta(days=1))
    with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
        assert job.run_once().trimmed == 6
    for day in range(6, 9):  # days -4 .. -2: in Redis only
        made.append(sync.subtract("alice", day).created_at)
        clock.advance(timedelta(days=1))
    sync.close()
    expected_amounts = [-8, -7, -6, 105, 104, 103, 102, 101, 100]
    for client in (
        CrediciClient.from_url(url, namespace=namespace, archive_url=postgres_url, clock=clock),
        AsyncCrediciClient.from_url(
            url, namespace=namespace, archive_url=postgres_url, clock=clock
        ),
    ):

        async def call(name: str, *args: Any, c: Any = client) -> Any:
            result = getattr(c, name)(*args)
            return await result if isinstance(c, AsyncCrediciClient) else result

        everything = await call("get_all_user_transactions", "alice")
        assert [tx.amount for tx in everything] == expected_amounts
        assert len({tx.transaction_id for tx in everything}) == 9
        # A period that straddles the seam: from day 3 (archived) to day 7 (Redis), inclusive.
        period = await call("get_user_transactions_for_period", "alice", made[3], made[7])
        assert [tx.amount for tx in period] == [-7, -6, 105, 104, 103]
        only_old = await call("get_user_transactions_for_period", "alice", made[0], made[1])
        assert [tx.amount for tx in only_old] == [101, 100]
        assert (await call("audit", "alice")).ok
        if isinstance(client, AsyncCrediciClient):
            await client.aclose()
        else:
            client.close()


def test_paged_history_crosses_the_seam_between_redis_and_the_archive(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str
) -> None:
    clock = FakeClock()
    clock.now = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=10)
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as sync:
        for i in range(7):  # archived and trimmed
            sync.add("bob", 100 + i)
            clock.advance(timedelta(hours=1))
        with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
            assert job.run_once().trimmed == 7
        for i in range(5):  # in Redis only
            sync.add("bob", 200 + i)
            clock.advance(timedelta(hours=1))
    with CrediciClient.from_url(
        url, namespace=namespace, archive_url=postgres_url, clock=clock
    ) as client:
        everything = client.get_all_user_transactions("bob")
        assert [t.amount for t in everything] == [204, 203, 202, 201, 200, *range(106, 99, -1)]
        pages, before = [], None
        while page := client.get_all_user_transactions("bob", limit=4, before=before):
            pages.append([t.amount for t in page])
            before = page[-1].transaction_id
        assert pages == [[204, 203, 202, 201], [200, 106, 105, 104], [103, 102, 101, 100]]
        assert list(client.iter_user_transactions("bob", page_size=3)) == everything
        assert client.get_all_user_transactions("bob", limit=7) == everything[:7]


def test_kept_entries_stay_in_redis_until_their_time_then_go(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str, raw: Any
) -> None:
    client = CrediciClient.from_url(url, namespace=namespace, archive_url=postgres_url)
    grant = client.add("bob", 50)
    spend = client.subtract("bob", 20)
    history = _keys.user_keys(namespace, "bob").history
    with archiver(url, namespace, postgres_url, keep=timedelta(hours=1)) as job:
        stats = job.run_once()
        assert (stats.entries, stats.trimmed) == (2, 0)
        assert raw.xlen(history) == 2  # archived, and kept: reverse needs them
        assert job.lag().users_pending == 0
    assert len(rows(pg, namespace)) == 2
    # In both places, returned once.
    assert client.get_all_user_transactions("bob") == [spend, grant]
    assert client.reverse(spend.transaction_id).amount == 20
    # An archiver that keeps nothing trims them, though nothing new was written since.
    with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
        stats = job.run_once()
        assert (stats.entries, stats.trimmed) == (1, 3)
    assert raw.xlen(history) == 0
    with pytest.raises(TransactionArchivedError):
        client.reverse(grant.transaction_id)
    assert [tx.kind for tx in client.get_all_user_transactions("bob")] == [
        "reverse", "subtract", "add",
    ]  # fmt: skip
    assert client.audit("bob").ok
    client.close()


def test_two_archivers_at_once_insert_nothing_twice(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str
) -> None:
    client = CrediciClient.from_url(url, namespace=namespace)
    users = [f"c{i}" for i in range(30)]
    charge(client, users, 3)
    jobs = [
        archiver(url, namespace, postgres_url, keep=timedelta(0), users_per_batch=4,
                 entries_per_user=2)
        for _ in range(2)
    ]  # fmt: skip
    for job in jobs:
        job.init_schema()
    threads = [threading.Thread(target=job.run_once) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert jobs[0].run_once().entries == 0
    for job in jobs:
        job.close()
    found = rows(pg, namespace)
    assert len(found) == 180 == len({r[0] for r in found})
    client.close()


def test_history_with_an_archive_is_indexed(pg: psycopg.Connection, namespace: str) -> None:
    pg.execute("SET enable_seqscan = off")
    plan = pg.execute(
        "EXPLAIN SELECT fields FROM credici_history WHERE namespace = %s AND user_id = %s"
        " AND created_at >= now() - interval '1 day' AND created_at < now()"
        " ORDER BY created_at DESC, entry_seq DESC",
        (namespace, "alice"),
    ).fetchall()
    text = "\n".join(r[0] for r in plan)
    assert "Index" in text and "credici_history_pkey" in text and "Sort" not in text


def test_bad_archiver_settings_are_typed_errors(url: str, namespace: str) -> None:
    with pytest.raises(InvalidInputError):
        Archiver(REDIS_URL, "mysql://x", namespace=namespace)
    with pytest.raises(InvalidInputError):
        Archiver(REDIS_URL, "postgresql://x", namespace=namespace, keep=timedelta(seconds=-1))
    with pytest.raises(InvalidInputError):
        Archiver(REDIS_URL, "postgresql://x", namespace="bad name")
    with pytest.raises(InvalidInputError):
        CrediciClient.from_url(url, namespace=namespace, archive_url="redis://x")


def test_merge_prefers_redis_and_sorts_newest_first(url: str, namespace: str) -> None:
    client = CrediciClient.from_url(url, namespace=namespace)
    a, b, c = (client.add("m", n) for n in (1, 2, 3))
    assert merge([c, b], [b, a]) == [c, b, a]
    assert merge([c], []) == [c]
    client.close()


async def test_async_archiver_and_reader(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str
) -> None:
    """The asyncio archiver is native (redis.asyncio and psycopg's asyncio connection), on the
    real Redis and on memory://, with follow() as an async iterator."""
    client = AsyncCrediciClient.from_url(url, namespace=namespace, archive_url=postgres_url)
    await client.add("d", 5)
    async with AsyncArchiver(url, postgres_url, namespace=namespace, keep=timedelta(0)) as job:
        assert (await job.lag()).entries_pending == 1
        assert (await job.run_once()).entries == 1
        await client.subtract("d", 2)
        seen: list[tuple[int, int]] = []
        passes = job.follow(
            interval=0.01, progress=lambda s, lag: seen.append((s.entries, lag.entries_pending))
        )
        async for stats in passes:
            if stats.entries == 0:
                break
        assert seen == [(1, 0), (0, 0)]
    reader = ArchiveReader(postgres_url, namespace)
    assert [e[1]["n"] for e in reader.entries_before("d", "99999999999999-0")] == ["5", "-2"]
    reader.close()
    assert [t.amount for t in await client.get_all_user_transactions("d")] == [-2, 5]
    await client.aclose()


@pytest.mark.parametrize("backend", ["redis"])
def test_cli_archive(
    url: str,
    namespace: str,
    pg: psycopg.Connection,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = CrediciClient.from_url(url, namespace=namespace)
    client.add("e", 5)
    client.subtract("e", 2)
    common = ["--redis-url", url, "--postgres-url", postgres_url, "--namespace", namespace]
    assert main([*common, "archive", "--init"]) == 0
    assert main([*common, "archive", "--lag"]) == 0
    assert "2 entries of 1 users waiting" in capsys.readouterr().out
    assert main([*common, "archive", "--once", "--keep", "0s", "--no-progress"]) == 0
    assert "archived 2 entries of 1 users" in capsys.readouterr().out
    assert main([*common, "archive", "--lag"]) == 0
    assert "nothing waiting" in capsys.readouterr().out
    assert main([*common, "history", "e", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main([*common, "audit", "e"]) == 0
    assert main([*common, "archive", "--keep", "soon"]) == 2
    client.close()


def test_an_archive_that_starts_after_retention_trims_audits_from_the_checkpoint(
    url: str, namespace: str, pg: psycopg.Connection, postgres_url: str, raw: Any
) -> None:
    """A team trims by retention (a checkpoint), then starts archiving: the archiver trims past
    the checkpoint, and the audit replays from the checkpoint with what PostgreSQL holds."""
    clock = FakeClock()
    clock.now -= timedelta(days=40)
    past = CrediciClient.from_url(
        url, namespace=namespace, clock=clock, history_retention=timedelta(days=30)
    )
    first = past.add("alice", 500)
    for _ in range(5):
        clock.advance(timedelta(hours=1))
        past.subtract("alice", 7)
    clock.now += timedelta(days=40) - timedelta(hours=5)  # today
    charged = past.subtract("alice", 11)
    past.reverse(charged.transaction_id)
    report = past.trim_history("alice")
    assert report.trimmed == 6 and report.problems == []
    past.close()
    with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
        job.run_once()
    keys = _keys.user_keys(namespace, "alice")
    assert raw.xlen(keys.history) == 0 and raw.get(keys.checkpoint) is not None
    with CrediciClient.from_url(url, namespace=namespace) as plain:
        assert not plain.audit("alice").ok  # the archived part is needed
    with CrediciClient.from_url(url, namespace=namespace, archive_url=postgres_url) as client:
        audit = client.audit("alice")
        assert audit.ok, audit.problems
        assert audit.balance == 500 - 35
        kinds = [t.kind for t in client.get_all_user_transactions("alice")]
        assert kinds == ["reverse", "subtract"]  # what PostgreSQL got: after the retention
        assert first.transaction_id not in {
            t.transaction_id for t in client.get_all_user_transactions("alice")
        }


def test_a_members_period_query_crosses_the_seam(
    url: str, namespace: str, postgres_url: str
) -> None:
    """Issue 19: a pool's entries per member, from PostgreSQL and Redis alike."""
    clock = FakeClock()
    clock.now = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=10)
    start = clock.now
    with CrediciClient.from_url(url, namespace=namespace, clock=clock) as sync:
        sync.add("pool", 1000)
        for i, member in enumerate(["alice", "bob", "alice", None]):  # archived and trimmed
            clock.advance(timedelta(hours=1))
            sync.subtract("pool", 1 + i, member=member)
        with archiver(url, namespace, postgres_url, keep=timedelta(0)) as job:
            assert job.run_once().trimmed == 5
        for i, member in enumerate(["bob", "alice"]):  # in Redis only
            clock.advance(timedelta(hours=1))
            sync.subtract("pool", 10 + i, member=member)
    with CrediciClient.from_url(
        url, namespace=namespace, archive_url=postgres_url, clock=clock
    ) as client:
        alice = client.get_user_transactions_for_period("pool", start, clock.now, member="alice")
        assert [(t.amount, t.member) for t in alice] == [
            (-11, "alice"),
            (-3, "alice"),
            (-1, "alice"),
        ]
        bob = client.get_user_transactions_for_period("pool", start, clock.now, member="bob")
        assert [t.amount for t in bob] == [-10, -2]
