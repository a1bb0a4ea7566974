"""Processes SIGKILLed in the middle of transfers (issue 19): after `recover_transfers`, the sum
of all balances is what it was, and every transfer that took credits out of its source was given
to its destination once or came back once. First a process killed right after each step of one
transfer; then worker processes transferring at random between accounts, killed at random
moments. Real Redis, real processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from credici_redis import CrediciClient, TransferRecovery
from tests.conftest import REDIS_URL

NOW = timedelta(0)

STEP_KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from credici_redis import CrediciClient
    from credici_redis._ops import transfers
    url, namespace, source, dest, scripts = sys.argv[1:6]
    client = CrediciClient.from_url(url, namespace=namespace)
    storage = client.storage
    req = transfers.build_transfer(source, dest, 30, None, None, None, None)

    def killing(flow):
        calls, ran = next(flow), 0
        while True:
            replies = yield calls
            ran += sum(1 for c in calls if c.script is not None)
            if ran >= int(scripts):
                os.kill(os.getpid(), signal.SIGKILL)  # dies between two steps
            calls = flow.send(replies)

    storage.run(killing(storage.ledger.execute(transfers.TRANSFER, req)))
    """
)


def records(namespace: str) -> int:
    """Transfers not settled: their records in Redis (fields of the sources' record hashes)."""
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        return sum(raw.hlen(key) for key in raw.scan_iter(match=f"{namespace}:*:xo", count=1000))
    finally:
        raw.close()


def totals(client: CrediciClient, users: list[str]) -> int:
    return sum(client.get_balance(u) for u in users)


def transfer_entries(client: CrediciClient, users: list[str]) -> tuple[Counter[str], Counter[str]]:
    """Per transfer id: its transfer_out entries; its transfer_in plus give-back entries."""
    out: Counter[str] = Counter()
    ended: Counter[str] = Counter()
    for user in users:
        for t in client.get_all_user_transactions(user):
            if t.transfer_id is None:
                continue
            if t.kind == "transfer_out":
                out[t.transfer_id] += 1
            else:  # transfer_in, or the reverse that gave a refused one back
                ended[t.transfer_id] += 1
    return out, ended


@pytest.mark.parametrize("scripts", [1, 2, 3])
def test_a_process_killed_after_each_step_leaves_a_whole_transfer(
    scripts: int, namespace: str
) -> None:
    source, dest = "alice", "bob"
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add(source, 100)
        args = [REDIS_URL, namespace, source, dest, str(scripts)]
        killed = subprocess.run([sys.executable, "-c", STEP_KILLED, *args], timeout=60)
        assert killed.returncode == -9  # it died there, by SIGKILL
        recovered = client.recover_transfers(older_than=NOW)
        assert recovered == TransferRecovery(completed=1 if scripts < 3 else 0)
        assert [client.get_balance(source), client.get_balance(dest)] == [70, 30]
        out, ended = transfer_entries(client, [source, dest])
        assert list(out.values()) == [1] and out == ended
        assert client.audit(source).ok and client.audit(dest).ok


WORKER = textwrap.dedent(
    """
    import random, sys
    from credici_redis import CrediciClient, InsufficientCreditsError
    url, namespace, users, worker = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
    rng = random.Random(int(worker))
    with CrediciClient.from_url(url, namespace=namespace) as client:
        for n in range(10**9):
            source, dest = rng.sample(users, 2)
            key = f"w{worker}-{n}" if n % 2 else None
            try:
                client.transfer(source, dest, rng.randint(1, 40), idempotency_key=key)
            except InsufficientCreditsError:
                pass
            print(n, flush=True)
    """
)


def test_workers_killed_at_random_moments_leave_every_transfer_whole(
    tmp_path: Path, namespace: str
) -> None:
    users = [f"acct-{i}" for i in range(6)]
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        client.add_many([(u, 500) for u in users])
        before = totals(client, users)
        logs = [tmp_path / f"worker-{w}.log" for w in range(4)]
        outputs = [log.open("w") for log in logs]
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, REDIS_URL, namespace, ",".join(users), str(w)],
                stdout=output,
            )
            for w, output in enumerate(outputs)
        ]
        deadline = time.monotonic() + 60
        while not all(log.stat().st_size > 400 for log in logs):  # transferring
            assert time.monotonic() < deadline, "the workers did not start transferring"
            time.sleep(0.02)
        for i, process in enumerate(workers):  # at different moments of their transfers
            time.sleep(0.05 + 0.037 * i)
            process.kill()
            process.wait()
        for output in outputs:
            output.close()
        done = sum(len(log.read_text().splitlines()) for log in logs)
        unsettled = records(namespace)
        recovered = client.recover_transfers(older_than=NOW)
        out, ended = transfer_entries(client, users)
        print(f"\n{done} transfer calls answered, {len(out)} begun, {unsettled} unsettled; "
              f"recovery: {recovered}")  # fmt: skip
        assert done > 100
        assert recovered.completed + recovered.refunded == unsettled
        assert records(namespace) == 0
        assert recovered.unresolved == []
        assert totals(client, users) == before  # no credit made or lost
        assert set(out.values()) == {1}  # each transfer took its credits once
        assert ended == out  # ... and gave them once, or gave them back once
        for user in users:
            assert client.audit(user).ok
