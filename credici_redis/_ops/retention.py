"""History retention without PostgreSQL: `trim_history` (lua/trim.lua) removes a user's history
entries older than the storage's `history_retention`, in bounded steps, each after a checkpoint.

One step: read the entries after the current checkpoint (or from the first) that are older than
the retention, at most `step` of them, in pages; replay them from the checkpoint with the audit's
replay (`credici_redis._core.audit.Replay`); if the replay finds nothing wrong, trim.lua records
what they add up to as the new checkpoint and trims them, in one atomic script that refuses if
another pass moved the checkpoint meanwhile (STALE: read again). The audit then replays from the
newest checkpoint on (`credici_redis._ops.audit`). A replay that finds a problem trims nothing:
the evidence stays, and the report names it.

A user whose history goes to PostgreSQL (the archiver ran for it) is left to the archiver, which
trims after PostgreSQL committed (its `keep`). Usage rollups (`get_usage`) are not history and
keep their own retention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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
    time_ms,
)
from credici_redis._core.requests import user_id as check_user_id
from credici_redis._core.scripts import load
from credici_redis._core.time import from_ms
from credici_redis._ops.audit import read_originals
from credici_redis.models import TrimReport

DEFAULT_STEP = 10_000
"""Entries one trim.lua call removes at most (and the client replays before it, in pages)."""
MAX_STEPS = 100
"""Steps one `trim_history` call takes at most: past that, the report says `more`."""
STALE_ATTEMPTS = 5
REVERSIBLE = frozenset({"a", "s", "p"})


@dataclass(frozen=True, slots=True)
class TrimRequest:
    user_id: str
    now_ms: int | None
    retention_ms: int
    step: int = DEFAULT_STEP
    # One step's ARGV, filled in by the flow:
    base: str = ""
    upto: str = ""
    checkpoint: str = ""
    forget: str = ""


@dataclass(frozen=True, slots=True)
class StepResult:
    code: str  # OK, STALE, TOO_NEW, ARCHIVED
    trimmed: int = 0


def build_trim(user: object, retention_ms: int, now_ms: int | None, step: int) -> TrimRequest:
    return TrimRequest(check_user_id(user), now_ms, retention_ms, step)


def _trim(ledger: Ledger, op: Operation[Any, Any], req: TrimRequest) -> Flow[TrimReport]:
    """Steps until nothing older than the retention is left (or MAX_STEPS)."""
    keys = _keys.user_keys(ledger.namespace, req.user_id)
    trimmed, stale, base = 0, 0, ""
    for _ in range(MAX_STEPS):
        got = yield from sent(
            [Call(("GET", keys.checkpoint)), Call(("HEXISTS", keys.state, "ar")), Call(("TIME",))]
        )
        raw_checkpoint, archived, now_reply = got
        if int(archived):
            return TrimReport(user_id=req.user_id, trimmed=trimmed, archived=True)
        now = req.now_ms if req.now_ms is not None else time_ms(now_reply)
        cutoff = now - req.retention_ms  # entries dated before this may go
        base, replay = "", Replay(req.user_id)
        originals: dict[str, dict[str, str]] = {}
        if raw_checkpoint is not None:
            base, _, data = text(raw_checkpoint).partition("\n")
            replay, originals = Replay.from_checkpoint(req.user_id, base, data)
        step = yield from _replay_step(ledger, keys, replay, originals, base, cutoff, req.step)
        if step is None:  # nothing older than the retention after the checkpoint
            return _report(req, trimmed, base)
        upto, seen = step
        if replay.problems:
            (again,) = yield from sent([Call(("GET", keys.checkpoint))])
            if again == raw_checkpoint:  # the entries as they are do not add up
                return _report(req, trimmed, base, problems=replay.problems)
            stale += 1  # another pass trimmed what this one was reading: read again
            if stale >= STALE_ATTEMPTS:
                return _report(req, trimmed, base, more=True)
            continue
        keep, forget = yield from _still_needed(keys, upto, {**originals, **seen})
        result: StepResult = yield from ledger.script_flow(
            op,
            replace(req, base=base, upto=upto, checkpoint=replay.checkpoint(keep),
                    forget=" ".join(forget)),
        )  # fmt: skip
        if result.code == "STALE":
            stale += 1
            if stale >= STALE_ATTEMPTS:
                return _report(req, trimmed, base, more=True)
            continue
        if result.code == "ARCHIVED":
            return TrimReport(user_id=req.user_id, trimmed=trimmed, archived=True)
        if result.code == "TOO_NEW":  # the server's clock is behind the client's
            return _report(req, trimmed, base)
        trimmed += result.trimmed
    return _report(req, trimmed, base, more=True)


def _report(
    req: TrimRequest, trimmed: int, checkpoint: str, *, problems: list[str] | None = None,
    more: bool = False,
) -> TrimReport:  # fmt: skip
    at = from_ms(int(checkpoint.partition("-")[0])) if checkpoint else None
    return TrimReport(
        user_id=req.user_id, trimmed=trimmed, checkpoint_at=at, problems=problems or [], more=more
    )


def _replay_step(
    ledger: Ledger,
    keys: _keys.UserKeys,
    replay: Replay,
    originals: dict[str, dict[str, str]],
    base: str,
    cutoff: int,
    most: int,
) -> Flow[tuple[str, dict[str, dict[str, str]]] | None]:
    """Feed the replay the entries after `base` dated before `cutoff`, at most `most`; the last
    one's id and the reversible entries seen (id -> fields), or None if there was none."""
    if cutoff <= 0:
        return None
    start, end = ("(" + base) if base else "-", str(cutoff - 1)
    seen: dict[str, dict[str, str]] = {}
    fed = 0
    while fed < most:
        count = min(HISTORY_PAGE, most - fed)
        (page,) = yield from sent([Call(("XRANGE", keys.history, start, end, "COUNT", count))])
        entries = [(text(raw_id), stream_fields(raw_fields)) for raw_id, raw_fields in page]
        # The originals of the page's reversals: in the checkpoint, or read in one round trip
        # (the audit's way), the page's own included.
        older = [(i, f) for i, f in entries if Replay.reversed_id(f) not in originals]
        found = {**originals, **(yield from read_originals(keys.history, older))}
        for entry_id, f in entries:
            reversed_id = Replay.reversed_id(f)
            replay.feed(entry_id, f, found.get(reversed_id) if reversed_id else None)
            if f.get("k") in REVERSIBLE:
                seen[entry_id] = f
        fed += len(page)
        if len(page) < count:
            break
        start = "(" + text(page[-1][0])
    if fed == 0:
        return None
    return replay.last, seen


