"""Each training job end to end in a real process: train (a few epochs) -> export -> parity -> publish; then the
published model.onnx is loaded with onnxruntime, as the server loads it, and scored on the job's test split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("mnist1d")

import onnxruntime as ort  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from service._proto import model_config_pb2  # noqa: E402
from training.data import hold_out, load  # noqa: E402
from training.spec import resolve  # noqa: E402

pytestmark = pytest.mark.slow

# (job, extra CLI args for a fast run, metric floor on the test split, published input/outputs)
JOBS = [
    ("digits_cnn", ["--epochs", "3", "--quantize", "int8"], 0.90),
    ("mnist1d_rnn", ["--epochs", "3", "--set", "data.mnist1d_samples=2000"], 0.40),
    ("langid_transformer", ["--epochs", "2", "--set", "data.max_per_language=100"], 0.40),
    ("digits_autoencoder", ["--epochs", "10", "--set", "evaluate.sweep=false"], 0.80),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """All four jobs at once, each in its own process and repository: most of a short run is imports and export,
    single-threaded, so on a 2-core machine running them side by side halves the wall time of this module."""
    import os

    procs = {}
    for job, args, _ in JOBS:
        tmp = tmp_path_factory.mktemp(job)
        cmd = [sys.executable, "-m", "training", job, *args, "--set", "train.threads=1", "--repository",
               str(tmp / "models"), "--runs", str(tmp / "runs")]
        procs[job] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       cwd=Path(__file__).parent.parent, env=dict(os.environ)), tmp, cmd)
    done = {}
    for job, (proc, tmp, cmd) in procs.items():
        out, err = proc.communicate(timeout=600)
        done[job] = (subprocess.CompletedProcess(cmd, proc.returncode, out, err), tmp)
    return done


def sets_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def score(sess: ort.InferenceSession, job: str, x: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + 256]}) for i in range(0, len(x), 256)]
    if job == "digits_autoencoder":
        return float(roc_auc_score(y, np.concatenate([o[1] for o in outs])))
    return float((np.concatenate([o[0] for o in outs]).argmax(1) == y).mean())


@pytest.mark.parametrize(("job", "args", "floor"), JOBS, ids=[j[0] for j in JOBS])
def test_job_end_to_end(runs, job: str, args: list[str], floor: float) -> None:
    done, tmp_path = runs[job]
    assert done.returncode == 0, done.stderr[-3000:]
    model_dir = tmp_path / "models" / job
    version = model_dir / "1"
    assert sorted(p.name for p in version.iterdir()) == ["card.json", "examples.npz", "model.onnx",
                                                          "training_curve.png"]
    assert (version / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")], "staging folder left behind"

    # The published file scores the job's own test split (same spec, so the same split) above the floor.
    spec = resolve(job, sets=sets_of(args))
    data = load(spec)
    if spec["task"] == "autoencode":
        data = hold_out(data, spec["data"]["anomaly_class"])
    sess = session(version / "model.onnx")
    value = score(sess, job, data.test.x, data.test.y)
    assert value >= floor, f"{job}: {value:.3f} on the test split, floor {floor}"

    card = json.loads((version / "card.json").read_text())
    assert card["version"] == 1 and card["seed"] == 0 and card["spec"]["job"] == job
    assert card["data"]["splits"] == data.sizes()
    epochs = int(args[args.index("--epochs") + 1])
    assert card["spec"]["train"]["epochs"] == epochs and [r["epoch"] for r in card["history"]] == list(
        range(1, epochs + 1))
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert {c["batch"] for c in card["parity"]["cases"]} == {1, 7, 64}
    # Sequence models are checked at every batch size at lengths 5, 40 and 100 (shorter and longer than
    # training's), the others once per batch size.
    sequence = job in ("mnist1d_rnn", "langid_transformer")
    assert sorted((c["batch"], c["length"]) for c in card["parity"]["cases"]) == sorted(
        (b, n) for b in (1, 7, 64) for n in ((5, 40, 100) if sequence else (None,)))
    assert set(card["versions"]) >= {"torch", "onnx", "onnxruntime"}
    metric = "onnxruntime_auroc" if job == "digits_autoencoder" else "onnxruntime_accuracy"
    assert card["test"][metric] == pytest.approx(value, abs=1e-6)

    cfg = read_config(model_dir)
    assert cfg.name == job and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 256
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    graph_inputs = [(i.name, i.shape) for i in sess.get_inputs()]
    assert [i.name for i in cfg.input] == [graph_inputs[0][0]]
    assert [o.name for o in cfg.output] == [o.name for o in sess.get_outputs()]
    examples = np.load(version / "examples.npz")
    assert examples["label"].dtype == np.int64 and 8 <= len(examples["label"]) <= 16
    check_contract(job, model_dir, cfg, sess, examples)
    served = [model_dir]
    if job == "digits_cnn":
        check_int8(tmp_path / "models", data)
        served.append(tmp_path / "models" / "digits_cnn_int8")
    if job == "mnist1d_rnn":
        check_stream(tmp_path / "models", sess, examples)
        served.append(tmp_path / "models" / "mnist1d_rnn_stream")
    for d in served:
        check_the_server_loads_it(d)


def check_the_server_loads_it(model_dir: Path) -> None:
    """The serving half's own loader accepts what was published (config checked against the graph, warm-up)."""
    from prometheus_client import CollectorRegistry

    from service.config import read_config
    from service.metrics import Metrics
    from service.models import load_version

    config = read_config(model_dir, (model_dir / "config.pbtxt").read_bytes())
    mv = load_version(model_dir, 1, config, True, Metrics(CollectorRegistry()))
    assert mv.name == model_dir.name and mv.inputs


