"""Traces: one trace per conversion, from the API request to every attempt and its recording,
across the API process and a real Celery worker process; nothing at all when tracing is off."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import requests
from conftest import ADMIN, ROOT, Proc, wait_until
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.helpers import add_click, add_offer, add_partner, conversion, messages, run_due
from support.otlp import OtlpReceiver
from support.partner import PartnerServer

from postback_worker import tracing
from postback_worker.domain.masking import mask_url
from postback_worker.pipeline.processing import Pipeline
from postback_worker.settings import Settings
from postback_worker.store.repo import Store

# One provider for the test process (OpenTelemetry sets the global provider only once).
EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))

# A caller's trace (the backend service that posts the conversion).
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
OTHER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, spans kept in memory."""
    EXPORTER.clear()
    tracing.enable(PROVIDER)
    yield EXPORTER
    tracing.disable()
    EXPORTER.clear()


def hex_trace(s: ReadableSpan) -> str:
    assert s.context is not None
    return f"{s.context.trace_id:032x}"


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


# -- switching on -----------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "exporter"), [
    ({}, None),
    ({"OTEL_SERVICE_NAME": "pw"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "otlp,console"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, None),
    ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
])
def test_what_turns_tracing_on(env: dict[str, str], exporter: str | None) -> None:
    assert tracing.env_wants_tracing(env) == exporter


OFF_PROBE = """
import sys
import redis  # redis-py 8 imports OpenTelemetry itself when it is installed: not ours to count
before = set(sys.modules)
from postback_worker import tracing
from postback_worker.api.app import create_app
from postback_worker.worker.app import start_tracing
from postback_worker.settings import Settings
from postback_worker.producer import Producer
settings = Settings.build(database_url="sqlite://", redis_url="redis://127.0.0.1:1/0")
create_app(settings)
start_tracing()
events = Producer(settings).validate([{"transaction_id": "tx1"}])
with tracing.items("conversion.intake", [{"id": "c1", "trace_context": None}]) as t:
    with tracing.span("conversion.attribute", item="c1") as s:
        s.set_attribute("k", "v")
    t.set("c1", "k", "v")
with tracing.each("postback.record", [(None, {})]):
    pass
tracing.finished("postback.attempt", None, 0, 1, {})
assert events[0].trace_context is None and "trace_context" not in events[0].to_message()
assert not tracing.on()
print(sorted(m for m in set(sys.modules) - before if m.startswith("opentelemetry")))
"""


