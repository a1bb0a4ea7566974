"""Memory per user, history included (issue 15): Redis allocates a stream's first node whole
(stream-node-max-bytes, 4 KB by default), so a user with a few history entries cost about 5 KB.
The first append of a call that finds the stream holding only its entry makes the node exact
(_ledger.lua compact_history: COPY onto the scratch key, RENAME back). Measured with MEMORY USAGE
on the real Redis; the history must come out of it unchanged."""

from __future__ import annotations

from datetime import timedelta

import pytest
import redis

from credici_redis import CrediciClient
from credici_redis._core import keys as _keys
from tests.conftest import BACKENDS, REDIS_URL

NODE = 4096
"""Redis's default stream-node-max-bytes: what a first node took, whatever it held."""


def history_bytes(raw: redis.Redis, namespace: str, user: str) -> int:
    usage = raw.memory_usage(_keys.user_keys(namespace, user).history, samples=0)
    assert usage is not None
    return int(usage)


@pytest.fixture
def raw() -> redis.Redis:
    r = redis.Redis.from_url(REDIS_URL)
    assert r.config_get("stream-node-max-bytes")["stream-node-max-bytes"] == str(NODE)
    return r


@pytest.mark.parametrize("entries", [1, 10, 50])
def test_a_small_history_costs_its_entries_not_a_whole_node(
    raw: redis.Redis, namespace: str, entries: int
) -> None:
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add("u", 10**6)
        for _ in range(entries - 1):
            client.subtract("u", 1)
        history = client.get_all_user_transactions("u")
    assert len(history) == entries
    used = history_bytes(raw, namespace, "u")
    # A bare stream of these entries, made without the node preallocated (COPY makes it exact):
    bare = f"{namespace}:bare"
    ids = [t.transaction_id.partition("@")[0] for t in reversed(history)]
    stream = _keys.user_keys(namespace, "u").history
    for entry_id, fields in raw.xrange(stream):
        raw.xadd(bare, fields, id=entry_id)
    raw.copy(bare, f"{bare}:exact")
    exact = int(raw.memory_usage(f"{bare}:exact", samples=0) or 0)
    print(f"{entries} entries: {used} B, an exact copy {exact} B")
    assert used <= exact + 64 * ((entries + 7) // 8), (used, exact)  # the growth slack only
    if entries <= 10:
        assert used < NODE // 2, used
    assert [text.decode() for text, _ in raw.xrange(stream)] == ids
    assert not raw.exists(_keys.user_keys(namespace, "u").scratch)


def test_the_first_entry_after_the_history_was_trimmed_away_is_compacted_too(
    raw: redis.Redis, namespace: str
) -> None:
    stream = _keys.user_keys(namespace, "u").history
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add("u", 100)
        raw.xtrim(stream, minid="9999999999999")  # as retention or the archiver would
        assert raw.xlen(stream) == 0
        after = client.subtract("u", 1)
    assert raw.xlen(stream) == 1
    assert history_bytes(raw, namespace, "u") < 1024
    assert [i.decode() for i, _ in raw.xrange(stream)] == [after.transaction_id.partition("@")[0]]


def test_a_long_history_is_left_to_redis(raw: redis.Redis, namespace: str) -> None:
    """Only a stream's first entry triggers the copy: a charge on a long history costs no COPY."""
    stream = _keys.user_keys(namespace, "u").history
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add("u", 10**6)
        client.subtract_many([("u", 1)] * 200)
        before = raw.info("commandstats").get("cmdstat_copy", {}).get("calls", 0)
        client.subtract("u", 1)
        assert raw.info("commandstats").get("cmdstat_copy", {}).get("calls", 0) == before
    assert raw.xlen(stream) == 202


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_operation_keeps_its_history_through_the_copy(backend: str, namespace: str) -> None:
    """Holds, cycles, expiries: many entries in one call right after the first one."""
    url = REDIS_URL if backend == "redis" else f"memory://{namespace}"
    with CrediciClient.from_url(url, namespace=namespace) as client:
        client.add("u", 10, ttl=timedelta(days=1), idempotency_key="k", metadata={"a": "1"})
        hold = client.reserve("u", 4)
        client.capture(hold.hold_id, 3)
        client.start_cycle(5, "day", "u")
        client.reverse(client.subtract("u", 2).transaction_id)
        kinds = [t.kind for t in client.get_all_user_transactions("u")]
        assert kinds == ["reverse", "subtract", "cycle_start", "capture", "reserve", "add"]
        assert client.get_balance("u") == 12
        assert client.audit("u").ok
