"""A Redis configured as a cache (any maxmemory-policy but noeviction) silently loses money:
evicted buckets, history, and idempotency records (a retried keyed request applied twice). The
storage reads the policy (INFO memory) before its first command and refuses such a Redis with
EvictionPolicyError, unless told allow_eviction=True. Servers of the tests' own: the shared
Redis's configuration is never changed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from credici_redis import AsyncCrediciClient, CrediciClient, EvictionPolicyError
from credici_redis.archive import Archiver
from tests.conftest import POSTGRES_URL, start_redis_server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """One redis-server per policy: name -> port."""
    ports: dict[str, int] = {}
    procs = []
    for policy in ("noeviction", "allkeys-lru", "volatile-ttl"):
        ports[policy], process = start_redis_server(
            tmp_path_factory.mktemp(policy), "--maxmemory", "64mb", "--maxmemory-policy", policy
        )
        procs.append(process)
    yield ports
    for proc in procs:
        proc.kill()
        proc.wait()


def _keys(port: int) -> int:
    with redis.Redis(port=port) as r:
        return int(r.dbsize())


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
@pytest.mark.parametrize("api", ["sync", "async", "async-batched"])
async def test_an_evicting_redis_is_refused_before_anything_is_written(
    servers: dict[str, int], policy: str, api: str
) -> None:
    url = f"redis://127.0.0.1:{servers[policy]}/0"
    with pytest.raises(EvictionPolicyError) as caught:
        if api == "sync":
            with CrediciClient.from_url(url, namespace="ns") as client:
                client.add("u", 10, idempotency_key="k")
        else:
            async with AsyncCrediciClient.from_url(
                url, namespace="ns", batching=api == "async-batched"
            ) as aclient:
                await aclient.add("u", 10, idempotency_key="k")
    assert caught.value.policy == policy
    assert f"maxmemory-policy {policy}" in str(caught.value)
    assert "noeviction" in str(caught.value) and "allow_eviction=True" in str(caught.value)
    assert _keys(servers[policy]) == 0  # refused before any script ran


def test_a_refused_read_is_refused_too(servers: dict[str, int]) -> None:
    url = f"redis://127.0.0.1:{servers['allkeys-lru']}/0"
    with CrediciClient.from_url(url, namespace="ns") as client:
        with pytest.raises(EvictionPolicyError):
            client.get_balance("u")
        with pytest.raises(EvictionPolicyError):  # asked again: not remembered as checked
            client.get_balance("u")


def test_allow_eviction_opts_out(servers: dict[str, int]) -> None:
    port = servers["allkeys-lru"]
    with CrediciClient.from_url(
        f"redis://127.0.0.1:{port}/0", namespace="optout", allow_eviction=True
    ) as client:
        assert client.add("u", 10).balance_after == 10
    with redis.Redis(port=port) as r:
        for key in r.scan_iter("optout:*"):
            r.delete(key)


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_noeviction_is_taken(servers: dict[str, int], api: str) -> None:
    url = f"redis://127.0.0.1:{servers['noeviction']}/0"
    if api == "sync":
        with CrediciClient.from_url(url, namespace=f"ok-{api}") as client:
            assert client.add("u", 3).balance_after == 3
    else:
        async with AsyncCrediciClient.from_url(url, namespace=f"ok-{api}") as aclient:
            assert (await aclient.add("u", 3)).balance_after == 3


def test_the_archiver_refuses_an_evicting_redis(servers: dict[str, int]) -> None:
    url = f"redis://127.0.0.1:{servers['allkeys-lru']}/0"
    with (
        Archiver(url, POSTGRES_URL, namespace="arch") as archiver,
        pytest.raises(EvictionPolicyError),
    ):
        archiver.run_once()


def test_a_policy_that_cannot_be_read_is_refused(servers: dict[str, int]) -> None:
    """An ACL user without +info: the policy is unknown, so the storage does not run."""
    port = servers["noeviction"]
    with redis.Redis(port=port) as admin:
        admin.execute_command(
            "ACL", "SETUSER", "noinfo", "reset", "on", ">pw", "~*", "+@all", "-info"
        )
    url = f"redis://noinfo:pw@127.0.0.1:{port}/0"
    with (
        CrediciClient.from_url(url, namespace="noinfo") as client,
        pytest.raises(EvictionPolicyError, match=r"\+info") as caught,
    ):
        client.get_balance("u")
    assert caught.value.policy is None


def test_memory_is_never_checked() -> None:
    with CrediciClient.from_url("memory://") as client:  # in process: nothing to evict
        assert client.add("u", 1).balance_after == 1
