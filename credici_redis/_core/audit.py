"""The audit: rebuild a user's balance, buckets and holds from the history alone, compare.

Pure code. Each grant names its bucket in history (field g, priority p), each expiry the bucket it
hit, each rollover what it carried from which bucket (r, f). Charges and reserves are replayed
with the scripts' burn order (priority, then bucket id); a grant repays a debt before it fills a
bucket; capture and release give a hold's parts back to their buckets as of the time they name
(t), except the parts of buckets whose expiry had come. Any difference is a problem in the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from credici_redis._core.time import NEVER_MS
from credici_redis.models import AuditReport


def replay(
    user_id: str,
    entries: Iterable[tuple[str, Mapping[str, str]]],
    balance: int,
    buckets: Mapping[str, int],
    held: int = 0,
) -> AuditReport:
    """entries: (entry id, fields), oldest first. balance, buckets, held: what Redis holds now."""
    model: dict[str, int] = {}
    rank: dict[str, int] = {}  # priority of each bucket (0 unless the grant said otherwise)
    holds: dict[str, list[tuple[str, int]]] = {}  # active holds: their parts
    seen: dict[str, Mapping[str, str]] = {}  # entries by id, for reversals
    running = count = 0
    problems: list[str] = []

    def drop(bucket: str, credits: int, entry_id: str) -> None:
        left = model.get(bucket, 0) - credits
        if bucket not in model or left < 0:
            problems.append(f"{entry_id}: takes {credits} from bucket {bucket}, which has less")
        if left > 0:
            model[bucket] = left
        else:
            model.pop(bucket, None)

    def take(need: int, entry_id: str) -> list[tuple[str, int]]:
        parts = []
        for bucket in sorted(model, key=lambda b: (rank.get(b, 0), b)):
            if need == 0:
                break
            used = min(need, model[bucket])
            parts.append((bucket, used))
            drop(bucket, used, entry_id)
            need -= used
        if need:
            problems.append(f"{entry_id}: needs {need} more credits than the buckets hold")
        return parts

    def give_back(
        parts: list[tuple[str, int]], at: int, before: int, entry_id: str, extra: int = 0
    ) -> None:
        restored = extra
        for bucket, credits in parts:
            expiry = int(bucket[:15])
            if expiry == NEVER_MS or expiry > at:
                model[bucket] = model.get(bucket, 0) + credits
                restored += credits
        if before < 0 and restored:
            take(min(restored, -before), entry_id)

    def parts_of(f: Mapping[str, str]) -> list[tuple[str, int]]:
        return [
            (part.split(":")[0], int(part.split(":")[1]))
            for part in f.get("u", "").split(";")
            if part
        ]

    for entry_id, f in entries:
        count += 1
        seen[entry_id] = f
        kind, amount = f.get("k", "?"), int(f.get("n", "0"))
        before = running
        repaid = min(max(amount, 0), max(-before, 0))  # what a grant pays back of a debt
        running += amount
        if int(f.get("b", "0")) != running:
            problems.append(f"{entry_id}: balance_after {f.get('b')}, history adds up to {running}")
        if kind == "a":
            if "g" in f:
                model[f["g"]] = amount - repaid
                rank[f["g"]] = int(f.get("p", "0"))
        elif kind == "s":
            taken = take(min(-amount, max(before, 0)), entry_id)  # past the buckets: debt
            if sorted(taken) != sorted(parts_of(f)):
                problems.append(f"{entry_id}: took {taken}, history says {parts_of(f)}")
            if running < 0 and model:
                problems.append(f"{entry_id}: in debt while buckets hold credits")
        elif kind == "e":
            if "h" not in f:  # a hold's expired parts had already left the buckets
                drop(f.get("g", "?"), -amount, entry_id)
        elif kind == "c":
            carried = int(f.get("r", "0"))
            if "f" in f:
                drop(f["f"], carried, entry_id)
            if "g" in f:
                model[f["g"]] = amount + carried - repaid
        elif kind == "r":
            holds[f.get("h", "?")] = take(-amount, entry_id)
        elif kind in ("p", "l"):
            parts = holds.pop(f.get("h", "?"), None)
            if parts is None:
                problems.append(f"{entry_id}: ends hold {f.get('h')}, which is not active")
                continue
            charge, rest = int(f.get("q", "0")), []
            for bucket, credits in parts:
                used = min(credits, charge)
                charge -= used
                if credits > used:
                    rest.append((bucket, credits - used))
            give_back(rest, int(f.get("t", "0")), before, entry_id)
        elif kind == "v":
            original = seen.get(f.get("o", "?"))
            if original is None:
                problems.append(f"{entry_id}: reverses {f.get('o')}, not in the history")
            elif original.get("k") == "a":
                if "g" in f and amount:
                    drop(f["g"], -amount, entry_id)  # all that was left of the grant
                elif "g" in f:
                    model.pop(f["g"], None)
            else:
                charged = parts_of(original)
                overdraft = (
                    -int(original["n"]) if original.get("k") == "s" else int(original["q"])
                ) - sum(credits for _, credits in charged)
                if overdraft > 0 and "g" in f:
                    model[f["g"]] = overdraft
                give_back(charged, int(f.get("t", "0")), before, entry_id, max(overdraft, 0))
        else:
            problems.append(f"{entry_id}: unknown kind {kind!r}")

    if running != balance:
        problems.append(f"balance is {balance}, history adds up to {running}")
    holding = sum(credits for parts in holds.values() for _, credits in parts)
    if holding != held:
        problems.append(f"holds hold {held}, history gives {holding}")
    for bucket in sorted(set(model) | set(buckets)):
        if model.get(bucket) != buckets.get(bucket):
            problems.append(
                f"bucket {bucket}: Redis holds {buckets.get(bucket)}, "
                f"history gives {model.get(bucket)}"
            )
    return AuditReport(
        user_id=user_id,
        ok=not problems,
        balance=balance,
        history_balance=running,
        entries=count,
        buckets=len(buckets),
        problems=problems,
    )
