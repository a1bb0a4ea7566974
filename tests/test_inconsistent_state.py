"""A user whose keys were changed from outside (a key evicted, a hand edit) is refused with
InconsistentStateError before anything is written, never met with a Lua error halfway (it used
to be `bad argument #1 to 'min' (number expected, got nil)`), and the audit reports it."""

from __future__ import annotations

from typing import Any

import pytest

from credici_redis import CrediciClient, InconsistentStateError, StorageError
from credici_redis._core.keys import user_keys
from tests.conftest import raw_redis


def _dump(raw: Any, namespace: str, user: str) -> dict[str, Any]:
    keys = user_keys(namespace, user)
    return {
        "state": raw.hgetall(keys.state),
        "amounts": raw.hgetall(keys.amounts),
        "order": raw.zrange(keys.order, 0, -1, withscores=True),
        "history": raw.xlen(keys.history),
    }


@pytest.mark.parametrize("lost", ["amounts", "order", "state"])
@pytest.mark.parametrize("backend", ["redis", "memory"])
def test_a_user_missing_a_key_is_refused_and_nothing_changes(
    url: str, namespace: str, lost: str
) -> None:
    raw = raw_redis(url)
    with CrediciClient.from_url(url, namespace=namespace) as client:
        client.add("u", 10)
        client.add("u", 5)
        raw.delete(getattr(user_keys(namespace, "u"), lost))  # as an evicting Redis would
        before = _dump(raw, namespace, "u")
        for call in (
            lambda: client.subtract("u", 3),
            lambda: client.add("u", 1),
            lambda: client.get_balance("u"),
            lambda: client.subtract_many([("u", 1)])[0],
        ):
            with pytest.raises(InconsistentStateError) as caught:
                result = call()
                if isinstance(result, Exception):
                    raise result
            assert isinstance(caught.value, StorageError)
            assert "nothing was changed" in str(caught.value)
        assert _dump(raw, namespace, "u") == before
        report = client.audit("u")
        assert not report.ok
        assert "inconsistent" in report.problems[0]
    raw.close()
