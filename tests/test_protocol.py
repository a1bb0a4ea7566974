"""Reply parsing and error mapping (no server needed)."""

from __future__ import annotations

import pytest
from redis.exceptions import NoScriptError, ResponseError

from credici_redis._core import protocol as _protocol
from credici_redis._core.protocol import Call
from credici_redis.errors import (
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidAmountError,
    InvalidExpiryError,
    StorageError,
)
from credici_redis.storage import to_resend


def test_transaction_reply_becomes_a_model() -> None:
    reply = [b"OK", b"1795551726366-0", b"s", b"-30", b"120", b"", b"k1", b'{"a":"b"}']
    tx = _protocol.parse_transaction("alice", reply, 30, "k1")
    assert tx.transaction_id == "1795551726366-0@alice"
    assert (tx.kind, tx.amount, tx.balance_after) == ("subtract", -30, 120)
    assert tx.created_at.timestamp() == 1795551726.366
    assert tx.idempotency_key == "k1"
    assert tx.metadata == {"a": "b"}
    # A client with decode_responses=True hands back str.
    assert _protocol.parse_transaction("alice", [v.decode() for v in reply], 30, "k1") == tx


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
        _protocol.parse_transaction("u", reply, 7, "key")


def test_insufficient_carries_its_facts() -> None:
    with pytest.raises(InsufficientCreditsError) as info:
        _protocol.parse_transaction("u", [b"INSUFFICIENT", b"6"], 7, None)
    assert (info.value.user_id, info.value.requested, info.value.available) == ("u", 7, 6)


def test_resend_after_noscript_includes_later_reads_but_never_a_script_that_ran() -> None:
    from credici_redis._core import scripts as _scripts

    script = Call(("EVALSHA", "x", 0), _scripts.SUBTRACT)
    other = Call(("EVALSHA", "y", 0), _scripts.ADD)
    read = Call(("XRANGE", "k", "-", "+"))
    calls = [read, other, script, read, other, read]
    replies = [[], [b"OK"], NoScriptError("NOSCRIPT"), [], [b"OK"], []]
    assert to_resend(calls, replies) == [2, 3, 5]
    assert to_resend(calls, [[], [b"OK"], [b"OK"], [], [b"OK"], []]) == []
    assert to_resend([read, other], [ResponseError("WRONGTYPE"), [b"OK"]]) == []


def test_error_replies_become_credici_errors_in_their_place() -> None:
    from redis.exceptions import ReadOnlyError

    from credici_redis._core import scripts as _scripts
    from credici_redis.errors import StorageUnavailableError
    from credici_redis.storage import errors_in_place

    call = Call(("EVALSHA", "x", 0), _scripts.SUBTRACT)
    wrongtype, readonly = ResponseError("WRONGTYPE"), ReadOnlyError("READONLY")
    out = errors_in_place([call] * 4, [[b"OK"], wrongtype, readonly, NoScriptError("again")])
    assert out[0] == [b"OK"]
    assert type(out[1]) is StorageError and out[1].__cause__ is wrongtype
    assert type(out[2]) is StorageUnavailableError and out[2].__cause__ is readonly
    assert type(out[3]) is StorageError
