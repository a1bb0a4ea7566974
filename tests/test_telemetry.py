"""Telemetry (issue 20): after a known workload, the metrics say how many calls of each
operation had each outcome, the durations were recorded, and every call had its span with the
script and the user's slot, never a user id in a metric. Read with the OpenTelemetry SDK's
in-memory readers; sync and asyncio clients on real Redis."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from credici_redis import (
    AsyncCrediciClient,
    CrediciClient,
    IdempotencyConflictError,
    InsufficientCreditsError,
)
from credici_redis._core.keys import user_slot
from credici_redis.telemetry import instrument, outcome_of
from tests.conftest import (
    POSTGRES_URL,
    REDIS_URL,
    FakeClock,
    SyncAsAsync,
    spin,
)


def sums(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, Any], ...]], float]:
    """Every counter's and gauge's value, by (metric, its attributes); a histogram's count."""
    found: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = tuple(sorted(dict(point.attributes or {}).items()))
                    value = getattr(point, "value", None)
                    found[(metric.name, attrs)] = (
                        getattr(point, "count", 0) if value is None else value
                    )
    return found


def counts(reader: InMemoryMetricReader) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """(calls by (operation, outcome), duration samples by operation)."""
    calls: dict[tuple[str, str], int] = {}
    samples: dict[str, int] = {}
    for (name, attributes), value in sums(reader).items():
        attrs = dict(attributes)
        if name.startswith("credici.operation"):
            assert set(attrs) == {"operation", "outcome"}  # no user id, ever
        if name == "credici.operations":
            key = (str(attrs["operation"]), str(attrs["outcome"]))
            calls[key] = calls.get(key, 0) + int(value)
        elif name == "credici.operation.duration":
            operation = str(attrs["operation"])
            samples[operation] = samples.get(operation, 0) + int(value)
    return calls, samples


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_metrics_and_spans_of_a_known_workload(api: str, namespace: str, user: str) -> None:
    reader = InMemoryMetricReader()
    spans = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(spans))
    made: Any = (
        CrediciClient.from_url(REDIS_URL, namespace=namespace)
        if api == "sync"
        else AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)
    )
    instrument(made, meter_provider=MeterProvider(metric_readers=[reader]), tracer_provider=tracing)
    instrument(made)  # twice: measured once
    client = SyncAsAsync(made) if api == "sync" else made
    try:
        await client.add(user, 100)
        await client.subtract(user, 30, idempotency_key="k")
        await client.subtract(user, 30, idempotency_key="k")  # a keyed retry: ok again
        with pytest.raises(IdempotencyConflictError):
            await client.subtract(user, 31, idempotency_key="k")
        with pytest.raises(InsufficientCreditsError):
            await client.subtract(user, 1000)
        results = await client.subtract_many([(user, 10), (user, 10), (user, 1000)])
        assert isinstance(results[2], InsufficientCreditsError)
        assert await client.get_balance(user) == 50
    finally:
        if api == "sync":
            made.close()
        else:
            await made.aclose()
    calls, samples = counts(reader)
    assert calls == {
        ("add", "ok"): 1,
        ("subtract", "ok"): 4,  # two single calls, two batch items
        ("subtract", "conflict"): 1,
        ("subtract", "insufficient"): 2,  # a single call, a batch item
        ("balance", "ok"): 1,
    }
    assert samples == {"add": 1, "subtract": 5, "balance": 1}  # a batch is one sample
    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == [
        "credici add", "credici subtract", "credici subtract", "credici subtract",
        "credici subtract", "credici subtract", "credici balance",
    ]  # fmt: skip
    single = finished[1].attributes or {}
    assert single["credici.script"] == "subtract" and single["credici.slot"] == user_slot(user)
    assert single["credici.outcome"] == "ok"
    assert (finished[3].attributes or {})["credici.outcome"] == "conflict"
    assert (finished[4].attributes or {})["credici.outcome"] == "insufficient"
    assert not finished[4].status.is_ok  # the refusal is recorded on its span
    assert (finished[5].attributes or {})["credici.items"] == 3
    assert (finished[5].attributes or {})["credici.outcome"] == "mixed"
    assert all(user not in str(dict(s.attributes or {})) for s in finished)


def test_outcomes_are_named_by_the_error() -> None:
    from credici_redis import OutcomeUnknownError, RateLimitedError, StorageUnavailableError

    assert outcome_of(None) == "ok"
    assert outcome_of(StorageUnavailableError("down")) == "unavailable"
    assert outcome_of(OutcomeUnknownError("lost")) == "outcome_unknown"
    assert outcome_of(RateLimitedError("u", 1, None)) == "limited"
    assert outcome_of(ValueError("x")) == "error"