def _still_needed(
    keys: _keys.UserKeys, upto: str, candidates: dict[str, dict[str, str]]
) -> Flow[tuple[dict[str, dict[str, str]], list[str]]]:
    """Of the trimmed entries that may have been reversed: those whose reversal stays (after
    `upto`: the replay will need them), and those whose reversal goes too (their 'v:' mark can
    go)."""
    ids = sorted(candidates, key=entry_key)
    keep: dict[str, dict[str, str]] = {}
    forget: list[str] = []
    for i in range(0, len(ids), HISTORY_PAGE):
        chunk = ids[i : i + HISTORY_PAGE]
        (marks,) = yield from sent([Call(("HMGET", keys.state, *(f"v:{e}" for e in chunk)))])
        for entry_id, mark in zip(chunk, marks, strict=True):
            if mark is None:
                continue
            if entry_key(text(mark)) > entry_key(upto):
                keep[entry_id] = candidates[entry_id]
            else:
                forget.append(entry_id)
    return keep, forget


def _step(req: TrimRequest, r: Reply) -> StepResult:
    return StepResult("OK", int(r["trimmed"]))


_STEP_OUTCOMES: dict[str, Any] = {  # a step's result, not the call's (the flow goes on)
    "STALE": lambda req, f: StepResult("STALE"),
    "TOO_NEW": lambda req, f: StepResult("TOO_NEW"),
    "ARCHIVED": lambda req, f: StepResult("ARCHIVED"),
}

TRIM: Operation[TrimRequest, TrimReport] = Operation(
    "trim",
    TrimRequest,
    load("trim", effect=False),  # a checkpoint and a trim: doing it twice is doing it once
    argv=("base", "upto", "checkpoint", "retention_ms", "forget"),
    reply=("OK", "trimmed"),
    parse=_step,
    outcomes=_STEP_OUTCOMES,
    flow=_trim,
)
