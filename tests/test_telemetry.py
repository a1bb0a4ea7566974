"""Telemetry (issue 20): after a known workload, the metrics say how many calls of each
operation had each outcome, the durations were recorded, and every call had its span with the
script and the user's slot, never a user id in a metric. Read with the OpenTelemetry SDK's
in-memory readers; sync and asyncio clients on real Redis."""

from __future__ import annotations

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
from tests.conftest import REDIS_URL, SyncAsAsync


def counts(reader: InMemoryMetricReader) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """(calls by (operation, outcome), duration samples by operation)."""
    calls: dict[tuple[str, str], int] = {}
    samples: dict[str, int] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    assert set(attrs) == {"operation", "outcome"}  # no user id, ever
                    if metric.name == "credici.operations":
                        key = (str(attrs["operation"]), str(attrs["outcome"]))
                        calls[key] = calls.get(key, 0) + int(point.value)  # type: ignore[union-attr]
                    elif metric.name == "credici.operation.duration":
                        operation = str(attrs["operation"])
                        samples[operation] = samples.get(operation, 0) + point.count  # type: ignore[union-attr]
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
