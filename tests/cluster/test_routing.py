"""`credici_redis._storages.cluster.Routing` without a server: what is sent again, what never."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_errors
from redis.crc import key_slot

from credici_redis._storages.cluster import Routing, key_of


@dataclass(frozen=True)
class Node:
    name: str


@dataclass
class Nodes:
    owner: dict[int, Node] = field(default_factory=dict)
    connection_kwargs: dict[str, Any] = field(default_factory=lambda: {"socket_timeout": 5.0})

    def get_node_from_slot(self, slot: int) -> Node:
        return self.owner.get(slot, A)


A, B = Node("127.0.0.1:7000"), Node("127.0.0.1:7001")


class FakeCluster:
    def __init__(self) -> None:
        self.nodes_manager = Nodes()

    def keyslot(self, key: str) -> int:
        return int(key_slot(key.encode()))

    def get_node(self, host: str, port: int) -> Node | None:
        return {A.name: A, B.name: B}.get(f"{host}:{port}")

    def get_default_node(self) -> Node:
        return A


WRITE = ("EVALSHA", "sha", 2, "ns:{u}:s", "ns:{u}:h", "1")
READ = ("XREVRANGE", "ns:{v}:h", "+", "-", "COUNT", 10)


def test_calls_are_routed_by_their_key() -> None:
    assert key_of(WRITE) == "ns:{u}:s"
    assert key_of(("XGROUP", "CREATE", "ns:{x}:ev", "g", "0")) == "ns:{x}:ev"
    assert key_of(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "ns:{x}:ev", ">")) == "ns:{x}:ev"
    assert key_of(("TIME",)) is None


def test_redirections_are_followed_and_the_wait_goes_with_the_write() -> None:
    client = FakeCluster()
    routing = Routing(client, [WRITE, READ], [True, False], 500, patience=5.0)
    (batch,) = routing.batches()
    assert batch.node == A and batch.commands == [WRITE, READ, ("WAIT", 1, 500)]
    slot = key_slot(b"u")
    routing.took(batch, [redis_errors.AskError(f"{slot} {B.name}"), "entries", 1])
    assert routing.replies[1] == "entries" and routing.acks[1] == 1
    assert routing.pause() == 0.0  # the node to ask is known
    (batch,) = routing.batches()  # only the redirected call, ASKING first, WAIT last
    assert batch.node == B and batch.commands == [("ASKING",), WRITE, ("WAIT", 1, 500)]
    routing.took(batch, [b"OK", redis_errors.TryAgainError("keys moving"), 0])
    assert routing.pause() > 0  # the slot's keys are on their way: start again from the owner
    (batch,) = routing.batches()
    assert batch.node == A and batch.commands == [WRITE, ("WAIT", 1, 500)]
    routing.took(batch, [redis_errors.MovedError(f"{slot} {B.name}"), 1])
    assert routing.moved  # the driver updates the slot table
    client.nodes_manager.owner[slot] = B
    (batch,) = routing.batches()
    assert batch.node == B
    routing.took(batch, [["OK"], 1])
    assert routing.batches() == []
    assert routing.replies == [["OK"], "entries"] and routing.acks == [1, 1]


def test_a_call_that_may_have_run_is_never_sent_again() -> None:
    routing = Routing(FakeCluster(), [WRITE, WRITE], [False, False], 500, patience=5.0)
    (batch,) = routing.batches()
    lost = redis_errors.TimeoutError("Timeout reading from socket")
    routing.took(batch, [["OK"], lost])
    assert routing.lost  # the driver learns the layout again
    assert routing.batches() == []
    assert routing.replies == [["OK"], lost]
    routing = Routing(FakeCluster(), [WRITE], [True], 500, patience=5.0)
    (batch,) = routing.batches()
    routing.failed(batch, redis_errors.ConnectionError("Connection closed by server."))
    assert routing.batches() == []


def test_a_slot_still_moving_when_the_timeout_passes_is_an_error_not_a_resend() -> None:
    routing = Routing(FakeCluster(), [WRITE], [False], 500, patience=0.0)
    (batch,) = routing.batches()
    routing.took(batch, [redis_errors.TryAgainError("keys moving")])
    assert routing.batches() == []
    assert isinstance(routing.replies[0], redis_errors.TryAgainError)
    assert "not sent" in str(routing.replies[0])
