"""Reply parsing and error mapping (no server needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from redis.exceptions import NoScriptError, ResponseError

from credici_redis._core import protocol as _protocol
from credici_redis._core.codes import REFUSALS, refusal
from credici_redis._core.protocol import Call, Ledger
from credici_redis._ops import OPERATIONS, charge
from credici_redis._storages.redis_base import by_sha, by_source
from credici_redis.errors import (
    AlreadyReversedError,
    BudgetExceededError,
    CaptureExceedsHoldError,
    CycleNotFoundError,
    HoldFinishedError,
    HoldNotFoundError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    NotReversibleError,
    RateLimitedError,
    StorageError,
    TransactionArchivedError,
    TransactionNotFoundError,
    TransferRefusedError,
)
from credici_redis.storage import to_resend

LEDGER = Ledger("t", 86_400_000)


def parse_subtract(reply: object, amount: int = 30, key: str | None = "k1") -> object:
    """A subtract's reply as the ledger parses it (the operation's reply names, the codes)."""
    req = charge.build_subtract("alice", amount, key, None, None)
    return LEDGER.result(charge.SUBTRACT, req, reply)


def test_transaction_reply_becomes_a_model() -> None:
    reply = [b"OK", b"1795551726366-0", b"s", b"-30", b"120", b"", b"k1", b'{"a":"b"}']
    tx = parse_subtract(reply)
    assert tx.transaction_id == "1795551726366-0@alice"
    assert (tx.kind, tx.amount, tx.balance_after) == ("subtract", -30, 120)
    assert tx.created_at.timestamp() == 1795551726.366
    assert tx.idempotency_key == "k1"
    assert tx.metadata == {"a": "b"}
    # A client with decode_responses=True hands back str.
    assert parse_subtract([v.decode() for v in reply]) == tx


def test_stream_entries_in_either_shape() -> None:
    fields = {b"k": b"a", b"n": b"5", b"b": b"5", b"x": b"1800000000000"}
    as_dict = _protocol.parse_entry("u", (b"17-2", fields))
    as_list = _protocol.parse_entry("u", [b"17-2", [x for kv in fields.items() for x in kv]])
    assert as_dict == as_list
    assert as_dict.expire_at is not None and as_dict.expire_at.year == 2027


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ([b"INSUFFICIENT", b"6"], InsufficientCreditsError),
        ([b"IDEM_CONFLICT"], IdempotencyConflictError),
        ([b"EXPIRY_PAST", b"1795551726366"], InvalidExpiryError),
        ([b"BALANCE_LIMIT", b"9007199254740991"], InvalidAmountError),
        ([b"SOMETHING_NEW"], StorageError),
        ([], StorageError),
        (b"OK", StorageError),
    ],
)
def test_coded_replies_become_typed_errors(reply: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_subtract(reply, 7, "key")


def test_insufficient_carries_its_facts() -> None:
    with pytest.raises(InsufficientCreditsError) as info:
        parse_subtract([b"INSUFFICIENT", b"6"], 7, None)
    assert (info.value.user_id, info.value.requested, info.value.available) == ("alice", 7, 6)


def test_every_code_of_every_operation_is_in_the_one_table() -> None:
    declared = {code for op in OPERATIONS.values() for code in op.refusals}
    assert declared <= set(REFUSALS), declared - set(REFUSALS)
    assert set(REFUSALS) <= declared, "a code no operation gives"


EXPECTED = {
    "INSUFFICIENT": InsufficientCreditsError,
    "IDEM_CONFLICT": IdempotencyConflictError,
    "EXPIRY_PAST": InvalidExpiryError,
    "BALANCE_LIMIT": InvalidAmountError,
    "NO_CYCLE": CycleNotFoundError,
    "NO_HOLD": HoldNotFoundError,
    "HOLD_DONE": HoldFinishedError,
    "HOLD_EXCEEDED": CaptureExceedsHoldError,
    "NO_TX": TransactionNotFoundError,
    "ARCHIVED": TransactionArchivedError,
    "NOT_REVERSIBLE": NotReversibleError,
    "REVERSED": AlreadyReversedError,
    "BUDGET": BudgetExceededError,
    "RATE": RateLimitedError,
    "REFUNDED": TransferRefusedError,
}


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_each_code_becomes_its_error_with_the_requests_facts(code: str) -> None:
    assert set(EXPECTED) == set(REFUSALS)
    req = SimpleNamespace(
        user_id="alice", amount=7, idempotency_key="k", hold_id="h1@alice",
        transaction_id="17-0@alice",
    )  # fmt: skip
    fields = {
        "BUDGET": ["5", "1795551726366", "1000", "B10:day:UTC"],
        "RATE": ["5", "R10:60000:10"],
        "REFUNDED": ["BALANCE_LIMIT", "t1", "17-1"],
    }.get(code, ["5"])
    error = refusal(req, [code, *fields])
    assert type(error) is EXPECTED[code]
    facts = {"user_id": "alice", "hold_id": "h1@alice", "transaction_id": "17-0@alice"}
    facts |= {"amount": 7, "requested": 7}
    for name, value in facts.items():  # the facts it carries are the request's
        assert getattr(error, name, value) == value, (name, error)


def test_resend_after_noscript_includes_later_reads_but_never_a_script_that_ran() -> None:

    script = Call(("EVALSHA", "x", 0), charge.SUBTRACT.script)
    other = Call(("EVALSHA", "y", 0), charge.ADD.script)
    read = Call(("XRANGE", "k", "-", "+"))
    calls = [read, other, script, read, other, read]
    replies = [[], [b"OK"], NoScriptError("NOSCRIPT"), [], [b"OK"], []]
    assert to_resend(calls, replies) == [2, 3, 5]
    assert to_resend(calls, [[], [b"OK"], [b"OK"], [], [b"OK"], []]) == []
    assert to_resend([read, other], [ResponseError("WRONGTYPE"), [b"OK"]]) == []


def test_resend_when_the_function_is_missing_or_fcall_refused() -> None:
    from redis.exceptions import NoPermissionError

    fcall = Call(("FCALL", "credici_x_subtract", 0), charge.SUBTRACT.script)
    read = Call(("XRANGE", "k", "-", "+"))
    missing = ResponseError("Function not found")
    refused = NoPermissionError("this user has no permissions to run the 'fcall' command")
    too_old = ResponseError("unknown command 'FCALL', with args beginning with: ")
    for reply in (missing, refused, too_old):
        assert to_resend([fcall, read], [reply, []]) == [0, 1]
    other = NoPermissionError("this user has no permissions to run the 'xadd' command")
    assert to_resend([fcall, read], [other, []]) == []  # an ACL refusal inside: not a resend
    assert by_source(fcall).args == ("EVAL", charge.SUBTRACT.script.source, 0)
    assert by_sha(fcall).args == ("EVALSHA", charge.SUBTRACT.script.sha, 0)


def test_error_replies_become_credici_errors_in_their_place() -> None:
    from redis.exceptions import ReadOnlyError

    from credici_redis.errors import StorageUnavailableError
    from credici_redis.storage import errors_in_place

    call = Call(("EVALSHA", "x", 0), charge.SUBTRACT.script)
    wrongtype, readonly = ResponseError("WRONGTYPE"), ReadOnlyError("READONLY")
    out = errors_in_place([call] * 4, [[b"OK"], wrongtype, readonly, NoScriptError("again")])
    assert out[0] == [b"OK"]
    assert type(out[1]) is StorageError and out[1].__cause__ is wrongtype
    assert type(out[2]) is StorageUnavailableError and out[2].__cause__ is readonly
    assert type(out[3]) is StorageUnavailableError  # NOSCRIPT: the script did not run
