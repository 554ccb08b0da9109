"""Export to ONNX with the dynamo exporter and prove the file computes what the torch model computes.

The legacy TorchScript exporter freezes a recurrent net's sequence length, so only `dynamo=True` with
`dynamic_shapes` gives a graph whose batch and length axes are free. The export is traced from a tiny example
(batch 2, length 3): the exporter fake-runs an RNN's per-step decomposition, so a short example keeps it fast."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.tasks import anomaly_score
from training.tokens import PAD_ID, TOKEN_OFFSET, VOCAB_SIZE

BATCHES = (1, 7, 64)
LENGTHS = (5, 40, 100)


class ExportError(RuntimeError):
    """The export or its check failed: the job stops and nothing is published."""


class Classifier(nn.Module):
    """logits and probabilities, the outputs the repository contract names."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, torch.softmax(logits, dim=-1)


class Detector(nn.Module):
    """reconstruction in [0, 1] and the per-sample anomaly score (mean squared reconstruction error)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.net(x)
        recon = torch.sigmoid(logits)
        return recon, anomaly_score(recon, x)


def wrap(net: nn.Module, task_kind: str) -> tuple[nn.Module, list[str]]:
    if task_kind == "autoencode":
        return Detector(net).eval(), ["reconstruction", "anomaly_score"]
    return Classifier(net).eval(), ["logits", "probabilities"]


def is_sequence(x: np.ndarray) -> bool:
    """[B,T,1] signals and [B,T] tokens have a length axis; images and feature vectors do not."""
    return x.dtype == np.int64 or (x.ndim == 3 and x.shape[-1] == 1)


def onnx_export(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str], dynamic: list[dict[int, Any]]) -> None:
    """torch.onnx.export(dynamo=True) quietly: its progress lines go to a buffer that is shown only on failure."""
    import onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed", once per export
    args = example if isinstance(example, tuple) else (example,)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, input_names=input_names,
                              output_names=output_names, dynamic_shapes=tuple(dynamic), verbose=False)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}\n{buf.getvalue()[-2000:]}") from exc


def export(net: nn.Module, task_kind: str, input_name: str, sample: np.ndarray, path: Path,
           max_length: int) -> list[str]:
    """Write `path`; returns the output names. Batch is always dynamic, length too for sequences."""
    from torch.export import Dim

    module, outputs = wrap(net.cpu().eval(), task_kind)
    batch = Dim("batch", min=1, max=4096)
    dims: dict[int, Any] = {0: batch}
    example = torch.as_tensor(sample[:2])
    if is_sequence(sample):
        dims[1] = Dim("time", min=1, max=max_length)
        example = example[:, :3] if example.dtype != torch.long else torch.randint(TOKEN_OFFSET, VOCAB_SIZE, (2, 3))
    onnx_export(module, example, path, [input_name], outputs, [dims])
    return outputs


def _inputs(sample: np.ndarray, batch: int, length: int | None, rng: np.random.Generator) -> np.ndarray:
    """Real test rows tiled to `batch`; sequences cropped or repeated to `length`; token rows get random bytes and
    random lengths, so the padding path is checked too."""
    if sample.dtype == np.int64:
        assert length is not None
        x = rng.integers(TOKEN_OFFSET, VOCAB_SIZE, size=(batch, length), dtype=np.int64)
        for i, n in enumerate(rng.integers(1, length + 1, size=batch)):
            x[i, n:] = PAD_ID
        x[0, :] = rng.integers(TOKEN_OFFSET, VOCAB_SIZE, size=length)  # at least one full-length row
        return x
    reps = -(-batch // len(sample))
    x = np.concatenate([sample] * reps)[:batch]
    if length is not None:
        reps = -(-length // x.shape[1])
        x = np.concatenate([x] * reps, axis=1)[:, :length]
    return np.ascontiguousarray(x, dtype=np.float32)


def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(net: nn.Module, task_kind: str, input_name: str, sample: np.ndarray, path: Path, tolerance: float,
           seed: int = 0) -> dict[str, Any]:
    """Max |torch - onnxruntime| over all outputs at batch 1, 7, 64 (and lengths 5, 40, 100 for sequences).
    Raises ExportError above `tolerance`; the report goes into the card either way."""
    module, outputs = wrap(net.cpu().eval(), task_kind)
    sess = session(path)
    rng = np.random.default_rng(seed)
    cases = []
    lengths: tuple[int | None, ...] = LENGTHS if is_sequence(sample) else (None,)
    for length in lengths:
        for batch in BATCHES:
            x = _inputs(sample, batch, length, rng)
            with torch.no_grad():
                ref = [t.numpy() for t in module(torch.from_numpy(x))]
            got = sess.run(outputs, {input_name: x})
            diffs = {name: float(np.max(np.abs(r - g))) for name, r, g in zip(outputs, ref, got, strict=True)}
            cases.append({"batch": batch, "length": length, "max_abs_diff": max(diffs.values()), "outputs": diffs})
    report: dict[str, Any] = {"tolerance": tolerance, "cases": cases,
                              "max_abs_diff": max(c["max_abs_diff"] for c in cases)}
    if sample.dtype == np.int64:
        report["padding_max_abs_diff"] = padding_check(sess, outputs, input_name, rng)
    worst = max(report["max_abs_diff"], report.get("padding_max_abs_diff", 0.0))
    report["passed"] = bool(worst <= tolerance)
    if not report["passed"]:
        raise ExportError(f"parity check failed: max |torch - onnxruntime| = {worst:.3g} > tolerance {tolerance:g} "
                          f"(cases: {[(c['batch'], c['length'], c['max_abs_diff']) for c in cases]})")
    return report


def padding_check(sess: Any, outputs: list[str], input_name: str, rng: np.random.Generator) -> float:
    """A text alone and the same text padded inside a longer batch must score the same (the server batches them)."""
    worst = 0.0
    for n in (1, 5, 40):
        row = rng.integers(TOKEN_OFFSET, VOCAB_SIZE, size=(1, n), dtype=np.int64)
        alone = sess.run(outputs, {input_name: row})
        batch = rng.integers(TOKEN_OFFSET, VOCAB_SIZE, size=(3, n + 17), dtype=np.int64)
        batch[1] = PAD_ID
        batch[1, :n] = row[0]
        padded = sess.run(outputs, {input_name: batch})
        worst = max(worst, *(float(np.max(np.abs(a[0] - p[1]))) for a, p in zip(alone, padded, strict=True)))
    return worst
