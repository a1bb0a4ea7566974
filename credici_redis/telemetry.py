"""Telemetry, opt-in (issue 20): OpenTelemetry metrics and a span for every operation.

    from credici_redis.telemetry import instrument

    client = instrument(CrediciClient.from_url(...))   # or an AsyncCrediciClient
    client = instrument(client, meter_provider=..., tracer_provider=...)

Nothing of OpenTelemetry is imported until `instrument` is called (the "telemetry" extra:
opentelemetry-api; your application installs the SDK and an exporter). Without providers given,
the global ones are used (a no-op until the application configures them).

Metrics; their attributes name the operation and the outcome, never a user (cardinality):
    credici.operations           counter     calls (a batch: one per item), by operation, outcome
    credici.operation.duration   histogram   seconds per call (a batch: the whole batch)
Outcomes: ok, insufficient (InsufficientCreditsError), limited (rate, budget, a member's cap),
conflict (an idempotency key reused for another request), unavailable (not applied: retry),
outcome_unknown (may have applied: retry with the same key), refused (any other typed refusal),
error (anything else).

The storage's inner steps, by operation where one is running (else "other"):
    credici.catchup.steps        counter     bounded catch-up steps a call needed (a user idle
                                             through many renewals or expiries), by script
    credici.retries              counter     calls sent again after an outage (`retries=`)
    credici.events.delivered     counter     low-balance events handed to this process, by kind
    credici.events.acknowledged  counter     ... and acknowledged (the consumer came back)
    credici.events.pending       updown      handed to this process, not yet acknowledged

An archiver (`Archiver`, `AsyncArchiver`) given to `instrument` reports its passes and its lag:
    credici.archive.entries      counter     entries moved to PostgreSQL (throughput: its rate)
    credici.archive.trimmed      counter     entries Redis dropped once archived
    credici.archive.pass.duration histogram  seconds per pass
    credici.archive.lag          gauge       seconds: age of the oldest entry not yet archived
    credici.archive.pending.entries / .users gauges   what waits for the archiver
The lag is read after a pass at most every `lag_every` seconds (30; a read covers every slot)
and whenever the archiver's own `lag()` is called.

Spans: "credici <operation>", with credici.operation, credici.script (the Lua script), credici.slot
(the user's Redis Cluster slot: which node, without saying who), credici.items (batches) and
credici.outcome; an exception is recorded on its span (status ERROR).

Prometheus: give `instrument` a MeterProvider whose reader is
`opentelemetry.exporter.prometheus.PrometheusMetricReader` (package
opentelemetry-exporter-prometheus) and serve `prometheus_client.start_http_server(port)`: the
counter is then `credici_operations_total{operation=..., outcome=...}`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from credici_redis._core import extras
from credici_redis._core.keys import user_slot
from credici_redis._core.observe import Observer
from credici_redis.errors import (
    CrediciError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    LimitExceededError,
    OutcomeUnknownError,
    StorageUnavailableError,
)

if TYPE_CHECKING:
    from credici_redis._archive.archive_async import AsyncArchiver
    from credici_redis._archive.archive_sync import Archiver
    from credici_redis._archive.base import ArchiveLag, ArchiveStats
    from credici_redis._clients.client_async import AsyncCrediciClient
    from credici_redis._clients.client_sync import CrediciClient
    from credici_redis._core.operation import Operation
    from credici_redis._core.requests import EventReading
    from credici_redis._storages.interface import AsyncStorage, Batch, Storage
    from credici_redis.models import BalanceEvent, TransferRecovery

R = TypeVar("R")
T = TypeVar("T")
Client = TypeVar("Client", "CrediciClient", "AsyncCrediciClient")
Drain = TypeVar("Drain", "Archiver", "AsyncArchiver")

SCOPE = "credici_redis"
_operation: contextvars.ContextVar[str] = contextvars.ContextVar("credici_operation", default="")
"""The operation a storage call is running for: the label of its retries and catch-up steps."""


def outcome_of(error: BaseException | None) -> str:
    """The outcome label of a call that raised `error` (None: it succeeded)."""
    if error is None:
        return "ok"
    if isinstance(error, InsufficientCreditsError):
        return "insufficient"
    if isinstance(error, LimitExceededError):
        return "limited"
    if isinstance(error, IdempotencyConflictError):
        return "conflict"
    if isinstance(error, OutcomeUnknownError):
        return "outcome_unknown"
    if isinstance(error, StorageUnavailableError):
        return "unavailable"
    if isinstance(error, CrediciError):
        return "refused"
    return "error"


def _meter(meter_provider: Any) -> Any:
    metrics = extras.need("opentelemetry.metrics", feature="telemetry", extra="telemetry")
    return (meter_provider or metrics.get_meter_provider()).get_meter(SCOPE)


class _Heard(Observer):
    """The storage's inner steps (`credici_redis._core.observe`), as metrics."""

    def __init__(self, meter: Any) -> None:
        self.steps = meter.create_counter(
            "credici.catchup.steps", unit="{step}", description="bounded catch-up steps"
        )
        self.retries = meter.create_counter(
            "credici.retries", unit="{call}", description="calls sent again after an outage"
        )
        self.delivered = meter.create_counter(
            "credici.events.delivered", unit="{event}", description="events handed over"
        )
        self.acknowledged = meter.create_counter(
            "credici.events.acknowledged", unit="{event}", description="events acknowledged"
        )
        self.pending = meter.create_up_down_counter(
            "credici.events.pending", unit="{event}", description="handed over, not acknowledged"
        )

    def catch_up_step(self, script: str) -> None:
        self.steps.add(1, {"operation": _operation.get() or "other", "script": script})

    def retry(self) -> None:
        self.retries.add(1, {"operation": _operation.get() or "other"})

    def events_read(self, kinds: list[str]) -> None:
        for kind in kinds:
            self.delivered.add(1, {"kind": kind})
        if kinds:
            self.pending.add(len(kinds))

    def events_acknowledged(self, count: int) -> None:
        self.acknowledged.add(count)
        self.pending.add(-count)


