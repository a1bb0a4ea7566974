"""The command line: the metering demo and its audit; operator commands on the real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis

from credici_redis import CrediciClient, Transaction
from credici_redis._core.keys import user_keys
from credici_redis._demo import audit_ledger, run_demo
from credici_redis.cli import main

REDIS_URL = os.environ.get("CREDICI_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(autouse=True)
def no_store_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDICI_REDIS_URL", raising=False)


def run(namespace: str, *args: str) -> int:
    return main(["--redis-url", REDIS_URL, "--namespace", namespace, *args])


def namespace_keys(namespace: str) -> list[bytes]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        return list(r.scan_iter(match=f"{namespace}:*", count=1000))
    finally:
        r.close()


# The demo


def test_demo_on_the_embedded_store_adds_up() -> None:
    result = run_demo("memory://", namespace="demo", users=20, workers=4, seconds=1.5, seed=7)

    assert result.ok, result.problems
    assert result.accepted > 0
    assert result.rejected >= 0
    # Dormant users are never charged and their promo credits last at most the run's length.
    assert result.expired > 0
    assert result.granted == result.spent + result.expired + result.balance_total
    assert result.ops >= result.accepted + result.rejected + result.topups
    assert 1.5 <= result.seconds < 5
    assert result.ops_per_second > 0


def test_demo_on_redis_adds_up_and_keeps_its_data(namespace: str) -> None:
    result = run_demo(REDIS_URL, namespace=namespace, users=30, workers=4, seconds=1, seed=3)

    assert result.ok, result.problems
    assert result.accepted > 0
    assert result.granted == result.spent + result.expired + result.balance_total
    assert namespace_keys(namespace)


def test_demo_command_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--users", "20", "--workers", "2", "--seconds", "1", "--seed", "5"]
    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "on memory://" in out
    assert "seed            5\n" in out
    assert " accepted, " in out and " rejected " in out
    assert " granted, " in out and " spent, " in out and " expired, " in out
    assert "ops/s" in out
    assert "audit           OK: all 20 balances match" in out


def test_demo_takes_the_store_from_the_environment(
    namespace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CREDICI_REDIS_URL", REDIS_URL)
    argv = ["demo", "--namespace", namespace, "--users", "10", "--seconds", "0.5"]
    assert main(argv) == 0

    out = capsys.readouterr().out
    assert f"on {REDIS_URL} (namespace {namespace!r})" in out
    assert f"--namespace {namespace} history" in out
    assert namespace_keys(namespace)


@pytest.mark.parametrize(
    ("option", "value"), [("--users", "0"), ("--workers", "-1"), ("--seconds", "0")]
)
def test_demo_refuses_an_empty_workload(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", option, value]) == 2
    assert f"argument {option}: must be" in capsys.readouterr().err


def test_audit_finds_a_balance_that_disagrees_with_history(namespace: str) -> None:
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add("alice", 10)
        client.subtract("alice", 3)
        sound = audit_ledger(client, ["alice"], datetime.now(timezone.utc))
        r = redis.Redis.from_url(REDIS_URL)
        try:
            r.hincrby(user_keys(namespace, "alice").state, "bal", 5)
        finally:
            r.close()
        tampered = audit_ledger(client, ["alice"], datetime.now(timezone.utc))

    assert (sound.problems, sound.granted, sound.spent, sound.balance_total) == ((), 10, 3, 7)
    assert tampered.problems == ("alice: balance 12, history sums to 7, newest entry says 7",)


# Operator commands


def test_add_then_balance(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(namespace, "add", "alice", "100") == 0
    out = capsys.readouterr().out
    assert out.startswith("+100 credits for 'alice': balance 100 (transaction ")

    assert run(namespace, "balance", "alice") == 0
    assert capsys.readouterr().out == "100\n"


def test_store_options_may_follow_the_command(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["balance", "nobody", "--redis-url", REDIS_URL, "--namespace", namespace]) == 0
    assert capsys.readouterr().out == "0\n"


def test_subtract_more_than_available_fails_cleanly(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(namespace, "add", "alice", "50") == 0
    assert run(namespace, "subtract", "alice", "20") == 0
    assert "-20 credits for 'alice': balance 30" in capsys.readouterr().out

    assert run(namespace, "subtract", "alice", "31") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "credici-redis: error: user 'alice' has 30 credits, 31 were requested\n"

    assert run(namespace, "balance", "alice") == 0
    assert capsys.readouterr().out == "30\n"


def test_idempotency_key_applies_once(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        assert run(namespace, "add", "alice", "10", "--idempotency-key", "order-1") == 0
    assert run(namespace, "balance", "alice") == 0
    assert capsys.readouterr().out.endswith("\n10\n")

    assert run(namespace, "add", "alice", "11", "--idempotency-key", "order-1") == 1
    assert "'order-1' of user 'alice' was used for a different request" in capsys.readouterr().err


def test_add_with_an_expiry(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(namespace, "add", "alice", "5", "--ttl", "60") == 0
    assert run(namespace, "add", "alice", "7", "--expire-at", "2999-01-01T00:00:00Z") == 0
    out = capsys.readouterr().out
    assert "+5 credits for 'alice', expiring " in out
    assert "+7 credits for 'alice', expiring 2999-01-01T00:00:00.000+00:00: balance 12" in out

    assert run(namespace, "add", "alice", "7", "--expire-at", "2000-01-01T00:00:00") == 1
    assert "expiry must be after the storage's current time" in capsys.readouterr().err

    assert run(namespace, "add", "alice", "7", "--ttl", "5", "--expire-at", "2999-01-01") == 2
    assert "not allowed with argument" in capsys.readouterr().err

    assert run(namespace, "add", "alice", "7", "--expire-at", "next week") == 2
    assert "not an ISO 8601 date and time: 'next week'" in capsys.readouterr().err


def test_history_json_lines(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(namespace, "add", "alice", "100", "--idempotency-key", "k1") == 0
    assert run(namespace, "subtract", "alice", "30") == 0
    capsys.readouterr()

    assert run(namespace, "history", "alice", "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    history = [Transaction.model_validate(json.loads(line)) for line in lines]
    assert [(tx.kind, tx.amount, tx.balance_after) for tx in history] == [
        ("subtract", -30, 70),
        ("add", 100, 100),
    ]
    assert history[1].idempotency_key == "k1"
    assert {tx.user_id for tx in history} == {"alice"}


def test_history_table_and_period(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(namespace, "add", "alice", "100", "--idempotency-key", "k1") == 0
    capsys.readouterr()

    assert run(namespace, "history", "alice") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["created_at", "kind", "amount", "balance", "expire_at", "key"]
    assert row.split()[1:] == ["add", "+100", "100", "-", "k1"]

    assert run(namespace, "history", "alice", "--from", "2000-01-01", "--to", "2001-01-01") == 0
    assert capsys.readouterr().out == "no transactions for 'alice'\n"
    assert run(namespace, "history", "alice", "--from", "2000-01-01T00:00:00Z", "--json") == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize(
    ("amount", "code", "message"),
    [
        ("abc", 2, "argument AMOUNT: invalid int value: 'abc'"),
        ("0", 1, "amount must be between 1 and 9007199254740991, got 0"),
        ("-5", 1, "amount must be between 1 and 9007199254740991, got -5"),
    ],
)
@pytest.mark.parametrize("command", ["add", "subtract"])
def test_bad_amount(
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    command: str,
    amount: str,
    code: int,
    message: str,
) -> None:
    assert run(namespace, command, "alice", amount) == code
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert namespace_keys(namespace) == []


def test_operator_commands_need_a_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["balance", "alice"]) == 2
    assert "balance needs --redis-url or $CREDICI_REDIS_URL" in capsys.readouterr().err

    assert main(["--redis-url", "memory://", "balance", "alice"]) == 2
    assert "give a Redis URL" in capsys.readouterr().err


def test_unreachable_redis_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", "redis://127.0.0.1:1/0", "balance", "alice"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("credici-redis: error: Redis is unavailable")
    assert err.count("\n") == 1


def test_python_dash_m_exits_with_the_status(namespace: str) -> None:
    argv = [sys.executable, "-m", "credici_redis", "--redis-url", REDIS_URL]
    argv += ["--namespace", namespace, "subtract", "alice", "5"]
    env = {k: v for k, v in os.environ.items() if k != "CREDICI_REDIS_URL"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "credici-redis: error: user 'alice' has 0 credits, 5 were requested\n"


def test_library_prints_the_source_and_loads_it_where_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from credici_redis._core.scripts import LIBRARY
    from tests.conftest import start_redis_server

    assert main(["library", "--print"]) == 0
    assert capsys.readouterr().out == LIBRARY.source
    port, proc = start_redis_server(tmp_path)  # a server of this test's own: empty
    url = f"redis://127.0.0.1:{port}/0"
    try:
        assert main(["library", "--redis-url", url]) == 0
        assert capsys.readouterr().out == f"{LIBRARY.name}: loaded on {url}\n"
        assert main(["library", "--redis-url", url]) == 0
        assert capsys.readouterr().out == f"{LIBRARY.name}: already on {url}\n"
        with redis.Redis(port=port) as admin:  # the clients find it there
            admin.acl_setuser(
                "noload",
                enabled=True,
                passwords=["+pw"],
                keys=["*"],
                commands=["+@all", "-function"],
            )
        with CrediciClient.from_url(f"redis://noload:pw@127.0.0.1:{port}/0") as client:
            assert client.add("u", 5).balance_after == 5
    finally:
        proc.kill()
        proc.wait()
    assert main(["library", "--redis-url", "memory://"]) == 2


def test_recover_transfers_finishes_one_cut_short(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from credici_redis._ops import transfers
    from tests.test_transfer_recovery import cut

    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add("alice", 10)
        req = transfers.build_transfer("alice", "bob", 4, None, None, None, None)
        storage = client.storage
        storage.run(cut(storage.ledger.execute(transfers.TRANSFER, req), 1))
        assert run(namespace, "recover-transfers", "--older-than", "0s") == 0
        assert "completed 1, refunded 0, unresolved 0, failed 0" in capsys.readouterr().out
        assert (client.get_balance("alice"), client.get_balance("bob")) == (6, 4)
    assert run(namespace, "recover-transfers") == 0  # nothing left
