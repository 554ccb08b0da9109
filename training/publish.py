"""Publish into the model repository (Triton layout) so a server scanning it never sees half a model.

The version folder is the unit of atomicity: it is built complete under a hidden name inside the model folder
(same filesystem, and the server skips names starting with '.') and renamed into place in one step. Model-level
files (config.pbtxt, labels.txt) are each replaced atomically right after; the version goes first, because a
version without a config is still servable (the server completes a missing config from the graph) while a config
without any version is not. A publish killed at any point leaves every visible file as it was."""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from service._proto import model_config_pb2 as mc

MAX_BATCH_SIZE = 256
QUEUE_DELAY_US = 500
DTYPES = {"float32": mc.TYPE_FP32, "int64": mc.TYPE_INT64}


def crash_point(name: str) -> None:
    """Fault injection for the atomic-publish test: DEEPSERVE_CRASH_AT=<name> kills this process here with SIGKILL,
    as a power cut or OOM kill would, so the test observes a real crash and not a simulated exception."""
    if os.environ.get("DEEPSERVE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Tensor:
    name: str
    dtype: str
    dims: list[int]  # without the batch dim; -1 = dynamic
    label_file: str = ""


@dataclass
class ModelSpec:
    """What config.pbtxt says about a published model."""

    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    parameters: dict[str, str] = field(default_factory=dict)
    state: list[Tensor] = field(default_factory=list)  # (h_in, h_out) pairs flattened: implicit sequence state


def config_text(spec: ModelSpec) -> str:
    """Triton ModelConfig text, built as a protobuf message so it always parses where Triton's does."""
    cfg = mc.ModelConfig(name=spec.name, platform="onnxruntime_onnx", max_batch_size=MAX_BATCH_SIZE)
    for t in spec.inputs:
        cfg.input.add(name=t.name, data_type=DTYPES[t.dtype], dims=t.dims)
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=DTYPES[t.dtype], dims=t.dims, label_filename=t.label_file)
    if spec.state:
        seq = cfg.sequence_batching
        seq.max_sequence_idle_microseconds = 60_000_000
        for h_in, h_out in zip(spec.state[::2], spec.state[1::2], strict=True):
            st = seq.state.add(input_name=h_in.name, output_name=h_out.name, data_type=DTYPES[h_in.dtype],
                               dims=h_in.dims)
            st.initial_state.add(name="zero", data_type=DTYPES[h_in.dtype], dims=h_in.dims, zero_data=True)
        seq.oldest.max_candidate_sequences = 64
        seq.oldest.max_queue_delay_microseconds = QUEUE_DELAY_US
    else:
        cfg.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    for key, value in spec.parameters.items():
        cfg.parameters[key].string_value = value
    return text_format.MessageToString(cfg)


def next_version(model_dir: Path) -> int:
    if not model_dir.is_dir():
        return 1
    return max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0) + 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Write a sibling temp file, then os.replace: readers see the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _write_file(tmp, data)
    os.replace(tmp, path)


def _clean_stale(model_dir: Path) -> None:
    """Remove hidden staging folders of publishes that died (their process is gone)."""
    for p in model_dir.glob(".publish-*"):
        try:
            pid = int(p.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def publish(repo: Path, spec: ModelSpec, write_version: Callable[[Path, int], None],
            labels: list[str] | None = None) -> tuple[int, Path]:
    """Stage the version folder with `write_version(folder, version)`, rename it into place, then replace the
    model-level files. Returns (version, its folder). Any exception removes the staging folder."""
    model_dir = repo / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(model_dir)
    stage = model_dir / f".publish-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(5):
            version = next_version(model_dir)
            stage.mkdir()
            write_version(stage, version)
            for f in stage.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(stage)
            crash_point("publish:staged")
            target = model_dir / str(version)
            if target.exists():  # another publisher took this number meanwhile: restage under the next one
                shutil.rmtree(stage)
                continue
            os.rename(stage, target)
            break
        else:
            raise RuntimeError(f"could not claim a version folder in {model_dir}")
        _fsync_dir(model_dir)
        crash_point("publish:renamed")
        replace_file(model_dir / "config.pbtxt", config_text(spec).encode())
        if labels is not None:
            replace_file(model_dir / "labels.txt", ("\n".join(labels) + "\n").encode())
        _fsync_dir(model_dir)
        return version, target
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