class _Call:
    """What a measured batch returned (`_Instruments.measure`)."""

    results: Any = None


class _Instruments:
    def __init__(self, meter_provider: Any, tracer_provider: Any) -> None:
        trace = extras.need("opentelemetry.trace", feature="telemetry", extra="telemetry")
        meter = _meter(meter_provider)
        self.heard = _Heard(meter)
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(SCOPE)
        self.calls = meter.create_counter(
            "credici.operations", unit="{call}", description="credici operations, by outcome"
        )
        self.duration = meter.create_histogram(
            "credici.operation.duration", unit="s", description="time per credici call"
        )

    def start(self, op: Operation[Any, Any], req: Any, items: int | None = None) -> Any:
        attributes: dict[str, Any] = {
            "credici.operation": op.name,
            "credici.script": op.script.name,
        }
        user = getattr(req, "user_id", "")
        if user:
            attributes["credici.slot"] = user_slot(user)
        if items is not None:
            attributes["credici.items"] = items
        return self.tracer.start_as_current_span(f"credici {op.name}", attributes=attributes)

    @contextlib.contextmanager
    def measure(
        self, op: Operation[Any, Any], req: Any, items: int | None = None
    ) -> Iterator[_Call]:
        """One call (`items` None) or a batch of `items`, measured: its span, its outcome (a
        batch: each item's, from the `results` the caller sets), its duration; the operation's
        name labels the storage's inner steps meanwhile (`_Heard`). Shared by the sync and the
        asyncio storage wrappers, which only await or not."""
        started, running, call = time.perf_counter(), _operation.set(op.name), _Call()
        try:
            with self.start(op, req, items) as span:
                try:
                    yield call
                except BaseException as exc:
                    self.ended(span, op, started, items, exc)
                    raise  # the span records it (OpenTelemetry's own handling)
                self.ended(span, op, started, items, call.results)
        finally:
            _operation.reset(running)

    def ended(
        self, span: Any, op: Operation[Any, Any], started: float, items: int | None, results: Any
    ) -> None:
        """`results`: a batch's results (each item's result or error), or the error of the whole
        call (None: a single call that succeeded)."""
        if items is None:
            outcomes = [outcome_of(results)]
        elif isinstance(results, BaseException):
            outcomes = [outcome_of(results)] * max(items, 1)
        else:
            outcomes = [outcome_of(r if isinstance(r, CrediciError) else None) for r in results]
        self.done(span, op, started, outcomes or ["ok"])

    def done(self, span: Any, op: Operation[Any, Any], started: float, outcomes: list[str]) -> None:
        elapsed = time.perf_counter() - started
        for outcome in outcomes:
            self.calls.add(1, {"operation": op.name, "outcome": outcome})
        overall = outcomes[0] if len(set(outcomes)) == 1 else "mixed"
        self.duration.record(elapsed, {"operation": op.name, "outcome": overall})
        span.set_attribute("credici.outcome", overall)


