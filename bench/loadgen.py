"""Load generators: Triton's perf_analyzer (C++, the field's standard), and a Python fallback for machines where
perf_analyzer cannot be installed.

perf_analyzer measures in time windows: its throughput is the requests completed inside a window over the window's
length, which is exact. (With `--request-count` it polls for completion once a second and divides by that rounded
duration, which is only good for sending an exact number of requests: the leak check and profiling loads.) Its
default stability rule (three windows within 10%) rarely holds on a shared machine and then it reports nothing,
so points run with a wide rule (`-s 100`: three windows within 2x), retried once with any three windows that
each completed requests (`-s 10000`); the three windows are merged into one result either way. Windows are
several request latencies long so that slow points complete enough requests in each. Sync mode: with
`--request-count`, async mode can wait for requests it never sent.

The Python generator pre-serializes one request and sends bytes (identity serializers), so its own cost per call
is the grpc.aio client's and nothing else; it still competes with the server for the same cores, so its numbers
are labelled and only comparable with each other.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from bench import httpload
from service._proto import inference_pb2 as pb
from service._proto import inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PERF_ANALYZER = ROOT.parent / "shared" / "tools" / "perf_analyzer"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
COUNT_TIMEOUT_S = 120.0  # count-mode runs are sized to take seconds
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
_NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32,
          "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


class BenchError(RuntimeError):
    """A measurement that could not be taken; the message says which and why."""


@dataclass
class Measurement:
    """One point: a target (server or ceiling) at one batch size and concurrency. Latencies are per request."""

    target: str
    model: str
    batch: int
    concurrency: int
    requests: int
    infer_per_s: float  # samples/s: requests/s times the batch size, as perf_analyzer counts
    p50_ms: float
    p90_ms: float
    p99_ms: float
    generator: str
    runs: int = 1  # measurements averaged into this one
    protocol: str = "grpc"  # "grpc" or "http" (binary tensors unless the target label says JSON)

    @property
    def requests_per_s(self) -> float:
        return self.infer_per_s / self.batch

    def to_dict(self) -> dict:
        return asdict(self)


class PerfAnalyzer:
    """perf_analyzer through `../shared/tools/perf_analyzer` (which installs it on first use)."""

    name = "perf_analyzer"
    takes_flags = True  # perf_analyzer options (shared memory) pass through `extra`

    def __init__(self, logs: Path, path: Path = PERF_ANALYZER, timeout_s: float = 600.0) -> None:
        self.path, self.logs, self.timeout_s = path, logs, timeout_s
        self.runs = 0
        self.stalls: list[str] = []

    def available(self) -> str | None:
        """None when usable, else why not. The first call may install it (minutes, from PyPI and Debian)."""
        if not self.path.exists():
            return f"{self.path} does not exist"
        try:
            out = subprocess.run([str(self.path), "--version"], capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{self.path} --version failed: {exc}"
        if "Perf Analyzer Version" not in out.stdout + out.stderr:
            return f"{self.path} --version: {(out.stdout + out.stderr).strip()[-300:]}"
        return None

    def _call(self, args: list[str], model: str, batch: int, concurrency: int, target: str,
              timeout_s: float | None = None, protocol: str = "grpc") -> tuple[dict[str, str] | None, str]:
        self.runs += 1
        stem = self.logs / f"pa_{self.runs:03d}_{protocol}_{target.split()[0]}_{model}_b{batch}_c{concurrency}"
        csv_path = stem.with_suffix(".csv")
        argv = [str(self.path), "-m", model, "-i", protocol, "-b", str(batch), "--concurrency-range",
                str(concurrency), "--percentile=99", "-f", str(csv_path), *args]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s or self.timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout_s or self.timeout_s:.0f}s: {' '.join(argv)}"
        stem.with_suffix(".log").write_text(" ".join(argv) + "\n\n" + out.stdout + out.stderr)
        if out.returncode != 0 or not csv_path.exists():
            return None, (f"exited {out.returncode} ({stem.with_suffix('.log').name}): "
                          f"{(out.stdout + out.stderr).strip()[-400:]}")
        with csv_path.open() as f:
            return next(csv.DictReader(f)), ""

    def _measurement(self, row: dict[str, str], target: str, model: str, batch: int, concurrency: int,
                     requests: int, protocol: str) -> Measurement:
        return Measurement(target, model, batch, concurrency, requests, float(row["Inferences/Second"]),
                           float(row["p50 latency"]) / 1e3, float(row["p90 latency"]) / 1e3,
                           float(row["p99 latency"]) / 1e3, self.name, protocol=protocol)

    def run(self, url: str, model: str, version: str, batch: int, concurrency: int, requests: int,
            target: str, protocol: str = "grpc", extra: tuple[str, ...] = ()) -> Measurement:
        """Exactly `requests` requests (the throughput of such a run is coarse, see the module docstring).

        Some count-mode runs at concurrency 32 never return; in the one caught live, the server had no request
        pending (its gauge read 0) and went on answering other clients. It is not the server's doing: of 40 HTTP
        runs of 2,000 requests at 32 in flight, 3 never returned against the server on uvloop, 2 on asyncio, and 4
        against the bare uvicorn ceiling, which runs none of our code (2026-12-02). Such a run is stopped after
        COUNT_TIMEOUT_S and sent again, once, and the report lists it."""
        args = ["-x", version, "-u", url, "--request-count", str(requests), *extra]
        row, why = self._call(args, model, batch, concurrency, target, COUNT_TIMEOUT_S, protocol)
        if row is None and why.startswith("timed out"):
            self.stalls.append(f"{target} {model} batch {batch} concurrency {concurrency}: {why}")
            row, why = self._call(args, model, batch, concurrency, target, COUNT_TIMEOUT_S, protocol)
        if row is None:
            raise BenchError(f"perf_analyzer {why}")
        return self._measurement(row, target, model, batch, concurrency, requests, protocol)

    def measure(self, url: str, model: str, version: str, batch: int, concurrency: int, seconds: float,
                target: str, latency_ms: float, protocol: str = "grpc", extra: tuple[str, ...] = ()) -> Measurement:
        """Three time windows of about seconds/3.6 each (perf_analyzer sleeps 1.2 windows per window), at least
        three expected request latencies long."""
        window = int(max(seconds * 1000 / 3.6, 3 * latency_ms, 200))
        why = ""
        for stability in ("100", "10000"):
            row, why = self._call(["-x", version, "-u", url, "-p", str(window), "-s", stability, "-r", "6", *extra],
                                  model, batch, concurrency, target, None, protocol)
            if row is not None:
                return self._measurement(row, target, model, batch, concurrency, 0, protocol)
        raise BenchError(f"perf_analyzer {why}")


def build_request(url: str, model: str, version: str, batch: int, seed: int = 0) -> bytes:
    """A serialized ModelInferRequest of random data, shaped from the target's own ModelMetadata."""
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as ch:
        meta = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(
            pb.ModelMetadataRequest(name=model, version=version), timeout=30)
    rng = np.random.default_rng(seed)
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for t in meta.inputs:
        shape = [batch if (j == 0 and d == -1) else max(d, 1) for j, d in enumerate(t.shape)]
        req.inputs.add(name=t.name, datatype=t.datatype, shape=shape)
        req.raw_input_contents.append(rng.random(shape).astype(_NUMPY[t.datatype]).tobytes())
    for t in meta.outputs:
        req.outputs.add(name=t.name)
    return req.SerializeToString()


