"""The audit: rebuild a user's balance, buckets and holds from the history alone, compare.

Pure code. Each grant names its bucket in history (field g, priority p), each expiry the bucket it
hit, each rollover what it carried from which bucket (r, f). Charges and reserves are replayed
with the scripts' burn order (priority, then bucket id); a grant repays a debt before it fills a
bucket; capture and release give a hold's parts back to their buckets as of the time they name
(t), except the parts of buckets whose expiry had come. Any difference is a problem in the report.

A pool's capped members (issue 19) are recounted too: what each spent in its cap's running period,
from the entries naming it (mb) since the first one the cap counts, less what came back in that
period (a hold's rest, release or ttl; a reversal), as the scripts count it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from credici_redis._core.time import NEVER_MS
from credici_redis.models import AuditReport

HOLD_MEMORY_MS = 86_400_000
"""A finished hold is remembered a day (lua/_ledger.lua RETAIN): a reversal of its capture
within that day gives back to the budgets and caps that counted its reserve."""


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class _Cap:
    """A capped member's counter as its record says (`stored`, period `end`, first entry
    counted `since`), and as the history recounts it (`count`)."""

    __slots__ = ("count", "end", "since", "stored")

    def __init__(self, stored: int, end: int, since: tuple[int, int]) -> None:
        self.stored, self.end, self.since, self.count = stored, end, since, 0


def replay(
    user_id: str,
    entries: Iterable[tuple[str, Mapping[str, str]]],
    balance: int,
    buckets: Mapping[str, int],
    held: int = 0,
    *,
    start: Replay | None = None,
    originals: Mapping[str, Mapping[str, str]] | None = None,
    members: Mapping[str, str] | None = None,
) -> AuditReport:
    """entries: (entry id, fields), oldest first. balance, buckets, held: what Redis holds now.
    `start`: a replay to go on from (a checkpoint's, with the `originals` it keeps). Keeps every
    entry for reversals; `Replay` fed page by page with the originals keeps none."""
    run = start or Replay(user_id)
    run.count_members(members or {})
    seen: dict[str, Mapping[str, str]] = dict(originals or {})
    for entry_id, f in entries:
        seen[entry_id] = f
        run.feed(entry_id, f, seen.get(f.get("o", "")) if f.get("k") == "v" else None)
    return run.report(balance, buckets, held)


class Replay:
    """The audit's replay, one entry at a time (oldest first), in memory bounded by the user's
    buckets and active holds, not by the history: a reversal is fed with the entry it reverses,
    which the caller looks up (`reversed_id`)."""

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.model: dict[str, int] = {}
        self.rank: dict[str, int] = {}  # priority of each bucket (0 unless the grant said so)
        self.holds: dict[str, list[tuple[str, int]]] = {}  # active holds: their parts
        self.running = 0
        self.count = 0
        self.last = "0-0"
        self.problems: list[str] = []
        self.caps: dict[str, _Cap] = {}  # capped members recounted (count_members)
        # Their holds: active ones (hold id -> its "r" entry), and captured ones for the day a
        # reversal of the capture may still give back (hold id -> ("r" entry, capture time)).
        self.reserved: dict[str, str] = {}
        self.captured: dict[str, tuple[str, int]] = {}

    def count_members(self, records: Mapping[str, str]) -> None:
        """Recount the capped members of these records (member -> "<cap>|<used>|<start>|<end>|
        <since>", lua/_ledger.lua "Members") from the entries fed from now on: those whose
        first counted entry is still to come (after a checkpoint, an earlier one is not)."""
        for member, record in records.items():
            _, used, _, end, since = record.split("|", 4)
            if since and end and _key(since) > _key(self.last):
                self.caps[member] = _Cap(int(used), int(end), _key(since))

    def _count_member(
        self, entry_id: str, f: Mapping[str, str], original: Mapping[str, str] | None
    ) -> None:
        cap = self.caps.get(f.get("mb", ""))
        if cap is None:
            return
        kind, at = f.get("k"), int(f.get("t", "0"))
        if kind in ("s", "r"):
            if kind == "r":
                self.reserved[f.get("h", "?")] = entry_id
            if _key(entry_id) >= cap.since:
                cap.count -= int(f.get("n", "0"))
            return
        back, by = 0, None
        if kind in ("p", "l"):  # a hold's rest or all of it came back at t
            back, by = int(f.get("n", "0")), self.reserved.pop(f.get("h", "?"), None)
            if kind == "p" and by is not None:
                self._forget_captures(at)
                self.captured[f.get("h", "?")] = (by, at)
        elif kind == "v" and original is not None and original.get("k") == "s":
            back, by = -int(original.get("n", "0")), f.get("o")
        elif kind == "v" and original is not None and original.get("k") == "p":
            back = int(original.get("q", "0"))
            reserve, captured_at = self.captured.get(original.get("h", "?"), (None, 0))
            if at < captured_at + HOLD_MEMORY_MS:  # the hold still remembered
                by = reserve
        if by is not None and _key(by) >= cap.since and at < cap.end:
            cap.count = max(cap.count - back, 0)

    def _forget_captures(self, now: int) -> None:
        """Captures over a day old can no longer give back: not kept (bounded memory)."""
        if len(self.captured) >= 1024:
            old = [h for h, (_, at) in self.captured.items() if at + HOLD_MEMORY_MS <= now]
            for hold in old:
                del self.captured[hold]

    # -- checkpoints (retention: `credici_redis._ops.retention`) --------------------------------

    def checkpoint(self, originals: Mapping[str, Mapping[str, str]]) -> str:
        """What the history fed so far adds up to, as a checkpoint's JSON: balance, buckets
        (credits and priority), active holds (their parts), entries counted, and `originals`:
        the entries (up to here) that a later reversal reverses, which the replay will need
        once they are trimmed."""
        return json.dumps(
            {
                "balance": self.running,
                "entries": self.count,
                "buckets": self.model,
                "rank": {b: r for b, r in self.rank.items() if r and b in self.model},
                "holds": {h: [[b, c] for b, c in parts] for h, parts in self.holds.items()},
                "originals": {i: dict(f) for i, f in originals.items()},
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_checkpoint(cls, user_id: str, entry_id: str, data: str) -> tuple[Replay, Any]:
        """A replay that starts where a checkpoint (`checkpoint`) left off, at entry `entry_id`;
        and the checkpoint's originals (entry id -> fields)."""
        state = json.loads(data)
        run = cls(user_id)
        run.running, run.count, run.last = int(state["balance"]), int(state["entries"]), entry_id
        run.model = {str(b): int(c) for b, c in state["buckets"].items()}
        run.rank = {str(b): int(r) for b, r in state["rank"].items()}
        run.holds = {str(h): [(str(b), int(c)) for b, c in p] for h, p in state["holds"].items()}
        originals = {str(i): {str(k): str(v) for k, v in f.items()}
                     for i, f in state["originals"].items()}  # fmt: skip
        return run, originals

    @staticmethod
    def reversed_id(f: Mapping[str, str]) -> str | None:
        """The id of the entry a reversal reverses (its caller feeds that entry along)."""
        return f.get("o") if f.get("k") == "v" else None

    def _drop(self, bucket: str, credits: int, entry_id: str) -> None:
        left = self.model.get(bucket, 0) - credits
        if bucket not in self.model or left < 0:
            self.problems.append(
                f"{entry_id}: takes {credits} from bucket {bucket}, which has less"
            )
        if left > 0:
            self.model[bucket] = left
        else:
            self.model.pop(bucket, None)

    def _take(self, need: int, entry_id: str) -> list[tuple[str, int]]:
        parts = []
        for bucket in sorted(self.model, key=lambda b: (self.rank.get(b, 0), b)):
            if need == 0:
                break
            used = min(need, self.model[bucket])
            parts.append((bucket, used))
            self._drop(bucket, used, entry_id)
            need -= used
        if need:
            self.problems.append(f"{entry_id}: needs {need} more credits than the buckets hold")
        return parts

    def _give_back(
        self, parts: list[tuple[str, int]], at: int, before: int, entry_id: str, extra: int = 0
    ) -> None:
        restored = extra
        for bucket, credits in parts:
            expiry = int(bucket[:15])
            if expiry == NEVER_MS or expiry > at:
                self.model[bucket] = self.model.get(bucket, 0) + credits
                restored += credits
        if before < 0 and restored:
            self._take(min(restored, -before), entry_id)

    @staticmethod
    def _parts_of(f: Mapping[str, str]) -> list[tuple[str, int]]:
        return [
            (part.split(":")[0], int(part.split(":")[1]))
            for part in f.get("u", "").split(";")
            if part
        ]

    def feed(
        self, entry_id: str, f: Mapping[str, str], original: Mapping[str, str] | None = None
    ) -> None:
        """The next entry; for a reversal, `original` is the entry it reverses (None: missing)."""
        model, problems = self.model, self.problems
        if self.caps:
            self._count_member(entry_id, f, original)
        self.count += 1
        self.last = entry_id
        kind, amount = f.get("k", "?"), int(f.get("n", "0"))
        before = self.running
        repaid = min(max(amount, 0), max(-before, 0))  # what a grant pays back of a debt
        self.running += amount
        running = self.running
        if int(f.get("b", "0")) != running:
            problems.append(f"{entry_id}: balance_after {f.get('b')}, history adds up to {running}")
        if kind == "a":
            if "g" in f:
                model[f["g"]] = amount - repaid
                self.rank[f["g"]] = int(f.get("p", "0"))
        elif kind in ("s", "o"):  # a charge; a transfer out (from the buckets only)
            taken = self._take(min(-amount, max(before, 0)), entry_id)  # past the buckets: debt
            if sorted(taken) != sorted(self._parts_of(f)):
                problems.append(f"{entry_id}: took {taken}, history says {self._parts_of(f)}")
            if running < 0 and model:
                problems.append(f"{entry_id}: in debt while buckets hold credits")
        elif kind == "i":  # a transfer in: repays a debt first, the rest in its buckets
            made = [(part.split(":")[0], part.split(":")) for part in f.get("gs", "").split(";")]
            into = 0
            for bucket, part in (m for m in made if m[0]):
                model[bucket] = int(part[1])
                self.rank[bucket] = int(part[2])
                into += int(part[1])
            if into != amount - repaid:
                problems.append(f"{entry_id}: puts {into} in buckets, of {amount - repaid}")
        elif kind == "d":  # a credit limit's change: no credits move (amount 0, checked above)
            if amount:
                problems.append(f"{entry_id}: a credit limit's change moves {amount}")
        elif kind == "e":
            if "h" not in f:  # a hold's expired parts had already left the buckets
                self._drop(f.get("g", "?"), -amount, entry_id)
        elif kind == "c":
            carried = int(f.get("r", "0"))
            if "f" in f:
                self._drop(f["f"], carried, entry_id)
            if "g" in f:
                model[f["g"]] = amount + carried - repaid
        elif kind == "r":
            self.holds[f.get("h", "?")] = self._take(-amount, entry_id)
        elif kind in ("p", "l"):
            parts = self.holds.pop(f.get("h", "?"), None)
            if parts is None:
                problems.append(f"{entry_id}: ends hold {f.get('h')}, which is not active")
                return
            charge, rest = int(f.get("q", "0")), []
            for bucket, credits in parts:
                used = min(credits, charge)
                charge -= used
                if credits > used:
                    rest.append((bucket, credits - used))
            self._give_back(rest, int(f.get("t", "0")), before, entry_id)
        elif kind == "v" and "tf" in f:  # a refused transfer's credits back: its parts
            self._give_back(self._parts_of(f), int(f.get("t", "0")), before, entry_id)
        elif kind == "v":
            if original is None:
                problems.append(f"{entry_id}: reverses {f.get('o')}, not in the history")
            elif original.get("k") == "a":
                if "g" in f and amount:
                    self._drop(f["g"], -amount, entry_id)  # all that was left of the grant
                elif "g" in f:
                    model.pop(f["g"], None)
            else:
                charged = self._parts_of(original)
                overdraft = (
                    -int(original["n"]) if original.get("k") in ("s", "o") else int(original["q"])
                ) - sum(credits for _, credits in charged)
                if overdraft > 0 and "g" in f:
                    model[f["g"]] = overdraft
                self._give_back(charged, int(f.get("t", "0")), before, entry_id, max(overdraft, 0))
        else:
            problems.append(f"{entry_id}: unknown kind {kind!r}")

    def report(self, balance: int, buckets: Mapping[str, int], held: int = 0) -> AuditReport:
        """The audit, against what Redis holds now."""
        problems = list(self.problems)
        if self.running != balance:
            problems.append(f"balance is {balance}, history adds up to {self.running}")
        holding = sum(credits for parts in self.holds.values() for _, credits in parts)
        if holding != held:
            problems.append(f"holds hold {held}, history gives {holding}")
        for bucket in sorted(set(self.model) | set(buckets)):
            if self.model.get(bucket) != buckets.get(bucket):
                problems.append(
                    f"bucket {bucket}: Redis holds {buckets.get(bucket)}, "
                    f"history gives {self.model.get(bucket)}"
                )
        for member, cap in sorted(self.caps.items()):
            if cap.count != cap.stored:
                problems.append(
                    f"member {member!r}: its cap counts {cap.stored} spent this period, "
                    f"history gives {cap.count}"
                )
        return AuditReport(
            user_id=self.user_id,
            ok=not problems,
            balance=balance,
            history_balance=self.running,
            entries=self.count,
            buckets=len(buckets),
            problems=problems,
        )