def test_nothing_of_opentelemetry_is_imported_when_off() -> None:
    """Until instrument() is called, credici imports nothing of OpenTelemetry (redis-py 8 may
    import it on its own, where it is installed: counted before)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from credici_redis import CrediciClient\n"
        "with CrediciClient.from_url('memory://') as c:\n"
        "    c.add('u', 1)\n"
        "def otel(): return {m for m in sys.modules if m.startswith('opentelemetry')}\n"
        "before = otel()\n"
        "import credici_redis.console, credici_redis.telemetry\n"
        "assert otel() == before, sorted(otel() - before)\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "c = credici_redis.telemetry.instrument(CrediciClient.from_url('memory://'))\n"
        "assert 'opentelemetry.metrics' in sys.modules\n"
        "c.close()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_catch_up_steps_are_counted_by_operation_and_script(
    namespace: str, clock: FakeClock
) -> None:
    """200 buckets expiring together: a read catches up in bounded steps (64 events at most
    each), every step counted."""
    reader = InMemoryMetricReader()
    client = CrediciClient.from_url(REDIS_URL, namespace=namespace, clock=clock)
    instrument(client, meter_provider=MeterProvider(metric_readers=[reader]))
    with client:
        client.add_many([("u", 1, clock.now + timedelta(hours=1)) for _ in range(200)])
        clock.advance(timedelta(hours=2))
        assert (
            sums(reader).get(
                ("credici.catchup.steps", (("operation", "balance"), ("script", "balance")))
            )
            is None
        )
        assert client.get_balance("u") == 0
    steps = sums(reader)[
        ("credici.catchup.steps", (("operation", "balance"), ("script", "balance")))
    ]
    assert 200 // 64 <= steps <= 200 // 8  # at most 64 events a step, at least 8


def test_retries_after_an_outage_are_counted(busy_redis: int) -> None:
    """A call that meets BUSY (another client's long script) goes again with retries=N: each
    retry is counted under the operation's name, and the call itself once, ok."""
    reader = InMemoryMetricReader()
    url = f"redis://127.0.0.1:{busy_redis}/0"
    client = CrediciClient.from_url(url, namespace="t", retries=50)
    instrument(client, meter_provider=MeterProvider(metric_readers=[reader]))
    with client:
        client.add("u", 10)

        spinning = spin(busy_redis, 1000)  # running past the threshold: BUSY
        try:
            assert client.subtract("u", 3).balance_after == 7
        finally:
            spinning.join()
    found = sums(reader)
    assert found[("credici.retries", (("operation", "subtract"),))] >= 1
    assert found[("credici.operations", (("operation", "subtract"), ("outcome", "ok")))] == 1


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_events_delivered_acknowledged_and_pending(api: str, namespace: str) -> None:
    reader = InMemoryMetricReader()
    made: Any = (
        CrediciClient.from_url(REDIS_URL, namespace=namespace)
        if api == "sync"
        else AsyncCrediciClient.from_url(REDIS_URL, namespace=namespace)
    )
    instrument(made, meter_provider=MeterProvider(metric_readers=[reader]))
    client = SyncAsAsync(made) if api == "sync" else made
    try:
        for user in ("a", "b"):
            await client.add(user, 10)
            await client.set_low_balance_threshold(user, 5)
            await client.subtract(user, 6)  # below 5: low_balance
        await client.subtract("b", 4)  # to 0: depleted
        events = made.events(idle_timeout=0.5, poll=0.05)
        seen = []
        if api == "sync":
            for event in events:
                seen.append(event.kind)
                if len(seen) == 1:  # handed over, not yet acknowledged
                    assert sums(reader)[("credici.events.pending", ())] == 3
        else:
            async for event in events:
                seen.append(event.kind)
                if len(seen) == 1:
                    assert sums(reader)[("credici.events.pending", ())] == 3
    finally:
        if api == "sync":
            made.close()
        else:
            await made.aclose()
    assert sorted(seen) == ["depleted", "low_balance", "low_balance"]
    found = sums(reader)
    assert found[("credici.events.delivered", (("kind", "low_balance"),))] == 2
    assert found[("credici.events.delivered", (("kind", "depleted"),))] == 1
    assert found[("credici.events.acknowledged", ())] == 3
    assert found[("credici.events.pending", ())] == 0


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_archiver_passes_and_lag(api: str, namespace: str) -> None:
    """Entries archived are counted, and the lag read after a pass (lag_every=0) is the
    archiver's own: what waits before the pass, nothing after it."""
    from credici_redis.archive import Archiver, AsyncArchiver

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    with CrediciClient.from_url(REDIS_URL, namespace=namespace) as client:
        for user in ("a", "b", "c"):
            client.add(user, 5)
            client.subtract(user, 1)
    if api == "sync":
        with Archiver(REDIS_URL, POSTGRES_URL, namespace=namespace, keep=timedelta(0)) as job:
            instrument(job, meter_provider=meters, lag_every=0)
            assert job.lag().entries_pending == 6
            assert sums(reader)[("credici.archive.pending.entries", ())] == 6
            assert sums(reader)[("credici.archive.pending.users", ())] == 3
            stats = job.run_once()
    else:
        async with AsyncArchiver(
            REDIS_URL, POSTGRES_URL, namespace=namespace, keep=timedelta(0)
        ) as ajob:
            instrument(ajob, meter_provider=meters, lag_every=0)
            assert (await ajob.lag()).entries_pending == 6
            assert sums(reader)[("credici.archive.pending.entries", ())] == 6
            stats = await ajob.run_once()
    assert stats.entries == 6
    found = sums(reader)
    assert found[("credici.archive.entries", ())] == 6
    assert found[("credici.archive.pass.duration", ())] == 1
    assert found[("credici.archive.pending.entries", ())] == 0  # read again after the pass
    assert found[("credici.archive.lag", ())] == 0
