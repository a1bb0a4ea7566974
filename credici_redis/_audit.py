"""The audit: rebuild a user's balance and buckets from the history alone, compare with Redis.

Pure code. Each grant names its bucket in history (field g), each expiry the bucket it hit, each
rollover what it carried from which bucket (r, f); a subtract is replayed with the scripts' burn
order (priority, then bucket id), and a grant repays any debt before it fills its bucket. Any
difference is a problem in the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from credici_redis.models import AuditReport


def replay(
    user_id: str,
    entries: Iterable[tuple[str, Mapping[str, str]]],
    balance: int,
    buckets: Mapping[str, int],
) -> AuditReport:
    """entries: (entry id, fields), oldest first. balance, buckets: what Redis holds now."""
    model: dict[str, int] = {}
    rank: dict[str, int] = {}  # priority of each bucket (0 unless the grant said otherwise)
    running = count = 0
    problems: list[str] = []

    def take(bucket: str, credits: int, entry_id: str) -> None:
        left = model.get(bucket, 0) - credits
        if bucket not in model or left < 0:
            problems.append(f"{entry_id}: takes {credits} from bucket {bucket}, which has less")
        if left > 0:
            model[bucket] = left
        else:
            model.pop(bucket, None)

    for entry_id, f in entries:
        count += 1
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
            need = min(-amount, max(before, 0))  # past the buckets, a charge is debt
            for bucket in sorted(model, key=lambda b: (rank.get(b, 0), b)):
                if need == 0:
                    break
                used = min(need, model[bucket])
                take(bucket, used, entry_id)
                need -= used
            if need:
                problems.append(f"{entry_id}: subtract of {-amount} finds {need} missing")
            if running < 0 and model:
                problems.append(f"{entry_id}: in debt while buckets hold credits")
        elif kind == "e":
            take(f.get("g", "?"), -amount, entry_id)
        elif kind == "c":
            carried = int(f.get("r", "0"))
            if "f" in f:
                take(f["f"], carried, entry_id)
            if "g" in f:
                model[f["g"]] = amount + carried - repaid
        else:
            problems.append(f"{entry_id}: unknown kind {kind!r}")

    if running != balance:
        problems.append(f"balance is {balance}, history adds up to {running}")
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
