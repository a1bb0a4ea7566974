"""What an operation is: one object that says everything about it (no I/O).

An `Operation` names its request type, the script it runs, which request fields go into the
script's ARGV (by name, after the clock and the schedule extension every script takes), how its
fingerprint is made, the names of its reply's fields and how they become a model, and the coded
refusals it may reply (`credici_redis._core.codes` turns each into its exception). Storages
execute any operation (`execute(op, request)`), so adding one never widens their interface.

The operations themselves are in `credici_redis._ops`, one module per family; every Operation
made registers itself in `OPERATIONS` (name -> operation), which the contract test, the
PostgreSQL storage and the docs read. tests/test_contract_lua.py checks each operation's ARGV and
reply names against its script's header.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Generic, TypeVar

from credici_redis._core.requests import fingerprint
from credici_redis._core.scripts import Script

Req = TypeVar("Req")
Res = TypeVar("Res")

CLOCK_ARGS = ("now_ms", "extension")
"""ARGV 1 and 2 of every operation's script: the caller's clock ('' = the server's) and the
calendar boundaries a SCHEDULE reply asked for."""
LEDGER_ARGS = frozenset({"idempotency_ttl_ms"})
"""ARGV names the ledger fills in (its settings), not the request."""


class Reply(Mapping[str, str]):
    """A script's OK reply, read by field name (the operation's `reply` names). A last name
    starting with ``*`` names the repeated tail: `tail()` returns it."""

    __slots__ = ("_fields", "_index")

    def __init__(self, index: Mapping[str, int], values: list[str]) -> None:
        self._fields = values
        self._index = index  # name -> position (`reply_index`: made once per operation)

    def __getitem__(self, name: str) -> str:
        return self._fields[self._index[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def tail(self) -> list[str]:
        """The fields after the named ones (the ``*`` name's repeated part)."""
        return self._fields[len(self._index) :]

    def has(self, name: str) -> bool:
        """Whether the reply carries this field (an optional last one)."""
        return name in self._index and self._index[name] < len(self._fields)


CustomFlow = Callable[[Any, "Operation[Any, Any]", Any], Generator[Any, Any, Any]]
"""An operation's own flow: (the `Ledger`, the operation, the request) -> a flow of its result."""


@dataclass(frozen=True, eq=False)
class Operation(Generic[Req, Res]):
    """One operation on one user: request, script, ARGV by name, reply by name, refusals."""

    name: str
    request: type[Req]
    script: Script
    argv: tuple[str, ...]
    """Request fields sent as ARGV 3, 4, ... (``idempotency_ttl_ms``: the ledger's setting).
    None goes as '', a bool as 0/1."""
    reply: tuple[str, ...]
    """Names of the OK reply's fields, 'OK' first; a last ``*name`` is a repeated tail."""
    parse: Callable[[Req, Reply], Any]
    """How the OK reply becomes the result (or, with `flow`, what the flow goes on from)."""
    refusals: frozenset[str] = frozenset()
    """Coded replies that mean an error (each in `credici_redis._core.codes.REFUSALS`)."""
    outcomes: Mapping[str, Callable[[Req, list[str]], Res]] = field(default_factory=dict)
    """Coded replies other than OK that are results (cycle.lua's NONE: no cycle)."""
    fingerprint: tuple[str, ...] | None = None
    """Request fields that make two keyed requests the same; None: the operation takes no key."""
    fingerprint_if_set: tuple[str, ...] = ()
    """Fields that make requests differ only when set (not ''): fields added later, so that a
    request without them keeps the fingerprint stored records were made with (a keyed retry
    across an upgrade is not refused as a conflict)."""
    more_keys: Callable[[str, Any], tuple[str, ...]] | None = None
    """Keys the script takes after the user's 13 (KEYS 14...) and before the idempotency record:
    (namespace, request) -> keys in the user's slot (a transfer's record and its slot's queue)."""
    reads_entry: str | None = None
    """A request field naming a history entry the script reads besides the newest (PostgreSQL
    storage loads it)."""
    flow: CustomFlow | None = None
    """The flow, when it is more than the script (a read of the server's clock before, history
    pages after); it runs the script by `Ledger.script_flow`."""
    reply_index: Mapping[str, int] = field(init=False, repr=False)
    """The reply's names by position, made once (`Reply` reads by it)."""

    def __post_init__(self) -> None:
        index = {name: i for i, name in enumerate(self.reply) if not name.startswith("*")}
        object.__setattr__(self, "reply_index", index)
        names = {f.name for f in fields(self.request)}  # type: ignore[arg-type]
        unknown = [a for a in self.argv if a not in names and a not in LEDGER_ARGS]
        unknown += [
            f for f in (*(self.fingerprint or ()), *self.fingerprint_if_set) if f not in names
        ]
        if unknown or not {"user_id", "now_ms"} <= names:
            raise TypeError(f"operation {self.name}: {self.request.__name__} lacks {unknown}")
        if self.name in OPERATIONS:
            raise TypeError(f"operation {self.name} is defined twice")
        OPERATIONS[self.name] = self

    @property
    def keyed(self) -> bool:
        """Takes an idempotency key (a retry under the same key is applied once)."""
        return self.fingerprint is not None

    def with_key(self, req: Req, key: str | None) -> Req:
        """The request under idempotency key `key` (None: no key), with its fingerprint."""
        if key is None:
            if getattr(req, "idempotency_key", None) is None and not getattr(
                req, "fingerprint", ""
            ):
                return req  # built without one: the usual case, no copy
            return replace(req, idempotency_key=None, fingerprint="")  # type: ignore[type-var]
        parts = [getattr(req, name) for name in self.fingerprint or ()]
        parts += [value for name in self.fingerprint_if_set if (value := getattr(req, name))]
        fp = fingerprint(self.name, *parts)
        return replace(req, idempotency_key=key, fingerprint=fp)  # type: ignore[type-var]

    def __repr__(self) -> str:
        return f"<Operation {self.name} ({self.script.name}.lua)>"


OPERATIONS: dict[str, Operation[Any, Any]] = {}
"""Every operation by name, filled as `credici_redis._ops` defines them."""
