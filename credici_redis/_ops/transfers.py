"""Transfers: credits move from one account to another, exactly once, whatever slots the two
are in. No script may touch two slots, so a transfer is three scripts (see "Transfers" in
lua/_ledger.lua), each atomic and each safe to run again:

    1 transfer_out.lua     on the source: take the credits, write the transfer's record
    2 transfer_in.lua      on the destination: give them, once (its marker answers a repeat)
    3 transfer_settle.lua  on the source: end the record (done), or give the credits back
                           (refused by the destination: its marker keeps that answer too)

`TRANSFER` runs the three; a process that dies between them leaves the record, which finishes it:
`recover` (the client's `recover_transfers`) takes the records of every slot's transfer queue
and runs steps 2 and 3 again, and so does a retry under the same idempotency key (the transfer's
id is made from the key, so the retry finds the record). Results: `Transfer`; refusals:
InsufficientCreditsError (nothing changed), TransferRefusedError (the credits went back),
TransferUnresolvedError.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from credici_redis._core import keys as _keys
from credici_redis._core import requests as check
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.protocol import Call, Flow, Ledger, sent, text
from credici_redis._core.scripts import load
from credici_redis._core.time import duration_ms, from_ms
from credici_redis.errors import (
    CrediciError,
    InvalidInputError,
    OutcomeUnknownError,
    StorageUnavailableError,
    TransferRefusedError,
    TransferUnresolvedError,
)
from credici_redis.models import Transfer, TransferRecovery

RECOVER_PER_SLOT = 100
"""Records read per slot by one `recover` pass, so that a round trip of 1,024 slots brings at
most 102,400 (more wait for the next pass: run it again while it finds some)."""
SLOTS_PER_ROUND = 1024
"""Slot queues read per round trip by `recover`."""


@dataclass(frozen=True, slots=True)
class TransferRequest:
    user_id: str
    """The source."""
    to_user: str
    amount: int
    expire_at_ms: int | None
    transfer_id: str
    """New with every transfer (a retry that finds its record goes on with the record's)."""
    record_id: str
    """The record's field: made from the idempotency key when there is one, so that a retry
    finds the record; else the transfer id."""
    idempotency_key: str | None
    fingerprint: str
    metadata_json: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class TransferInRequest:
    user_id: str
    """The destination."""
    transfer_id: str
    from_user: str
    amount: int
    parts: str
    expire_at_ms: int | None
    created_ms: int
    metadata_json: str
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class SettleRequest:
    user_id: str
    """The source."""
    record_id: str
    outcome: str
    in_id: str
    idempotency_key: str | None
    now_ms: int | None


@dataclass(frozen=True, slots=True)
class Pending:
    """A transfer whose credits left the source (step 1 done): what steps 2 and 3 need."""

    transfer_id: str
    record_id: str
    from_user: str
    to_user: str
    amount: int
    created_ms: int
    out_id: str
    expire_at_ms: int | None
    idempotency_key: str | None
    metadata_json: str
    parts: str

    def completed(self, in_id: str) -> Transfer:
        return Transfer(
            transfer_id=self.transfer_id,
            from_user=self.from_user,
            to_user=self.to_user,
            amount=self.amount,
            status="completed",
            created_at=from_ms(self.created_ms),
            from_transaction_id=_keys.transaction_id(self.from_user, self.out_id),
            to_transaction_id=_keys.transaction_id(self.to_user, in_id),
            expire_at=None if self.expire_at_ms is None else from_ms(self.expire_at_ms),
            idempotency_key=self.idempotency_key,
            metadata=json.loads(self.metadata_json) if self.metadata_json else {},
        )


@dataclass(frozen=True, slots=True)
class Taken:
    """Step 2's answer: OK (the destination has the credits, in entry `in_id`), or why not."""

    outcome: str
    in_id: str = ""
    provable: bool = True


def _pending(r: Reply) -> Pending:
    expire = r["expire_at"]
    return Pending(
        r["transfer_id"], r["record_id"], r["from_user"], r["to_user"], int(r["amount"]),
        int(r["created_at"]), r["out_id"], int(expire) if expire else None,
        r["idempotency_key"] or None, r["metadata"], r["parts"],
    )  # fmt: skip


def _started(req: TransferRequest, r: Reply) -> Pending | Transfer:
    pending = _pending(r)
    return pending.completed(r["in_id"]) if r["status"] == "completed" else pending


TRANSFER_REPLY = (
    "OK", "transfer_id", "record_id", "status", "from_user", "to_user", "amount", "created_at",
    "out_id", "in_id", "expire_at", "idempotency_key", "metadata", "parts",
)  # fmt: skip
"""transfer_reply (lua/_ledger.lua)."""


def _record_keys(namespace: str, req: TransferRequest | SettleRequest) -> tuple[str, ...]:
    return (
        _keys.transfer_records(namespace, req.user_id),
        _keys.transfer_queue(namespace, _keys.user_slot(req.user_id)),
    )


def _marker_keys(namespace: str, req: TransferInRequest) -> tuple[str, ...]:
    return (_keys.transfer_marker(namespace, req.user_id, req.transfer_id),)


def _transfer_flow(ledger: Ledger, op: Operation[Any, Any], req: TransferRequest) -> Flow[Any]:
    # Keyed (by the caller, or by the storage for its retries): a retry finds the same record.
    key = req.idempotency_key
    req = replace(req, record_id=req.transfer_id if key is None else record_id_for(key))
    started = yield from ledger.script_flow(op, req)
    if isinstance(started, Transfer):
        return started
    try:
        return (yield from finish(ledger, started, req.now_ms))
    except (TransferRefusedError, TransferUnresolvedError):
        raise
    except CrediciError as exc:  # the credits left the source: never a plain failure
        raise OutcomeUnknownError(
            f"transfer {started.transfer_id} began (its credits left {started.from_user!r}) and"
            f" could not finish: {exc}; recover_transfers() finishes it"
        ) from exc


TRANSFER: Operation[TransferRequest, Transfer] = Operation(
    "transfer",
    TransferRequest,
    load("transfer_out", effect=True),
    argv=(
        "transfer_id",
        "record_id",
        "user_id",
        "to_user",
        "amount",
        "expire_at_ms",
        "fingerprint",
        "idempotency_ttl_ms",
        "idempotency_key",
        "metadata_json",
    ),
    reply=TRANSFER_REPLY,
    parse=_started,
    refusals=frozenset({"IDEM_CONFLICT", "EXPIRY_PAST", "INSUFFICIENT", "REFUNDED"}),
    fingerprint=("to_user", "amount", "expire_at_ms", "metadata_json"),
    more_keys=_record_keys,
    flow=_transfer_flow,
)

TRANSFER_IN: Operation[TransferInRequest, Taken] = Operation(
    "transfer_in",
    TransferInRequest,
    load("transfer_in", effect=True),
    argv=(
        "transfer_id",
        "from_user",
        "amount",
        "parts",
        "expire_at_ms",
        "created_ms",
        "metadata_json",
    ),
    reply=("OK", "in_id", "balance_after"),
    parse=lambda req, r: Taken("OK", r["in_id"]),
    outcomes={
        "STALE": lambda req, f: Taken("STALE", provable=f[1] == "1"),
        "BALANCE_LIMIT": lambda req, f: Taken("BALANCE_LIMIT"),
    },
    more_keys=_marker_keys,
)

GONE = object()
"""transfer_settle.lua's GONE: another call settled the transfer first."""

TRANSFER_SETTLE: Operation[SettleRequest, Any] = Operation(
    "transfer_settle",
    SettleRequest,
    load("transfer_settle", effect=True),
    argv=("record_id", "outcome", "in_id", "idempotency_ttl_ms"),
    reply=TRANSFER_REPLY,
    parse=lambda req, r: _pending(r).completed(r["in_id"]),
    refusals=frozenset({"REFUNDED"}),
    outcomes={"GONE": lambda req, f: GONE},
    more_keys=_record_keys,
)


def finish(ledger: Ledger, p: Pending, now_ms: int | None) -> Flow[Transfer]:
    """Steps 2 and 3 of a transfer whose credits left the source: the same answer however
    often they run (the destination's marker keeps what it did: took them, or refused)."""
    give = TransferInRequest(
        p.to_user, p.transfer_id, p.from_user, p.amount, p.parts, p.expire_at_ms,
        p.created_ms, p.metadata_json, now_ms,
    )  # fmt: skip
    taken = yield from ledger.script_flow(TRANSFER_IN, give)
    if not taken.provable:
        raise TransferUnresolvedError(p.transfer_id)
    outcome = "done" if taken.outcome == "OK" else taken.outcome
    settled = yield from ledger.script_flow(
        TRANSFER_SETTLE,
        SettleRequest(p.from_user, p.record_id, outcome, taken.in_id, p.idempotency_key, now_ms),
    )
    if settled is GONE:  # settled by another call, which met the same marker
        if outcome == "done":
            return p.completed(taken.in_id)
        raise TransferRefusedError(p.transfer_id, outcome, None)
    assert isinstance(settled, Transfer)
    return settled


def recover(ledger: Ledger, now_ms: int | None, older_than_ms: int) -> Flow[TransferRecovery]:
    """Finish the transfers of every slot's queue that began `older_than_ms` ago or earlier
    (younger ones are likely still on their way). A transfer that cannot finish (its
    destination's keys are broken) is reported and the others go on; an outage stops it."""
    now = now_ms if now_ms is not None else (yield from ledger.server_ms())
    done: dict[str, int] = {"completed": 0, "refunded": 0}
    unresolved: list[str] = []
    failed: list[str] = []
    for start in range(0, _keys.SLOTS, SLOTS_PER_ROUND):
        slots = range(start, min(start + SLOTS_PER_ROUND, _keys.SLOTS))
        queues = [_keys.transfer_queue(ledger.namespace, slot) for slot in slots]
        replies = yield from sent([
            Call(("ZRANGE", q, "-inf", now - older_than_ms, "BYSCORE", "LIMIT", 0,
                  RECOVER_PER_SLOT))
            for q in queues
        ])  # fmt: skip
        members = [text(member).rpartition("#") for reply in replies for member in reply]
        if not members:
            continue
        raws = yield from sent([Call(("HGET", key, rid)) for key, _, rid in members])
        for raw in raws:
            if raw is None:  # settled meanwhile
                continue
            p = pending_of(text(raw))
            try:
                yield from finish(ledger, p, now_ms)
                done["completed"] += 1
            except TransferRefusedError:
                done["refunded"] += 1
            except TransferUnresolvedError:
                unresolved.append(p.transfer_id)
            except StorageUnavailableError:
                raise
            except CrediciError as exc:
                failed.append(f"{p.transfer_id}: {exc}")
    return TransferRecovery(**done, unresolved=unresolved, failed=failed)


def pending_of(raw: str) -> Pending:
    """A transfer's record (written by transfer_out.lua) as the steps that remain need it."""
    r = json.loads(raw)
    return Pending(
        r["id"], r["rid"], r["from"], r["to"], int(r["n"]), int(r["t"]), r["o"],
        int(r["x"]) if r["x"] else None, r["i"] or None, r["m"], r["u"],
    )  # fmt: skip


def record_id_for(key: str) -> str:
    """The record id of a source's transfer under idempotency key `key` (the records are the
    source's own: the key needs no user)."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:32]


def build_transfer(
    from_user: object,
    to_user: object,
    credits: object,
    expire_at: object,
    key: object,
    meta: object,
    now_ms: int | None,
) -> TransferRequest:
    source, destination, n = check.user_id(from_user), check.user_id(to_user), check.amount(credits)
    if source == destination:
        raise InvalidInputError("a transfer needs two different accounts")
    expire_ms, _ = check.expiry(expire_at, None)
    ikey, meta_json = check.idempotency_key(key), check.metadata(meta)
    tid = "t" + uuid.uuid4().hex
    req = TransferRequest(source, destination, n, expire_ms, tid, tid, None, "", meta_json, now_ms)
    return TRANSFER.with_key(req, ikey)


def build_recover(older_than: object) -> int:
    """The age in ms below which an unsettled transfer is left alone (it may still be on its
    way)."""
    if not isinstance(older_than, timedelta) or older_than < timedelta(0):
        raise InvalidInputError(f"older_than must be a timedelta >= 0, not {older_than!r}")
    return duration_ms(older_than)