def test_off_by_default_imports_no_opentelemetry() -> None:
    """Without OTEL_* settings the API, the worker's hooks, the producer and every span helper
    run without importing a single OpenTelemetry module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", OFF_PROBE], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    # The same probe with an endpoint set does load the SDK (the probe can fail otherwise).
    on = subprocess.run([sys.executable, "-c", OFF_PROBE.replace(
        "assert not tracing.on()", "assert tracing.on()")],
        env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, cwd=ROOT,
        capture_output=True, text=True, timeout=60)
    assert on.returncode == 0, on.stderr
    assert "opentelemetry.sdk.trace" in on.stdout


# -- in one process: the pipeline -----------------------------------------------------------

def test_each_conversion_of_a_batch_joins_its_own_trace(
        pipeline: Pipeline, store: Store, partner: PartnerServer, clock: object,
        spans: InMemorySpanExporter) -> None:
    """Two conversions accepted by two requests, processed in one batch, retried later: every
    span of each lands in that conversion's trace; the batch span links to both."""
    add_offer(store)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    add_click(store, "tx2")
    partner.set_script([503, 200, 200])
    first = conversion("tx1", id="c_one")
    second = conversion("tx2", id="c_two")
    msgs = messages(first, second)
    msgs[0]["trace_context"], msgs[1]["trace_context"] = CALLER, OTHER
    pipeline.process_conversions(msgs)
    clock.advance(5)  # type: ignore[attr-defined]
    run_due(pipeline)
    assert store.get_conversion("c_one")["trace_context"] == CALLER  # type: ignore[index]
    assert {p["state"] for c in ("c_one", "c_two") for p in store.postbacks_for(c)} == \
        {"delivered"}

    for cid, parent in (("c_one", CALLER), ("c_two", OTHER)):
        trace_id = parent.split("-")[1]
        intake = [s for s in named(spans, "conversion.intake")
                  if s.attributes and s.attributes["postback.conversion.id"] == cid]
        assert len(intake) == 1 and hex_trace(intake[0]) == trace_id
        assert intake[0].parent is not None and \
            f"{intake[0].parent.span_id:016x}" == parent.split("-")[2]
        assert intake[0].attributes["postback.conversion.state"] == "attributed"  # type: ignore[index]
        attribute = [s for s in named(spans, "conversion.attribute") if hex_trace(s) == trace_id]
        render = [s for s in named(spans, "postback.render") if hex_trace(s) == trace_id]
        assert len(attribute) == 1 and len(render) == 1
        assert attribute[0].parent.span_id == intake[0].context.span_id  # type: ignore[union-attr]
        assert render[0].parent.span_id == intake[0].context.span_id  # type: ignore[union-attr]
        pb = store.postbacks_for(cid)[0]
        attempts = [s for s in named(spans, "postback.attempt") if hex_trace(s) == trace_id]
        records = [s for s in named(spans, "postback.record") if hex_trace(s) == trace_id]
        assert {s.attributes["postback.id"] for s in attempts} == {pb["id"]}  # type: ignore[index]
        assert len(attempts) == pb["attempts"] and len(records) == pb["attempts"]
    # One of the two got the 503 (they fire concurrently): its retry, handed out by the
    # sweep, is traced in its own conversion's trace too.
    retried = next(c for c in ("c_one", "c_two") if store.postbacks_for(c)[0]["attempts"] == 2)
    trace_id = (CALLER if retried == "c_one" else OTHER).split("-")[1]
    two = sorted((s for s in named(spans, "postback.attempt") if hex_trace(s) == trace_id),
                 key=lambda s: s.attributes["postback.attempt"])  # type: ignore[index]
    assert [s.attributes["http.response.status_code"] for s in two] == [503, 200]  # type: ignore[index]
    assert [s.attributes["postback.failure_class"] for s in two] == \
        ["partner_5xx", "delivered"]  # type: ignore[index]
    assert two[0].attributes["url.full"] == mask_url(  # type: ignore[index]
        store.postbacks_for(retried)[0]["url"])
    batch = named(spans, "conversion.batch")
    assert len(batch) == 1
    assert {f"{link.context.trace_id:032x}" for link in batch[0].links} == \
        {TRACE_ID, OTHER.split("-")[1]}


def test_untraced_conversions_are_processed_as_before(
        pipeline: Pipeline, store: Store, partner: PartnerServer) -> None:
    """Tracing off: no trace context stored, nothing else changes."""
    add_offer(store)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    pipeline.process_conversions(messages(conversion("tx1", id="c_plain")))
    assert store.get_conversion("c_plain")["trace_context"] is None  # type: ignore[index]
    assert [p["state"] for p in store.postbacks_for("c_plain")] == ["delivered"]


def test_an_unsampled_conversion_makes_no_spans(
        pipeline: Pipeline, store: Store, partner: PartnerServer,
        spans: InMemorySpanExporter) -> None:
    """A traceparent whose sampled flag is off (the caller sampled it out): the worker skips
    that conversion's spans, and traces its sampled neighbour in the same batch."""
    add_offer(store)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx1")
    add_click(store, "tx2")
    msgs = messages(conversion("tx1", id="c_out"), conversion("tx2", id="c_in"))
    msgs[0]["trace_context"] = OTHER[:-2] + "00"
    msgs[1]["trace_context"] = CALLER
    pipeline.process_conversions(msgs)
    assert {p["state"] for c in ("c_out", "c_in") for p in store.postbacks_for(c)} == \
        {"delivered"}
    # (the batch span, outside any task here, is a trace of its own: it links to c_in's)
    traces = {hex_trace(s) for s in spans.get_finished_spans() if s.name != "conversion.batch"}
    assert traces == {TRACE_ID}
    batch = named(spans, "conversion.batch")
    assert [f"{link.context.trace_id:032x}" for link in batch[0].links] == [TRACE_ID]
    assert len(named(spans, "postback.attempt")) == 1
    assert len(named(spans, "conversion.intake")) == 1


