"""Every Redis key name credici-redis uses, built in this one module.

All keys of one user share the hash tag ``{<quoted user id>}`` so that every script touches one
Redis Cluster slot. The user id is percent-encoded inside the tag: the encoding is injective (two
ids never share keys) and leaves no '{' or '}' that could end the tag early.

    <ns>:{<user>}:s        hash    balance, last history id, bucket counter, current cycle
    <ns>:{<user>}:o        zset    buckets in burn order
    <ns>:{<user>}:x        zset    expiring buckets by expiry (ms)
    <ns>:{<user>}:a        hash    credits left in each bucket
    <ns>:{<user>}:h        stream  history, ids are "<created_at ms>-<seq>"
    <ns>:{<user>}:d        hash    holds
    <ns>:{<user>}:t        zset    hold timers (release by ttl, forget when done)
    <ns>:{<user>}:u        hash    usage rollups per hour and day
    <ns>:{<user>}:k        string  checkpoint: the state the trimmed history added up to
    <ns>:{<user>}:c        stream  scratch: the history's compact copy, only while a script runs
    <ns>:{<user>}:m        hash    members of a pool: member -> cap and what it used this period
    <ns>:{%S<x>}:ev        stream  low-balance events of every user in the slot of tag %S<x>
    <ns>:{%S<x>}:ob        zset    archive outbox of the slot: history key -> oldest unarchived ms
    <ns>:{%S<x>}:tq        zset    trim queue of the slot: history key -> when kept entries may go
    <ns>:{%S<x>}:xq        zset    transfer queue of the slot: "<records key>#<record id>" -> when
                                   the transfer began (ms)

Events cannot go to one namespace-wide stream: the script that notices a low balance may only
touch its user's slot. So each Redis Cluster slot has its own event stream, named by a tag that
hashes to that slot ("%S" never occurs in a percent-encoded user id). The archive outbox is per
slot for the same reason: the archiver visits the 16384 slot outboxes, never the users.
    <ns>:{<user>}:i:<key>  string  idempotency record, expires after the retention time
    <ns>:{<user>}:xo       hash    transfers from the user not settled yet: record id -> JSON
    <ns>:{<user>}:xi:<id>  string  a transfer to the user was taken: "<entry id>|<balance>"
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from itertools import product
from typing import NamedTuple
from urllib.parse import quote, unquote

from redis.crc import key_slot

from credici_redis.errors import InvalidInputError

_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")


class UserKeys(NamedTuple):
    """The keys every ledger script receives, in the order the scripts expect (KEYS[1..13])."""

    state: str
    order: str
    expiry: str
    amounts: str
    history: str
    holds: str
    timers: str
    events: str
    outbox: str
    usage: str
    checkpoint: str
    scratch: str
    members: str


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise InvalidInputError(
            "namespace must be 1-64 characters of letters, digits, '_', '.' or '-'"
        )
    return namespace


@lru_cache(maxsize=65536)
def user_tag(user_id: str) -> str:
    """Percent-encoded, cached: a busy worker charges the same users over and over."""
    return quote(user_id, safe="")


@lru_cache(maxsize=65536)
def user_keys(namespace: str, user_id: str) -> UserKeys:
    base = f"{namespace}:{{{user_tag(user_id)}}}:"
    slot = f"{namespace}:{{{slot_tag(key_slot(user_tag(user_id).encode()))}}}:"
    return UserKeys(
        base + "s", base + "o", base + "x", base + "a", base + "h", base + "d", base + "t",
        slot + "ev", slot + "ob", base + "u", base + "k", base + "c",
        base + "m",
    )  # fmt: skip


SLOTS = 16384


@lru_cache(maxsize=1)
def _slot_tags() -> tuple[str, ...]:
    """A hash tag for every Redis Cluster slot: the shortest "%S<base36>" that hashes to it."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    for size in range(1, 5):
        for chars in product(string.digits + string.ascii_lowercase, repeat=size):
            tag = "%S" + "".join(chars)
            slot = key_slot(tag.encode())
            if tags[slot] is None:
                tags[slot], missing = tag, missing - 1
                if not missing:
                    return tuple(t for t in tags if t is not None)
    raise RuntimeError("no hash tag found for some slots")


