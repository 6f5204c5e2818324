"""OpenTelemetry traces: one trace per conversion, from the API (or producer) to each attempt.

Off by default, and then free: every helper here returns at once and no OpenTelemetry module
is imported. `configure()` turns tracing on from the standard environment variables:

- `OTEL_SDK_DISABLED=true`: off, whatever else is set;
- `OTEL_TRACES_EXPORTER` set and not `none`: on, with that exporter (`otlp`, `console`, or any
  installed `opentelemetry_traces_exporter` entry point);
- else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` set: on, OTLP.

`otlp` follows `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` (default http/protobuf). The SDK reads
the rest itself (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*`, the exporter's endpoint and headers). A host application that set up its own
SDK calls `enable()` instead.

Each accepted event carries its W3C `traceparent` (`ConversionEvent.trace_context`, stored on
its conversion row and copied to its postbacks), so intake, attribution, rendering, every
attempt and its recording join the conversion's trace, in whichever worker, however late.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

log = logging.getLogger(__name__)

Attributes = Mapping[str, Any]
# At most this many links from a batch span to the traces of its conversions.
MAX_LINKS = 32

_lock = threading.Lock()
_tracer: Any = None  # an OpenTelemetry Tracer once on
_configured_pid = -1
# The per-conversion spans open in this context (conversion id -> span), see `items`.
_open_items: ContextVar[Mapping[str, Any] | None] = ContextVar("postback_items", default=None)


def on() -> bool:
    return _tracer is not None


def env_wants_tracing(env: Mapping[str, str] | None = None) -> str | None:
    """The traces exporter the environment asks for, or None (tracing off)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        first = exporter.split(",")[0].strip()
        return None if first == "none" else first
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return None


def configure(service_name: str = "postback-worker", *, instrument_celery: bool = False) -> bool:
    """Turn tracing on if the environment asks for it (once per process); True when on.

    `instrument_celery`: task spans and header propagation by opentelemetry-instrumentation-
    celery (workers; publishers that use `send_task` add `headers()` themselves)."""
    global _configured_pid
    exporter = env_wants_tracing()
    if exporter is None:
        return on()
    with _lock:
        if _configured_pid == os.getpid() or on():
            return on()
        _configured_pid = os.getpid()
        try:
            provider = _sdk_provider(exporter, service_name)
        except Exception as exc:  # noqa: BLE001 - tracing must never stop the service
            log.warning("tracing not started (OTEL_* settings): %s", exc)
            return False
    enable(provider, instrument_celery=instrument_celery)
    return True


def _sdk_provider(exporter_name: str, service_name: str) -> Any:
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = exporter_name
    if name == "otlp":
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        name = "otlp_proto_grpc" if protocol.strip() == "grpc" else "otlp_proto_http"
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise RuntimeError(f"no traces exporter {name!r} is installed "
                           "(pip install 'postback-worker[otel]')")
    exporter_cls = next(iter(found)).load()
    explicit = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if explicit else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter_cls()))
    return provider


def enable(provider: Any = None, *, instrument_celery: bool = False) -> None:
    """Turn tracing on with `provider` (default: the global one, which becomes `provider`
    when given and none is set yet); instruments Celery's task spans and headers."""
    global _tracer
    from opentelemetry import trace

    if provider is not None:
        current = trace.get_tracer_provider()
        if type(current).__name__ == "ProxyTracerProvider":
            trace.set_tracer_provider(provider)
    else:
        provider = trace.get_tracer_provider()
    _tracer = provider.get_tracer("postback_worker")
    if instrument_celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        instrumentor = CeleryInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)
        _instrument_extras(provider)


def _instrument_extras(provider: Any) -> None:
    """A span per Redis command (opentelemetry-instrumentation-redis) only when
    POSTBACK_OTEL_INSTRUMENT=redis: off by default (it also traces the broker's own commands).
    SQLAlchemy's instrumentation is not offered: its release declares SQLAlchemy < 2.1 and
    fails on 2.1 without greenlet (docs/tracing.md)."""
    wanted = {w.strip().lower() for w in
              os.environ.get("POSTBACK_OTEL_INSTRUMENT", "").split(",") if w.strip()}
    if wanted - {"redis"}:
        log.warning("POSTBACK_OTEL_INSTRUMENT: unknown %s (known: redis)",
                    ", ".join(sorted(wanted - {"redis"})))
    if "redis" in wanted:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        if not RedisInstrumentor().is_instrumented_by_opentelemetry:
            RedisInstrumentor().instrument(tracer_provider=provider)


def disable() -> None:
    """Turn tracing off in this process (tests)."""
    global _tracer, _configured_pid
    if _tracer is not None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        instrumentor = CeleryInstrumentor()
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
    _tracer = None
    _configured_pid = -1


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered (e.g. before a process exits)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    force = getattr(provider, "force_flush", None)
    if force is not None:
        force(timeout_ms)


# -- context --------------------------------------------------------------------------------


def traceparent() -> str | None:
    """The current span's W3C traceparent (None when off or outside any span)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def stamp(events: Sequence[Any]) -> list[Any]:
    """The events (dataclasses with `trace_context`) carrying the current span's traceparent
    (unchanged when off or outside any span)."""
    parent = traceparent()
    if parent is None:
        return list(events)
    from dataclasses import replace

    return [e if e.trace_context else replace(e, trace_context=parent) for e in events]


def headers() -> dict[str, str]:
    """W3C trace context headers for an outgoing message (empty when off)."""
    if _tracer is None:
        return {}
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


_contexts: dict[str, Any] = {}


def _context(parent: str | None) -> Any:
    """An OpenTelemetry Context whose parent is the span a traceparent names (None: current)."""
    if not parent:
        return None
    ctx = _contexts.get(parent)
    if ctx is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if len(_contexts) >= 4096:
            _contexts.clear()
        ctx = _contexts[parent] = TraceContextTextMapPropagator().extract(
            {"traceparent": parent})
    return ctx


def _unsampled(parent: str | None) -> bool:
    """A stored traceparent whose trace was not sampled: its spans are skipped outright."""
    return parent is not None and parent.endswith("-00")


# -- spans ----------------------------------------------------------------------------------


class _Noop:
    """What the span helpers hand out when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> _Noop:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def set(self, item: str, key: str, value: Any) -> None:
        return None