def test_an_unknown_exporter_leaves_tracing_off(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no_such_exporter")
    assert tracing.configure("postback-worker") is False
    assert not tracing.on()
    assert "no traces exporter 'no_such_exporter' is installed" in caplog.text
    tracing.disable()


# -- across processes: the API here, a real Celery worker there -------------------------------

def test_one_trace_spans_the_api_and_a_worker_process(
        settings: Settings, store: Store, partner: PartnerServer, redis_client: object,
        celery_procs: Callable[..., Proc], spans: InMemorySpanExporter,
        serve: Callable[[Settings], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend posts a conversion inside its own trace; the API (uvicorn in this process,
    in-memory exporter) and a Celery worker (its own process, OTLP/HTTP to a local receiver) put the
    request, intake, attribution, rendering, both attempts (503, then the retry beat's sweep
    hands out) and their recordings in that one trace."""
    add_offer(store)
    add_partner(store, "p1", partner.url)
    add_click(store, "tx_traced")
    partner.set_script([503])
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        celery_procs("worker", concurrency=1)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
        celery_procs("beat")
        api = serve(settings)  # uvicorn, in this process
        r = requests.post(f"{api}/v1/conversions", headers={**ADMIN, "traceparent": CALLER},
                          json={"transaction_id": "tx_traced", "payout": "3.00"}, timeout=10)
        assert r.status_code == 202, r.text
        cid = r.json()["ids"][0]
        wait_until(lambda: [p["state"] for p in store.postbacks_for(cid)] == ["delivered"],
                   60, message="the postback to be delivered after one retry")
        pb = store.postbacks_for(cid)[0]
        assert pb["attempts"] == 2 and pb["trace_context"].split("-")[1] == TRACE_ID

        def worker_spans_arrived() -> bool:
            return (len(receiver.named("postback.record", TRACE_ID)) == 2
                    and len(receiver.named("postback.attempt", TRACE_ID)) == 2)

        wait_until(worker_spans_arrived, 30, message="the worker's spans at the receiver")

        # The API process: the server span continues the caller's trace.
        server = [s for s in spans.get_finished_spans() if s.kind.name == "SERVER"]
        assert len(server) == 1, [s.name for s in spans.get_finished_spans()]
        assert server[0].name == "POST /v1/conversions" and hex_trace(server[0]) == TRACE_ID
        assert server[0].resource.attributes["service.name"] != "postback-worker"
        request_span = f"{server[0].context.span_id:016x}"  # type: ignore[union-attr]
        # The worker process: every step in the same trace, under the request's span (the
        # conversion travels in the journal; the wake-up task that took it serves many traces,
        # so its own span is not in this one).
        for name in ("conversion.intake", "conversion.attribute", "postback.render",
                     "postback.attempt", "postback.record"):
            got = receiver.named(name, TRACE_ID)
            assert got, f"no {name} span in the conversion's trace"
            assert {s.service for s in got} == {"postback-worker"}
        intake = receiver.named("conversion.intake", TRACE_ID)[0]
        assert intake.parent_id == request_span
        assert intake.attributes["postback.conversion.id"] == cid
        attempts = sorted(receiver.named("postback.attempt", TRACE_ID),
                          key=lambda s: s.attributes["postback.attempt"])
        assert [(s.attributes["http.response.status_code"], s.parent_id) for s in attempts] \
            == [(503, request_span), (200, request_span)]
        assert {s.attributes["postback.id"] for s in attempts} == {pb["id"]}
