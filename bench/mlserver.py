"""MLServer's REST beside ours: MLServer in its own virtualenv (its pins conflict with the project's), serving the
same digits_cnn ONNX file through a minimal custom runtime (bench/mlserver_runtime.py: one onnxruntime session,
our server's thread settings for the model, run in MLServer's main process: `parallel_workers: 0`, as our server
runs a fast model inline; adaptive batching left at MLServer's default, off).

The virtualenv is created on first use with a pinned MLServer and the onnxruntime our server runs; when that
fails (no network, a wheel missing), the row is skipped with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata as pkg
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf import json_format

from bench import compute
from bench.loadgen import PerfAnalyzer
from bench.models import DIGITS
from bench.procs import ROOT, Target, free_port, model_info
from service._proto import model_config_pb2

if TYPE_CHECKING:
    from bench.harness import Run

MLSERVER_VERSION = "1.7.1"
VENV = ROOT / "bench" / "results" / "mlserver-venv"  # bench/results/ is git-ignored; kept between runs
RUNTIME = Path(__file__).with_name("mlserver_runtime.py")


def ensure(say: Callable[[str], None], timeout_s: float = 1200.0) -> tuple[Path | None, str]:
    """The virtualenv's `mlserver` command, installing it first when needed; else None and why not."""
    cli, py = VENV / "bin" / "mlserver", VENV / "bin" / "python"
    ort_version = pkg.version("onnxruntime")
    check = [str(py), "-c", f"import mlserver, onnxruntime; assert mlserver.__version__ == {MLSERVER_VERSION!r}"]
    if cli.exists() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0:
        return cli, f"MLServer {MLSERVER_VERSION} ({VENV})"
    say(f"installing MLServer {MLSERVER_VERSION} and onnxruntime {ort_version} into {VENV} (first use, minutes)")
    shutil.rmtree(VENV, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(py), "-m", "pip", "install", "-q", f"mlserver=={MLSERVER_VERSION}", f"onnxruntime=={ort_version}"]]
    for argv in steps:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(argv[:4])} failed: {exc}"
        if out.returncode != 0:
            lines = [line for line in (out.stdout + out.stderr).splitlines() if not line.startswith("WARNING")]
            return None, f"{' '.join(argv[:4])} exited {out.returncode}: {' '.join(lines)[-400:]}"
    if subprocess.run(check, capture_output=True, timeout=120).returncode != 0:
        return None, f"MLServer {MLSERVER_VERSION} installed into {VENV} but does not import"
    return cli, f"MLServer {MLSERVER_VERSION} ({VENV}, installed by this run)"


def target(cli: Path, model_file: Path, cfg: model_config_pb2.ModelConfig, version: str, intra_threads: int,
           work: Path, logs: Path) -> Target:
    """An MLServer process serving `model_file` as cfg.name on free ports (HTTP, gRPC; metrics off)."""
    folder = work / "mlserver"
    model_dir = folder / cfg.name
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, model_dir / "model.onnx")
    shutil.copy(RUNTIME, model_dir / RUNTIME.name)
    (model_dir / "triton_config.json").write_text(json.dumps(json_format.MessageToDict(
        cfg, preserving_proto_field_name=True)))
    http, grpc_port = free_port(), free_port()
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http, "grpc_port": grpc_port, "metrics_port": free_port(),
        "metrics_endpoint": None, "parallel_workers": 0, "debug": False, "load_models_at_startup": True}))
    batch = [-1] if cfg.max_batch_size > 0 else []
    tensors = {side: [{"name": t.name, "datatype": model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_"),
                       "shape": [*batch, *t.dims]} for t in ts] for side, ts in (("inputs", cfg.input),
                                                                                 ("outputs", cfg.output))}
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": cfg.name, "implementation": f"{RUNTIME.stem}.OnnxModel", **tensors,
        "parameters": {"uri": "./model.onnx", "version": version, "extra": {"intra_op_threads": intra_threads}}}))
    return Target("mlserver", [str(cli), "start", str(folder)], grpc_port, logs / "mlserver.log", http)


def json_input(cfg: model_config_pb2.ModelConfig, path: Path) -> Path:
    """perf_analyzer's --input-data file for one sample of every input (random values): its JSON tensor format
    sends only data it is given."""
    rng = np.random.default_rng(0)
    sample = {t.name: rng.random(int(np.prod([max(d, 1) for d in t.dims]))).round(4).tolist() for t in cfg.input}
    path.write_text(json.dumps({"data": [sample]}))
    return path


def compare(run: Run, server: Target, version: str, work: Path) -> None:
    """MLServer's REST beside ours, digits_cnn batch 1: ours with binary tensors, ours with JSON tensors and
    MLServer (JSON: it has no binary tensor extension) in one ABBA sequence at each HTTP concurrency level."""
    if run.plan.mlserver == "off":
        run.results.mlserver_note = "not measured: --mlserver off"
        return
    if not isinstance(run.gen, PerfAnalyzer):
        run.results.mlserver_note = ("not measured: needs perf_analyzer (JSON tensors); the Python generator "
                                     "sends binary ones only")
        return
    cli, note = ensure(run.say)
    if cli is None:
        run.results.mlserver_note = f"not measured: {note}"
        run.say(f"MLServer skipped: {note}")
        return
    model_file = next((run.repo.root / DIGITS).glob(f"{version}/model.onnx"))
    _, cfg_bytes = model_info(server.url, DIGITS)
    cfg = model_config_pb2.ModelConfig.FromString(cfg_bytes)
    intra = compute.session(model_file, cfg)[1]
    run.results.mlserver_note = f"{note}; runtime bench/mlserver_runtime.py, {intra} intra-op thread(s)"
    json_flags = ("--input-tensor-format", "json", "--output-tensor-format", "json", "--input-data",
                  str(json_input(cfg, work / "input.json")))
    try:
        ml = target(cli, model_file, cfg, version, intra, work, run.logs).start()
    except RuntimeError as exc:
        run.results.mlserver_note = f"not measured: MLServer did not start: {str(exc)[:300]}"
        run.say(run.results.mlserver_note)
        return
    with ml:
        run.warm(ml, DIGITS, version, 1, 200, ["grpc"])  # MLServer has no binary tensor extension
        for conc in run.plan.http_concurrency:
            ms = run.abba(lambda c=conc: run.point(server, DIGITS, version, 1, c, "server", protocol="http"),
                          lambda c=conc: run.point(server, DIGITS, version, 1, c, "server (JSON)", protocol="http",
                                                   extra=json_flags),
                          lambda c=conc: run.point(ml, DIGITS, version, 1, c, "MLServer (JSON)", protocol="http",
                                                   extra=json_flags))
            if ms:
                run.results.mlserver.append(tuple(ms))
                run.say(f"MLServer c{conc}: ours binary {ms[0].requests_per_s:,.0f}, JSON "
                        f"{ms[1].requests_per_s:,.0f}, MLServer {ms[2].requests_per_s:,.0f} req/s")
