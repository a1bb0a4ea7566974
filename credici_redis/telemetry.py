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

Spans: "credici <operation>", with credici.operation, credici.script (the Lua script), credici.slot
(the user's Redis Cluster slot: which node, without saying who), credici.items (batches) and
credici.outcome; an exception is recorded on its span (status ERROR).

Prometheus: give `instrument` a MeterProvider whose reader is
`opentelemetry.exporter.prometheus.PrometheusMetricReader` (package
opentelemetry-exporter-prometheus) and serve `prometheus_client.start_http_server(port)`: the
counter is then `credici_operations_total{operation=..., outcome=...}`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from credici_redis._core import extras
from credici_redis._core.keys import user_slot
from credici_redis.errors import (
    CrediciError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    LimitExceededError,
    OutcomeUnknownError,
    StorageUnavailableError,
)

if TYPE_CHECKING:
    from credici_redis._clients.client_async import AsyncCrediciClient
    from credici_redis._clients.client_sync import CrediciClient
    from credici_redis._core.operation import Operation
    from credici_redis._core.requests import EventReading
    from credici_redis._storages.interface import AsyncStorage, Batch, Storage
    from credici_redis.models import BalanceEvent, TransferRecovery

R = TypeVar("R")
T = TypeVar("T")
Client = TypeVar("Client", "CrediciClient", "AsyncCrediciClient")

SCOPE = "credici_redis"


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


class _Instruments:
    def __init__(self, meter_provider: Any, tracer_provider: Any) -> None:
        metrics = extras.need("opentelemetry.metrics", feature="telemetry", extra="telemetry")
        trace = extras.need("opentelemetry.trace", feature="telemetry", extra="telemetry")
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(SCOPE)
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

    def one(self, span: Any, op: Operation[Any, Any], started: float, error: Any) -> None:
        """A single call ended: with `error` (None: it succeeded)."""
        self.done(span, op, started, [outcome_of(error)])

    def many(
        self, span: Any, op: Operation[Any, Any], started: float, items: int, results: Any
    ) -> None:
        """A batch ended: `results` (each item's result or error), or the error of all."""
        if isinstance(results, BaseException):
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
        started = time.perf_counter()
        with self._i.start(op, req) as span:
            try:
                result = self.inner.execute(op, req)
            except BaseException as exc:
                self._i.one(span, op, started, exc)
                raise  # the span records it (OpenTelemetry's own handling)
            self._i.one(span, op, started, None)
            return result

    def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]:
        started = time.perf_counter()
        with self._i.start(op, None, items=len(reqs)) as span:
            try:
                results = self.inner.execute_many(op, reqs)
            except BaseException as exc:
                self._i.many(span, op, started, len(reqs), exc)
                raise
            self._i.many(span, op, started, len(reqs), results)
            return results

    def scan_users(self, batch: int) -> Iterator[list[str]]:
        return self.inner.scan_users(batch)

    def events(self, group: str, consumer: str, reading: EventReading) -> Iterator[BalanceEvent]:
        return self.inner.events(group, consumer, reading)

    def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        return self.inner.recover_transfers(now_ms, older_than_ms)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # the wrapped storage's own (ledger, redis, ...)
        return getattr(self.inner, name)


class AsyncInstrumentedStorage:
    """An `AsyncStorage` that measures every call of the storage it wraps."""

    def __init__(self, inner: AsyncStorage, instruments: _Instruments) -> None:
        self.inner, self._i = inner, instruments

    async def execute(self, op: Operation[R, T], req: R) -> T:
        started = time.perf_counter()
        with self._i.start(op, req) as span:
            try:
                result = await self.inner.execute(op, req)
            except BaseException as exc:
                self._i.one(span, op, started, exc)
                raise
            self._i.one(span, op, started, None)
            return result

    async def execute_many(self, op: Operation[R, T], reqs: Batch[R]) -> list[T | CrediciError]:
        started = time.perf_counter()
        with self._i.start(op, None, items=len(reqs)) as span:
            try:
                results = await self.inner.execute_many(op, reqs)
            except BaseException as exc:
                self._i.many(span, op, started, len(reqs), exc)
                raise
            self._i.many(span, op, started, len(reqs), results)
            return results

    def scan_users(self, batch: int) -> AsyncIterator[list[str]]:
        return self.inner.scan_users(batch)

    def events(
        self, group: str, consumer: str, reading: EventReading
    ) -> AsyncIterator[BalanceEvent]:
        return self.inner.events(group, consumer, reading)

    async def recover_transfers(self, now_ms: int | None, older_than_ms: int) -> TransferRecovery:
        return await self.inner.recover_transfers(now_ms, older_than_ms)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def instrument(
    client: Client, *, meter_provider: Any = None, tracer_provider: Any = None
) -> Client:
    """Measure every call `client` makes from now on (see the module's docstring); returns it.
    Calling it twice measures once."""
    from credici_redis._clients.client_async import AsyncCrediciClient

    storage: Any = client.storage
    if isinstance(storage, (InstrumentedStorage, AsyncInstrumentedStorage)):
        return client
    instruments = _Instruments(meter_provider, tracer_provider)
    if isinstance(client, AsyncCrediciClient):
        client.storage = AsyncInstrumentedStorage(storage, instruments)
    else:
        client.storage = InstrumentedStorage(storage, instruments)
    return client
