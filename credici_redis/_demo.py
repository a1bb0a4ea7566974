"""The metering demo behind ``credici-redis demo``: users charged by worker threads, then audited.

Users get a subscription cycle, some get top-ups (promo credits that expire within seconds, packs
that never do), then worker threads sharing one `CrediciClient` charge them for a fixed time. At
the end every user's balance is checked against its history, and the ledger's totals against what
the workers did. `run_demo` returns a `DemoResult` so tests can run it without the CLI.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from tqdm import tqdm

from credici_redis.client import CrediciClient
from credici_redis.errors import InsufficientCreditsError

# (plan, credits per cycle, weight): free users run dry within seconds, so charges get rejected.
PLANS = (("free", 20, 3), ("basic", 100, 5), ("pro", 500, 2))
CYCLE = timedelta(days=30)
DORMANT_SHARE = 0.1
"""Subscribers who are never charged: their promo credits are sure to expire during the run."""
PROMO_SHARE = 0.03
"""Share of worker operations that grant promo credits instead of charging."""
PACK_AFTER_REJECTION = 0.25
"""Chance that a rejected charge makes the user buy a pack of credits, as a real customer might."""
PACKS = (50, 100, 200)
MAX_PROMO_TTL = 3.0
PROGRESS_TICK = 0.1


@dataclass(frozen=True)
class DemoResult:
    """What a demo run did and what the audit found; `problems` is empty when the ledger adds up."""

    namespace: str
    seed: int
    users: int
    workers: int
    seconds: float
    ops: int
    accepted: int
    rejected: int
    topups: int
    granted: int
    spent: int
    expired: int
    balance_total: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Audit:
    """The ledger as its histories tell it, at one instant, and every inconsistency found."""

    granted: int
    spent: int
    expired: int
    charges: int
    balance_total: int
    problems: tuple[str, ...]


@dataclass
class _Tally:
    """One worker's counts; only its own thread writes it, the progress bar only reads it."""

    ops: int = 0
    accepted: int = 0
    rejected: int = 0
    spent: int = 0
    topups: int = 0
    granted: int = 0


@dataclass
class _Population:
    """The simulated users: who exists, who gets charged and how often (Zipf-like weights)."""

    users: list[str]
    active: list[str]
    cum_weights: list[float] = field(default_factory=list)

    @classmethod
    def create(cls, count: int, rng: random.Random) -> _Population:
        users = [f"user-{i:04d}" for i in range(count)]
        dormant = max(1, round(count * DORMANT_SHARE)) if count > 1 else 0
        active = users[dormant:]
        ranked = rng.sample(active, len(active))
        total, cum = 0.0, []
        for rank in range(len(ranked)):
            total += 1.0 / (rank + 1)
            cum.append(total)
        return cls(users, ranked, cum)

    @property
    def dormant(self) -> list[str]:
        return self.users[: len(self.users) - len(self.active)]

    def charged_user(self, rng: random.Random) -> str:
        return rng.choices(self.active, cum_weights=self.cum_weights)[0]


def run_demo(
    url: str = "memory://",
    *,
    namespace: str,
    users: int = 300,
    workers: int = 8,
    seconds: float = 10.0,
    seed: int | None = None,
    progress: bool = False,
) -> DemoResult:
    """Set up `users` subscribers, charge them from `workers` threads for `seconds`, audit."""
    if users < 1 or workers < 1 or not seconds > 0:
        raise ValueError("users and workers must be at least 1, seconds more than 0")
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    population = _Population.create(users, rng)
    promo_ttl = max(0.01, min(MAX_PROMO_TTL, seconds))  # so promo credits expire within the run
    with CrediciClient.from_url(url, namespace=namespace) as client:
        granted = _subscribe(client, population, rng, promo_ttl)
        tallies = [_Tally() for _ in range(workers)]
        started = time.perf_counter()
        _charge(client, population, tallies, seed, seconds, promo_ttl, progress)
        elapsed = time.perf_counter() - started
        audit = audit_ledger(client, population.users, datetime.now(timezone.utc))
    accepted = sum(t.accepted for t in tallies)
    spent = sum(t.spent for t in tallies)
    granted += sum(t.granted for t in tallies)
    problems = list(audit.problems)
    if audit.charges != accepted or audit.spent != spent:
        problems.append(
            f"workers made {accepted} charges of {spent} credits in all, "
            f"the histories hold {audit.charges} charges of {audit.spent}"
        )
    if audit.granted != granted:
        problems.append(f"{granted} credits were granted, the histories hold {audit.granted}")
    return DemoResult(
        namespace=namespace,
        seed=seed,
        users=users,
        workers=workers,
        seconds=elapsed,
        ops=sum(t.ops for t in tallies),
        accepted=accepted,
        rejected=sum(t.rejected for t in tallies),
        topups=sum(t.topups for t in tallies),
        granted=audit.granted,
        spent=audit.spent,
        expired=audit.expired,
        balance_total=audit.balance_total,
        problems=tuple(problems),
    )


