"""What the storages do differently on a Redis Cluster (redis-py's `RedisCluster` clients).

Every script's keys share one user's hash tag, so each call goes to one slot's primary. The
storage routes calls itself (`Routing`) instead of using redis-py's `execute_command` and
`ClusterPipeline`, for three reasons:

- A command that may have reached Redis is never sent twice. A connection failure or timeout
  leaves the call's reply a ConnectionError/TimeoutError (the storage makes it
  OutcomeUnknownError); only MOVED, ASK and TRYAGAIN, which mean the command did not run, are
  sent again, until the client's socket timeout has passed. (redis-py's sync `ClusterPipeline`
  re-sends a command whose reply was lost; its `execute_command`, between a migrating and an
  importing node, spends its 16 attempts going ASK -> TRYAGAIN -> MOVED and raises.)
- While a slot migrates, a script is answered ASK by the old owner as soon as one of its keys is
  missing there (a user's scripts always name keys that do not exist, such as an idempotency
  record), then TRYAGAIN by the new owner until every key has arrived: the storage starts again
  from the slot's owner after a short pause, until the migration of that slot is done.
- ``durability="replica"``: a ``WAIT 1 <ms>`` must follow the writes on the connection that ran
  them; each node's commands go out as one pipeline on one connection, WAIT last.

SCAN has a cursor per node: the storage runs each SCAN flow once per primary (`primaries`),
sending its SCAN to that node (`scan_reply` unwraps redis-py's per-node reply). A call answered
NOSCRIPT is sent again as EVAL of its source, routed like any call: it runs, and caches the script,
on whichever primary owns the key by then (a newly promoted one included).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from redis import exceptions as redis_errors

LOST = (redis_errors.ConnectionError, redis_errors.TimeoutError)

DEFAULT_PATIENCE = 5.0
"""Seconds a call is redirected for when the client has no socket timeout."""

TRYAGAIN_PAUSE = (0.005, 0.1)
"""First and longest pause before a call answered TRYAGAIN is sent again (doubling)."""


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


def key_of(args: tuple[Any, ...]) -> Any:
    """The key a command is routed by (the ledger's commands name one slot each); None: any node."""
    name = str(args[0]).upper()
    if name in {"FCALL", "EVALSHA", "EVAL"}:
        return args[3] if int(args[2]) > 0 else None
    if name == "XGROUP":
        return args[2]
    if name == "XREADGROUP":
        return args[list(args).index("STREAMS") + 1]
    if name == "TIME" or len(args) < 2:
        return None
    return args[1]


def patience(client: Any) -> float:
    """How long calls are redirected (TRYAGAIN) before giving up: the client's socket timeout."""
    timeout = client.nodes_manager.connection_kwargs.get("socket_timeout")
    return float(timeout) if timeout else DEFAULT_PATIENCE


@dataclass
class NodeBatch:
    """The commands of one round that go to one node, as one pipeline on one connection."""

    node: Any
    commands: list[tuple[Any, ...]] = field(default_factory=list)
    calls: list[int | None] = field(default_factory=list)
    """For each command, the index of its call; None for ASKING and WAIT."""


class Routing:
    """One round trip of calls on a cluster, without I/O: `batches` says what to send to which
    node, `took`/`failed` take what came back, until no call is left. Then `replies` holds each
    call's reply or error, and `acks` the reply to the WAIT that followed it (None: none did).

    `wait`: the calls to follow by ``WAIT 1 <wait_ms>`` on their node's connection.
    """

    def __init__(
        self,
        client: Any,
        args: list[tuple[Any, ...]],
        wait: list[bool],
        wait_ms: int,
        patience: float,
    ) -> None:
        self._client = client
        self._args = args
        self._wait = wait
        self._wait_ms = wait_ms
        self._deadline = time.monotonic() + patience
        self._pending = list(range(len(args)))
        self._asking: dict[int, Any] = {}
        self._again: dict[int, Exception] = {}
        self._tries = 0
        self.replies: list[Any] = [None] * len(args)
        self.acks: list[Any] = [None] * len(args)
        self.moved: list[redis_errors.MovedError] = []
        """MOVED replies of the last round: the driver updates the slot table with them."""
        self.lost = False
        """A node failed: the driver asks the cluster for its layout again."""

    def batches(self) -> list[NodeBatch]:
        """What to send now, one batch per node; [] when every call has its reply."""
        self.moved = []
        self.lost = False
        if self._again and time.monotonic() > self._deadline:
            for i in self._pending:  # still redirected: it never ran
                self.replies[i] = redis_errors.TryAgainError(
                    f"not sent: still redirected when the timeout passed ({self._again.get(i)})"
                )
            self._pending = []
        by_node: dict[str, NodeBatch] = {}
        for i in self._pending:
            node = self._asking.get(i) or self._owner(i)
            if node is None:
                continue
            batch = by_node.setdefault(node.name, NodeBatch(node))
            if i in self._asking:  # ASKING lets the next command (only) into an importing slot
                batch.commands.append(("ASKING",))
                batch.calls.append(None)
            batch.commands.append(self._args[i])
            batch.calls.append(i)
        self._asking = {}
        for batch in by_node.values():
            if any(i is not None and self._wait[i] for i in batch.calls):
                batch.commands.append(("WAIT", 1, self._wait_ms))
                batch.calls.append(None)
        self._pending = [i for batch in by_node.values() for i in batch.calls if i is not None]
        return list(by_node.values())

    def _owner(self, i: int) -> Any:
        key = key_of(self._args[i])
        client = self._client
        try:
            if key is None:
                return client.get_default_node() or client.get_random_node()
            return client.nodes_manager.get_node_from_slot(client.keyslot(key))
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            self.replies[i] = redis_errors.ClusterDownError(f"no node serves this key: {exc}")
            self.lost = True
            return None

    def failed(self, batch: NodeBatch, exc: Exception) -> None:
        """The node's pipeline failed as a whole (it may have run: `exc` tells)."""
        for i in batch.calls:
            if i is not None:
                self.replies[i] = exc
        self._pending = [i for i in self._pending if i not in batch.calls]
        self.lost = True

    def busy(self, batch: NodeBatch) -> None:
        """Nothing of the batch was sent (no connection free): send it again after a pause."""
        for i in batch.calls:
            if i is not None:
                self._again[i] = redis_errors.ConnectionError("No connection available")

    def took(self, batch: NodeBatch, replies: list[Any]) -> None:
        """The node's replies, one per command of the batch."""
        ack = replies[-1] if batch.commands[-1][0] == "WAIT" else None
        self.lost = self.lost or isinstance(ack, LOST)
        done = []
        refused: Exception | None = None  # an ASKING Redis refused (an ACL without it)
        for i, command, reply in zip(batch.calls, batch.commands, replies, strict=True):
            if i is None:
                refused = reply if command[0] == "ASKING" and isinstance(reply, Exception) else None
                continue
            if refused is not None and isinstance(reply, (redis_errors.AskError, *TRYAGAIN_LIKE)):
                # Without ASKING the call meets ASK again for ever: it did not run, and it
                # cannot: the refusal is its reply.
                reply = refused
            refused = None
            if isinstance(reply, redis_errors.MovedError):  # (a subclass of AskError)
                self.moved.append(reply)
            elif isinstance(reply, redis_errors.AskError):
                node = self._client.get_node(host=reply.host, port=reply.port)
                if node is None:  # a node we do not know yet: learn the layout
                    self.lost = True
                else:
                    self._asking[i] = node
            elif not isinstance(reply, redis_errors.TryAgainError):
                self.replies[i] = reply
                self.acks[i] = ack
                self.lost = self.lost or isinstance(reply, LOST)
                done.append(i)
                continue
            self._again[i] = reply
        self._pending = [i for i in self._pending if i not in done]

    def pause(self) -> float:
        """Seconds to wait before the next round: none after MOVED and ASK (the owner is
        known), a short, growing one after TRYAGAIN (the slot's keys are on their way)."""
        waiting = [i for i in self._pending if i not in self._asking]
        if not any(isinstance(self._again.get(i), TRYAGAIN_LIKE) for i in waiting):
            return 0.0
        self._tries += 1
        first, most = TRYAGAIN_PAUSE
        return float(min(first * 2 ** (self._tries - 1), most))


TRYAGAIN_LIKE = (redis_errors.TryAgainError, redis_errors.ConnectionError)


def send(
    client: Any, args: list[tuple[Any, ...]], wait: list[bool], wait_ms: int
) -> tuple[list[Any], list[Any]]:
    """Send calls over a sync cluster client: (replies or errors in place, WAIT replies)."""
    routing = Routing(client, args, wait, wait_ms, patience(client))
    while batches := routing.batches():
        sent: list[tuple[NodeBatch, Any, Any]] = []
        try:
            for batch in batches:  # write to every node, then read from each
                try:
                    node = client.get_redis_connection(batch.node)
                    connection = node.connection_pool.get_connection()
                except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
                    routing.failed(batch, exc)
                    continue
                sent.append((batch, node, connection))
                try:
                    connection.send_packed_command(connection.pack_commands(batch.commands))
                except redis_errors.RedisError as exc:
                    sent.pop()
                    connection.disconnect()
                    node.connection_pool.release(connection)
                    routing.failed(batch, exc)
            while sent:
                batch, node, connection = sent[0]
                try:
                    replies = _read(node, connection, batch.commands)
                except redis_errors.RedisError as exc:  # it may have run: never sent again
                    connection.disconnect()
                    routing.failed(batch, exc)
                else:
                    routing.took(batch, replies)
                node.connection_pool.release(connection)
                sent.pop(0)
        finally:  # interrupted (or a bug): no connection goes back with replies left unread
            for _, node, connection in sent:
                connection.disconnect()
                node.connection_pool.release(connection)
        for moved in routing.moved:
            with suppress(redis_errors.RedisError, redis_errors.RedisClusterException):
                client.nodes_manager.move_slot(moved)
        if routing.lost:
            refresh(client)
        time.sleep(routing.pause())
    return routing.replies, routing.acks


def _read(node: Any, connection: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    replies: list[Any] = []
    for command in commands:
        try:
            replies.append(node.parse_response(connection, command[0]))
        except redis_errors.ResponseError as exc:
            replies.append(exc)
    return replies


def refresh(client: Any) -> None:
    """Learn the cluster's layout anew after a lost node (a replica may have been promoted):
    redis-py does it after a failed single command, not after a failed pipeline."""
    with suppress(redis_errors.RedisError, redis_errors.RedisClusterException):
        client.nodes_manager.initialize()  # if no node answers yet, the next failure tries again


async def async_send(
    client: Any, args: list[tuple[Any, ...]], wait: list[bool], wait_ms: int
) -> tuple[list[Any], list[Any]]:
    """`send` over an asyncio cluster client; the nodes are written to and read concurrently."""
    await client.initialize()  # does nothing once done
    routing = Routing(client, args, wait, wait_ms, patience(client))
    while batches := routing.batches():
        results = await asyncio.gather(*(_node_round(batch) for batch in batches))
        for batch, result in zip(batches, results, strict=True):
            if isinstance(result, redis_errors.MaxConnectionsError):
                routing.busy(batch)
            elif isinstance(result, Exception):
                routing.failed(batch, result)
            else:
                routing.took(batch, result)
        for moved in routing.moved:
            with suppress(redis_errors.RedisError, redis_errors.RedisClusterException):
                await client.nodes_manager.move_slot(moved)
        if routing.lost:
            await async_refresh(client)
        await asyncio.sleep(routing.pause())
    return routing.replies, routing.acks


async def _node_round(batch: NodeBatch) -> list[Any] | Exception:
    commands = [
        redis.asyncio.cluster.PipelineCommand(at, *command)
        for at, command in enumerate(batch.commands)
    ]
    try:  # every reply, an error reply or a connection failure included, lands in its command
        await batch.node.execute_pipeline(commands)
    except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
        return exc  # nothing could be read: it may still have been written
    return [command.result for command in commands]


async def async_refresh(client: Any) -> None:
    """`refresh` for an asyncio client."""
    with suppress(redis_errors.RedisError, redis_errors.RedisClusterException):
        await client.nodes_manager.initialize()
