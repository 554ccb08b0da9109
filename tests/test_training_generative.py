"""digits_gan and digits_vae end to end in real processes: the published digits_cnn judges them, a short run of
each publishes a generator that onnxruntime and the server's loader accept, and the default runs draw digits
that digits_cnn reads as the label asked for, at least 90% of the time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import onnxruntime as ort  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from service._proto import model_config_pb2  # noqa: E402
from training.quality import frechet_distance  # noqa: E402
from training.spec import resolve, training_order  # noqa: E402

ROOT = Path(__file__).parent.parent
JOBS = ("digits_gan", "digits_vae")
SHORT = ["--epochs", "2"]


def command(job: str, tmp: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "training", job, *args, "--set", "train.threads=1", "--repository",
            str(tmp / "models"), "--runs", str(tmp / "runs")]


def popen(cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """digits_cnn (the judge) at its defaults, then a short and a default run of both jobs, all four side by side,
    each pair in its own repository holding a copy of the judge."""
    judge = tmp_path_factory.mktemp("judge")
    done = subprocess.run(command("digits_cnn", judge), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    procs = {}
    for run, args in (("short", SHORT), ("default", [])):
        tmp = tmp_path_factory.mktemp(run)
        shutil.copytree(judge / "models" / "digits_cnn", tmp / "models" / "digits_cnn")
        for job in JOBS:
            cmd = command(job, tmp, *args)
            procs[f"{job}/{run}"] = (popen(cmd), tmp, cmd)
    out = {}
    for key, (proc, tmp, cmd) in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        out[key] = (subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), tmp)
    return out


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_train_all_trains_the_judge_before_the_jobs_it_judges() -> None:
    order = training_order()
    assert {"digits_cnn", *JOBS} <= set(order) and len(order) == len(set(order))
    assert all(order.index("digits_cnn") < order.index(job) for job in JOBS)
    assert all(resolve(job)["evaluate"]["judge"] == "digits_cnn" for job in JOBS)


def test_frechet_distance_of_gaussians_is_the_mean_shift_squared_when_covariances_agree() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([3.0, 0.0, 4.0])) == pytest.approx(25.0, abs=1e-6)
    dead = np.concatenate([a, np.zeros((4000, 2))], axis=1)  # dead ReLU features: singular covariances
    assert frechet_distance(dead, dead + 1.0) == pytest.approx(5.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("job", JOBS)
def test_without_a_published_judge_the_job_stops_before_training(tmp_path: Path, job: str) -> None:
    done = subprocess.run(command(job, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"{job} is judged by the published digits_cnn" in done.stderr
    assert f"deepserve train digits_cnn --repository {tmp_path / 'models'}" in done.stderr
    assert "epoch 1 " not in done.stdout and not (tmp_path / "models" / job).exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first test to use `runs` waits for all of it: five trainings on a shared machine
@pytest.mark.parametrize("job", JOBS)
def test_short_run_publishes_a_checked_servable_generator(runs, job: str) -> None:
    done, tmp = runs[f"{job}/short"]
    assert done.returncode == 0, done.stderr[-3000:]
    model_dir = tmp / "models" / job
    version = model_dir / "1"
    assert sorted(p.name for p in version.iterdir()) == ["card.json", "examples.npz", "model.onnx",
                                                          "training_curve.png"]
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]
    spec = resolve(job)
    latent = spec["model"]["latent"]

    cfg = read_config(model_dir)
    fp32, int64 = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT64
    assert cfg.name == job and cfg.max_batch_size == 256
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("z", fp32, [latent]), ("label", int64, [])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("image", fp32, [1, 8, 8])]

    sess = session(version / "model.onnx")
    examples = np.load(version / "examples.npz")
    assert sorted(examples.files) == ["label", "z"]
    assert examples["z"].shape == (16, latent) and examples["label"].tolist() == [*range(10), *range(6)]
    (image,) = sess.run(["image"], {"z": examples["z"], "label": examples["label"]})
    assert image.shape == (16, 1, 8, 8) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    (again,) = sess.run(["image"], {"z": examples["z"][3:4], "label": examples["label"][3:4]})
    assert np.abs(again[0] - image[3]).max() <= 1e-5  # a sample does not depend on its batch

    card = json.loads((version / "card.json").read_text())
    assert card["job"] == job and card["task"] == "generate" and [r["epoch"] for r in card["history"]] == [1, 2]
    assert card["parity"]["passed"] and card["parity"]["max_abs_diff"] <= 1e-4
    assert [c["batch"] for c in card["parity"]["cases"]] == [1, 7, 64]
    quality = card["quality"]
    assert quality["samples"] == 1000 and quality["real_train_images"] == 1000 and quality["real_test_images"] == 360
    assert sorted(quality["sample_accuracy_per_label"]) == [str(i) for i in range(10)]
    assert quality["judge"]["model"] == "digits_cnn" and quality["judge"]["version"] == 1
    for key in ("sample_accuracy", "frechet_distance", "frechet_distance_real_train"):
        assert card["test"][key] == quality[key]
    assert 0 <= quality["sample_accuracy"] <= 1 and quality["frechet_distance_real_train"] >= 0
    if job == "digits_vae":
        test = card["test"]
        assert test["elbo"] < 0 and test["elbo"] == pytest.approx(-(test["reconstruction_nats"] + test["kl_nats"]))
    check_the_server_loads_it(model_dir)


def check_the_server_loads_it(model_dir: Path) -> None:
    from prometheus_client import CollectorRegistry

    from service.config import read_config as service_config
    from service.metrics import Metrics
    from service.models import load_version

    config = service_config(model_dir, (model_dir / "config.pbtxt").read_bytes())
    mv = load_version(model_dir, 1, config, True, Metrics(CollectorRegistry()))
    assert mv.name == model_dir.name and sorted(mv.inputs) == ["label", "z"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("job", JOBS)
def test_default_run_draws_digits_the_classifier_reads_as_their_label(runs, job: str) -> None:
    """Scored here afresh (other z than the job's own) with the published judge in onnxruntime."""
    done, tmp = runs[f"{job}/default"]
    assert done.returncode == 0, done.stderr[-3000:]
    spec = resolve(job)
    card = json.loads((tmp / "models" / job / "1" / "card.json").read_text())
    assert card["spec"]["train"]["epochs"] == spec["train"]["epochs"] == len(card["history"])
    assert card["test"]["sample_accuracy"] >= 0.90
    rng = np.random.default_rng(12345)
    labels = np.repeat(np.arange(10, dtype=np.int64), 50)
    z = rng.standard_normal((len(labels), spec["model"]["latent"])).astype(np.float32)
    (images,) = session(tmp / "models" / job / "1" / "model.onnx").run(["image"], {"z": z, "label": labels})
    (logits,) = session(tmp / "models" / "digits_cnn" / "1" / "model.onnx").run(["logits"], {"image": images})
    assert float((logits.argmax(1) == labels).mean()) >= 0.90


def test_deepserve_infer_draws_a_generators_samples_as_a_png(runs, tmp_path: Path) -> None:
    """`deepserve infer digits_gan --label 3 --count 16 --png grid.png` against a real server, over HTTP: 16
    samples of the label asked for, drawn as one 4x4 grid of 8x8 tiles scaled up."""
    from PIL import Image
    from support import Server

    _, tmp = runs["digits_gan/short"]
    server = Server(tmp / "models", "--no-strict-readiness")
    try:
        out = tmp_path / "grid.png"
        done = subprocess.run([sys.executable, "-m", "service.cli", "infer", "digits_gan", "--label", "3", "--count",
                               "16", "--png", str(out), "--url", server.http_url], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "image float32 [16, 1, 8, 8]" in done.stdout and f"wrote 16 images to {out}" in done.stdout
        with Image.open(out) as png:
            assert png.mode == "L" and png.size == (4 * 64 + 5 * 2, 4 * 64 + 5 * 2)
        done = subprocess.run([sys.executable, "-m", "service.cli", "infer", "digits_cnn", "--label", "3", "--url",
                               server.url], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "--label is for generators with inputs z and label" in done.stderr
    finally:
        server.stop()
