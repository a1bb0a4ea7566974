"""The locust load test runs headless without a single failure, and leaves every balance equal to
the sum of its history; so does its HTTP scenario against the example app, with no hold left.

Locust runs on gevent, which monkey-patches the interpreter: it runs as a subprocess, never in the
test process (the example app runs in the test process, under uvicorn in a thread).
"""

from __future__ import annotations

import csv
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from credici_redis import CrediciClient
from tests.conftest import REDIS_URL

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"
HOT_USERS = 5


def run_locust(
    namespace: str, directory: Path, *options: str, seconds: int = 8, **env_vars: str
) -> dict[str, dict[str, str]]:
    """A short headless run; its stats CSV rows by request name."""
    env = {
        **os.environ,
        "CREDICI_REDIS_URL": REDIS_URL,
        "CREDICI_NAMESPACE": namespace,
        "CREDICI_USERS": "200",
        "CREDICI_HOT_USERS": str(HOT_USERS),
        **env_vars,
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *options, "--headless",
        "-u", "20", "-r", "20", "-t", f"{seconds}s", "--stop-timeout", "5",
        "--only-summary", "--csv", str(directory / "run"),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=120
    )
    failures = directory / "run_failures.csv"
    assert done.returncode == 0, (
        f"locust exited {done.returncode}\n{done.stderr[-3000:]}\n"
        f"{failures.read_text() if failures.exists() else ''}"
    )
    with open(directory / "run_stats.csv", newline="") as stats:
        return {row["Name"]: row for row in csv.DictReader(stats)}


@pytest.mark.slow
def test_locust_run_has_no_failures_and_balances_match_history(
    namespace: str, tmp_path: Path
) -> None:
    stats = run_locust(namespace, tmp_path)

    total = stats["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, stats
    for name in ("subtract", "add", "get_balance", "subtract_many(10)"):
        assert int(stats[name]["Request Count"]) > 0, f"no {name} requests: {sorted(stats)}"
    # The HTTP scenario runs only when named: a plain run leaves it out.
    assert not [name for name in stats if name.startswith("/")], sorted(stats)

    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        users = [user for batch in client.scan_users() for user in batch]
        assert {f"hot-{i}" for i in range(HOT_USERS)} <= set(users)
        for user in users:
            # A bucket may expire between two reads (top-ups with a TTL of seconds): read the
            # history between two equal balances, so both describe the same moment.
            for _ in range(5):
                balance = client.get_balance(user)
                history = client.get_all_user_transactions(user)
                if client.get_balance(user) == balance:
                    break
            else:
                pytest.fail(f"the balance of {user} kept moving")
            assert balance == sum(tx.amount for tx in history), user
            assert history[0].balance_after == balance, user
            assert balance >= 0, user
            report = client.audit(user)
            assert report.ok, (user, report.problems)


@pytest.mark.slow
def test_locust_http_scenario_against_the_example_app(namespace: str, tmp_path: Path) -> None:
    from tests.web.conftest import eventually, load_example, serve_asgi

    app = load_example().create_app(REDIS_URL, namespace, token_delay=0.002)
    with serve_asgi(app) as base:
        stats = run_locust(
            namespace, tmp_path, "ExampleApiUser", "--host", base, seconds=4,
            CREDICI_ABANDON_SHARE="0.3",
        )  # fmt: skip
    total = stats["Aggregated"]
    assert int(total["Failure Count"]) == 0, stats
    for name in ("/signup", "/v1/echo", "/v1/summarize", "/v1/generate", "/balance"):
        assert int(stats[name]["Request Count"]) > 0, f"no {name} requests: {sorted(stats)}"
    assert int(stats["/v1/generate (abandoned)"]["Request Count"]) > 0
    assert not {"subtract", "add"} & set(stats)  # the library scenario did not run

    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        users = [user for batch in client.scan_users() for user in batch]
        assert len(users) == 20
        for user in users:
            # Streams cut off when locust stopped are settled by the middleware: no hold stays.
            details = eventually(
                functools.partial(client.get_balance_details, user), lambda d: d.held == 0
            )
            assert details.held == 0
            history = client.get_all_user_transactions(user)
            assert client.get_balance(user) == sum(tx.amount for tx in history), user
            assert client.audit(user).ok, user
            kinds = {tx.kind for tx in history}
            assert {"cycle_start", "subtract", "reserve"} <= kinds, (user, kinds)
