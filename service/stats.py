"""Per model version: Triton's ModelStatistics counters and the Prometheus children, updated together.
All updates happen on the event loop thread, so plain integers need no lock. `snapshot` gives the statistics in
Triton's JSON shape (what HTTP answers as is and gRPC parses into its ModelStatistics message)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from service.errors import kind_of
from service.metrics import Metrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def snapshot(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class Recorder:
    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.model, self.version = model, version
        self.success, self.fail, self.queue = Duration(), Duration(), Duration()
        self.compute = BatchDurations()
        self.per_batch: dict[int, BatchDurations] = {}
        self.inference_count = self.execution_count = self.last_inference_ms = 0
        m, lv = metrics, (model, version)
        self._metrics = m
        self._add = m.tally.add  # per-request counter moves (service.metrics.Tally)
        self._requests_ok = m.requests.labels(*lv, "OK")
        self._inferences = m.inferences.labels(*lv)
        self._executions = m.executions.labels(*lv)
        self._request_s = m.request_duration.labels(*lv)
        self._queue_s = m.queue_duration.labels(*lv)
        self._compute_s = m.compute_duration.labels(*lv)
        self._batch = m.batch_size.labels(*lv)
        self.pending = m.pending.labels(*lv)
        self._tokens = m.generated_tokens.labels(*lv)
        self._first_token_s = m.time_to_first_token.labels(*lv)
        self._inter_token_s = m.inter_token_latency.labels(*lv)

    def first_token(self, seconds: float) -> None:
        """Generation: a request's first token (TTFT) is also one inference of one token."""
        self.inference_count += 1
        self._add(self._tokens)
        self._add(self._inferences)
        self._first_token_s.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.inference_count += 1
        self._add(self._tokens)
        self._add(self._inferences)
        self._inter_token_s.observe(seconds)

    def arrived(self) -> None:
        """A request accepted for this version (the pending gauge), until `left`."""
        self._add(self.pending)

    def left(self) -> None:
        self._add(self.pending, -1)

    def request_ok(self, duration_ns: int, samples: int) -> None:
        s = self.success
        s.count += 1
        s.ns += duration_ns
        self.inference_count += samples
        self.last_inference_ms = time.time_ns() // 1_000_000
        self._add(self._requests_ok)
        self._add(self._inferences, samples)
        self._request_s.observe(duration_ns / 1e9)

    def request_raised(self, started_ns: int, exc: BaseException) -> None:
        """A request (started at perf_counter_ns `started_ns`) ended by `exc`: CANCELLED when its client went away
        or its stream was closed, else the error's kind."""
        code = "CANCELLED" if isinstance(exc, asyncio.CancelledError | GeneratorExit) else kind_of(exc)
        self.request_failed(time.perf_counter_ns() - started_ns, code)

    def request_failed(self, duration_ns: int, code: str) -> None:
        self.fail.add(duration_ns)
        self._metrics.requests.labels(self.model, self.version, code).inc()
        self._request_s.observe(duration_ns / 1e9)

    def queued(self, ns: int) -> None:
        self.queue.add(ns)
        self._queue_s.observe(ns / 1e9)

    def executed(self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model run of `batch_size` samples that answered `requests` requests."""
        self.execution_count += 1
        c = self.compute
        c.compute_input.add(input_ns * requests, requests)
        c.compute_infer.add(infer_ns * requests, requests)
        c.compute_output.add(output_ns * requests, requests)
        b = self.per_batch.setdefault(batch_size, BatchDurations())
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)
        self._executions.inc()
        self._batch.observe(batch_size)
        self._compute_s.observe((input_ns + infer_ns + output_ns) / 1e9)

    def snapshot(self) -> dict:
        c = self.compute
        return {
            "name": self.model, "version": self.version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count, "execution_count": self.execution_count,
            "inference_stats": {"success": self.success.snapshot(), "fail": self.fail.snapshot(),
                                "queue": self.queue.snapshot(), "compute_input": c.compute_input.snapshot(),
                                "compute_infer": c.compute_infer.snapshot(),
                                "compute_output": c.compute_output.snapshot()},
            "batch_stats": [{"batch_size": size, "compute_input": d.compute_input.snapshot(),
                             "compute_infer": d.compute_infer.snapshot(),
                             "compute_output": d.compute_output.snapshot()}
                            for size, d in sorted(self.per_batch.items())],
        }
