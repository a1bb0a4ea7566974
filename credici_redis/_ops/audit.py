"""`audit`: lua/audit.lua snapshots the user's balance, buckets and holds, then XRANGE reads the
history up to that snapshot, oldest first, in pages; `AuditSnapshot.report` replays it
(`credici_redis._core.audit`) with whatever the archive holds of what Redis trimmed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from credici_redis._core import audit as _audit
from credici_redis._core import keys as _keys
from credici_redis._core.audit import Replay
from credici_redis._core.operation import Operation, Reply
from credici_redis._core.protocol import (
    HISTORY_PAGE,
    Call,
    Flow,
    Ledger,
    entry_key,
    sent,
    stream_fields,
    text,
)
from credici_redis._core.requests import UserRequest
from credici_redis._core.scripts import load
from credici_redis.errors import StorageError
from credici_redis.models import AuditReport


@dataclass(slots=True)
class AuditSnapshot:
    """What Redis holds of a user, and its history replayed (or kept, to replay with the archive).

    `trimmed`: entries before this id were archived to PostgreSQL and trimmed from Redis ('' =
    none); the audit then needs them (`report(archived)`), read after this snapshot so none can be
    trimmed between the two reads unseen, and the entries Redis keeps are held in `entries` to
    replay after them. With nothing trimmed, the history is replayed page by page as it is read
    (`replayed`), in memory bounded by the user's buckets and holds, whatever its length.
    """

    user_id: str
    balance: int
    buckets: dict[str, int]
    held: int
    entries: list[tuple[str, dict[str, str]]]
    last: str
    stream_last: str
    trimmed: str
    checkpoint: str = ""
    """'' or "<entry id>\n<JSON>": what the history up to that entry added up to, written
    before those entries were trimmed (`credici_redis._ops.retention`); the replay starts there."""
    replayed: Replay | None = None
    members: dict[str, str] = field(default_factory=dict)
    """A pool's capped members: member -> its cap's record (recounted by the replay)."""

    def _from_checkpoint(self) -> bool:
        """Whether Redis keeps every entry after the checkpoint (nothing trimmed past it)."""
        at = self.checkpoint.partition("\n")[0]
        if not at:
            return False
        ms, seq = entry_key(at)
        return not self.trimmed or entry_key(self.trimmed) <= (ms, seq + 1)

    def report(self, archived: Sequence[tuple[str, dict[str, str]]]) -> AuditReport:
        """The audit, with the archived entries (any order, duplicates of kept ones allowed)."""
        if self.replayed is not None:
            newest = self.replayed.last
            report = self.replayed.report(self.balance, self.buckets, self.held)
        else:
            kept = {entry_id for entry_id, _ in self.entries}
            at, _, data = self.checkpoint.partition("\n")  # the archiver trimmed past it
            since = entry_key(at) if at else (-1, -1)
            older = sorted(
                (
                    (i, f)
                    for i, f in archived
                    if i not in kept and since < entry_key(i) <= entry_key(self.last)
                ),
                key=lambda e: entry_key(e[0]),
            )
            entries = [*older, *self.entries]
            newest = entries[-1][0] if entries else "0-0"
            start, originals = Replay.from_checkpoint(self.user_id, at, data) if at else (None, {})
            report = _audit.replay(
                self.user_id, entries, self.balance, self.buckets, self.held,
                start=start, originals=originals, members=self.members,
            )  # fmt: skip
        problems = list(report.problems)
        if self.trimmed and not archived and not self._from_checkpoint():
            problems.insert(
                0,
                f"the history before {self.trimmed} was archived to PostgreSQL: audit with the "
                "archive (archive_url) to replay it",
            )
        ends = [i for i in (self.stream_last, newest) if i != "0-0"]
        newest = max(ends, key=entry_key, default="0-0")  # an empty stream may be all archived
        if newest != self.last:
            problems.append(f"the history ends at {newest}, the balance knows it up to {self.last}")
        if problems == report.problems:
            return report
        return report.model_copy(update={"ok": False, "problems": problems})


def _state(req: UserRequest, r: Reply) -> AuditSnapshot:
    """The script's snapshot, without the history yet."""
    rest = r.tail()
    pairs = json.loads(r["members"]) or []  # Lua's cjson writes an empty table as {}
    return AuditSnapshot(
        req.user_id, int(r["balance"]), {rest[i]: int(rest[i + 1]) for i in range(0, len(rest), 2)},
        int(r["held"]), [], r["last"], r["stream_last"], r["trimmed"], r["checkpoint"],
        members={str(pairs[i]): str(pairs[i + 1]) for i in range(0, len(pairs), 2)},
    )  # fmt: skip


