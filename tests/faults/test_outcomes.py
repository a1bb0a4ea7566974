"""One classification of every Redis reply and connection state (`_storages/outcomes.py`), by
whether the request may have been applied (no server needed: the states as redis-py shows them)."""

from __future__ import annotations

import pytest
from redis import exceptions as e

from credici_redis._core.protocol import Call
from credici_redis._ops import account, charge
from credici_redis._storages.outcomes import not_replicated, storage_error
from credici_redis.errors import (
    OutcomeUnknownError,
    ReplicationTimeoutError,
    StorageError,
    StorageUnavailableError,
)

WRITE = Call(("EVALSHA", "x", 0), charge.SUBTRACT.script)
READ = Call(("EVALSHA", "y", 0), account.BALANCE.script)

NOT_APPLIED = [
    e.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
    e.TimeoutError("Timeout connecting to server"),
    e.ConnectionError("No connection available."),
    e.BusyLoadingError("Redis is loading the dataset in memory"),
    e.ResponseError("BUSY Redis is busy running a script."),
    e.ReadOnlyError("You can't write against a read only replica."),
    e.MasterDownError("MASTERDOWN Link with MASTER is down"),
    e.ClusterDownError("CLUSTERDOWN The cluster is down"),
    e.TryAgainError("not sent: still redirected when the timeout passed"),
    e.MovedError("3999 127.0.0.1:6381"),
    e.AskError("3999 127.0.0.1:6381"),
    e.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
    e.NoScriptError("No matching script."),
    e.RedisClusterException("no node of the cluster could be reached"),
]


@pytest.mark.parametrize("state", NOT_APPLIED, ids=lambda exc: type(exc).__name__)
def test_states_where_nothing_ran_are_unavailable_and_say_so(state: Exception) -> None:
    error = storage_error(state, [WRITE])
    assert type(error) is StorageUnavailableError
    assert "not applied" in str(error)


@pytest.mark.parametrize(
    "state",
    [e.ConnectionError("Connection reset by peer"), e.TimeoutError("Timeout reading from socket")],
)
def test_a_connection_lost_with_a_write_on_the_wire_is_an_unknown_outcome(state: Exception) -> None:
    error = storage_error(state, [WRITE])
    assert type(error) is OutcomeUnknownError and "may have been applied" in str(error)
    assert type(storage_error(state, [READ])) is StorageUnavailableError  # a read: just retry


def test_an_acl_refusal_is_a_setting_not_an_outage() -> None:
    error = storage_error(e.NoPermissionError("NOPERM this user has no permissions"), [WRITE])
    assert type(error) is StorageError and "ACL" in str(error)


def test_an_unknown_error_reply_is_a_plain_storage_error() -> None:
    assert type(storage_error(e.ResponseError("WRONGTYPE Operation"), [WRITE])) is StorageError


def test_the_wait_after_an_applied_write() -> None:
    timed_out = not_replicated(0, 0.5)
    assert type(timed_out) is ReplicationTimeoutError and "applied on the primary" in str(timed_out)
    unblocked = e.ResponseError(
        "UNBLOCKED force unblock from blocking operation, instance state changed"
    )
    demoted = e.ResponseError("ERR WAIT cannot be used with replica instances.")
    for ack in (unblocked, demoted, e.ConnectionError("Connection reset by peer")):
        error = not_replicated(ack, 0.5)
        assert type(error) is OutcomeUnknownError, ack
        assert "may have been" in str(error) and "was applied" not in str(error)
        assert error.__cause__ is ack
    refused = not_replicated(e.NoPermissionError("NOPERM no permissions to run 'wait'"), 0.5)
    assert type(refused) is StorageError and "applied on the primary" in str(refused)
