"""One job end to end: spec -> data -> train -> test -> export -> parity -> publish (-> int8). Every step that can
reject the run (bad spec, bad data, failed export or parity) runs before the first byte reaches the repository."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import card as cards
from training.data import Dataset, hold_out, load
from training.export import export, parity
from training.generative import export_sampler, sampler_parity, write_sampler_examples
from training.loop import Dist, FitResult, Log, fit
from training.nets import build
from training.publish import ModelSpec, Tensor, publish
from training.quality import find_judge, sample_quality
from training.quantize import compare, quantize, run_all
from training.spec import Options, SpecError, fingerprint, resolve
from training.tasks import auroc, make_task
from training.tokens import PAD_ID, TOKEN_OFFSET


def pick_device(name: str, dist: Dist) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SpecError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                            "expected a machine with an NVIDIA GPU and a CUDA build of torch, or --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _dist() -> Dist:
    """torchrun sets WORLD_SIZE/RANK; the process group itself is started in training.distributed."""
    return Dist(rank=int(os.environ.get("RANK", "0")), world=int(os.environ.get("WORLD_SIZE", "1")))


def model_spec(name: str, data: Dataset, task_kind: str, outputs: list[str], max_length: int) -> ModelSpec:
    x = data.test.x
    params: dict[str, str] = {}
    if x.dtype == np.int64:
        dims = [-1]
        params = {"text_input": data.input_name, "text_encoding": "utf8_bytes", "text_offset": str(TOKEN_OFFSET),
                  "text_pad_id": str(PAD_ID), "text_max_length": str(max_length)}
    elif x.ndim == 3 and x.shape[-1] == 1:
        dims = [-1, 1]
    else:
        dims = list(x.shape[1:])
    inputs = [Tensor(data.input_name, "int64" if x.dtype == np.int64 else "float32", dims)]
    if task_kind == "autoencode":
        outs = [Tensor(outputs[0], "float32", list(x.shape[1:])), Tensor(outputs[1], "float32", [])]
    else:
        k = data.num_classes
        outs = [Tensor(outputs[0], "float32", [k]), Tensor(outputs[1], "float32", [k], "labels.txt")]
    return ModelSpec(name, inputs, outs, params)


def sampler_spec(name: str, net: torch.nn.Module, data: Dataset) -> ModelSpec:
    """A generator's contract: z FP32 [B, latent] and label INT64 [B] in, image FP32 [B, 1, H, W] out."""
    inputs = [Tensor("z", "float32", [net.config.latent]), Tensor("label", "int64", [])]
    return ModelSpec(name, inputs, [Tensor("image", "float32", list(data.test.x.shape[1:]))])