NOOP = _Noop()


def span(name: str, attributes: Attributes | None = None, *, parent: str | None = None,
         item: str | None = None, kind: str = "internal") -> Any:
    """A context manager for one span (a no-op when off). Its parent: the open per-item span
    of `item` (see `items`), else the span `parent` names (a stored traceparent), else the
    current span. Yields an object with `set_attribute`."""
    if _tracer is None:
        return NOOP
    from opentelemetry import trace

    if item is not None:  # a step of one conversion of the batch `items` has open
        opened = _open_items.get()
        if opened is None or item not in opened:
            return NOOP  # that conversion is not traced (its trace was not sampled)
        return _Leaf(_tracer.start_span(name, context=trace.set_span_in_context(opened[item]),
                                        attributes=attributes))
    if _unsampled(parent):
        return NOOP
    return _tracer.start_as_current_span(name, context=_context(parent), attributes=attributes,
                                         kind=getattr(trace.SpanKind, kind.upper()))


class _Leaf:
    """A span with no children: not made current (cheaper), ended on exit."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def __enter__(self) -> Any:
        return self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            from opentelemetry.trace import StatusCode

            self.span.record_exception(exc)
            self.span.set_status(StatusCode.ERROR, str(exc))
        self.span.end()


def items(name: str, rows: Sequence[Mapping[str, Any]],
          attributes: Attributes | None = None) -> Any:
    """One span per row (a conversion of a batch: its `id` and stored `trace_context`), each
    a child of its own traceparent, open together for the block; `span(..., item=id)` nests
    under them. A batch span around the block (child of the current span) links to the rows'
    traces. Yields an object with `set(item, key, value)`; a no-op when off."""
    if _tracer is None or not rows:
        return NOOP
    parents = {r["id"]: r.get("trace_context") for r in rows
               if not _unsampled(r.get("trace_context"))}
    return _items(name, parents, attributes) if parents else NOOP


class _Items:
    def __init__(self, spans: dict[str, Any]) -> None:
        self.spans = spans

    def set(self, item: str, key: str, value: Any) -> None:
        s = self.spans.get(item)
        if s is not None and value is not None:
            s.set_attribute(key, value)


@contextmanager
def _items(name: str, parents: Mapping[str, str | None],
           attributes: Attributes | None) -> Iterator[_Items]:
    from opentelemetry import trace

    contexts = {p: _context(p) for p in set(parents.values()) if p}
    links = [trace.Link(trace.get_current_span(c).get_span_context())
             for c in list(contexts.values())[:MAX_LINKS]]
    batch_attrs = {**(attributes or {}), "postback.batch.size": len(parents)}
    with _tracer.start_as_current_span(name.rsplit(".", 1)[0] + ".batch", links=links,
                                       attributes=batch_attrs) as batch:
        link = [trace.Link(batch.get_span_context())]
        spans = {
            item: _tracer.start_span(name, context=contexts.get(p or ""), links=link,
                                     attributes={**(attributes or {}), ITEM_KEY: item})
            for item, p in parents.items()
        }
        token = _open_items.set(spans)
        try:
            yield _Items(spans)
        except BaseException as exc:
            for s in spans.values():
                s.record_exception(exc)
                s.set_status(trace.StatusCode.ERROR, str(exc))
            raise
        finally:
            _open_items.reset(token)
            for s in spans.values():
                s.end()


ITEM_KEY = "postback.conversion.id"


def each(name: str, parents: Sequence[tuple[str | None, Attributes]]) -> Any:
    """One span per (traceparent, attributes), all open for the block (e.g. recording a group
    of answers in one transaction); a no-op when off."""
    if _tracer is None:
        return NOOP
    parents = [(p, a) for p, a in parents if not _unsampled(p)]
    return _each(name, parents) if parents else NOOP


@contextmanager
def _each(name: str, parents: Sequence[tuple[str | None, Attributes]]) -> Iterator[None]:
    from opentelemetry import trace

    contexts: dict[str, Any] = {}
    spans = []
    for p, attrs in parents:
        if p and p not in contexts:
            contexts[p] = _context(p)
        spans.append(_tracer.start_span(name, context=contexts.get(p or ""),
                                        attributes=attrs))
    try:
        yield None
    except BaseException as exc:
        for s in spans:
            s.set_status(trace.StatusCode.ERROR, str(exc))
        raise
    finally:
        for s in spans:
            s.end()


def finished(name: str, parent: str | None, start_ns: int, end_ns: int,
             attributes: Attributes, *, error: str | None = None,
             kind: str = "client") -> None:
    """A span for something already over (an HTTP attempt timed by the sender)."""
    if _tracer is None or _unsampled(parent):
        return
    from opentelemetry import trace

    s = _tracer.start_span(name, context=_context(parent), attributes=attributes,
                           kind=getattr(trace.SpanKind, kind.upper()), start_time=start_ns)
    if error:
        s.set_status(trace.StatusCode.ERROR, error)
    s.end(end_time=end_ns)
