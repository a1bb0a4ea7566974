"""The public surface: the names outside code relies on, and sync/async parity."""

from __future__ import annotations

import inspect

import pytest

import credici_redis
from credici_redis import AsyncCrediciClient, CrediciClient, InvalidOptionError

REQUIRED = [
    "CrediciClient",
    "AsyncCrediciClient",
    "RedisStorage",
    "AsyncRedisStorage",
    "Transaction",
    "Cycle",
    "CrediciError",
    "InsufficientCreditsError",
    "InvalidAmountError",
    "InvalidUserIdError",
    "InvalidExpiryError",
    "IdempotencyConflictError",
    "StorageUnavailableError",
]

SEED_METHODS = [
    "add",
    "subtract",
    "get_balance",
    "start_cycle",
    "get_cycle",
    "get_all_user_transactions",
    "get_user_transactions_for_period",
]


def test_required_names_are_exported() -> None:
    for name in REQUIRED:
        assert name in credici_redis.__all__
        assert hasattr(credici_redis, name)


def _public(cls: type) -> dict[str, inspect.Signature]:
    """Public methods and classmethods (a classmethod object itself is not callable)."""
    return {
        name: inspect.signature(getattr(cls, name))
        for name, member in vars(cls).items()
        if not name.startswith("_") and (callable(member) or isinstance(member, classmethod))
    }


def test_sync_and_async_clients_have_the_same_methods_and_signatures() -> None:
    sync, async_ = _public(CrediciClient), _public(AsyncCrediciClient)
    sync_names = set(sync) - {"close"}
    async_names = set(async_) - {"aclose"}
    assert sync_names == async_names
    assert "from_url" in sync_names
    for name in sync_names:
        s, a = sync[name], async_[name]
        async_only = {"batching"}  # auto-batching needs an event loop
        a_params = [p for p in a.parameters.values() if p.name not in async_only]
        assert list(s.parameters.values()) == a_params, name
        if name in ("scan_users", "events", "iter_user_transactions"):  # async iterators
            assert "AsyncIterator" in str(inspect.signature(getattr(AsyncCrediciClient, name)))
        elif name != "from_url":
            assert inspect.iscoroutinefunction(getattr(AsyncCrediciClient, name)), name
    assert "batching" not in sync["from_url"].parameters
    with pytest.raises(InvalidOptionError, match="asyncio client only"):
        CrediciClient.from_url("memory://", batching=True)
    assert set(SEED_METHODS) <= sync_names


def test_seed_call_shapes_are_accepted() -> None:
    # Keyword names from the seed README.
    params = inspect.signature(CrediciClient.add).parameters
    assert {"user_id", "amount", "expire_at"} <= set(params)
    assert list(inspect.signature(CrediciClient.start_cycle).parameters)[1:4] == [
        "amount",
        "time_delta",
        "user_id",
    ]
