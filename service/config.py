"""config.pbtxt: parsed with protobuf's text_format into our ModelConfig (Triton's schema, the subset we support,
so an unsupported field fails to parse and the error names it), checked, and completed from the ONNX graph."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
from google.protobuf import json_format, text_format

from service._proto import model_config_pb2
from service.errors import ModelLoadError
from service.tensors import BY_CONFIG, BY_ORT, TensorSpec

ModelConfig = model_config_pb2.ModelConfig
PLATFORMS = ("", "onnxruntime_onnx")
BACKENDS = ("", "onnxruntime")
# A missing config on a graph whose inputs all have a dynamic first axis gets batching, as Triton's autocomplete does.
AUTO_MAX_BATCH_SIZE = 64


def parse_text(text: str, where: str) -> ModelConfig:
    try:
        return text_format.Parse(text, ModelConfig())
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def parse_json(text: str, where: str) -> ModelConfig:
    """The `config` parameter of RepositoryModelLoad: Triton sends the config as JSON."""
    try:
        return json_format.Parse(text, ModelConfig())
    except (json_format.ParseError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def read_config(model_dir: Path, data: bytes | None) -> ModelConfig:
    """Parse and check config.pbtxt from the bytes the caller read (the poller's snapshot, so that what is loaded
    and what is remembered as loaded are the same bytes); None, no file, is an empty config to complete."""
    path = model_dir / "config.pbtxt"
    config = parse_text(decode_text(data, path), str(path)) if data is not None else ModelConfig()
    check(config, model_dir.name)
    return config


def decode_text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                             "save it as UTF-8 text") from None


def check(config: ModelConfig, name: str) -> None:
    if config.name and config.name != name:
        raise ModelLoadError(f"config.pbtxt names the model {config.name!r} but its folder is {name!r}")
    config.name = name
    if config.platform not in PLATFORMS or config.backend not in BACKENDS:
        raise ModelLoadError(f"platform {config.platform!r} / backend {config.backend!r} is not served; "
                             "deepserve serves platform 'onnxruntime_onnx' (backend 'onnxruntime')")
    config.platform = "onnxruntime_onnx"
    if config.max_batch_size < 0:
        raise ModelLoadError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    unsupported = _unsupported(config)
    if unsupported:
        raise ModelLoadError(f"config sets {', '.join(unsupported)}, which deepserve does not support; remove "
                             f"{'it' if len(unsupported) == 1 else 'them'}")
    if config.HasField("sequence_batching") and not config.sequence_batching.state:
        raise ModelLoadError("sequence_batching without implicit `state` entries is not supported")
    if config.sequence_batching.oldest.max_candidate_sequences < 0:
        raise ModelLoadError("sequence_batching.oldest.max_candidate_sequences must be >= 0, got "
                             f"{config.sequence_batching.oldest.max_candidate_sequences}")
    for entry in config.input:
        if entry.format != model_config_pb2.ModelInput.FORMAT_NONE and len(entry.dims) != 3:
            # As Triton checks it: an image layout names three axes besides the batch axis.
            raise ModelLoadError(f"config input {entry.name!r}: format "
                                 f"{model_config_pb2.ModelInput.Format.Name(entry.format)} needs 3 dims, got "
                                 f"{list(entry.dims)}")


def _unsupported(config: ModelConfig) -> list[str]:
    """Fields of Triton's schema that parse but that deepserve does not implement: set to anything but their
    default they are a load error naming them, never silently ignored."""
    found = []
    if config.dynamic_batching.preserve_ordering:
        found.append("dynamic_batching.preserve_ordering")
    if config.dynamic_batching.default_queue_policy.timeout_action:  # DELAY: deprioritise instead of refusing
        found.append("dynamic_batching.default_queue_policy.timeout_action DELAY")
    sb = config.sequence_batching
    if sb.direct.minimum_slot_utilization:
        found.append("sequence_batching.direct.minimum_slot_utilization")
    if sb.oldest.preserve_ordering:
        found.append("sequence_batching.oldest.preserve_ordering")
    for accel in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accel.parameters:  # onnxruntime's TensorRT options are not mapped from Triton's names
            found.append(f"gpu_execution_accelerator {accel.name!r} parameters {sorted(accel.parameters)}")
    return found


def _graph_shape(arg: ort.NodeArg) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))


def _ort_dtype(arg: ort.NodeArg, where: str):
    dt = BY_ORT.get(arg.type)
    if dt is None:
        raise ModelLoadError(f"{where} {arg.name!r} has onnxruntime type {arg.type}, which deepserve does not serve")
    return dt


def complete(config: ModelConfig, session: ort.InferenceSession, explicit: bool) -> None:
    """Fill what the config leaves out from the graph and check what it says against the graph.
    `explicit` is False when there was no config.pbtxt at all (then batching is inferred)."""
    state = {n for st in config.sequence_batching.state for n in (st.input_name, st.output_name)}
    graph_names = {a.name for a in session.get_inputs() + session.get_outputs()}
    missing_state = sorted(state - graph_names)
    if missing_state:
        raise ModelLoadError(f"sequence_batching state {missing_state} is not in the model")
    inputs = [a for a in session.get_inputs() if a.name not in state]  # state is the server's, not the client's
    outputs = [a for a in session.get_outputs() if a.name not in state]
    if not explicit and config.max_batch_size == 0 and all(_graph_shape(a)[:1] == (-1,) for a in inputs + outputs):
        config.max_batch_size = AUTO_MAX_BATCH_SIZE
        config.dynamic_batching.SetInParent()
    batching = config.max_batch_size > 0
    for kind, graph_args, entries, new in (("input", inputs, config.input, config.input.add),
                                           ("output", outputs, config.output, config.output.add)):
        by_name = {a.name: a for a in graph_args}
        for entry in entries:
            if entry.name not in by_name:
                raise ModelLoadError(f"config {kind} {entry.name!r} is not in the model; the graph has "
                                     f"{sorted(by_name)}")
        named = {e.name for e in entries}
        for arg in graph_args:
            if arg.name not in named:
                shape = _graph_shape(arg)
                e = new(name=arg.name, data_type=_ort_dtype(arg, kind).config)
                e.dims.extend(shape[1:] if batching else shape)
        for entry in entries:
            arg = by_name[entry.name]
            want = _ort_dtype(arg, f"model {kind}")
            if entry.data_type != want.config:
                got = model_config_pb2.DataType.Name(entry.data_type)
                raise ModelLoadError(f"config {kind} {entry.name!r} says {got}, the model has "
                                     f"{model_config_pb2.DataType.Name(want.config)}")
            graph = _graph_shape(arg)
            if batching:
                if graph[:1] not in ((-1,), ()) :
                    raise ModelLoadError(f"max_batch_size {config.max_batch_size} needs a dynamic first axis, but "
                                         f"{kind} {entry.name!r} has shape {list(graph)}")
                graph = graph[1:]
            if len(entry.dims) != len(graph) or any(g not in (-1, d) for d, g in zip(entry.dims, graph, strict=True)):
                raise ModelLoadError(f"config {kind} {entry.name!r} dims {list(entry.dims)} do not fit the model's "
                                     f"{list(graph)}{' after the batch axis' if batching else ''}")
    if not config.input:
        raise ModelLoadError("the model has no inputs")


def specs(config: ModelConfig) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    batch = (-1,) if config.max_batch_size > 0 else ()

    def spec(e) -> TensorSpec:
        dt = BY_CONFIG.get(e.data_type)
        if dt is None:
            raise ModelLoadError(f"{e.name!r}: datatype {model_config_pb2.DataType.Name(e.data_type)} not served")
        return TensorSpec(e.name, dt, batch + tuple(e.dims), getattr(e, "optional", False))

    return {e.name: spec(e) for e in config.input}, {e.name: spec(e) for e in config.output}


def read_labels(model_dir: Path, config: ModelConfig) -> dict[str, list[str]]:
    """Labels per output, from each output's label_filename (a file in the model folder, never a request path)."""
    labels: dict[str, list[str]] = {}
    for out in config.output:
        if out.label_filename:
            path = model_dir / Path(out.label_filename).name
            if not path.exists():
                raise ModelLoadError(f"output {out.name!r} label_filename {out.label_filename!r} does not exist")
            labels[out.name] = decode_text(path.read_bytes(), path).splitlines()
    return labels