class InstrumentedStorage:
    """A `Storage` that measures every call of the storage it wraps. The measuring is
    `_Instruments`' (shared with `AsyncInstrumentedStorage`); the two only await or not."""

    def __init__(self, inner: Storage, instruments: _Instruments) -> None:
        self.inner, self._i = inner, instruments

    def execute(self, op: Operation[R, T], req: R) -> T:
        with self._i.measure(op, req):
            return self.inner.execute(op, req)

    def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]:
        with self._i.measure(op, None, len(reqs)) as call:
            results = call.results = self.inner.execute_many(op, reqs)
            return results

    def scan_users(self, batch: int) -> Iterator[list[str]]:
        return self.inner.scan_users(batch)

    def events(self, group: str, consumer: str, reading: EventReading) -> Iterator[BalanceEvent]:
        return self.inner.events(group, consumer, reading)

    def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        return self.inner.recover_transfers(now_ms, older_than_ms)

    def recent_events(self, count: int) -> list[BalanceEvent]:
        return self.inner.recent_events(count)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # the wrapped storage's own (ledger, redis, ...)
        return getattr(self.inner, name)


class AsyncInstrumentedStorage:
    """An `AsyncStorage` that measures every call of the storage it wraps."""

    def __init__(self, inner: AsyncStorage, instruments: _Instruments) -> None:
        self.inner, self._i = inner, instruments

    async def execute(self, op: Operation[R, T], req: R) -> T:
        with self._i.measure(op, req):
            return await self.inner.execute(op, req)

    async def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]:
        with self._i.measure(op, None, len(reqs)) as call:
            results = call.results = await self.inner.execute_many(op, reqs)
            return results

    def scan_users(self, batch: int) -> AsyncIterator[list[str]]:
        return self.inner.scan_users(batch)

    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]:
        return self.inner.events(group, consumer, reading)

    async def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        return await self.inner.recover_transfers(now_ms, older_than_ms)

    async def recent_events(self, count: int) -> list[BalanceEvent]:
        return await self.inner.recent_events(count)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@overload