def export_sampler_and_judge(net: torch.nn.Module, data: Dataset, spec: dict[str, Any], path: Path,
                             judge: tuple[Path, int]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Export the sampler alone, check it against torch, and judge its samples from the exported file."""
    sampler, latent, seed = net.sampler(), net.config.latent, spec["train"]["seed"]
    outputs = export_sampler(sampler, latent, path)
    checked = sampler_parity(sampler, latent, data.num_classes, path, spec["export"]["tolerance"], seed)
    quality = sample_quality(path, judge[0], judge[1], data, latent, spec["evaluate"]["samples_per_label"], seed)
    return outputs, checked, quality


def sweep(spec: dict[str, Any], full: Dataset, device: torch.device, dist: Dist, log: Log,
          done: dict[int, float]) -> dict[str, float]:
    """AUROC with each class held out in turn (same spec and seed), the number the autoencoder is judged by."""
    result = {}
    for c in range(full.num_classes):
        if c not in done:
            view = hold_out(full, c)
            net = build(spec, torch.as_tensor(view.train.x[:2]), 0)
            task = make_task(spec, 0)
            fit(net, task, view, spec, device=device, log=log, dist=dist, quiet=True)
            done[c] = task.test_metrics(net, torch.as_tensor(view.test.x), torch.as_tensor(view.test.y), 512,
                                        None)["auroc"]
        result[(full.labels or [])[c]] = done[c]
        log(f"  held-out class {c}: test AUROC {done[c]:.4f}")
    return result


def ort_score(path: Path, data: Dataset, task_kind: str) -> float:
    """The published file's own test metric, computed with onnxruntime, as a client would see it."""
    outs = run_all(path, data.input_name, data.test.x)
    if task_kind == "autoencode":
        return auroc(data.test.y, outs[1])
    return float((outs[0].argmax(1) == data.test.y).mean())


def run_job(job: str, opts: Options, log: Log = print) -> dict[str, Any]:
    began = time.perf_counter()
    flags = {"train.epochs": opts.epochs, "train.seed": opts.seed, "train.device": opts.device}
    spec = resolve(job, opts.config, opts.sets, flags)
    if spec["model"]["arch"] == "gpt":  # a language model: its own data, steps, metrics and export (gpt_job)
        from training.gpt_job import run_gpt

        return run_gpt(spec, opts, log)
    if opts.quantize not in (None, "int8"):
        raise SpecError(f"--quantize {opts.quantize}: expected int8")
    dist = _dist()
    device = pick_device(spec["train"]["device"], dist)
    if spec["train"]["threads"] > 0:
        torch.set_num_threads(spec["train"]["threads"])
    full = load(spec, opts.data)
    data = full
    kind = spec["task"]
    if kind == "autoencode":
        data = hold_out(full, spec["data"]["anomaly_class"])
    judge = find_judge(opts.repository, spec["evaluate"]["judge"], job) if kind == "generate" else None
    if judge is not None and opts.quantize:
        raise SpecError(f"--quantize {opts.quantize}: {job} publishes a generator; int8 is for the classifiers and "
                        "the detector")
    if dist.main:
        log(f"{job}: {data.source['name']}; split {data.sizes()}; device {device}")
    task = make_task(spec, data.num_classes)
    torch.manual_seed(spec["train"]["seed"])
    net = build(spec, torch.as_tensor(data.train.x[:2]), data.num_classes)
    quiet_log: Log = log if dist.main else (lambda line: None)
    fitted: FitResult = fit(net, task, data, spec, run_dir=opts.runs / job, resume=opts.resume, device=device,
                            fingerprint=fingerprint(spec), log=quiet_log, dist=dist)
    net.cpu().eval()
    x_test, y_test = torch.as_tensor(data.test.x), torch.as_tensor(data.test.y)
    test = task.test_metrics(net, x_test, y_test, 512, data.labels)
    sweep_began = time.perf_counter()
    if kind == "autoencode" and spec["evaluate"]["sweep"] and dist.main:  # evaluation only: rank 0 alone
        per_class = sweep(spec, full, device, Dist(), log, {spec["data"]["anomaly_class"]: test["auroc"]})
        test["auroc_per_held_out_class"] = per_class
        test["mean_auroc"] = float(np.mean(list(per_class.values())))
    sweep_seconds = time.perf_counter() - sweep_began
    if not dist.main:
        return {"job": job, "rank": dist.rank}
    log(f"{job}: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
    trained = time.perf_counter()
    max_length = spec["model"].get("max_length", 4096)
    tolerance = spec["export"]["tolerance"]
    with tempfile.TemporaryDirectory(prefix=f"deepserve-{job}-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        quality: dict[str, Any] | None = None
        if judge is not None:
            outputs, checked, quality = export_sampler_and_judge(net, data, spec, onnx_path, judge)
            test.update({k: quality[k] for k in ("sample_accuracy", "frechet_distance", "frechet_distance_real_train")})
            log(f"{job}: export ok, parity max |torch - onnxruntime| = {checked['max_abs_diff']:.2e}; "
                f"{quality['samples']} samples judged by {spec['evaluate']['judge']} v{judge[1]}: accuracy "
                f"{quality['sample_accuracy']:.4f}, Frechet distance {quality['frechet_distance']:.3f} (real train "
                f"vs test: {quality['frechet_distance_real_train']:.3f})")
        else:
            outputs = export(net, kind, data.input_name, data.test.x, onnx_path, max_length)
            checked = parity(net, kind, data.input_name, data.test.x, onnx_path, tolerance, spec["train"]["seed"])
            log(f"{job}: export ok, parity max |torch - onnxruntime| = {checked['max_abs_diff']:.2e}")
            onnx_metric = ort_score(onnx_path, data, kind)
            test["onnxruntime_" + ("auroc" if kind == "autoencode" else "accuracy")] = onnx_metric
        extra = None
        if spec["model"]["arch"] == "rnn" and spec["export"].get("stream", False):
            from training.stream import prepare_stream

            extra = prepare_stream(net, job, data, Path(tmp), tolerance)
        spec_out = sampler_spec(job, net, data) if judge is not None else model_spec(job, data, kind, outputs,
                                                                                    max_length)
        card: dict[str, Any] = {
            "job": job, "task": kind, "data": {**data.source, "splits": data.sizes(), "labels": data.labels},
            "spec": spec, "history": fitted.history, "best_epoch": fitted.best_epoch,
            "stopped_early": fitted.stopped_early, "resumed_from_epoch": fitted.resumed_from,
            "test": test, "parity": checked, "seed": spec["train"]["seed"], "device": str(device),
            "world_size": dist.world, "train_samples_per_epoch": fitted.samples_per_epoch,
            "weights_sha256_per_rank": fitted.rank_digests,
            "torch_threads": torch.get_num_threads(), "versions": cards.versions(),
            "seconds": {"train": round(fitted.train_seconds, 2), "held_out_sweep": round(sweep_seconds, 2),
                        "until_trained": round(trained - began, 2)},
        }
        if quality is not None:
            card["quality"] = quality

        def write(folder: Path, version: int, src: Path = onnx_path, card: dict[str, Any] = card) -> None:
            (folder / "model.onnx").write_bytes(src.read_bytes())
            card["seconds"]["total"] = round(time.perf_counter() - began, 2)
            cards.write_card(folder / "card.json", {"name": spec_out.name, "version": version, **card})
            cards.plot_curve(fitted.history, folder / "training_curve.png", f"{spec_out.name} v{version}")
            if judge is not None:
                write_sampler_examples(folder / "examples.npz", net.config.latent, data.num_classes,
                                       spec["train"]["seed"])
            else:
                cards.write_examples(folder / "examples.npz", data)

        version, where = publish(opts.repository, spec_out, write, data.labels)
        seconds = time.perf_counter() - began
        log(f"{job}: published {where} (version {version}) in {seconds:.1f} s")
        summary = {"job": job, "version": version, "path": str(where), "seconds": round(seconds, 1),
                   "train_seconds": round(fitted.train_seconds + sweep_seconds, 1), "test": test,
                   "target": spec.get("target", {})}
        if extra is not None:
            summary["stream"] = extra.publish(opts.repository, write_examples=lambda p: cards.write_examples(p, data),
                                              card=card, log=log)
        if opts.quantize == "int8":
            summary["int8"] = publish_int8(job, onnx_path, data, kind, spec_out, card, opts.repository, log)
    return summary


def publish_int8(job: str, onnx_path: Path, data: Dataset, kind: str, spec_out: ModelSpec, card: dict[str, Any],
                 repo: Path, log: Log) -> dict[str, Any]:
    q_path = onnx_path.with_name("model_int8.onnx")
    quantize(onnx_path, q_path)
    change = compare(onnx_path, q_path, data.input_name, data.test.x, data.test.y, kind)
    log(f"{job}_int8: test {change['metric']} {change['int8']:.4f} (fp32 {change['fp32']:.4f}), "
        f"speed x{change['speedup']:.2f} vs fp32, {change['int8_bytes']} bytes vs {change['fp32_bytes']}")
    q_spec = ModelSpec(f"{job}_int8", spec_out.inputs, spec_out.outputs, dict(spec_out.parameters))
    q_card = dict(card, quantization=change, test={change["metric"]: change["int8"], "samples": change["samples"]})

    def write(folder: Path, version: int) -> None:
        (folder / "model.onnx").write_bytes(q_path.read_bytes())
        cards.write_card(folder / "card.json", {"name": q_spec.name, "version": version, **q_card})
        cards.plot_curve(card["history"], folder / "training_curve.png", f"{q_spec.name} v{version} (fp32 curve)")
        cards.write_examples(folder / "examples.npz", data)

    version, where = publish(repo, q_spec, write, data.labels)
    log(f"{job}_int8: published {where} (version {version})")
    return {"version": version, "path": str(where), **change}