def check_stream(repo: Path, whole: ort.InferenceSession, examples: np.lib.npyio.NpzFile) -> None:
    """mnist1d_rnn_stream: stepping the published cell through each example gives the whole-sequence logits."""
    from training.stream import step_through

    stream_dir = repo / "mnist1d_rnn_stream"
    cfg = read_config(stream_dir)
    assert cfg.parameters["stream_of"].string_value == "mnist1d_rnn"
    assert [i.name for i in cfg.input] == ["x_t"] and [o.name for o in cfg.output] == ["y"]
    (state,) = cfg.sequence_batching.state
    assert (state.input_name, state.output_name) == ("h_in", "h_out") and state.initial_state[0].zero_data
    sess = session(stream_dir / "1" / "model.onnx")
    assert [(i.name, i.shape[1]) for i in sess.get_inputs()] == [("x_t", 1), ("h_in", state.dims[0])]
    x = examples["signal"]
    stepped = step_through(sess, x, int(state.dims[0]))
    assert np.abs(stepped - whole.run(["logits"], {"signal": x})[0]).max() <= 1e-5
    card = json.loads((stream_dir / "1" / "card.json").read_text())
    assert card["stream"]["stepped_max_abs_diff"] <= 1e-5 and card["stream"]["of"] == "mnist1d_rnn"
    assert [c["length"] for c in card["stream"]["stepped_cases"]] == [5, 40, 100]


def check_contract(job: str, model_dir: Path, cfg: model_config_pb2.ModelConfig, sess: ort.InferenceSession,
                   examples: np.lib.npyio.NpzFile) -> None:
    """Tensor names, dtypes and dims the server and clients rely on."""
    fp32, int64 = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT64
    outs = {o.name: o for o in cfg.output}
    if job == "digits_autoencoder":
        assert (cfg.input[0].name, cfg.input[0].data_type, list(cfg.input[0].dims)) == ("features", fp32, [64])
        assert list(outs["reconstruction"].dims) == [64] and list(outs["anomaly_score"].dims) == []
        assert not (model_dir / "labels.txt").exists()
        rec, s = sess.run(None, {"features": examples["features"]})
        assert rec.shape == examples["features"].shape and s.shape == (len(examples["label"]),)
        assert set(examples["label"].tolist()) == {0, 1}
        return
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert outs["probabilities"].label_filename == "labels.txt" and outs["logits"].label_filename == ""
    assert list(outs["logits"].dims) == [len(labels)] == list(outs["probabilities"].dims)
    x = examples[cfg.input[0].name]
    logits, probs = sess.run(None, {cfg.input[0].name: x})
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    if job == "digits_cnn":
        assert labels == [str(i) for i in range(10)]
        assert (cfg.input[0].name, list(cfg.input[0].dims)) == ("image", [1, 8, 8]) and 0 <= x.min() <= x.max() <= 1
    elif job == "mnist1d_rnn":
        assert (cfg.input[0].name, list(cfg.input[0].dims)) == ("signal", [-1, 1])
        for length in (5, 100):  # the length axis is dynamic, not frozen at 40
            assert sess.run(None, {"signal": np.resize(x, (3, length, 1))})[0].shape == (3, 10)
    else:
        assert (cfg.input[0].name, cfg.input[0].data_type, list(cfg.input[0].dims)) == ("tokens", int64, [-1])
        assert len(labels) >= 13 and "english" in labels
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params == {"text_input": "tokens", "text_encoding": "utf8_bytes", "text_offset": "1",
                          "text_pad_id": "0", "text_max_length": "256"}
        text = [str(t) for t in examples["text"]]
        assert len(text) == len(x)
        # The encoding the config declares reproduces the example tokens, and padding does not change answers.
        row = np.frombuffer(text[0].encode()[:256], np.uint8).astype(np.int64) + 1
        alone = sess.run(None, {"tokens": row[None, :]})[1][0]
        padded = np.zeros((2, len(row) + 30), np.int64)
        padded[0, :len(row)] = row
        padded[1, :] = 65
        assert np.abs(sess.run(None, {"tokens": padded})[1][0] - alone).max() < 1e-5
        assert np.array_equal(x[0][x[0] != 0], row)


def check_int8(repo: Path, data) -> None:
    q_dir = repo / "digits_cnn_int8"
    cfg = read_config(q_dir)
    assert cfg.name == "digits_cnn_int8" and (q_dir / "labels.txt").exists()
    card = json.loads((q_dir / "1" / "card.json").read_text())
    q = card["quantization"]
    assert q["metric"] == "accuracy" and q["int8_bytes"] < q["fp32_bytes"] and q["speedup"] > 0
    value = score(session(q_dir / "1" / "model.onnx"), "digits_cnn", data.test.x, data.test.y)
    assert value == pytest.approx(q["int8"], abs=1e-9) and value >= 0.85
    assert q["change"] == pytest.approx(q["int8"] - q["fp32"])
