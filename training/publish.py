"""Publish into the model repository (Triton layout) so a server scanning it never sees half a model.

The version folder is the unit of atomicity: it is built complete under a hidden name inside the model folder
(same filesystem, and the server skips names starting with '.') and renamed into place in one step. Model-level
files (config.pbtxt, labels.txt) are each replaced atomically right after; the version goes first, because a
version without a config is still servable (the server completes a missing config from the graph) while a config
without any version is not.

A model's first publish has no model folder to stage in, and creating one first would show the server a model with
no version (reported as unservable) until the rename, or for good after a crash. So the whole model folder, version
1 and config included, is built under a hidden name at the repository root and renamed into place. A publish
killed at any point leaves every visible file and folder as it was."""

from __future__ import annotations

import os
import shutil
import signal
import socket
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
    text: str = ""  # a whole config.pbtxt, for a model the fields above cannot describe (a generation model)


def config_text(spec: ModelSpec) -> str:
    """Triton ModelConfig text, built as a protobuf message so it always parses where Triton's does."""
    if spec.text:
        return spec.text
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


def _stage_name() -> str:
    """.publish-<pid>-<random>-<host>: the host, because on a shared filesystem another machine's pid means
    nothing here."""
    return f".publish-{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


def _clean_stale(folder: Path) -> None:
    """Remove hidden staging folders of publishes on this machine that died (their process is gone)."""
    for p in folder.glob(".publish-*"):
        try:
            parts = p.name.split("-", 3)
            if len(parts) == 4 and parts[3] != socket.gethostname():
                continue
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_dir():
            _fsync_tree(f)
        else:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _publish_first(repo: Path, spec: ModelSpec, write_version: Callable[[Path, int], None],
                   labels: list[str] | None) -> tuple[int, Path] | None:
    """The whole model folder staged at the repository root and renamed into place. None when the model folder
    appeared meanwhile (another publisher): the caller then publishes the next version inside it."""
    model_dir = repo / spec.name
    stage = repo / _stage_name()
    try:
        (stage / "1").mkdir(parents=True)
        write_version(stage / "1", 1)
        _write_file(stage / "config.pbtxt", config_text(spec).encode())
        if labels is not None:
            _write_file(stage / "labels.txt", ("\n".join(labels) + "\n").encode())
        _fsync_tree(stage)
        crash_point("publish:staged")
        try:
            os.rename(stage, model_dir)  # fails if the folder now exists and is not empty
        except OSError:
            return None
        _fsync_dir(repo)
        return 1, model_dir / "1"
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def publish(repo: Path, spec: ModelSpec, write_version: Callable[[Path, int], None],
            labels: list[str] | None = None) -> tuple[int, Path]:
    """Stage the version folder with `write_version(folder, version)`, rename it into place, then replace the
    model-level files. Returns (version, its folder). Any exception removes the staging folder."""
    model_dir = repo / spec.name
    repo.mkdir(parents=True, exist_ok=True)
    _clean_stale(repo)
    if not model_dir.exists():
        first = _publish_first(repo, spec, write_version, labels)
        if first is not None:
            return first
    _clean_stale(model_dir)
    stage = model_dir / _stage_name()
    try:
        for _ in range(5):
            version = next_version(model_dir)
            stage.mkdir()
            write_version(stage, version)
            _fsync_tree(stage)
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
