"""Kill the archiver in the middle of its batches, again and again, while clients keep charging:
PostgreSQL ends up with exactly the full history, nothing doubled, nothing missing.

The archiver runs in a subprocess. It is the real `Archiver`, slowed down around its PostgreSQL
commits (a subclass in the child script) so that most kills land between the commit and the
Redis update that follows it: the case that would double or lose entries if the design were wrong.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import psycopg
import pytest
import redis

from credici_redis import CrediciClient, InsufficientCreditsError
from credici_redis._core import keys as _keys
from credici_redis.archive import Archiver
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import sys, time
    from datetime import timedelta
    from credici_redis.archive import Archiver

    class Slow(Archiver):
        def _insert(self, batch):
            time.sleep(0.005)
            super()._insert(batch)
            time.sleep(0.02)  # committed, Redis not told yet: kills land here most often

    redis_url, postgres_url, namespace = sys.argv[1:4]
    job = Slow(redis_url, postgres_url, namespace=namespace, keep=timedelta(0),
               users_per_batch=3, entries_per_user=4)
    job.init_schema()
    print("ready", flush=True)
    for _ in job.follow(interval=0.01):
        pass
    """
)


def test_archiver_killed_mid_batch_loses_and_doubles_nothing(
    namespace: str, pg: psycopg.Connection, postgres_url: str
) -> None:
    users = [f"k{i}" for i in range(12)]
    acked: set[str] = set()
    stop = threading.Event()
    lock = threading.Lock()

    def charge(seed: int) -> None:
        rng = random.Random(seed)
        with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
            while not stop.is_set():
                user = rng.choice(users)
                try:
                    tx = (
                        client.add(user, rng.randint(1, 9))
                        if rng.random() < 0.5
                        else (client.subtract(user, rng.randint(1, 5)))
                    )
                except InsufficientCreditsError:
                    continue
                with lock:
                    acked.add(tx.transaction_id)

    workers = [threading.Thread(target=charge, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    r = redis.Redis.from_url(REDIS_URL)
    caught_between = 0  # kills that left rows committed but not yet recorded in Redis
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    try:
        for _ in range(12):
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, REDIS_URL, postgres_url, namespace],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            time.sleep(random.uniform(0.05, 0.5))  # somewhere in its passes
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            for user in users:
                archived = r.hget(_keys.user_keys(namespace, user).state, "ar")
                newest = pg.execute(
                    "SELECT max((extract(epoch FROM created_at) * 1000)::bigint * 1000000"
                    " + entry_seq) FROM credici_history WHERE namespace = %s AND user_id = %s",
                    (namespace, user),
                ).fetchone()
                if newest is None or newest[0] is None:
                    continue
                ms, seq = (int(x) for x in (archived or b"0-0").decode().split("-"))
                if newest[0] > ms * 1_000_000 + seq:
                    caught_between += 1
                    break
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert caught_between > 0, "no kill landed between a commit and its Redis update"

    with Archiver(REDIS_URL, postgres_url, namespace=namespace, keep=timedelta(0)) as job:
        job.run_once()
        assert job.lag().entries_pending == 0

    found = pg.execute(
        "SELECT user_id, transaction_id, amount, balance_after FROM credici_history"
        " WHERE namespace = %s ORDER BY user_id, created_at, entry_seq",
        (namespace,),
    ).fetchall()
    ids = [row[1] for row in found]
    assert len(ids) == len(set(ids))  # nothing doubled
    assert acked <= set(ids)  # nothing acknowledged is missing
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        for user in users:
            mine = [row for row in found if row[0] == user]
            assert r.xlen(_keys.user_keys(namespace, user).history) == 0
            running = 0
            for _, tx_id, amount, balance_after in mine:  # no gap: each entry follows the last
                running += amount
                assert balance_after == running, tx_id
            assert running == client.get_balance(user)
    r.close()
