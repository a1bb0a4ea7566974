"""The asyncio client. `_clients/client_sync.py` is generated from this file by
tools/async_to_sync.py: edit here, then run the tool (a test fails while the two differ)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

from credici_redis._clients.base import AddItem, ClientBase, Clock, SubtractItem, UserId
from credici_redis._core import requests as check
from credici_redis._ops import (
    account,
    audit,
    charge,
    cycles,
    history,
    holds,
    limits,
    members,
    retention,
    reverse,
    transfers,
    usage,
)
from credici_redis._storages.connect import DEFAULT_TIMEOUT, open_async_storage
from credici_redis.errors import (
    CrediciError,
    InconsistentStateError,
    OutcomeUnknownError,
    StorageUnavailableError,
)
from credici_redis.models import (
    ActiveHolds,
    AuditReport,
    BalanceDetails,
    BalanceEvent,
    Budget,
    CalendarPeriod,
    Cycle,
    Decision,
    Granularity,
    Hold,
    Limits,
    MemberUsage,
    RateLimit,
    Transaction,
    Transfer,
    TransferRecovery,
    TrimReport,
    UsagePoint,
)
from credici_redis.storage import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_NAMESPACE,
    AsyncStorage,
    Durability,
)

if TYPE_CHECKING:  # the archive needs the "postgres" extra: imported when asked for
    from credici_redis.archive import AsyncArchiveReader


class AsyncCrediciClient(ClientBase):
    """Credits of many users, kept by a storage. One client serves a whole process."""

    def __init__(
        self,
        storage: AsyncStorage,
        *,
        clock: Clock | None = None,
        archive: AsyncArchiveReader | None = None,
        default_limits: Limits | None = None,
    ) -> None:
        """archive: where the history the archiver moved out of Redis is (credici_redis.archive);
        history reads and the audit then cover it too. default_limits: the rate and budget of
        users that have no limits of their own (`set_limits`): a free plan needs no per-user
        call."""
        super().__init__(clock, default_limits)
        self.storage = storage
        self.archive = archive

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = DEFAULT_TIMEOUT,
        idempotency_ttl: timedelta = DEFAULT_IDEMPOTENCY_TTL,
        retries: int = 0,
        batching: bool = False,  # async only
        cluster: bool = False,
        durability: Durability = "primary",
        clock: Clock | None = None,
        archive_url: str | None = None,
        allow_eviction: bool = False,
        default_limits: Limits | None = None,
        usage_tz: str = "UTC",
        history_retention: timedelta | None = None,
        **redis_options: Any,
    ) -> AsyncCrediciClient:
        """``redis://host:port/db`` (or ``rediss://``, ``unix://``), or ``memory://`` (embedded).

        timeout: seconds before a call fails with StorageUnavailableError. retries: how often a
        call is retried by itself after an outage (writes get an idempotency key, so a retry never
        applies twice). batching (asyncio only): calls of one event-loop moment share one
        pipeline. cluster: the URL names a node of a Redis Cluster. archive_url: the
        PostgreSQL database the archiver (credici_redis.archive) moves old history to; history
        reads return one seamless history across both. durability="replica": a write returns
        once a replica has it too (WAIT, up to timeout/2), else raises ReplicationTimeoutError.
        The first call reads the Redis's maxmemory-policy and raises EvictionPolicyError unless
        it is noeviction (keys evicted = credits lost); allow_eviction=True skips that check.
        default_limits: the rate and budget of users without limits of their own.
        usage_tz: the time zone of the usage days and months that `get_usage` reports.
        history_retention: history older than this is removed by `trim_history` (Redis only).
        Other keyword arguments go to redis-py; one it does not take raises InvalidOptionError.
        The URL is required: ``memory://`` keeps credits in this process only.
        """
        archive = None
        if archive_url is not None:
            from credici_redis.archive import AsyncArchiveReader

            archive = AsyncArchiveReader(archive_url, namespace, timeout=timeout)
        storage = open_async_storage(
            url,
            namespace,
            timeout=timeout,
            idempotency_ttl=idempotency_ttl,
            retries=retries,
            batching=batching,  # async only
            cluster=cluster,
            durability=durability,
            allow_eviction=allow_eviction,
            usage_tz=usage_tz,
            history_retention=history_retention,
            **redis_options,
        )
        return cls(storage, clock=clock, archive=archive, default_limits=default_limits)

    async def add(
        self,
        user_id: UserId,
        amount: int,
        expire_at: datetime | None = None,
        *,
        ttl: timedelta | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, str] | None = None,
        priority: int = 0,
    ) -> Transaction:
        """Grant `amount` credits expiring at `expire_at` (naive = UTC), after `ttl`, or never.

        Burn order: priority ascending, then soonest expiry, never-expiring last, then oldest.
        A debt (see set_credit_limit) is repaid first.
        """
        req = charge.build_add(
            user_id, amount, expire_at, ttl, idempotency_key, metadata, self._now(), priority
        )
        return await self.storage.execute(charge.ADD, req)

    async def subtract(
        self,
        user_id: UserId,
        amount: int,
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, str] | None = None,
        member: str | None = None,
    ) -> Transaction:
        """Take `amount` credits, soonest-expiring first; all or nothing. With limits (see
        `set_limits`), the same atomic step also checks and uses the rate and the budget:
        InsufficientCreditsError, BudgetExceededError, RateLimitedError (in that order), and
        nothing changed. `member`: a member of the pool `user_id` charging on their behalf
        (the entry names them; their cap, `set_member_cap`, is checked after the credits:
        BudgetExceededError with `member` set)."""
        req = charge.build_subtract(
            user_id, amount, idempotency_key, metadata, self._now(), self._limits, member
        )
        return await self.storage.execute(charge.SUBTRACT, req)

    async def add_many(self, items: Iterable[AddItem]) -> list[Transaction | CrediciError]:
        """Many adds in one round trip. An item is (user_id, amount[, expire_at]) or a mapping
        with the keys of `add`; each result, in order, is its Transaction or the error it got."""
        reqs = charge.build_many(items, charge.build_add_item, self._now())
        return await self.storage.execute_many(charge.ADD, reqs)

    async def subtract_many(
        self, items: Iterable[SubtractItem]
    ) -> list[Transaction | CrediciError]:
        """Many subtracts in one round trip. An item is (user_id, amount) or a mapping with the
        keys of `subtract`; each result, in order, is its Transaction or the error it got."""
        reqs = charge.build_many(
            items, partial(charge.build_subtract_item, limits=self._limits), self._now()
        )
        return await self.storage.execute_many(charge.SUBTRACT, reqs)

    async def get_balance(self, user_id: UserId) -> int:
        """Credits available now (expired buckets excluded). Cost does not grow with history."""
        req = account.build_user(user_id, self._now())
        return await self.storage.execute(account.BALANCE, req)

    async def start_cycle(
        self,
        amount: int,
        time_delta: int | timedelta | CalendarPeriod = 30,
        user_id: UserId | None = None,
        *,
        rollover: int | None = 0,
        renew: bool = False,
        tz: str = "UTC",
        idempotency_key: str | None = None,
    ) -> Cycle:
        """Start a cycle granting `amount` per period; a running cycle ends now (rollover applies).

        time_delta: days (int), a timedelta, or "day"/"week"/"month"/"year" in time zone `tz`.
        rollover: how much of the previous grant carries over (0, N, or None for all).
        renew: start the next period by itself, on the original schedule, at the next operation.
        With no user_id a new user (a uuid4) is created; `Cycle.user_id` tells which.
        """
        req = cycles.build_start_cycle(
            amount, time_delta, user_id, rollover_=rollover, renew=renew, tz=tz,
            key=idempotency_key, now_ms=self._now(),
        )  # fmt: skip
        return await self.storage.execute(cycles.START_CYCLE, req)

    async def get_cycle(self, user_id: UserId) -> Cycle | None:
        """The user's current (or last) cycle, renewed up to now; None if it never had one."""
        req = account.build_user(user_id, self._now())
        return await self.storage.execute(cycles.GET_CYCLE, req)

    async def cancel_cycle(self, user_id: UserId, *, forfeit: bool = False) -> Cycle:
        """Stop renewal; the grant stays until the cycle's end, or expires now with forfeit."""
        req = cycles.build_cancel_cycle(user_id, forfeit, self._now())
        return await self.storage.execute(cycles.CANCEL_CYCLE, req)

    async def get_all_user_transactions(
        self, user_id: UserId, *, limit: int | None = None, before: str | None = None
    ) -> list[Transaction]:
        """The user's history, newest first: all of it, or at most `limit` entries (up to
        100,000) older than the transaction `before`. To read a long history in bounded
        memory, page with `before=` the last one returned, or use iter_user_transactions."""
        req = history.build_history(
            user_id, None, None, self._now(), period=False, limit=limit, before=before
        )
        return await self._history(req)

    async def get_user_transactions_for_period(
        self,
        user_id: UserId,
        from_: datetime,
        to_: datetime,
        *,
        limit: int | None = None,
        before: str | None = None,
        member: str | None = None,
    ) -> list[Transaction]:
        """History entries with from_ <= created_at <= to_ (naive = UTC), newest first; `limit`
        and `before` as for get_all_user_transactions; `member`: only the entries of a pool
        naming that member (who spent what)."""
        req = history.build_history(
            user_id, from_, to_, self._now(), period=True, limit=limit, before=before,
            member=member,
        )  # fmt: skip
        return await self._history(req)

    async def iter_user_transactions(
        self,
        user_id: UserId,
        *,
        from_: datetime | None = None,
        to_: datetime | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[Transaction]:
        """The user's history (or the period's, if from_ and to_ are given), newest first, read
        `page_size` entries at a time: memory stays bounded whatever the history's length."""
        period = from_ is not None or to_ is not None
        before: str | None = None
        while True:
            req = history.build_history(
                user_id, from_, to_, self._now(), period=period, limit=page_size, before=before
            )
            page = await self._history(req)
            for transaction in page:
                yield transaction
            if len(page) < page_size:
                return
            before = page[-1].transaction_id

    async def _history(self, req: history.HistoryRequest) -> list[Transaction]:
        recent = await self.storage.execute(history.HISTORY, req)
        if self.archive is None or (req.limit is not None and len(recent) >= req.limit):
            return recent
        # Redis first: an entry trimmed after this read was committed to PostgreSQL before.
        # Redis returned fewer than asked: what is older than its last entry is in the archive.
        if req.limit is not None and recent:
            last = recent[-1].transaction_id.partition("@")[0]
            req = replace(req, before=last, limit=req.limit - len(recent))
        return history.merge(recent, await self.archive.history(req))

    async def reserve(
        self,
        user_id: UserId,
        amount: int,
        *,
        ttl: timedelta = holds.DEFAULT_HOLD_TTL,
        idempotency_key: str | None = None,
        metadata: dict[str, str] | None = None,
        member: str | None = None,
    ) -> Hold:
        """Hold `amount` credits (out of the available balance, in burn order) until capture,
        release, or `ttl`, after which the next operation on the user releases them. The held
        amount counts against the user's rate and budget now, as a subtract would (a capture
        below it, a release or the ttl give the rest back to the budget). `member`: as for
        subtract; the member's cap counts the held amount the same way."""
        req = holds.build_reserve(
            user_id, amount, ttl, idempotency_key, metadata, self._now(), self._limits, member
        )
        return await self.storage.execute(holds.RESERVE, req)

    async def capture(
        self, hold_id: str, amount: int | None = None, *, idempotency_key: str | None = None
    ) -> Transaction:
        """Charge `amount` (None: all) of a hold and give the rest back; once per hold.

        The Transaction's `captured` is the charge, its `amount` what came back.
        """
        req = holds.build_capture(hold_id, amount, idempotency_key, self._now())
        return await self.storage.execute(holds.CAPTURE, req)

    async def release(self, hold_id: str, *, metadata: dict[str, str] | None = None) -> Hold:
        """Give every held credit back; once per hold. `metadata`: kept in the release entry
        (why, by whom)."""
        req = holds.build_hold(hold_id, self._now(), metadata)
        return await self.storage.execute(holds.RELEASE, req)

    async def get_hold(self, hold_id: str) -> Hold:
        """The hold as it is now (an expired one is released first). HoldNotFoundError once it
        ended more than a day ago."""
        req = holds.build_hold(hold_id, self._now())
        return await self.storage.execute(holds.GET_HOLD, req)

    async def get_holds(self, user_id: UserId, limit: int = 100) -> ActiveHolds:
        """The user's active holds, soonest released first, at most `limit` (1-1000); `more`
        says there may be others (one call looks at the 4 * limit holds released or forgotten
        next)."""
        req = holds.build_holds(user_id, limit, self._now())
        return await self.storage.execute(holds.GET_HOLDS, req)

    async def reverse(
        self,
        transaction_id: str,
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Transaction:
        """Undo a subtract or capture (credits back to their buckets, unless those expired:
        see `unrestored`) or an add (what is left of it is removed). Once per transaction.
        `metadata`: kept in the reverse entry (why it was reversed, by whom)."""
        req = reverse.build_reverse(transaction_id, idempotency_key, self._now(), metadata)
        return await self.storage.execute(reverse.REVERSE, req)

    async def check(self, user_id: UserId, amount: int) -> Decision:
        """Would `subtract(user_id, amount)` pass now? A dry run: nothing is charged and no rate
        or budget used (due expiries and renewals are recorded, as by any read). The reason is
        subtract's first refusal: credits, budget, rate."""
        req = limits.build_check(user_id, amount, self._now(), self._limits)
        return await self.storage.execute(limits.CHECK, req)

    async def set_limits(
        self, user_id: UserId, *, rate: RateLimit | None = None, budget: Budget | None = None
    ) -> Limits:
        """The user's own limits, enforced by every charge (subtract, reserve, the batches) in
        the same atomic step: `rate` (GCRA: n credits use n units) and `budget` (credits spent
        per calendar period in a time zone, or per fixed window). Both None: the user's own
        limits are cleared and the client's default_limits apply again. What was spent of a
        budget of the same period and zone still counts; a new rate starts with a full burst."""
        req = limits.build_set_limits(user_id, rate, budget, self._now(), self._limits)
        return await self.storage.execute(limits.SET_LIMITS, req)

    async def get_limits(self, user_id: UserId) -> Limits:
        """The user's limits in effect (its own, else the client's default: `default` is True),
        what was spent of the budget in the running period and when that period ends."""
        req = limits.build_get_limits(user_id, self._now(), self._limits)
        return await self.storage.execute(limits.GET_LIMITS, req)

    async def set_member_cap(
        self, user_id: UserId, member: str, budget: Budget | None
    ) -> MemberUsage:
        """Cap what `member` may spend of the pool `user_id` per calendar period (in a time
        zone) or fixed window: checked by every charge made with `member=` in the same atomic
        step. None removes the cap. What the member spent under a cap of the same period and
        zone still counts; charges made before a new cap never come back to it."""
        req = members.build_set_member_cap(user_id, member, budget, self._now())
        return await self.storage.execute(members.SET_MEMBER_CAP, req)

    async def get_member_usage(self, user_id: UserId, member: str) -> MemberUsage:
        """A member's cap on the pool `user_id`, what it spent in the running period, and when
        that period ends (cap None: the member is not capped, and not counted)."""
        req = members.build_member(user_id, member, self._now())
        return await self.storage.execute(members.GET_MEMBER_USAGE, req)

    async def transfer(
        self,
        from_user: UserId,
        to_user: UserId,
        amount: int,
        *,
        idempotency_key: str | None = None,
        expire_at: datetime | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Transfer:
        """Move `amount` credits from `from_user` to `to_user` (any two accounts, in any cluster
        slots), exactly once: a `transfer_out` entry on the source and a `transfer_in` entry on
        the destination, linked by `transfer_id`. Only credits the source holds move (never its
        credit limit); they keep their buckets' expiry unless `expire_at` is given, and repay
        the destination's debt first. InsufficientCreditsError: nothing changed. A retry under
        the same `idempotency_key` returns the same Transfer, finishing it if a process died
        midway; so does `recover_transfers`. TransferRefusedError: the destination refused (its
        balance would pass 2**53-1), the credits went back. An outage raises
        OutcomeUnknownError: the transfer may have begun; the retry or recovery finishes it."""
        req = transfers.build_transfer(
            from_user, to_user, amount, expire_at, idempotency_key, metadata, self._now()
        )
        try:
            return await self.storage.execute(transfers.TRANSFER, req)
        except StorageUnavailableError as exc:
            if isinstance(exc, OutcomeUnknownError):
                raise
            raise OutcomeUnknownError(
                f"transfer from {req.user_id!r} to {req.to_user!r} may have begun ({exc}):"
                " retry it with the same idempotency key, or recover_transfers() finishes it"
            ) from exc

    async def recover_transfers(
        self, *, older_than: timedelta = timedelta(seconds=30)
    ) -> TransferRecovery:
        """Finish every transfer a process left unsettled (its credits out of the source, not
        yet settled) that began `older_than` ago or earlier: the destination gets the credits
        once, or, if it refuses them or a day has passed, the source gets them back. Safe
        beside running transfers and other recoveries; run it every minute or so (the archiver's
        schedule is a good place). Reads each slot's transfer queue (16384 small reads)."""
        older_ms = transfers.build_recover(older_than)
        return await self.storage.recover_transfers(self._now(), older_ms)

    async def get_usage(
        self,
        user_id: UserId,
        from_: datetime,
        to_: datetime,
        *,
        granularity: Granularity = "day",
        tz: str | None = None,
    ) -> list[UsagePoint]:
        """The user's usage per hour, day or month: one point per period that overlaps
        [from_, to_) (naive = UTC), each counting its whole period, oldest first. Hours are UTC
        hours (kept 7 days); days and months are those of the storage's usage_tz (days kept 400
        days), which `tz` (default: usage_tz) must name; points start in `tz`. Exact against
        the history: every change updates them in the same script. UsageUnavailableError for
        periods before the records begin; UsageZoneError for days in another zone."""
        req = usage.build_usage(
            user_id, from_, to_, granularity, tz or self._usage_tz(), self._now()
        )
        return await self.storage.execute(usage.USAGE, req)

    async def trim_history(self, user_id: UserId) -> TrimReport:
        """Remove the user's history entries older than the storage's history_retention, in
        bounded steps, each after a checkpoint of what they add up to (the audit replays from
        the newest one). Entries whose replay finds a problem stay (see `problems`). A user
        whose history the archiver moves to PostgreSQL is left to it (`archived`)."""
        req = retention.build_trim(
            user_id, self._retention_ms(), self._now(), retention.DEFAULT_STEP
        )
        return await self.storage.execute(retention.TRIM, req)

    async def get_balance_details(self, user_id: UserId) -> BalanceDetails:
        """Balance, debt, credit limit and the buckets in burn order."""
        req = account.build_user(user_id, self._now())
        return await self.storage.execute(account.DETAILS, req)

    async def set_credit_limit(
        self, user_id: UserId, limit: int, *, metadata: dict[str, str] | None = None
    ) -> None:
        """Allow the balance down to -limit (0, the default: no overdraft). A change is recorded
        in the history as a "credit_limit" entry (amount 0) with `metadata` (who and why);
        setting the limit the user already has records nothing."""
        req = account.build_credit_limit(user_id, limit, self._now(), metadata)
        return await self.storage.execute(account.SET_CREDIT_LIMIT, req)

    async def set_low_balance_threshold(self, user_id: UserId, threshold: int | None) -> None:
        """Ask for events when the user's balance falls below `threshold` (or to 0);
        None: no events for this user (the default)."""
        req = account.build_threshold(user_id, threshold, self._now())
        return await self.storage.execute(account.SET_LOW_BALANCE_THRESHOLD, req)

    def events(
        self,
        group: str = "credici",
        consumer: str | None = None,
        *,
        batch: int = 100,
        poll: float = 0.2,
        claim_after: float = 60.0,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[BalanceEvent]:
        """Low-balance and depleted events of the namespace's users, shared by the consumers of
        `group` (each event goes to one of them). At least once: an event is acknowledged when
        you come back for the next one; one a consumer never acknowledged is taken over after
        `claim_after` seconds. Stops after `idle_timeout` seconds without events (None: never)."""
        names = check.consumer_name(group, consumer)
        reading = check.event_reading(batch, poll, claim_after, idle_timeout)
        return self.storage.events(*names, reading)

    async def recent_events(self, limit: int = 20) -> list[BalanceEvent]:
        """The namespace's newest low-balance and depleted events, newest first, for a look (an
        operator's page): no consumer group is joined, nothing is acknowledged, `events()`
        consumers are not affected. Reads every slot's event stream on Redis (found by SCAN)."""
        return await self.storage.recent_events(check.read_limit(limit))

    async def audit(self, user_id: UserId) -> AuditReport:
        """Rebuild the balance and every bucket from the history; report any difference."""
        req = account.build_user(user_id, self._now())
        try:
            snapshot = await self.storage.execute(audit.AUDIT, req)
        except InconsistentStateError as exc:
            return AuditReport(
                user_id=req.user_id, ok=False, balance=0, history_balance=0, entries=0,
                buckets=0, problems=[str(exc)],
            )  # fmt: skip
        if self.archive is None or not snapshot.trimmed:
            return snapshot.report(())
        # Read after the snapshot: whatever Redis trimmed before it is in PostgreSQL by now.
        return snapshot.report(await self.archive.entries_before(req.user_id, snapshot.trimmed))

    def scan_users(self, batch: int = 500) -> AsyncIterator[list[str]]:
        """Every user of the namespace, `batch` at a time (SCAN: never blocks Redis for long)."""
        return self.storage.scan_users(check.batch_size(batch))

    async def aclose(self) -> None:
        await self.storage.aclose()
        if self.archive is not None:
            await self.archive.aclose()

    async def __aenter__(self) -> AsyncCrediciClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
