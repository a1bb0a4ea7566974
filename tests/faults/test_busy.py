"""BUSY (another client's script running past busy-reply-threshold): the call did not run, so it
is a StorageUnavailableError (retryable, also by retries=N), never a plain StorageError."""

from __future__ import annotations

import pytest

from credici_redis import CrediciClient, StorageUnavailableError
from tests.conftest import spin


def test_busy_is_unavailable_and_not_applied(busy_redis: int) -> None:
    with CrediciClient.from_url(f"redis://127.0.0.1:{busy_redis}/0", namespace="b") as client:
        client.add("u", 10)
        spinning = spin(busy_redis, 700)
        try:
            with pytest.raises(StorageUnavailableError, match="busy") as caught:
                client.subtract("u", 3)
            assert "not applied" in str(caught.value)
        finally:
            spinning.join()
        assert client.get_balance("u") == 10  # the refused charge did not run


def test_retries_ride_out_a_busy_redis(busy_redis: int) -> None:
    url = f"redis://127.0.0.1:{busy_redis}/0"
    with CrediciClient.from_url(url, namespace="b", retries=8) as client:
        client.add("u", 10)
        spinning = spin(busy_redis, 500)
        try:
            assert client.subtract("u", 3).balance_after == 7
        finally:
            spinning.join()
        assert [t.amount for t in client.get_all_user_transactions("u")] == [-3, 10]
