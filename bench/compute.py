"""The compute ceiling: raw onnxruntime, in-process, on the same model file at the same batch sizes.

The session is built with the server's own placement and session options (service.runtime), so the thread
settings are the server's defaults by construction (one instance: intra-op threads = cores, or one for a model
whose batch-1 run is under runtime.FAST_RUN_NS, inter-op 1, full graph optimisation, memory arena on) and cannot
drift from them. What remains between this number and the server's is
the serving: transport, decoding, queueing, batching and the hand-off to the executor thread.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service._proto import model_config_pb2
from service.runtime import placement, runs_fast, session_options


@dataclass
class ComputeCeiling:
    model: str
    batch: int
    runs: int
    samples_per_s: float
    p50_ms: float  # per run (one batch)
    intra_threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def session(model_file: Path, config: model_config_pb2.ModelConfig) -> tuple[ort.InferenceSession, int]:
    """The server's session for this model, thread count included (a fast model gets one intra-op thread)."""
    place = placement(config)
    so = session_options(config, place)
    s = ort.InferenceSession(str(model_file), sess_options=so, providers=place.providers)
    if place.intra_chosen and place.intra_threads > 1:
        one = _feeds(s, 1)
        s.run(None, one)
        if runs_fast(lambda: s.run(None, one)):
            place.intra_threads = so.intra_op_num_threads = 1
            s = ort.InferenceSession(str(model_file), sess_options=so, providers=place.providers)
    return s, place.intra_threads


def _feeds(s: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in s.get_inputs():
        shape = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 1) for i, d in enumerate(inp.shape)]
        feeds[inp.name] = rng.random(shape, dtype=np.float32)
    return feeds


def measure(model_file: Path, config: model_config_pb2.ModelConfig, batch: int, seconds: float,
            sess: tuple[ort.InferenceSession, int] | None = None) -> ComputeCeiling:
    """Back-to-back runs on one session for about `seconds` after a short warm-up; samples/s over all runs."""
    s, intra = sess or session(model_file, config)
    feeds = _feeds(s, batch)
    warm_until = time.perf_counter() + min(0.5, seconds / 4)
    while time.perf_counter() < warm_until:
        s.run(None, feeds)
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return ComputeCeiling(config.name, batch, len(times), len(times) * batch / elapsed,
                          float(np.median(times)) * 1e3, intra)