def instrument(
    client: Client, *, meter_provider: Any = None, tracer_provider: Any = None
) -> Client: ...
@overload
def instrument(
    client: Drain, *, meter_provider: Any = None, tracer_provider: Any = None,
    lag_every: float = 30.0,
) -> Drain: ...  # fmt: skip
def instrument(
    client: Any, *, meter_provider: Any = None, tracer_provider: Any = None,
    lag_every: float = 30.0,
) -> Any:  # fmt: skip
    """Measure every call `client` makes from now on (see the module's docstring); returns it.
    Also takes an `Archiver` or `AsyncArchiver`: its passes and lag (read at most every
    `lag_every` seconds). Calling it twice measures once."""
    from credici_redis._archive.archive_async import AsyncArchiver
    from credici_redis._archive.archive_sync import Archiver
    from credici_redis._clients.client_async import AsyncCrediciClient

    if isinstance(client, (Archiver, AsyncArchiver)):
        if not getattr(client, "_credici_measured", False):
            _ArchiveMeter(_meter(meter_provider), lag_every).attach(client)
        return client
    storage: Any = client.storage
    if isinstance(storage, (InstrumentedStorage, AsyncInstrumentedStorage)):
        return client
    instruments = _Instruments(meter_provider, tracer_provider)
    ledger = getattr(storage, "ledger", None)
    if ledger is not None:  # a storage of one's own may have none: no inner steps then
        ledger.observer = instruments.heard
    if isinstance(client, AsyncCrediciClient):
        client.storage = AsyncInstrumentedStorage(storage, instruments)
    else:
        client.storage = InstrumentedStorage(storage, instruments)
    return client


class _ArchiveMeter:
    """An archiver's passes and lag, as metrics: its `run_once` and `lag` are wrapped (its own
    `follow` calls them), sync or asyncio alike."""

    def __init__(self, meter: Any, lag_every: float) -> None:
        metrics = extras.need("opentelemetry.metrics", feature="telemetry", extra="telemetry")
        self.lag_every = lag_every
        self.last: ArchiveLag | None = None
        self.read_at = -float("inf")
        self.entries = meter.create_counter(
            "credici.archive.entries", unit="{entry}", description="entries archived"
        )
        self.trimmed = meter.create_counter(
            "credici.archive.trimmed", unit="{entry}", description="entries trimmed from Redis"
        )
        self.duration = meter.create_histogram(
            "credici.archive.pass.duration", unit="s", description="time per archive pass"
        )

        def gauge(name: str, unit: str, value: Callable[[ArchiveLag], float]) -> None:
            def observe(options: Any) -> list[Any]:
                last = self.last
                return [] if last is None else [metrics.Observation(value(last))]

            meter.create_observable_gauge(name, callbacks=[observe], unit=unit)

        gauge("credici.archive.lag", "s", lambda lag: lag.seconds)
        gauge("credici.archive.pending.entries", "{entry}", lambda lag: lag.entries_pending)
        gauge("credici.archive.pending.users", "{user}", lambda lag: lag.users_pending)

    def passed(self, stats: ArchiveStats, started: float) -> bool:
        """Record a pass; True when the lag is due to be read."""
        self.entries.add(stats.entries)
        self.trimmed.add(stats.trimmed)
        self.duration.record(time.perf_counter() - started)
        return time.monotonic() - self.read_at >= self.lag_every

    def seen(self, lag: ArchiveLag) -> ArchiveLag:
        self.last, self.read_at = lag, time.monotonic()
        return lag

    def attach(self, archiver: Any) -> None:
        run_once, lag = archiver.run_once, archiver.lag
        if inspect.iscoroutinefunction(run_once):

            async def run_once_async(progress: Any = None) -> ArchiveStats:
                started = time.perf_counter()
                stats: ArchiveStats = await run_once(progress)
                if self.passed(stats, started):
                    await lag_async()
                return stats

            async def lag_async() -> ArchiveLag:
                return self.seen(await lag())

            archiver.run_once, archiver.lag = run_once_async, lag_async
        else:

            def run_once_sync(progress: Any = None) -> ArchiveStats:
                started = time.perf_counter()
                stats: ArchiveStats = run_once(progress)
                if self.passed(stats, started):
                    lag_sync()
                return stats

            def lag_sync() -> ArchiveLag:
                return self.seen(lag())

            archiver.run_once, archiver.lag = run_once_sync, lag_sync
        archiver._credici_measured = True
