"""Grant and charge: `add` (lua/add.lua) and `subtract` (lua/subtract.lua), one at a time or many
in one round trip. Both reply a tx_reply, parsed into a Transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from credici_redis._core import requests as check
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.protocol import TX_REPLY, parse_tx
from credici_redis._core.scripts import load
from credici_redis.errors import CrediciError, InvalidInputError
from credici_redis.models import Transaction


@dataclass(frozen=True, slots=True)
class AddRequest:
    user_id: str
    amount: int
    expire_at_ms: int | None
    ttl_ms: int | None
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class SubtractRequest:
    user_id: str
    amount: int
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None
    default_limits: str = ""
    """The client's default limits (a spec, `_ops.limits`), for a user without its own."""
    member: str = ""
    """Who charges the user (a pool) on their behalf; '' = the account itself."""


def _transaction(req: AddRequest | SubtractRequest, r: Reply) -> Transaction:
    tx = parse_tx(req.user_id, r)
    member = getattr(req, "member", "")
    return tx.model_copy(update={"member": member}) if member else tx


ADD: Operation[AddRequest, Transaction] = Operation(
    "add",
    AddRequest,
    load("add", effect=True),
    argv=(
        "amount",
        "expire_at_ms",
        "ttl_ms",
        "fingerprint",
        "idempotency_ttl_ms",
        "idempotency_key",
        "metadata_json",
        "priority",
    ),
    reply=TX_REPLY,
    parse=_transaction,
    refusals=frozenset({"IDEM_CONFLICT", "EXPIRY_PAST", "BALANCE_LIMIT"}),
    fingerprint=("amount", "expire_at_ms", "ttl_ms", "metadata_json", "priority"),
)

SUBTRACT: Operation[SubtractRequest, Transaction] = Operation(
    "subtract",
    SubtractRequest,
    load("subtract", effect=True),
    argv=(
        "amount",
        "fingerprint",
        "idempotency_ttl_ms",
        "idempotency_key",
        "metadata_json",
        "default_limits",
        "member",
    ),
    reply=TX_REPLY,
    parse=_transaction,
    refusals=frozenset({"IDEM_CONFLICT", "INSUFFICIENT", "BUDGET", "RATE"}),
    fingerprint=("amount", "metadata_json"),
    fingerprint_if_set=("member",),
)


def build_add(
    user: object,
    credits: object,
    expire_at: object,
    ttl: object,
    key: object,
    meta: object,
    now_ms: int | None,
    rank: object = 0,
) -> AddRequest:
    uid, n = check.user_id(user), check.amount(credits)
    exp_ms, ttl_ms = check.expiry(expire_at, ttl)
    ikey, meta_json = check.idempotency_key(key), check.metadata(meta)
    req = AddRequest(uid, n, exp_ms, ttl_ms, None, "", meta_json, now_ms, check.priority(rank))
    return ADD.with_key(req, ikey)


def build_subtract(
    user: object,
    credits: object,
    key: object,
    meta: object,
    now_ms: int | None,
    limits: str = "",
    member: object = None,
) -> SubtractRequest:
    uid, n = check.user_id(user), check.amount(credits)
    ikey, meta_json = check.idempotency_key(key), check.metadata(meta)
    req = SubtractRequest(uid, n, None, "", meta_json, now_ms, limits, check.member(member))
    return SUBTRACT.with_key(req, ikey)


SUBTRACT_ITEM_KEYS = frozenset({"user_id", "amount", "idempotency_key", "metadata", "member"})
ADD_ITEM_KEYS = frozenset(
    {"user_id", "amount", "expire_at", "ttl", "idempotency_key", "metadata", "priority"}
)


def _item_fields(item: object, keys: frozenset[str], positional: int) -> dict[str, Any]:
    if isinstance(item, Mapping):
        unknown = set(item) - keys
        if unknown:
            raise InvalidInputError(f"unknown item keys {sorted(map(str, unknown))}")
        return dict(item)
    if isinstance(item, tuple) and 2 <= len(item) <= positional:
        return dict(zip(("user_id", "amount", "expire_at"), item, strict=False))
    raise InvalidInputError(
        f"an item is a (user_id, amount) tuple or a mapping with keys from {sorted(keys)}"
    )


def build_subtract_item(item: object, now_ms: int | None, limits: str = "") -> SubtractRequest:
    f = _item_fields(item, SUBTRACT_ITEM_KEYS, 2)
    return build_subtract(
        f.get("user_id"), f.get("amount"), f.get("idempotency_key"), f.get("metadata"), now_ms,
        limits, f.get("member"),
    )  # fmt: skip


def build_add_item(item: object, now_ms: int | None) -> AddRequest:
    f = _item_fields(item, ADD_ITEM_KEYS, 3)
    return build_add(
        f.get("user_id"), f.get("amount"), f.get("expire_at"), f.get("ttl"),
        f.get("idempotency_key"), f.get("metadata"), now_ms, f.get("priority", 0),
    )  # fmt: skip


Built = TypeVar("Built", AddRequest, SubtractRequest)


def build_many(
    items: object, build: Callable[[object, int | None], Built], now_ms: int | None
) -> list[Built | CrediciError]:
    """One request per item; an item with bad input becomes its error, the others go ahead."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise InvalidInputError("items must be an iterable of items")
    built: list[Built | CrediciError] = []
    for item in items:
        try:
            built.append(build(item, now_ms))
        except InvalidInputError as error:
            built.append(error)
    return built
