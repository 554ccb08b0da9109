"""The `deepserve train` command as a user meets it: bad input, their own data, a run killed and resumed, a
publish killed half way, and a serving install without torch."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from training.cli import _verdict, train_main

ROOT = Path(__file__).parent.parent


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file and folder a server scanning the repository would see (hidden staging folders excluded); folders
    as "name/": an empty model folder is a model the server reports as unservable."""
    if not repo.exists():
        return {}
    return {str(p.relative_to(repo)) + ("/" if p.is_dir() else ""): b"" if p.is_dir() else p.read_bytes()
            for p in sorted(repo.rglob("*")) if not any(part.startswith(".") for part in p.relative_to(repo).parts)}


def run_cli(capsys, tmp_path: Path, *args: str) -> tuple[int, str]:
    code = train_main([*args, "--repository", str(tmp_path / "models"), "--runs", str(tmp_path / "runs")])
    return code, capsys.readouterr().err


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


BAD_SPECS = [
    (["nope"], ["unknown job 'nope'", "digits_cnn", "'all'"]),
    (["digits_cn"], ["did you mean 'digits_cnn'"]),
    (["digits_cnn", "--set", "train.lrr=0.1"], ["unknown key 'train.lrr'", "did you mean 'train.lr'"]),
    (["digits_cnn", "--set", "train.lr=fast"], ["train.lr = 'fast'", "expected a number"]),
    (["digits_cnn", "--set", "model.activation=swish"], ["model.activation = 'swish'", "relu, gelu, tanh, sigmoid"]),
    (["digits_cnn", "--set", "train.optimizer=lbfgs"], ["sgd, adam, adamw, rmsprop"]),
    (["digits_cnn", "--set", "model.dropout=1.5"], ["model.dropout = 1.5", "[0, 1)"]),
    (["digits_cnn", "--set", "train.lr"], ["expected key=value"]),
    (["digits_cnn", "--epochs", "0"], ["train.epochs = 0", "> 0"]),
    (["digits_cnn", "--config", "/no/such.toml"], ["--config file /no/such.toml does not exist"]),
    (["all", "--set", "train.lr=0.1"], ["belong to one job"]),
    (["digits_cnn", "--set", "export.tolerance=0.01"], ["at most 1e-4"]),
    (["digits_autoencoder", "--set", "train.loss=cross_entropy"], ["does not fit an autoencoder", "'mse' or 'bce'"]),
    (["mnist1d_rnn", "--set", "model.bidirectional=true"], ["export.stream = true needs a unidirectional net"]),
    (["digits_cnn", "--quantize", "int4"], ["--quantize: invalid choice: 'int4'"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD_SPECS, ids=[" ".join(a[0]) for a in BAD_SPECS])
def test_bad_spec_is_one_clear_line_and_publishes_nothing(capsys, tmp_path: Path, args, expected) -> None:
    code, err = run_cli(capsys, tmp_path, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for part in expected:
        assert part in err, err
    assert snapshot(tmp_path / "models") == {}


def test_bad_config_file_names_the_key(capsys, tmp_path: Path) -> None:
    cfg = tmp_path / "mine.toml"
    cfg.write_text("[train]\nepochs = 2\nbatchsize = 8\n")
    code, err = run_cli(capsys, tmp_path, "digits_cnn", "--config", str(cfg))
    assert code == 2 and "unknown key 'train.batchsize'" in err and "train.batch_size" in err
    cfg.write_text("[train\n")
    code, err = run_cli(capsys, tmp_path, "digits_cnn", "--config", str(cfg))
    assert code == 2 and "not valid TOML" in err


def test_bad_user_data_names_the_array_and_the_expected_shape(capsys, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    cases = [
        (write_npz(tmp_path / "noy.npz", x=rng.random((20, 8, 8))), "digits_cnn", ["missing array(s) y", "'x'"]),
        (write_npz(tmp_path / "flat.npz", x=rng.random((20, 64)), y=np.arange(20) % 2), "digits_cnn",
         ["'x' has shape (20, 64)", "[N, H, W] or [N, 1, H, W]"]),
        (write_npz(tmp_path / "yfloat.npz", x=rng.random((20, 40)), y=rng.random(20)), "mnist1d_rnn",
         ["'y' has shape (20,) and dtype float64", "1-D integer array"]),
        (write_npz(tmp_path / "rows.npz", x=rng.random((20, 64)), y=np.arange(19) % 2), "digits_autoencoder",
         ["'x' has 20 rows but 'y' has 19"]),
        (write_npz(tmp_path / "img.npz", x=rng.random((20, 8, 8)), y=np.arange(20) % 2), "langid_transformer",
         ["expects a folder <label>/*.txt"]),
        (tmp_path / "missing.npz", "digits_cnn", ["no such file or folder"]),
    ]
    for path, job, expected in cases:
        code, err = run_cli(capsys, tmp_path, job, "--data", str(path))
        assert code == 2, (job, path, err)
        assert len(err.strip().splitlines()) == 1, err
        for part in expected:
            assert part in err, err
    one = tmp_path / "texts" / "english"
    one.mkdir(parents=True)
    (one / "a.txt").write_text("hello there\nhow are you\n")
    code, err = run_cli(capsys, tmp_path, "langid_transformer", "--data", str(tmp_path / "texts"))
    assert code == 2 and "found 1 label folder(s)" in err and "at least two labels" in err
    assert snapshot(tmp_path / "models") == {}


def test_cuda_requested_without_a_gpu(capsys, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err = run_cli(capsys, tmp_path, "digits_cnn", "--device", "cuda", "--epochs", "1")
    assert code == 2 and "--device cuda" in err and "--device cpu" in err


def test_train_all_summary_says_ok_and_missed_against_each_jobs_target() -> None:
    from training.spec import resolve

    cnn = {"job": "digits_cnn", "version": 3, "train_seconds": 8.04, "target": resolve("digits_cnn")["target"]}
    line = _verdict({**cnn, "test": {"accuracy": 0.99}, "seconds": 10.6})
    assert line.startswith("digits_cnn           v3   test accuracy 0.9900 (target >= 0.985: ok)"), line
    assert line.endswith("10.6 s, training 8.0 s (target <= 60 s: ok)") and "MISSED" not in line
    line = _verdict({**cnn, "test": {"accuracy": 0.98}, "seconds": 60.1})
    assert "(target >= 0.985: MISSED)" in line and "(target <= 60 s: MISSED)" in line and ": ok" not in line
    line = _verdict({**cnn, "test": {"accuracy": 0.985}, "seconds": 60.0})  # exactly on target meets it
    assert line.count(": ok)") == 2 and "MISSED" not in line
    ae = {"job": "digits_autoencoder", "version": 1, "train_seconds": 24.0,
          "target": resolve("digits_autoencoder")["target"]}
    line = _verdict({**ae, "test": {"auroc": 0.99, "mean_auroc": 0.92}, "seconds": 27.8})
    assert "test mean_auroc 0.9200 (target >= 0.93: MISSED)" in line and "(target <= 60 s: ok)" in line
    line = _verdict({**ae, "test": {"auroc": 0.99}, "seconds": 27.8})  # no sweep: the metric is not there
    assert "test mean_auroc n/a   " in line and ">=" not in line


def start(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], list[str]]:
    cmd = [sys.executable, "-m", "training", *args, "--repository", str(tmp / "models"), "--runs", str(tmp / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    return proc, cmd


def finish(started: tuple[subprocess.Popen[str], list[str]]) -> subprocess.CompletedProcess[str]:
    proc, cmd = started
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return finish(start(tmp, *args, env=env))


@pytest.mark.slow
def test_user_npz_with_other_image_size_and_user_text_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    big = np.kron(x.reshape(-1, 8, 8) / 16.0, np.ones((1, 2, 2)))[:600]  # 16x16 images, labels as names
    path = write_npz(tmp_path / "mine.npz", x=big.astype(np.float32), y=y[:600],
                     labels=np.array([f"digit-{i}" for i in range(10)]))
    texts = tmp_path / "texts"
    for label, lines in {"greeting": ["hello there", "good morning", "hi friend", "good evening"] * 5,
                         "number": ["one two three", "four five six", "seven eight", "nine ten"] * 5}.items():
        (texts / label).mkdir(parents=True)
        (texts / label / "part1.txt").write_text("\n".join(lines) + "\n")
    text_run = start(tmp_path / "t", "langid_transformer", "--data", str(texts), "--epochs", "2")  # side by side
    done = train(tmp_path, "digits_cnn", "--data", str(path), "--epochs", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    model_dir = tmp_path / "models" / "digits_cnn"
    assert "dims: 16" in (model_dir / "config.pbtxt").read_text()
    assert (model_dir / "labels.txt").read_text().splitlines()[3] == "digit-3"
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = sess.run(["logits"], {"image": big[-200:, None].astype(np.float32)})[0].argmax(1)
    assert (pred == y[400:600]).mean() > 0.6  # 400 of these were training rows, the rest val/test; chance 0.1

    done = finish(text_run)
    assert done.returncode == 0, done.stderr[-2000:]
    model_dir = tmp_path / "t" / "models" / "langid_transformer"
    assert (model_dir / "labels.txt").read_text().splitlines() == ["greeting", "number"]
    card = json.loads((model_dir / "1" / "card.json").read_text())
    assert card["data"]["lines_per_label"] == {"greeting": 20, "number": 20}


STRAIGHT_RUN = """
import json, sys
import torch
from training.data import load
from training.loop import fit
from training.nets import build
from training.spec import resolve
from training.tasks import make_task
spec = resolve("digits_cnn", flags={"train.epochs": int(sys.argv[1])})
data = load(spec)
torch.manual_seed(0)
net = build(spec, torch.as_tensor(data.train.x[:2]), 10)
print(json.dumps([r["val_loss"] for r in fit(net, make_task(spec, 10), data, spec, quiet=True).history]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_the_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    epochs = 8
    cmd = [sys.executable, "-m", "training", "digits_cnn", "--epochs", str(epochs), "--repository",
           str(tmp_path / "models"), "--runs", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 3 "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(tmp_path / "models") == {}  # killed before publishing: nothing there
    ckpt = torch.load(tmp_path / "runs" / "digits_cnn" / "checkpoint.pt", weights_only=False)
    killed_at = ckpt["epoch"]
    assert 2 <= killed_at < epochs

    done = train(tmp_path, "digits_cnn", "--epochs", str(epochs), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"after epoch {killed_at}/{epochs}" in done.stdout
    assert [ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("epoch ")] == [
        str(e) for e in range(killed_at + 1, epochs + 1)]
    card = json.loads((tmp_path / "models" / "digits_cnn" / "1" / "card.json").read_text())
    assert card["resumed_from_epoch"] == killed_at
    resumed = [r["val_loss"] for r in card["history"]]

    # The resumed run is the run that was never killed: same per-epoch validation losses, epoch for epoch. The
    # reference runs in a fresh process, as the CLI does: state the pytest process gathered from earlier tests
    # (torch's thread count, for one) must not make the two differ.
    ref = subprocess.run([sys.executable, "-c", STRAIGHT_RUN, str(epochs)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert resumed == pytest.approx(json.loads(ref.stdout.splitlines()[-1]), rel=1e-6)

    done = train(tmp_path, "digits_cnn", "--epochs", str(epochs + 1), "--resume")
    assert done.returncode == 2 and "different spec" in done.stderr


@pytest.mark.slow
def test_publish_is_atomic_under_a_crash_and_a_failed_check(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    repo = tmp_path / "models"
    old = repo / "digits_cnn"  # a repository that already serves version 1
    (old / "1").mkdir(parents=True)
    for name in ("model.onnx", "card.json"):
        (old / "1" / name).write_bytes(b"version 1's " + name.encode())
    (old / "config.pbtxt").write_text('name: "digits_cnn"\n')
    (old / "labels.txt").write_text("old labels\n")
    before = snapshot(repo)

    # SIGKILL after the new version is fully written but before it is renamed into place; side by side, the same
    # crash in a model's first-ever publish (an empty repository), and a run whose parity check cannot pass (it
    # must fail the job before anything is written).
    crash_run = start(tmp_path, "digits_cnn", "--epochs", "1", env={"DEEPSERVE_CRASH_AT": "publish:staged"})
    first = tmp_path / "first"
    first_run = start(first, "digits_cnn", "--epochs", "1", env={"DEEPSERVE_CRASH_AT": "publish:staged"})
    failed = train(tmp_path, "digits_cnn", "--epochs", "1", "--set", "export.tolerance=1e-12")
    crashed = finish(crash_run)
    assert crashed.returncode == -signal.SIGKILL
    assert snapshot(repo) == before
    staged = [p for p in (repo / "digits_cnn").iterdir() if p.name.startswith(".publish-")]
    assert len(staged) == 1 and (staged[0] / "model.onnx").exists()  # the crash really was mid-publish
    assert failed.returncode == 1
    assert "parity check failed" in failed.stderr and "nothing published" in failed.stderr
    assert snapshot(repo) == before

    # The first publish crashed with the whole model staged, and the repository shows no model folder at all.
    assert finish(first_run).returncode == -signal.SIGKILL
    assert snapshot(first / "models") == {}
    (staged_model,) = [p for p in (first / "models").iterdir()]
    assert staged_model.name.startswith(".publish-")
    assert {p.name for p in staged_model.iterdir()} == {"1", "config.pbtxt", "labels.txt"}
    assert (staged_model / "1" / "model.onnx").exists()
    assert train(first, "digits_cnn", "--epochs", "1").returncode == 0
    assert [p.name for p in (first / "models").iterdir()] == ["digits_cnn"]  # and the dead stage is gone
    assert set(snapshot(first / "models")) == {"digits_cnn/", "digits_cnn/config.pbtxt", "digits_cnn/labels.txt",
                                                "digits_cnn/1/", *(f"digits_cnn/1/{f}" for f in (
                                                    "model.onnx", "card.json", "training_curve.png",
                                                    "examples.npz"))}

    # The repository still works: the next publish is version 2 and sweeps the dead staging folder away.
    assert train(tmp_path, "digits_cnn", "--epochs", "1").returncode == 0
    after = snapshot(repo)
    assert {k for k in after if k not in before} == {"digits_cnn/2/", *(f"digits_cnn/2/{f}" for f in (
        "model.onnx", "card.json", "training_curve.png", "examples.npz"))}
    assert all(after[k] == v for k, v in before.items() if k.startswith("digits_cnn/1/"))
    assert after["digits_cnn/labels.txt"].decode().splitlines() == [str(i) for i in range(10)]
    assert not [p for p in (repo / "digits_cnn").iterdir() if p.name.startswith(".")]


def state_digest(state: dict) -> str:
    """sha256 over a state dict's tensors in key order (the card's weights_sha256_per_rank)."""
    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        h.update(key.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_two_process_data_parallel_training_publishes_one_checked_model(tmp_path: Path) -> None:
    """`deepserve train JOB --nproc 2` runs torchrun: DDP over gloo, DistributedSampler, rank 0 publishes."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    from training.data import load
    from training.spec import resolve

    cmd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))", "train",
           "digits_cnn", "--nproc", "2", "--epochs", "3", "--repository", str(tmp_path / "models"), "--runs",
           str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("published") == 1 and done.stdout.count("epoch 3 ") == 1  # rank 0 alone reports
    model_dir = tmp_path / "models" / "digits_cnn"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    card = json.loads((model_dir / "1" / "card.json").read_text())
    assert card["world_size"] == 2 and card["parity"]["passed"] and card["parity"]["max_abs_diff"] <= 1e-4
    data = load(resolve("digits_cnn"))
    # Sharded, not copied: the two ranks' samples, summed, are the training split once (1,293 rows, odd, so
    # DistributedSampler repeats one row to even the shards; the repeat trains but is not counted).
    assert len(data.train.y) % 2 == 1 and card["train_samples_per_epoch"] == len(data.train.y)
    # Data parallel, not two separate runs: both ranks end with rank 0's final weights, bit for bit (parameters
    # and batch-norm statistics), and those are the weights rank 0 checkpointed.
    ckpt = torch.load(tmp_path / "runs" / "digits_cnn" / "checkpoint.pt", weights_only=False)
    assert card["weights_sha256_per_rank"] == [state_digest(ckpt["best_model"])] * 2
    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    accuracy = float((sess.run(["logits"], {"image": data.test.x})[0].argmax(1) == data.test.y).mean())
    assert accuracy >= 0.90 and accuracy == pytest.approx(card["test"]["onnxruntime_accuracy"])


@pytest.mark.slow
def test_multi_node_rendezvous_stops_early_on_every_rank_together(tmp_path: Path) -> None:
    """The README's multi-node command, two torchrun agents meeting at a c10d rendezvous as two machines would,
    with early stopping on: every rank must take the same stop and best-epoch decision, or one rank is left
    waiting in a collective the other never enters and the job hangs."""
    torch = pytest.importorskip("torch")
    from support import free_port

    # val_accuracy takes one of len(val) + 1 = 145 values, so with patience 1 it must stop before epoch 146.
    epochs = 150
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test", "--nproc-per-node", "1",
             "-m", "training", "digits_cnn", "--epochs", str(epochs), "--set", "train.patience=1", "--set",
             "train.early_stopping_metric=val_accuracy", "--set", "train.schedule=none",
             "--repository", str(tmp_path / "models"), "--runs", str(tmp_path / "runs")]
    procs = [subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:  # a hung job: end each agent's whole process group, workers included
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    assert stdout.count("early stopping") == 1 and stdout.count("published") == 1
    card = json.loads((tmp_path / "models" / "digits_cnn" / "1" / "card.json").read_text())
    assert card["world_size"] == 2 and card["stopped_early"]
    history = card["history"]
    assert len(history) < epochs and history[-1]["epoch"] == card["best_epoch"] + 1
    assert history[-1]["val_accuracy"] <= max(r["val_accuracy"] for r in history[:-1])
    ckpt = torch.load(tmp_path / "runs" / "digits_cnn" / "checkpoint.pt", weights_only=False)
    assert ckpt["stopped_early"] and card["weights_sha256_per_rank"] == [state_digest(ckpt["best_model"])] * 2


BLOCK_TORCH = textwrap.dedent("""
    import importlib, pkgutil, sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"No module named {name!r} (blocked: a serving install has no torch)")

    sys.meta_path.insert(0, BlockTorch())
    import service
    for m in pkgutil.walk_packages(service.__path__, "service."):
        importlib.import_module(m.name)
    assert not any(n == "torch" or n.startswith("torch.") for n in sys.modules)
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker did not block torch")
    from service.cli import main
    sys.exit(main(["train", "digits_cnn", "--epochs", "1"]))
""")


def test_service_imports_without_torch_and_train_says_what_is_missing(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "deepserve[train]" in done.stderr and "torch" in done.stderr