CHECKPOINT_ATTEMPTS = 5
"""How often the audit starts again when a trim moved the checkpoint while it read."""


def _audit_snapshot(
    ledger: Ledger, op: Operation[Any, Any], req: UserRequest
) -> Flow[AuditSnapshot]:
    """The snapshot, then the history up to it, oldest first, in pages: replayed as it comes
    (each reversal's original read by id) from the newest checkpoint, or kept when part of it is
    in the archive. If a trim moved the checkpoint meanwhile, it starts again."""
    keys = _keys.user_keys(ledger.namespace, req.user_id)
    for _ in range(CHECKPOINT_ATTEMPTS):
        snapshot = yield from _read_history(ledger, op, req, keys.history)
        if not snapshot.checkpoint:
            return snapshot
        (now,) = yield from sent([Call(("GET", keys.checkpoint))])
        if now is not None and text(now) == snapshot.checkpoint:
            return snapshot
    raise StorageError("the history kept being trimmed while the audit read it: try again")


def _read_history(
    ledger: Ledger, op: Operation[Any, Any], req: UserRequest, stream: str
) -> Flow[AuditSnapshot]:
    snapshot: AuditSnapshot = yield from ledger.script_flow(op, req)
    start = "-"
    checkpointed: dict[str, dict[str, str]] = {}
    replay: Replay | None = None
    if snapshot._from_checkpoint():
        at, _, data = snapshot.checkpoint.partition("\n")
        replay, checkpointed = Replay.from_checkpoint(req.user_id, at, data)
        start = "(" + at
    elif not snapshot.trimmed:
        replay = Replay(req.user_id)
    if replay is not None:
        replay.count_members(snapshot.members)
    while snapshot.last != "0-0":
        (page,) = yield from sent(
            [Call(("XRANGE", stream, start, snapshot.last, "COUNT", HISTORY_PAGE))]
        )
        entries = [(text(e[0]), stream_fields(e[1])) for e in page]
        if replay is None:
            snapshot.entries.extend(entries)
        else:
            originals = yield from read_originals(stream, entries)
            originals = {**checkpointed, **originals}
            for entry_id, f in entries:
                reversed_id = Replay.reversed_id(f)
                replay.feed(entry_id, f, originals.get(reversed_id) if reversed_id else None)
        if len(page) < HISTORY_PAGE:
            break
        start = "(" + text(page[-1][0])
    snapshot.replayed = replay
    return snapshot


ENTRY_ID = re.compile(r"\d+-\d+")


def read_originals(
    stream: str, entries: list[tuple[str, dict[str, str]]]
) -> Flow[dict[str, dict[str, str]]]:
    """The entries the reversals of a page reverse, read by id in one round trip."""
    wanted = sorted(
        {o for _, f in entries if (o := Replay.reversed_id(f)) and ENTRY_ID.fullmatch(o)}
    )
    if not wanted:
        return {}
    replies = yield from sent([Call(("XRANGE", stream, o, o)) for o in wanted])
    return {text(e[0]): stream_fields(e[1]) for found in replies for e in found}


AUDIT: Operation[UserRequest, AuditSnapshot] = Operation(
    "audit",
    UserRequest,
    load("audit", effect=False, write=False),
    argv=(),
    reply=(
        "OK",
        "balance",
        "last",
        "stream_last",
        "held",
        "trimmed",
        "checkpoint",
        "members",
        "*buckets",
    ),
    parse=_state,
    flow=_audit_snapshot,
)
