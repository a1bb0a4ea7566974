"""credici_redis.wsgi where WSGI differs: a late start_response, request objects, its
configuration. What both middlewares promise is in test_contract.py."""

from __future__ import annotations

from datetime import timedelta

import pytest

from credici_redis import CrediciClient
from credici_redis.wsgi import (
    CreditMiddleware,
    Meter,
    WSGIEnvironment,
    current_meter,
    report_usage,
    user_from_header,
)
from tests.conftest import REDIS_URL
from tests.web.conftest import credit_headers, fresh_user
from tests.web.contract import WSGIApp, serve_contract


def test_streamed_response_with_late_start_response_gets_the_headers(
    namespace: str, credici: CrediciClient
) -> None:
    user = fresh_user()
    credici.add(user, 2)
    with serve_contract("wsgi", REDIS_URL, namespace) as served:
        r = served.http.get("/late", headers={"X-User": user})
    assert r.json() == {"path": "/late", "charged": 1}
    assert credit_headers(r) == {"x-credits-remaining": "1", "x-credits-cost": "1"}


def test_bad_configuration_is_refused_at_once() -> None:
    with CrediciClient.from_url("memory://") as client:
        for bad, error in ((-1, ValueError), (True, TypeError), ("1", TypeError)):
            with pytest.raises(error):
                CreditMiddleware(WSGIApp(), client=client, user=user_from_header("X"), cost=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="on_storage_error"):
            CreditMiddleware(
                WSGIApp(),
                client=client,
                user=user_from_header("X"),
                on_storage_error="ajar",  # type: ignore[arg-type]
            )


def test_meter_helpers_and_bad_configuration() -> None:
    class Request:  # a framework's request: Werkzeug keeps the environ in .environ
        def __init__(self, environ: WSGIEnvironment) -> None:
            self.environ = environ

    usage = Meter("alice", 5)
    request = Request({"credici.meter": usage})
    assert current_meter(request) is usage and report_usage(request, 4)
    assert (usage.used, usage.left) == (4, 1)
    assert current_meter({}) is None and not report_usage({}, 1)
    with pytest.raises(TypeError, match="environ"):
        current_meter(object())
    with CrediciClient.from_url("memory://") as client:
        for bad, error in ((-1, ValueError), (True, TypeError)):
            with pytest.raises(error):
                CreditMiddleware(WSGIApp(), client=client, user=user_from_header("X"), reserve=bad)
        with pytest.raises(TypeError, match="timedelta"):
            CreditMiddleware(WSGIApp(), client=client, user=user_from_header("X"), hold_ttl=60)  # type: ignore[arg-type]
        CreditMiddleware(
            WSGIApp(), client=client, user=user_from_header("X"), hold_ttl=timedelta(hours=1)
        )