def _subscribe(
    client: CrediciClient, population: _Population, rng: random.Random, promo_ttl: float
) -> int:
    """Start every user's cycle; a third of the users, and every dormant one, get promo credits."""
    granted = 0
    plans, weights = [p[:2] for p in PLANS], [p[2] for p in PLANS]
    dormant = set(population.dormant)
    for user in population.users:
        _, credits = rng.choices(plans, weights=weights)[0]
        client.start_cycle(credits, CYCLE, user)
        granted += credits
        if user in dormant or rng.random() < 1 / 3:
            promo = rng.randint(10, 30)
            ttl = timedelta(seconds=rng.uniform(min(1.0, promo_ttl), promo_ttl))
            client.add(user, promo, ttl=ttl, metadata={"reason": "welcome promo"})
            granted += promo
    return granted


def _charge(
    client: CrediciClient,
    population: _Population,
    tallies: Sequence[_Tally],
    seed: int,
    seconds: float,
    promo_ttl: float,
    progress: bool,
) -> None:
    """Run one worker per tally until `seconds` have passed; a worker's failure is re-raised."""
    stop = threading.Event()
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(len(tallies), thread_name_prefix="credici-demo") as pool:
        futures = [
            pool.submit(
                _work, client, population, tally, random.Random(f"{seed}/{n}"), promo_ttl, stop, n
            )
            for n, tally in enumerate(tallies)
        ]
        bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"
        try:
            with tqdm(
                total=seconds,
                desc="charging",
                bar_format=bar_format,
                disable=None if progress else True,
            ) as bar:
                while (now := time.monotonic()) < deadline and not any(f.done() for f in futures):
                    time.sleep(min(PROGRESS_TICK, deadline - now))
                    bar.n = seconds - max(0.0, deadline - time.monotonic())
                    bar.set_postfix(
                        {
                            "ops": sum(t.ops for t in tallies),
                            "accepted": sum(t.accepted for t in tallies),
                            "rejected": sum(t.rejected for t in tallies),
                        }
                    )
        finally:
            stop.set()
        for future in futures:
            future.result()


def _work(
    client: CrediciClient,
    population: _Population,
    tally: _Tally,
    rng: random.Random,
    promo_ttl: float,
    stop: threading.Event,
    worker: int,
) -> None:
    """Charge small amounts until stopped; now and then grant promo credits or sell a pack."""
    while not stop.is_set():
        if rng.random() < PROMO_SHARE:
            promo = rng.randint(10, 30)
            ttl = timedelta(seconds=rng.uniform(min(1.0, promo_ttl), promo_ttl))
            client.add(rng.choice(population.users), promo, ttl=ttl, metadata={"reason": "promo"})
            tally.granted += promo
            tally.topups += 1
            tally.ops += 1
            continue
        user, price = population.charged_user(rng), rng.randint(1, 5)
        try:
            client.subtract(user, price)
        except InsufficientCreditsError:
            tally.rejected += 1
            if rng.random() < PACK_AFTER_REJECTION:
                pack = rng.choice(PACKS)
                # A purchase is the write one would retry after a timeout: give it a key.
                key = f"pack-w{worker}-{tally.topups}"
                client.add(user, pack, idempotency_key=key, metadata={"reason": "pack"})
                tally.granted += pack
                tally.topups += 1
                tally.ops += 1
        else:
            tally.accepted += 1
            tally.spent += price
        tally.ops += 1


def audit_ledger(client: CrediciClient, users: Sequence[str], at: datetime) -> Audit:
    """Check every user's balance against its history, all read as of the instant `at`.

    Reading at one pinned instant keeps a bucket that expires between the balance read and the
    history read from making two correct answers disagree.
    """
    pinned = CrediciClient(client.storage, clock=lambda: at)
    granted = spent = expired = charges = balance_total = 0
    problems: list[str] = []
    for user in users:
        balance = pinned.get_balance(user)
        history = pinned.get_all_user_transactions(user)
        total = sum(tx.amount for tx in history)
        newest = history[0].balance_after if history else 0
        if not balance == total == newest:
            problems.append(
                f"{user}: balance {balance}, history sums to {total}, newest entry says {newest}"
            )
        balance_total += balance
        for tx in history:
            if tx.kind in ("add", "cycle_start"):
                granted += tx.amount
            elif tx.kind == "subtract":
                spent -= tx.amount
                charges += 1
            else:
                expired -= tx.amount
    return Audit(granted, spent, expired, charges, balance_total, tuple(problems))