def slot_tag(slot: int) -> str:
    return _slot_tags()[slot]


def outbox(namespace: str, slot: int) -> str:
    """The archive outbox of one Redis Cluster slot."""
    return f"{namespace}:{{{slot_tag(slot)}}}:ob"


def trim_queue(namespace: str, slot: int) -> str:
    """Users of one slot whose archived entries wait for the archiver's keep time to pass."""
    return f"{namespace}:{{{slot_tag(slot)}}}:tq"


def transfer_queue(namespace: str, slot: int) -> str:
    """The transfers from users of one slot that are not settled yet."""
    return f"{namespace}:{{{slot_tag(slot)}}}:xq"


def transfer_records(namespace: str, user_id: str) -> str:
    """The transfers from `user_id` not settled yet: record id -> the record (JSON)."""
    return f"{namespace}:{{{user_tag(user_id)}}}:xo"


def transfer_marker(namespace: str, user_id: str, transfer_id: str) -> str:
    """Says that `user_id` took the credits of a transfer (and in which entry)."""
    return f"{namespace}:{{{user_tag(user_id)}}}:xi:{transfer_id}"


def user_slot(user_id: str) -> int:
    return int(key_slot(user_tag(user_id).encode()))


def events_pattern(namespace: str) -> str:
    """A SCAN pattern matching every event stream of the namespace."""
    return f"{namespace}:{{%S*}}:ev"


def events_key(namespace: str, tag: str) -> str:
    """The event stream of the slot whose hash tag is `tag`."""
    return f"{namespace}:{{{tag}}}:ev"


def events_tag(namespace: str, stream: str) -> str:
    """The slot's hash tag of an event stream key (`events_key`'s inverse)."""
    inner = stream.removeprefix(f"{namespace}:{{").removesuffix("}:ev")
    if events_key(namespace, inner) != stream:
        raise ValueError(f"{stream!r} is not an event stream of namespace {namespace!r}")
    return inner


def idempotency_key(namespace: str, user_id: str, key: str) -> str:
    return f"{namespace}:{{{user_tag(user_id)}}}:i:{key}"


def user_pattern(namespace: str) -> str:
    """A SCAN pattern matching every user's state hash in the namespace."""
    return f"{namespace}:{{*}}:s"


def user_from_key(namespace: str, key: str) -> str:
    """The user id a key belongs to (the inverse of user_keys)."""
    prefix = namespace + ":{"
    if not key.startswith(prefix) or "}" not in key:
        raise InvalidInputError(f"{key!r} is not a credici key of namespace {namespace!r}")
    return unquote(key[len(prefix) : key.index("}")])


def transaction_id(user_id: str, entry_id: str) -> str:
    """Globally unique: the history entry id, then the user it belongs to."""
    return f"{entry_id}@{user_tag(user_id)}"


def parse_transaction_id(value: str) -> tuple[str, str]:
    """(user id, history entry id); InvalidInputError if it is not a transaction id."""
    entry, at, tag = value.partition("@")
    ms, dash, seq = entry.partition("-")
    if not at or not tag or not dash or not _stream_number(ms) or not _stream_number(seq):
        raise InvalidInputError(f"{value!r} is not a transaction id")
    return unquote(tag), entry


def _stream_number(text: str) -> bool:
    """A part of a stream id: ASCII digits that fit 64 bits (str.isdigit takes '²' and '١')."""
    return text.isascii() and text.isdigit() and int(text) < 2**64


def hold_id(user_id: str, local_id: str) -> str:
    """Globally unique, and it names its user: capture and release need nothing else."""
    return f"{local_id}@{user_tag(user_id)}"


def parse_hold_id(value: str) -> tuple[str, str]:
    """(user id, the hold's id within the user); InvalidInputError if it is not a hold id."""
    local, at, tag = value.partition("@")
    if not at or not local.startswith("h") or not _stream_number(local[1:]) or not tag:
        raise InvalidInputError(f"{value!r} is not a hold id")
    return unquote(tag), local