async def _drive(url: str, request: bytes, concurrency: int, count: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    remaining = count
    async with grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary(INFER_METHOD)  # no serializers: bytes out, bytes back

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                await call(request, timeout=120)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


class PythonLoad:
    """Closed-loop generator: gRPC as `concurrency` grpc.aio calls in flight on one channel; HTTP as `concurrency`
    keep-alive connections (bench.httpload). `extra` (perf_analyzer flags) is not understood and refused."""

    name = "python grpc.aio / http.client"
    takes_flags = False

    def __init__(self) -> None:
        self.stalls: list[str] = []  # runs stopped and sent again: this generator has none (PerfAnalyzer's do)
        self._requests: dict[tuple[str, str, int], bytes] = {}
        self._bodies: dict[tuple[str, str, int], tuple[bytes, int]] = {}

    def available(self) -> str | None:
        return None

    def run(self, url: str, model: str, version: str, batch: int, concurrency: int, requests: int,
            target: str, protocol: str = "grpc", extra: tuple[str, ...] = ()) -> Measurement:
        if extra:
            raise BenchError(f"{target} {model}: the Python generator takes no perf_analyzer flags {extra}")
        key = (url, model, batch)
        try:
            if protocol == "http":
                if key not in self._bodies:
                    self._bodies[key] = httpload.build_body(url, model, version, batch)
                elapsed, lat = httpload.drive(url, model, version, *self._bodies[key], concurrency, requests)
            else:
                if key not in self._requests:
                    self._requests[key] = build_request(url, model, version, batch)
                elapsed, lat = asyncio.run(_drive(url, self._requests[key], concurrency, requests))
        except (grpc.RpcError, httpload.HttpLoadError, OSError) as exc:
            raise BenchError(f"{target} {model} ({protocol}): {exc}") from exc
        p50, p90, p99 = (float(np.percentile(lat, q)) * 1e3 for q in (50, 90, 99))
        return Measurement(target, model, batch, concurrency, requests, requests * batch / elapsed, p50, p90, p99,
                           self.name, protocol=protocol)

    def measure(self, url: str, model: str, version: str, batch: int, concurrency: int, seconds: float,
                target: str, latency_ms: float, protocol: str = "grpc", extra: tuple[str, ...] = ()) -> Measurement:
        """A probe run (warm-up, and the rate that sizes the real run), then a run of about `seconds`."""
        probe = self.run(url, model, version, batch, concurrency, max(8, 2 * concurrency), target, protocol, extra)
        count = max(16, 4 * concurrency, int(probe.requests_per_s * seconds))
        return self.run(url, model, version, batch, concurrency, count, target, protocol, extra)


Generator = PerfAnalyzer | PythonLoad


def merge(ms: list[Measurement]) -> Measurement:
    """Several runs of one point as one: mean throughput and mean percentiles (the runs are the same length, so
    this is each percentile's typical value, not a pooled percentile)."""
    first = ms[0]
    if len(ms) == 1:
        return first
    mean = lambda f: float(np.mean([getattr(m, f) for m in ms]))  # noqa: E731
    return Measurement(first.target, first.model, first.batch, first.concurrency, sum(m.requests for m in ms),
                       mean("infer_per_s"), mean("p50_ms"), mean("p90_ms"), mean("p99_ms"), first.generator,
                       sum(m.runs for m in ms), first.protocol)


def measure(gen: Generator, url: str, model: str, version: str, batch: int, concurrency: int, seconds: float,
            target: str, latency_ms: float = 0.0, protocol: str = "grpc", extra: tuple[str, ...] = ()) -> Measurement:
    """One point of about `seconds`; `latency_ms` is a guess of one request's latency, to size windows."""
    return gen.measure(url, model, version, batch, concurrency, seconds, target, latency_ms, protocol, extra)


def pick_generator(choice: str, logs: Path) -> tuple[Generator, str]:
    """perf_analyzer when it can run ('auto'), else the Python generator; the note says what was used and why."""
    if choice in ("auto", "perf_analyzer"):
        pa = PerfAnalyzer(logs)
        why = pa.available()
        if why is None:
            return pa, (f"perf_analyzer ({pa.path}, sync mode, three time windows per point; -i grpc, and -i http with "
                        "binary tensors, its default)")
        if choice == "perf_analyzer":
            raise BenchError(f"perf_analyzer is not usable: {why}")
        return PythonLoad(), f"python grpc.aio / http.client fallback (perf_analyzer not usable: {why})"
    return PythonLoad(), "python grpc.aio / http.client (asked for with --generator python)"


def cores() -> int:
    """Cores this process may run on: what the server's thread defaults see as os.cpu_count() on this machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
