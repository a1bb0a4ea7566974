"""`reverse` (lua/reverse.lua): undo a subtract, a capture or an add, once."""

from __future__ import annotations

from dataclasses import dataclass

from credici_redis._core import requests as check
from credici_redis._core.keys import parse_transaction_id
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.protocol import TX_REPLY, parse_tx
from credici_redis._core.scripts import load
from credici_redis.errors import InvalidInputError
from credici_redis.models import Transaction


@dataclass(frozen=True, slots=True)
class ReverseRequest:
    transaction_id: str
    user_id: str
    entry_id: str
    idempotency_key: str | None
    fingerprint: str
    now_ms: int | None
    metadata_json: str = ""
    """Why (the console keeps an operator's reason here); '' = none."""


def _reversal(req: ReverseRequest, r: Reply) -> Transaction:
    return parse_tx(req.user_id, r).model_copy(
        update={"related_id": req.transaction_id, "unrestored": int(r["unrestored"])}
    )


REVERSE: Operation[ReverseRequest, Transaction] = Operation(
    "reverse",
    ReverseRequest,
    load("reverse", effect=True),
    argv=("entry_id", "fingerprint", "idempotency_ttl_ms", "idempotency_key", "metadata_json"),
    reply=(*TX_REPLY, "reversed_id", "unrestored", "member"),
    parse=_reversal,
    refusals=frozenset(
        {"IDEM_CONFLICT", "NO_TX", "ARCHIVED", "NOT_REVERSIBLE", "REVERSED", "BALANCE_LIMIT"}
    ),
    fingerprint=("entry_id",),
    fingerprint_if_set=("metadata_json",),
    reads_entry="entry_id",
)


def build_reverse(
    transaction: object, key: object, now_ms: int | None, meta: object = None
) -> ReverseRequest:
    if not isinstance(transaction, str):
        raise InvalidInputError(f"transaction_id must be a str, not {type(transaction).__name__}")
    uid, entry = parse_transaction_id(transaction)
    ikey, meta_json = check.idempotency_key(key), check.metadata(meta)
    req = ReverseRequest(transaction, check.user_id(uid), entry, None, "", now_ms, meta_json)
    return REVERSE.with_key(req, ikey)
