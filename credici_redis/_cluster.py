"""What the storages do differently on a Redis Cluster (redis-py's `RedisCluster` clients).

Every script's keys share one user's hash tag, so each call goes to one slot's primary and a
pipeline of calls is split by redis-py per node. Three things are the storage's to handle:

- A command that may have reached Redis is never sent twice. `from_url(..., cluster=True)` gives
  the cluster client no retries (``Retry(NoBackoff(), 0)``): a connection failure or timeout
  raises. MOVED, ASK and TRYAGAIN (the command did not run) are still followed by redis-py.
  The sync `ClusterPipeline` would re-send a command whose reply was lost (it treats a
  timeout like a redirection); `pipeline` below runs it without redirections and re-sends only
  the commands Redis redirected.
- SCAN has a cursor per node: the storage runs each SCAN flow once per primary (`primaries`),
  sending its SCAN to that node (`scan_reply` unwraps redis-py's per-node reply).
- SCRIPT LOAD goes to every primary (redis-py routes it so); a NOSCRIPT anywhere reloads it.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from redis import exceptions as redis_errors

REDIRECTED = (redis_errors.MovedError, redis_errors.AskError, redis_errors.TryAgainError)
"""Replies that mean the command did not run: safe to send again (to the node named)."""


LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError)


def is_cluster(client: Any) -> bool:
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def primaries(client: Any) -> list[Any]:
    """The primaries a SCAN must visit; [None] (the one server) when not a cluster."""
    if not is_cluster(client):
        return [None]
    return list(client.get_primaries())


async def async_primaries(client: Any) -> list[Any]:
    """`primaries` of an asyncio client, which learns the cluster's layout on first use."""
    if is_cluster(client):
        await client.initialize()  # does nothing once done
    return primaries(client)


def scan_reply(reply: Any, node: Any) -> Any:
    """redis-py answers a SCAN sent to one node as ({node name: cursor}, keys): make it the
    plain (cursor, keys) the ledger parses."""
    cursors, keys = reply
    if isinstance(cursors, dict):
        return [cursors[node.name], keys]
    return reply


def pipeline(client: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    """Send commands over a sync cluster pipeline; each reply or error comes back in its place.

    Only redirected commands are sent again (one by one, redis-py follows the redirection);
    a command whose connection failed keeps its ConnectionError/TimeoutError: it may have run.
    """
    pipe: Any = client.pipeline(transaction=False)
    for command in args:
        pipe.execute_command(*command)
    strategy = pipe._execution_strategy  # execute() has no allow_redirections in the sync client
    try:
        replies: list[Any] = strategy.send_cluster_commands(
            strategy.command_queue, raise_on_error=False, allow_redirections=False
        )
    finally:
        pipe.reset()
    for i, reply in enumerate(replies):
        if isinstance(reply, REDIRECTED):
            try:
                replies[i] = client.execute_command(*args[i])
            except redis_errors.RedisError as exc:
                replies[i] = exc
    if any(isinstance(reply, LOST) for reply in replies):
        refresh(client)
    return replies


def refresh(client: Any) -> None:
    """Learn the cluster's layout anew after a lost node (a replica may have been promoted):
    redis-py does it after a failed single command, not after a failed pipeline."""
    with suppress(redis_errors.RedisError, redis_errors.RedisClusterException):
        client.nodes_manager.initialize()  # if no node answers yet, the next failure tries again


async def async_pipeline(client: Any, args: list[tuple[Any, ...]]) -> list[Any]:
    """Send commands over an asyncio cluster pipeline (which re-sends only redirected ones);
    each reply or error comes back in its place, and a lost node refreshes the layout."""
    pipe: Any = client.pipeline(transaction=False)
    for command in args:
        pipe.execute_command(*command)
    try:
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    except LOST:
        await async_refresh(client)
        raise
    if any(isinstance(reply, LOST) for reply in replies):
        await async_refresh(client)
    return replies


async def async_refresh(client: Any) -> None:
    """`refresh` for an asyncio client."""
    with suppress(redis_errors.RedisError, redis_errors.RedisClusterException):
        await client.nodes_manager.initialize()
