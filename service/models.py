"""One loaded model version: its completed config, tensor specs, labels, onnxruntime instances, batcher and
statistics. Loading is synchronous (it runs in a worker thread) and ends with a warmup, so a version is ready only
once it has really run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service._proto import model_config_pb2
from service.batcher import Batcher
from service.config import complete, read_labels, specs
from service.errors import ModelLoadError
from service.generation import Generator
from service.metrics import Metrics
from service.runtime import Instance, allows_spinning, placement, runs_fast, session_options
from service.sequences import Sequences
from service.stats import Recorder
from service.tensors import BY_CONFIG, BYTES, TensorSpec
from service.text import TextInput

log = logging.getLogger("deepserve.models")


@dataclass
class ModelVersion:
    name: str
    version: int
    config: model_config_pb2.ModelConfig
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    labels: dict[str, list[str]]
    instances: list[Instance]
    providers: list[str]
    recorder: Recorder
    metadata: dict = field(default_factory=dict)  # Triton's model metadata, less the versions list (the data plane's)
    batcher: Batcher | None = None
    sequences: Sequences | None = None
    text: TextInput | None = None
    generator: Generator | None = None  # decoupled generation models: the decode loop (service.generation)
    active: int = 0  # requests in flight or queued here, kept by the data plane: a busy version is never evicted
    # read on every request: plain attributes, since a protobuf field read costs ~0.5 us
    version_str: str = field(init=False)
    max_batch: int = field(init=False)
    # (input name, datatype, shape) of raw numeric inputs already checked against the specs -> (spec, byte count);
    # the data plane's decode skips the checks for a signature seen before (service.dataplane.decode_request)
    signatures: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.version_str = str(self.version)
        self.max_batch = self.config.max_batch_size

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled


def load_version(model_dir: Path, version: int, config: model_config_pb2.ModelConfig, explicit: bool,
                 metrics: Metrics, cores: int = 0) -> ModelVersion:
    """Build sessions, complete and check the config against the graph, warm up. Raises ModelLoadError."""
    config = _copy(config)
    name = config.name
    filename = config.default_model_filename or "model.onnx"
    path = model_dir / str(version) / Path(filename).name
    if not path.is_file():
        raise ModelLoadError(f"version {version}: {path.name} is missing")
    place = placement(config, cores)
    so = session_options(config, place)
    t0 = time.perf_counter()
    instances = [Instance(str(path), so, place) for _ in range(place.count)]
    complete(config, instances[0].session, explicit)
    inputs, outputs = specs(config)
    labels = read_labels(model_dir, config)
    providers = instances[0].providers
    config.parameters["execution_providers"].string_value = ",".join(providers)
    for note in place.notes:
        log.warning("model %s version %d: %s", name, version, note)
    sequences = Sequences(name, config) if config.HasField("sequence_batching") else None
    probe = _warmup(instances, config, inputs, sequences, name)
    if probe and place.intra_chosen and place.intra_threads > 1 and runs_fast(lambda: instances[0].run(probe)):
        place.intra_threads = so.intra_op_num_threads = 1  # see runtime.FAST_RUN_NS
        instances = [Instance(str(path), so, place) for _ in range(place.count)]
        _warmup(instances, config, inputs, sequences, name)
    config.parameters["intra_op_thread_count"].string_value = str(place.intra_threads)  # reported by ModelConfig
    spins = place.intra_threads > 1 and allows_spinning(config)  # one thread: no pool, nothing to spin
    config.parameters["allow_spinning"].string_value = "true" if spins else "false"  # reported by ModelConfig
    recorder = Recorder(metrics, name, str(version))
    text = TextInput(config, inputs) if "text_input" in config.parameters else None
    mv = ModelVersion(name, version, config, inputs, outputs, labels, instances, providers, recorder,
                      sequences=sequences, text=text)
    if mv.decoupled:
        if "generation_ids_input" not in config.parameters:
            raise ModelLoadError("model_transaction_policy { decoupled: true } is served for generation models: "
                                 "declare the decode loop in the config parameters (see service/generation.py)")
        mv.generator = Generator(name, config, instances[0], recorder.first_token, recorder.next_token,
                                 lambda rows, ns: recorder.executed(rows, rows, 0, ns, 0))
    mv.metadata = _metadata(mv)
    metrics.load_duration.labels(name, str(version)).set(time.perf_counter() - t0)
    log.info("model %s version %d loaded in %.2fs on %s (%d instance%s, %d intra-op threads each)", name, version,
             time.perf_counter() - t0, providers[0], place.count, "s" * (place.count > 1), place.intra_threads)
    return mv


def _copy(config: model_config_pb2.ModelConfig) -> model_config_pb2.ModelConfig:
    c = model_config_pb2.ModelConfig()
    c.CopyFrom(config)
    return c


def _metadata(mv: ModelVersion) -> dict:
    extra = {mv.text.name: mv.text.spec} if mv.text else {}

    def tensors(specs_: dict[str, TensorSpec]) -> list[dict]:
        return [{"name": t.name, "datatype": t.dtype.wire, "shape": list(t.shape)} for t in specs_.values()]

    return {"name": mv.name, "platform": mv.config.platform, "inputs": tensors({**mv.inputs, **extra}),
            "outputs": tensors(mv.outputs)}


def _sample(spec: TensorSpec, dims: list[int], batch: int, random: bool) -> np.ndarray:
    shape = ([batch] if spec.shape[:1] == (-1,) and len(dims) == len(spec.shape) - 1 else []) + list(dims)
    if spec.dtype is BYTES:
        return np.full(shape, "0", dtype=object)  # text that also parses as a number (a graph may Cast it)
    if random:
        return np.random.default_rng(0).random(shape).astype(spec.dtype.numpy)
    return np.zeros(shape, dtype=spec.dtype.numpy)


def _warmup(instances: list[Instance], config: model_config_pb2.ModelConfig, inputs: dict[str, TensorSpec],
            sequences: Sequences | None, model: str = "") -> dict[str, np.ndarray]:
    """Config `model_warmup` samples, or one implicit request of batch 1 (each dynamic dim 1, zeros, BYTES "0").
    Returns the feeds that ran, to time the model with ({} when the implicit one could not run).

    A failed `model_warmup` sample is a load error: the config asked for it. The implicit request is ours, not the
    config's (Triton warms up only what model_warmup lists), so a graph that rejects it (a string parser that wants
    other text, a shape the zeros do not fit) still loads, with a warning; only the one-thread timing is skipped."""
    plans = []
    for w in config.model_warmup:
        feeds = {}
        for name, inp in w.inputs.items():
            if name not in inputs:
                raise ModelLoadError(f"model_warmup {w.name!r}: unknown input {name!r}")
            spec = inputs[name]
            if inp.data_type and BY_CONFIG.get(inp.data_type) is not spec.dtype:
                raise ModelLoadError(f"model_warmup {w.name!r}: input {name!r} data_type differs from the model")
            if inp.WhichOneof("input_data_type") == "input_data_file":
                raise ModelLoadError(f"model_warmup {w.name!r}: input_data_file is not supported")
            feeds[name] = _sample(spec, list(inp.dims), max(w.batch_size, 1), inp.random_data)
        plans.append((w.name, feeds, max(w.count, 1)))
    if not plans:
        feeds = {n: _sample(s, [1 if d == -1 else d for d in s.shape[1 if config.max_batch_size else 0:]], 1, False)
                 for n, s in inputs.items() if not s.optional}
        plans.append(("default", feeds, 1))
    implicit = not config.model_warmup
    first: dict[str, np.ndarray] = {}
    for name, feeds, count in plans:
        if sequences:
            rows = next(iter(feeds.values())).shape[0] if feeds else 1
            feeds = {**feeds, **{st.input: np.zeros((rows, *st.dims), st.dtype) for st in sequences.states}}
        first = first or feeds
        for inst in instances:
            for _ in range(count):
                try:
                    inst.run(feeds)
                except Exception as exc:
                    if implicit:
                        log.warning("model %s: the implicit warmup request (zeros, BYTES \"0\") did not run: %s; "
                                    "loading anyway (add model_warmup to the config to warm up with real data)",
                                    model, str(exc).splitlines()[0][:200])
                        return {}
                    raise ModelLoadError(f"warmup {name!r} failed: {exc}") from exc
    return first
