"""durability="replica" on one primary and its replica (two redis-servers of the test's own).

A write returns only once the replica has it (WAIT 1 on the connection that wrote); a replica
that does not answer (SIGSTOP: connected, silent) makes the write raise ReplicationTimeoutError
within the timeout, and the write stays applied exactly once: a retry with the same key after
the replica is back returns the original transaction.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from credici_redis import AsyncCrediciClient, CrediciClient
from credici_redis._core.keys import user_keys
from credici_redis.errors import InvalidInputError, ReplicationTimeoutError, StorageError
from tests.conftest import SyncAsAsync, free_port

TIMEOUT = 0.6  # the client's; WAIT gets half of it


@dataclass
class Pair:
    primary: int
    replica: int
    replica_process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.primary}/0"

    def synced(self) -> None:
        """Until the replica is linked and has everything the primary wrote."""
        deadline = time.monotonic() + 10
        with redis.Redis(port=self.primary) as p, redis.Redis(port=self.replica) as r:
            while True:
                info = r.info("replication")
                offset = p.info("replication")["master_repl_offset"]
                if info.get("master_link_status") == "up" and info["slave_repl_offset"] >= offset:
                    return
                assert time.monotonic() < deadline, info
                time.sleep(0.02)

    def pause_replica(self) -> None:
        os.kill(self.replica_process.pid, signal.SIGSTOP)  # connected, but acknowledges nothing

    def resume_replica(self) -> None:
        os.kill(self.replica_process.pid, signal.SIGCONT)


def _start(port: int, directory: Path, *extra: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port, socket_connect_timeout=0.2) as r:
                r.ping()
            return process
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    primary_port, replica_port = free_port(), free_port()
    primary = _start(
        primary_port, tmp_path_factory.mktemp("primary"), "--repl-diskless-sync-delay", "0"
    )
    replica = _start(
        replica_port, tmp_path_factory.mktemp("replica"), "--replicaof", "127.0.0.1",
        str(primary_port),
    )  # fmt: skip
    started = Pair(primary_port, replica_port, replica)
    try:
        started.synced()
        yield started
    finally:
        started.resume_replica()
        for process in (replica, primary):
            process.kill()
            process.wait(5)


@pytest.fixture(params=["sync", "async", "async-batched"])
async def make(request: pytest.FixtureRequest, pair: Pair) -> AsyncIterator[Any]:
    made: list[Any] = []
    namespace = f"r{uuid.uuid4().hex[:10]}"

    def make(**options: Any) -> Any:
        options = {"namespace": namespace, "timeout": TIMEOUT, **options}
        if request.param == "sync":
            client = CrediciClient.from_url(pair.url, **options)
            made.append(client)
            return SyncAsAsync(client)
        batching = request.param == "async-batched"
        aclient = AsyncCrediciClient.from_url(pair.url, batching=batching, **options)
        made.append(aclient)
        return aclient

    yield make
    pair.resume_replica()
    for client in made:
        if isinstance(client, CrediciClient):
            client.close()
        else:
            await client.aclose()


def _on_replica(pair: Pair, namespace: str, user: str, transaction_id: str) -> bool:
    entry_id = transaction_id.split("@", 1)[0]
    with redis.Redis(port=pair.replica) as r:
        return bool(r.xrange(user_keys(namespace, user).history, entry_id, entry_id))


async def test_a_write_returns_once_the_replica_has_it(make: Any, pair: Pair) -> None:
    client = make(durability="replica", timeout=3.0)  # WAIT up to 1.5 s
    await client.add("alice", 100)
    pair.synced()
    pair.pause_replica()
    resumed_at: list[float] = []

    def resume() -> None:
        time.sleep(0.3)
        resumed_at.append(time.monotonic())
        pair.resume_replica()

    resumer = threading.Thread(target=resume)
    resumer.start()
    try:
        tx = await client.subtract("alice", 1)
        returned_at = time.monotonic()
        batch = await client.subtract_many([("alice", 1), ("bob", 1)])
    finally:
        resumer.join()
    assert returned_at >= resumed_at[0]  # it waited for the paused replica
    assert _on_replica(pair, client_namespace(client), "alice", tx.transaction_id)
    assert batch[0].balance_after == 98
    assert _on_replica(pair, client_namespace(client), "alice", batch[0].transaction_id)
    assert type(batch[1]).__name__ == "InsufficientCreditsError"


def client_namespace(client: Any) -> str:
    namespace: str = client.storage.namespace  # SyncAsAsync passes attributes through
    return namespace


async def test_a_silent_replica_makes_the_write_raise_and_it_applies_once(
    make: Any, pair: Pair
) -> None:
    client = make(durability="replica")
    plain = make()  # durability="primary": does not wait
    await client.add("alice", 100)
    pair.synced()
    pair.pause_replica()
    try:
        started = time.monotonic()
        with pytest.raises(ReplicationTimeoutError) as raised:
            await client.subtract("alice", 7, idempotency_key="charge-1")
        elapsed = time.monotonic() - started
        assert TIMEOUT / 2 <= elapsed < TIMEOUT, elapsed  # WAIT's timeout, within the client's
        assert raised.value.replicas == 0 and raised.value.timeout == TIMEOUT / 2
        # A retry finds the charge done and writes nothing; its WAIT, on another connection,
        # still covers the charge (Redis moves a connection's offset at every command).
        with pytest.raises(ReplicationTimeoutError):
            await make(durability="replica").subtract("alice", 7, idempotency_key="charge-1")
        batch = await client.add_many([("alice", 1), ("bob", 2)])
        assert [type(r) for r in batch] == [ReplicationTimeoutError] * 2
        assert await client.get_balance("alice") == 94  # applied on the primary; reads do not wait
        started = time.monotonic()
        assert (await plain.subtract("bob", 1)).balance_after == 1
        assert time.monotonic() - started < TIMEOUT / 2
    finally:
        pair.resume_replica()
    pair.synced()
    again = await client.subtract("alice", 7, idempotency_key="charge-1")
    assert again.balance_after == 93 and await client.get_balance("alice") == 94
    history = await client.get_all_user_transactions("alice")
    assert [t.idempotency_key for t in history].count("charge-1") == 1
    assert sum(t.amount for t in history) == 94
    assert _on_replica(pair, client_namespace(client), "alice", again.transaction_id)


def test_replica_durability_needs_a_redis_url() -> None:
    with pytest.raises(InvalidInputError):
        CrediciClient.from_url("memory://", durability="replica")
    with pytest.raises(InvalidInputError):
        AsyncCrediciClient.from_url("redis://127.0.0.1:1", durability="always")  # type: ignore[arg-type]


async def test_a_refused_wait_is_an_error_never_a_silent_success(make: Any, pair: Pair) -> None:
    with redis.Redis(port=pair.primary) as r:
        r.acl_setuser(
            "nowait", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-wait"]
        )
    client = make(durability="replica", username="nowait", password="pw")
    with pytest.raises(StorageError, match="refused WAIT") as raised:
        await client.add("alice", 5)
    assert not isinstance(raised.value, ReplicationTimeoutError)
    assert await client.get_balance("alice") == 5  # applied: the error says so
