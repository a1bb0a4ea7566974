"""Namespaces: clients of two namespaces on one Redis never see each other's data.

Whatever the user ids: equal in both namespaces, or shaped like the other namespace's key names.
The namespaces include ones that are prefixes of each other ("t1a2b" and "t1a2b1", "t1a2b.x"...):
a namespace cannot contain ':' (nor '{', '}', '*', ...), and every key is "<namespace>:{...", so
no key of one namespace starts with another's prefix, and `SCAN MATCH <namespace>:*` (what an
operator deletes a namespace with, and what an ACL key pattern matches) catches only its own.

Runs on the real Redis and on memory:// (one embedded store shared by both namespaces), with every
client API.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from credici_redis import AsyncCrediciClient, CrediciClient, InvalidInputError
from credici_redis._core import keys as _keys
from credici_redis._core.keys import user_tag
from tests.conftest import REDIS_URL, SyncAsAsync, delete_namespace
from tests.hostile.test_hostile_input import Seen, forget, hostile_settings, look, raw_redis, scan

# The namespace of the test (from the `namespace` fixture), and others built from it that share
# its prefix, differ by case, or are the longest allowed and its 63-character prefix.
SIBLINGS: dict[str, Callable[[str], str]] = {
    "base": lambda ns: ns,
    "digit": lambda ns: ns + "1",
    "dot": lambda ns: ns + ".x",
    "dash": lambda ns: ns + "-",
    "underscore": lambda ns: ns + "_",
    "upper": lambda ns: ns.upper(),
    "63": lambda ns: ns.ljust(64, "z")[:63],
    "64": lambda ns: ns.ljust(64, "z"),
}
PAIRS = [
    ("base", "digit"),
    ("base", "dot"),
    ("base", "dash"),
    ("base", "underscore"),
    ("base", "upper"),
    ("63", "64"),
    ("digit", "dot"),
]


@pytest.fixture
async def namespaces(
    api: str, backend: str, namespace: str
) -> AsyncIterator[dict[str, tuple[str, Any]]]:
    """name -> (namespace, client) for every sibling; their keys are deleted afterwards."""
    url = REDIS_URL if backend == "redis" else f"memory://{namespace}"
    made: dict[str, tuple[str, Any]] = {}
    for name, build in SIBLINGS.items():
        ns = build(namespace)
        if api == "sync":
            made[name] = (ns, SyncAsAsync(CrediciClient.from_url(url, namespace=ns)))
        else:
            options = {"batching": True} if api == "async-batched" else {}
            made[name] = (ns, AsyncCrediciClient.from_url(url, namespace=ns, **options))
    yield made
    for ns, client in made.values():
        if isinstance(client, SyncAsAsync):
            client.sync.close()
        else:
            await client.aclose()
        if backend == "redis" and ns != namespace:  # the fixture deletes its own
            delete_namespace(ns)


# Ids of the other namespace's keys, of this namespace's keys, and ordinary ones.
TEMPLATES: list[Callable[[str, str, str], str]] = [
    lambda mine, theirs, u: u,
    lambda mine, theirs, u: f"{theirs}:{{{u}}}:s",
    lambda mine, theirs, u: f"{theirs}:{{{user_tag(u)}}}:h",
    lambda mine, theirs, u: f"{mine}:{{{user_tag(u)}}}:s",
    lambda mine, theirs, u: "}:" + theirs + ":{" + u,
    lambda mine, theirs, u: f"{theirs[len(mine) :]}:{u}",  # the other's suffix, e.g. "1:u"
    lambda mine, theirs, u: theirs,
]
USER_IDS = st.text(
    st.one_of(st.characters(codec="utf-8"), st.sampled_from("{}:*?%\x00 ")),
    min_size=1,
    max_size=40,
)


def clip(user: str) -> str:
    """At most the 256 UTF-8 bytes a user id may have."""
    return user.encode()[:256].decode(errors="ignore")


@hostile_settings(80)
@given(
    pair=st.sampled_from(PAIRS),
    raw=st.tuples(
        st.integers(0, len(TEMPLATES) - 1), USER_IDS, st.integers(0, len(TEMPLATES) - 1), USER_IDS
    ),
    same=st.booleans(),
)
async def test_two_namespaces_never_see_each_other(
    namespaces: dict[str, tuple[str, Any]],
    pair: tuple[str, str],
    raw: tuple[int, str, int, str],
    same: bool,
) -> None:
    (ns_a, a), (ns_b, b) = namespaces[pair[0]], namespaces[pair[1]]
    u_a = clip(TEMPLATES[raw[0]](ns_a, ns_b, raw[1]))
    u_b = u_a if same else clip(TEMPLATES[raw[2]](ns_b, ns_a, raw[3]))
    for client, ns in ((a, ns_a), (b, ns_b)):  # ids hypothesis draws again start fresh
        for user in (u_a, u_b):
            await forget(client, ns, user)
    # Every id, in every namespace, starts empty.
    keys_before = {ns: await scan(a, f"{ns}:*") for ns, _ in namespaces.values()}

    # The same idempotency key in both: each namespace applies its own request.
    added_a = await a.add(u_a, 7, idempotency_key="same", metadata={"ns": "a"})
    added_b = await b.add(u_b, 5, idempotency_key="same", metadata={"ns": "b"})
    assert added_a.balance_after == 7 and added_b.balance_after == 5
    await b.start_cycle(3, 30, u_b)
    await a.subtract(u_a, 2)

    seen_a, seen_b = await look(a, u_a), await look(b, u_b)
    assert seen_a.balance == 5
    assert [(t.kind, t.amount) for t in seen_a.history] == [("subtract", -2), ("add", 7)]
    assert seen_a.history[1].metadata == {"ns": "a"} and seen_a.cycle is None
    assert seen_b.balance == 8
    assert [(t.kind, t.amount) for t in seen_b.history] == [("cycle_start", 3), ("add", 5)]
    assert seen_b.history[1].metadata == {"ns": "b"} and seen_b.cycle is not None
    if u_a != u_b:  # each id is unknown in the other namespace
        assert await look(b, u_a) == Seen(0, [], None)
        assert await look(a, u_b) == Seen(0, [], None)
    for ns, _ in namespaces.values():  # the namespaces not in the pair saw nothing
        if ns not in (ns_a, ns_b):
            assert await scan(a, f"{ns}:*") == keys_before[ns]

    # On Redis: every key of a namespace is "<namespace>:{<user>}:...", all of a user's keys in
    # one cluster slot, and no key matches another namespace's pattern.
    keys_a = await scan(a, f"{ns_a}:*") - keys_before[ns_a]
    keys_b = await scan(b, f"{ns_b}:*") - keys_before[ns_b]
    assert keys_a and keys_b and not keys_a & keys_b
    for ns, user, keys in ((ns_a, u_a, keys_a), (ns_b, u_b, keys_b)):
        prefix = f"{ns}:{{{user_tag(user)}}}:".encode()
        # ... or the user's slot's shared keys (the archive outbox, events): same slot
        slot_prefix = f"{ns}:{{{_keys.slot_tag(_keys.user_slot(user))}}}:".encode()
        assert all(key.startswith((prefix, slot_prefix)) for key in keys), (prefix, keys)
        assert len({key_slot(key) for key in keys}) == 1
        for other, _ in namespaces.values():
            if other != ns:
                assert not any(key.startswith(f"{other}:".encode()) for key in keys)


async def test_deleting_a_namespace_leaves_its_prefix_siblings(
    namespaces: dict[str, tuple[str, Any]],
) -> None:
    """`SCAN MATCH <namespace>:*` + UNLINK (how an operator drops a namespace) takes only it."""
    for _, client in namespaces.values():
        await client.add("u", 3, idempotency_key="k")
        await client.start_cycle(2, 30, "u")
        assert await client.get_balance("u") == 5
    base, client = namespaces["base"]
    r, is_async = raw_redis(client)
    doomed = await scan(client, f"{base}:*")
    assert doomed
    if is_async:
        await r.unlink(*doomed)
    else:
        r.unlink(*doomed)
    assert await client.get_balance("u") == 0
    for name, (_, other) in namespaces.items():
        if name != "base":
            assert await other.get_balance("u") == 5
            assert len(await other.get_all_user_transactions("u")) == 2


@pytest.mark.parametrize(
    "bad",
    [
        *("", "a:b", "a{b", "a}b", "{a}", "a*", "a?", "a[b]", "a b", "a\n", "a\x00", "ä", "a/b"),
        *("a" * 65, None, 1, b"ns", ["ns"]),
    ],
    ids=repr,
)
@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_a_namespace_that_could_overlap_another_is_refused(bad: Any, backend: str) -> None:
    """':', braces and glob characters could make one namespace's keys or patterns another's."""
    url = REDIS_URL if backend == "redis" else f"memory://ns-{uuid.uuid4().hex}"
    with pytest.raises(InvalidInputError):
        CrediciClient.from_url(url, namespace=bad).close()
    with pytest.raises(InvalidInputError):
        await AsyncCrediciClient.from_url(url, namespace=bad).aclose()


@pytest.mark.parametrize("good", ["a", "A-Z_0.9", "x" * 64, "..", "-", "_"], ids=repr)
async def test_allowed_namespaces(good: str) -> None:
    with CrediciClient.from_url(f"memory://ns-{uuid.uuid4().hex}", namespace=good) as client:
        assert client.add("u", 1).balance_after == 1
