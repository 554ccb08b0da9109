"""onnxruntime sessions for one model version: execution providers chosen from the config the way Triton's
onnxruntime backend maps them, checked after creation (onnxruntime falls back to CPU silently; we never do),
thread counts that keep concurrent instances from oversubscribing the cores, and warmup."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from service._proto import model_config_pb2
from service.errors import ModelLoadError

log = logging.getLogger("deepserve.runtime")

Kind = model_config_pb2.ModelInstanceGroup.Kind
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# A run shorter than this is cheaper on the event loop thread than handed to an executor thread and back (the
# batcher runs it inline), and cheaper on one intra-op thread than split: a parallel-for over a 20 us operator
# costs more in wake-ups than it saves, and on a busy machine it stalls the event loop until the second thread
# is scheduled. Measured on digits_cnn, batch 4: 72 us CPU on one thread, 116 us on two.
FAST_RUN_NS = 250_000
_GRAPH_LEVELS = {
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}
_TRUE = ("1", "true", "yes", "on")


def param(config: model_config_pb2.ModelConfig, key: str, default: str = "") -> str:
    p = config.parameters.get(key)
    return p.string_value if p is not None else default


@dataclass
class Placement:
    """Where the sessions of one model version run and with how many threads each."""

    providers: list  # as onnxruntime.InferenceSession takes them: names or (name, options)
    wanted: str  # the provider that must end up first after creation
    count: int
    intra_threads: int
    inter_threads: int
    allow_cpu_fallback: bool
    notes: list[str] = field(default_factory=list)
    intra_chosen: bool = False  # intra_threads is our default, not the config's: a fast model may get 1 instead


def placement(config: model_config_pb2.ModelConfig, cores: int = 0) -> Placement:
    """`cores`: this process's share of the CPUs (all of them unless --workers splits them)."""
    groups = list(config.instance_group) or [model_config_pb2.ModelInstanceGroup(kind=Kind.KIND_AUTO, count=1)]
    if len({g.kind for g in groups}) > 1:
        raise ModelLoadError("instance_group: mixing kinds in one model is not supported; use one kind")
    kind = groups[0].kind
    count = sum(max(g.count, 1) for g in groups)
    gpus = [d for g in groups for d in g.gpus]
    available = ort.get_available_providers()
    fallback = param(config, "allow_cpu_fallback", "false").lower() in _TRUE
    if kind == Kind.KIND_MODEL:
        raise ModelLoadError("instance_group kind KIND_MODEL is not supported; use KIND_CPU or KIND_GPU")
    accel = [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator]
    cpu_accel = [a.name for a in config.optimization.execution_accelerators.cpu_execution_accelerator]
    if cpu_accel:
        raise ModelLoadError(f"optimization.execution_accelerators.cpu_execution_accelerator {cpu_accel} "
                             "is not supported")
    unknown = [a for a in accel if a != "tensorrt"]
    if unknown:
        raise ModelLoadError(f"gpu_execution_accelerator {unknown} is not supported; only 'tensorrt'")
    use_gpu = kind == Kind.KIND_GPU or (kind == Kind.KIND_AUTO and CUDA in available)
    cores = cores or os.cpu_count() or 1
    intra_default = max(1, cores // count)  # instances run concurrently: split the cores, never oversubscribe
    intra = int(param(config, "intra_op_thread_count", "0")) or intra_default
    chosen = not param(config, "intra_op_thread_count")
    inter = int(param(config, "inter_op_thread_count", "0")) or 1
    notes: list[str] = []
    if use_gpu:
        device = gpus[0] if gpus else 0
        if CUDA not in available:
            if not fallback:
                raise ModelLoadError(f"instance_group asks for KIND_GPU but onnxruntime has no {CUDA} "
                                     f"(available: {', '.join(available)}); install deepserve[gpu] on a GPU "
                                     "machine, or set parameters allow_cpu_fallback: \"true\"")
            notes.append(f"KIND_GPU requested, {CUDA} absent: running on CPU (allow_cpu_fallback)")
            return Placement([CPU], CPU, count, intra, inter, fallback, notes, chosen)
        providers: list = []
        wanted = CUDA
        if "tensorrt" in accel:
            if TENSORRT not in available and not fallback:
                raise ModelLoadError(f"gpu_execution_accelerator tensorrt asked for but onnxruntime has no "
                                     f"{TENSORRT} (available: {', '.join(available)})")
            if TENSORRT in available:
                providers.append((TENSORRT, {"device_id": device}))
                wanted = TENSORRT
        providers += [(CUDA, {"device_id": device}), CPU]
        return Placement(providers, wanted, count, intra, inter, fallback, notes)
    return Placement([CPU], CPU, count, intra, inter, fallback, notes, chosen)


def allows_spinning(config: model_config_pb2.ModelConfig) -> bool:
    return param(config, "allow_spinning", "true").lower() in _TRUE


def session_options(config: model_config_pb2.ModelConfig, place: Placement) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = place.intra_threads
    so.inter_op_num_threads = place.inter_threads
    level = config.optimization.graph.level
    if level not in _GRAPH_LEVELS:
        raise ModelLoadError(f"optimization.graph.level {level} is not one of {sorted(_GRAPH_LEVELS)}")
    so.graph_optimization_level = _GRAPH_LEVELS[level]
    arena = param(config, "enable_mem_arena", param(config, "enable_mem_area", "true")).lower()
    so.enable_cpu_mem_arena = arena in _TRUE
    # onnxruntime's default: a worker that finishes its part of an operator spins a moment for the next part before
    # it sleeps. A fast model gets one intra-op thread, so nothing spins; for a model with a thread pool, sleeping
    # between operators made every run wait for wake-ups: bench_resnet batch-1 p50 2.68 -> 1.62 ms over HTTP at
    # concurrency 1, 29.3 -> 27.9 ms over gRPC at 16; batch-32 gRPC at 4: 112 -> 96 ms (2026-12-02).
    spin = allows_spinning(config)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return so


def runs_fast(run: Callable[[], object]) -> bool:
    """Best of three timed runs (after warmup) under FAST_RUN_NS? A slow first run stops the timing early."""
    best = FAST_RUN_NS * 10
    for _ in range(3):
        t0 = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - t0)
        if best >= FAST_RUN_NS * 10:
            break
    return best < FAST_RUN_NS


class Instance:
    """One onnxruntime session. `run` is called from an executor thread; onnxruntime releases the GIL."""

    def __init__(self, path: str, so: ort.SessionOptions, place: Placement) -> None:
        try:
            self.session = ort.InferenceSession(path, sess_options=so, providers=place.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files and graphs
            raise ModelLoadError(f"onnxruntime could not load {os.path.basename(path)}: {exc}") from exc
        self.providers = self.session.get_providers()
        if self.providers[0] != place.wanted:
            if not (place.allow_cpu_fallback and self.providers[0] == CPU):
                raise ModelLoadError(f"asked for {place.wanted} but onnxruntime activated {self.providers}; "
                                     "refusing a silent fallback (parameters allow_cpu_fallback: \"true\" allows it)")
            place.notes.append(f"{place.wanted} failed to activate, running on {self.providers[0]}")
        self._run = self.session.run
        self._output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._run(self._output_names, feeds), strict=True))
