"""Prometheus metrics, named and labelled as DESIGN.md says (base units, `_total` counters, histograms so replicas
aggregate). Label children are bound once per model version at load, so the request path never looks them up.

Counters and gauges that move on every request go through `Tally`: the request path adds plain integers, and
prometheus-client is told once per event-loop iteration (a Counter.inc costs ~1.3 us here, under its lock; a
dict update ~0.1 us). A scrape first has the loop write what is pending, so /metrics is never behind the replies
already sent."""

from __future__ import annotations

import asyncio
import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Request latencies on this class of service run from ~100 us to seconds.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MV = ("model", "version")


class Tally:
    """Per-request counter and gauge moves, summed per child and written once per event-loop iteration. `add` is
    called on the loop thread only; `flush` runs there too (a scrape asks the loop for it)."""

    def __init__(self) -> None:
        self._pending: dict = {}  # Counter or Gauge child -> amount not yet written
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0  # the loop's thread

    def add(self, child, amount: float = 1) -> None:
        pending = self._pending
        if not pending:  # the first move of this iteration: write them all at its end
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): write it now
                child.inc(amount)
                return
            if loop is not self._loop:
                self._loop, self._thread = loop, threading.get_ident()
            loop.call_soon(self.flush)
        pending[child] = pending.get(child, 0) + amount

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for child, amount in pending.items():
            if amount:
                child.inc(amount)

    def collect(self) -> list:
        """prometheus-client calls this (in its scrape thread) before it reads our metrics: have the loop write
        what is pending, and wait for it (a stopped or busy loop costs the scrape at most a second)."""
        loop = self._loop
        if self._pending and threading.get_ident() == self._thread:
            self.flush()
        elif self._pending and loop is not None and not loop.is_closed():
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(lambda: (self.flush(), done.set()))
            except RuntimeError:  # the loop closed meanwhile
                return []
            done.wait(1.0)
        return []

    def describe(self) -> list:
        return []


class Metrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.tally = Tally()
        registry.register(self.tally)  # before the metrics: a scrape collects in registration order
        self.requests = Counter("deepserve_requests", "Inference requests by status (gRPC code names, both protocols)",
                                [*MV, "code"], registry=registry)
        self.inferences = Counter("deepserve_inferences", "Samples inferred (a batch-8 request counts 8)",
                                  MV, registry=registry)
        self.executions = Counter("deepserve_executions", "Model executions (a dynamic batch counts 1)",
                                  MV, registry=registry)
        self.request_duration = Histogram("deepserve_request_duration_seconds", "Inference request duration",
                                          MV, buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_duration = Histogram("deepserve_queue_duration_seconds", "Time a request waited in the queue",
                                        MV, buckets=LATENCY_BUCKETS, registry=registry)
        self.compute_duration = Histogram("deepserve_compute_duration_seconds",
                                          "Time of one model execution (merge, run, split)",
                                          MV, buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("deepserve_batch_size", "Samples per model execution", MV,
                                    buckets=BATCH_BUCKETS, registry=registry)
        # Gauge modes only matter with --workers (prometheus-client multiprocess mode): how workers combine.
        self.pending = Gauge("deepserve_pending_requests", "Requests accepted and not yet answered", MV,
                             registry=registry, multiprocess_mode="livesum")
        self.load_duration = Gauge("deepserve_model_load_duration_seconds",
                                   "How long the last load of this version took", MV, registry=registry,
                                   multiprocess_mode="max")
        self.load_failures = Counter("deepserve_model_load_failures", "Failed model loads", ["model"],
                                     registry=registry)
        self.loads = Counter("deepserve_model_loads", "Model loads that left at least one version serving",
                             ["model"], registry=registry)
        self.evictions = Counter("deepserve_model_evictions", "Models unloaded to make room for another "
                                 "(--max-loaded-models / --max-loaded-bytes)", ["model"], registry=registry)
        self.loaded_models = Gauge("deepserve_loaded_models", "Models in memory or being loaded into it",
                                   registry=registry, multiprocess_mode="livesum")
        self.loaded_bytes = Gauge("deepserve_loaded_model_bytes", "Bytes on disk of the model versions in memory "
                                  "or being loaded (what --max-loaded-bytes bounds)", registry=registry,
                                  multiprocess_mode="livesum")
        self.model_info = Gauge("deepserve_model_info", "Loaded model versions and their execution provider",
                                [*MV, "platform", "execution_provider"], registry=registry,
                                multiprocess_mode="livemax")
        self.grpc_requests = Counter("deepserve_grpc_requests", "gRPC calls by method and status code",
                                     ["method", "code"], registry=registry)
        self.grpc_duration = Histogram("deepserve_grpc_request_duration_seconds", "gRPC call duration by method",
                                       ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.generated_tokens = Counter("deepserve_generated_tokens", "Tokens generated by generation models", MV,
                                        registry=registry)
        self.time_to_first_token = Histogram("deepserve_time_to_first_token_seconds", "From a generation request's "
                                             "arrival to its first token", MV, buckets=LATENCY_BUCKETS,
                                             registry=registry)
        self.inter_token_latency = Histogram("deepserve_inter_token_latency_seconds", "Between two tokens of one "
                                             "generation", MV, buckets=LATENCY_BUCKETS, registry=registry)
        self.http_requests = Counter("deepserve_http_requests", "HTTP/REST requests by endpoint and status code",
                                     ["endpoint", "code"], registry=registry)
        self.http_duration = Histogram("deepserve_http_request_duration_seconds", "HTTP/REST request duration by "
                                       "endpoint", ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)
