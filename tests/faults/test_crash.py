"""Crash: Redis SIGKILLed under a multi-process charging load loses no acknowledged operation.

The evidence for the "appendfsync always" row of the README's durability table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis

from credici_redis import CrediciClient
from tests.conftest import free_port

WORKER = textwrap.dedent(
    """
    import json, random, sys
    from credici_redis import CrediciClient, CrediciError
    url, namespace, users, log_path, seed = sys.argv[1:6]
    rng = random.Random(int(seed))
    users = int(users)
    with CrediciClient.from_url(url, namespace=namespace, timeout=1.0) as client, \\
            open(log_path, "w") as log:
        n = 0
        while True:
            user = f"u{rng.randrange(users)}"
            n += 1
            try:
                if rng.random() < 0.2:
                    tx = client.add(user, rng.randint(1, 20), idempotency_key=f"{seed}-{n}")
                else:
                    tx = client.subtract(user, rng.randint(1, 5))
            except CrediciError as exc:
                if type(exc).__name__ == "InsufficientCreditsError":
                    continue
                break  # Redis is gone
            # Acknowledged: record it before anything else can happen.
            log.write(json.dumps([user, tx.transaction_id]) + "\\n")
            log.flush()
    """
)


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        try:
            redis.Redis(port=port, socket_connect_timeout=0.1).ping()
            return proc
        except redis.exceptions.BusyLoadingError:
            time.sleep(0.05)
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_operation(tmp_path: Path) -> None:
    port, users = free_port(), 20
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path)
    try:
        with CrediciClient.from_url(url, namespace="crash") as client:
            for i in range(users):
                client.add(f"u{i}", 200)
        logs = [tmp_path / f"worker{i}.log" for i in range(4)]
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, url, "crash", str(users), str(log), str(i)]
            )
            for i, log in enumerate(logs)
        ]
        # Kill in the middle of the load: once the workers have had a few hundred acknowledged
        # (a fixed sleep is not enough on a loaded CI machine, where imports alone take seconds).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = sum(log.read_text().count("\n") for log in logs if log.exists())
            if done >= 300:
                break
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        for w in workers:
            assert w.wait(timeout=60) == 0
        server = start_redis(port, tmp_path)  # the same files

        acknowledged: dict[str, set[str]] = {}
        for log in logs:
            for line in log.read_text().splitlines():
                user, tx_id = json.loads(line)
                acknowledged.setdefault(user, set()).add(tx_id)
        total_acked = sum(len(v) for v in acknowledged.values())
        assert total_acked > 200  # the load really ran

        found_total = 0
        with CrediciClient.from_url(url, namespace="crash") as client:
            for i in range(users):
                user = f"u{i}"
                history = client.get_all_user_transactions(user)
                found = {t.transaction_id for t in history}
                assert acknowledged.get(user, set()) <= found, f"lost acknowledged ops of {user}"
                assert client.get_balance(user) == sum(t.amount for t in history)
                assert history[0].balance_after == client.get_balance(user)
                found_total += len(history) - 1  # minus the initial grant
        # Found may exceed acknowledged: an operation applied as Redis died was never answered.
        print(f"\ncrash test: {total_acked} acknowledged, {found_total} found after restart")
        assert found_total >= total_acked
    finally:
        server.kill()
        server.wait()
