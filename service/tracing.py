"""OpenTelemetry traces of inference requests, exported over OTLP/HTTP by the OpenTelemetry SDK (its batch span
processor, its exporter, its W3C trace-context propagator: nothing hand-written on the wire).

Off by default, and then free: a front end tests `tracing.on` (one attribute) and passes no handle, so the request
path makes no span object and does no context work; the SDK is not even imported until tracing is first switched on
(at start, or later through the trace settings extension). On, a front end asks `begin(model, carrier, protocol)`
for a handle: `carrier` is its incoming metadata as a mapping or (key, value) pairs (gRPC invocation metadata,
HTTP headers), from which the SDK's propagator takes `traceparent` / `tracestate`. Which requests are traced
follows Triton's trace settings (service.trace_settings): the level, one in `trace_rate`, while `trace_count`
lasts; a request whose caller sent a sampled traceparent is always traced, as in Triton, and one whose caller
sent an unsampled traceparent never is (the caller's sampling decision stands, as W3C trace context means it).

A traced request is one server span, `ModelInfer` (attributes model_name, model_version, request_id as Triton
names them, plus protocol, batch_size and status), with child spans `queue` (enqueued until its batch started),
`compute` (merge, onnxruntime, split; batch_size and batch_requests of the batch it ran in) and `encode` (the
front end's reply). A failed request's span has status ERROR and the error kind in `status`.

Exporter settings: `--trace-config opentelemetry,url=URL` (else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT /
OTEL_EXPORTER_OTLP_ENDPOINT, as the SDK reads them; else http://localhost:4318/v1/traces), `opentelemetry,resource=
key=value` over OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME (service.name defaults to deepserve), and
`opentelemetry,bsp_*` over the SDK's OTEL_BSP_* variables."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

from service import __version__
from service.errors import kind_of
from service.trace_settings import TraceConfig, TraceSettings

log = logging.getLogger("deepserve.tracing")
_BSP = {"bsp_max_queue_size": "max_queue_size", "bsp_schedule_delay": "schedule_delay_millis",
        "bsp_max_export_batch_size": "max_export_batch_size"}


class Tracing:
    def __init__(self, config: TraceConfig | None = None) -> None:
        self.settings = TraceSettings(config or TraceConfig())
        self.on = False  # the one attribute the request path tests
        self._provider: Any = None
        self._tracer: Any = None
        self._refresh()

    # --- settings (Triton's trace extension), shared by both front ends through the data plane --------------------
    def get(self, model: str = "") -> dict:
        return self.settings.get(model)

    def update(self, model: str, changes: Mapping) -> dict:
        """Takes effect at once: the next request is sampled by the new setting."""
        out = self.settings.update(model, changes)
        self._refresh()
        return out

    def _refresh(self) -> None:
        if self.settings.on and self._tracer is None:
            self._start()
        self.on = self.settings.on

    def _start(self) -> None:
        """Build the SDK pipeline, the first time tracing is switched on (imports cost ~0.4 s, so not before)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        config = self.settings.config
        resource = Resource.create(dict(config.resource))  # flags over OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "deepserve"}))
        exporter = OTLPSpanExporter(endpoint=config.otel.get("url") or None)
        batching = {arg: int(config.otel[key]) for key, arg in _BSP.items() if key in config.otel}
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, **batching))
        self._tracer = self._provider.get_tracer("deepserve", __version__)
        log.info("tracing on: OTLP/HTTP spans to %s as service %s",
                 config.otel.get("url") or "the OTEL_EXPORTER_OTLP_* endpoint", resource.attributes.get(SERVICE_NAME))

    def close(self) -> None:
        """Flush what is queued (on shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()

    # --- the request path ---------------------------------------------------------------------------------------
    def begin(self, model: str, carrier: Mapping | Iterable[tuple[str, str]] | None, protocol: str) -> Trace | None:
        """A handle for this request when it is to be traced, else None. Call only when `on`. A Mapping carrier
        must answer lower-case names (gRPC metadata keys are; HTTP header mappings match without case); pairs are
        lower-cased here."""
        from opentelemetry import propagate
        from opentelemetry import trace as otel

        setting = self.settings.of(model)
        if not setting.level:
            return None
        if not isinstance(carrier, Mapping):
            carrier = {k.lower(): v for k, v in carrier or ()}
        context = propagate.extract(carrier)  # a fresh context: the caller's span, or none
        parent = otel.get_current_span(context).get_span_context()
        if parent.is_valid:
            if not parent.trace_flags.sampled:
                return None
        elif not setting.sample():
            return None
        offset = time.time_ns() - time.perf_counter_ns()  # one clock for the request's spans: ordered exactly
        span = self._tracer.start_span("ModelInfer", context=context, kind=otel.SpanKind.SERVER,
                                       attributes={"model_name": model, "protocol": protocol},
                                       start_time=time.perf_counter_ns() + offset)
        return Trace(self._tracer, span, otel.set_span_in_context(span), setting.tensors, offset)


class Trace:
    """One traced request: the server span and the calls the layers make on it. Times from the batcher are
    perf_counter_ns; `offset` turns them into the epoch nanoseconds spans carry."""

    __slots__ = ("tracer", "span", "context", "tensors", "offset")

    def __init__(self, tracer, span, context, tensors: bool, offset: int) -> None:
        self.tracer, self.span, self.context, self.tensors, self.offset = tracer, span, context, tensors, offset

    def admitted(self, version: str, rows: int, inputs: Iterable = ()) -> None:
        """The data plane found the version and checked the inputs (at level TENSORS: which they are, as sent)."""
        self.span.set_attributes({"model_version": version, "batch_size": rows})
        if self.tensors:
            for t in inputs:
                self.span.add_event("TENSOR_QUEUE_INPUT", {"name": t.name, "datatype": t.datatype,
                                                           "shape": list(t.shape)})

    def answered(self, outputs: Iterable) -> None:
        if self.tensors:
            for out in outputs:
                self.span.add_event("TENSOR_BACKEND_OUTPUT", {"name": out.name, "datatype": out.datatype,
                                                              "shape": list(out.shape)})

    def ran(self, enqueued: int, started: int, ended: int, rows: int, requests: int, t_in: int, t_run: int,
            t_out: int) -> None:
        """The batcher ran this request: queue wait and compute, in the batch it ran in (perf_counter_ns)."""
        self._child("queue", enqueued, started, {})
        self._child("compute", started, ended, {"batch_size": rows, "batch_requests": requests,
                                                "compute_input_ns": t_in, "compute_infer_ns": t_run,
                                                "compute_output_ns": t_out})

    @contextmanager
    def encoding(self):
        """Around the front end's conversion of the response to its wire format."""
        t0 = time.perf_counter_ns()
        try:
            yield
        finally:
            self._child("encode", t0, time.perf_counter_ns(), {})

    def _child(self, name: str, start: int, end: int, attributes: dict) -> None:
        span = self.tracer.start_span(name, context=self.context, start_time=start + self.offset,
                                      attributes=attributes)
        span.end(end_time=end + self.offset)

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """End the server span with the request's status (the error kind, as the front ends map it)."""
        from opentelemetry.trace import Status, StatusCode

        if exc is None:
            self.span.set_attribute("status", "OK")
        else:
            status = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else kind_of(exc)
            self.span.set_attribute("status", status)
            first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
            self.span.set_status(Status(StatusCode.ERROR, f"{status}: {first}"))
        self.span.end(end_time=time.perf_counter_ns() + self.offset)
        return False
