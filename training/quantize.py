"""--quantize int8: onnxruntime dynamic quantization (int8 weights, activations quantized on the fly), scored on
the same test split as the fp32 model and timed against it, so the card can state what the smaller model costs
in accuracy and what it buys in speed on this machine."""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.export import session


def quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            source = prepared
        except Exception:  # pre-processing is an optimisation; quantizing the original graph is still correct
            source = src
        # MatMul/Gemm only: ConvInteger runs far slower than fp32 Conv on onnxruntime's CPU provider (measured 6x
        # slower on digits_cnn), which is why onnxruntime recommends static quantization for convolutions.
        quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    prepared.unlink(missing_ok=True)


def run_all(path: Path, input_name: str, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """All outputs over x in batches (token rows trimmed to each batch's longest row)."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if xb.dtype == np.int64:
            xb = xb[:, : max(1, int((xb != 0).sum(axis=1).max()))]
        for j, out in enumerate(sess.run(names, {input_name: xb})):
            parts[j].append(out)
    return [np.concatenate(p) for p in parts]


def seconds_per_pass(path: Path, input_name: str, x: np.ndarray, repeats: int = 5) -> float:
    """Median wall time of one pass over x (one thread, batch 64), after a warm-up pass."""
    run_all(path, input_name, x[:64])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_all(path, input_name, x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare(fp32: Path, int8: Path, input_name: str, x: np.ndarray, y: np.ndarray, task_kind: str,
            ) -> dict[str, Any]:
    """Test metric and speed of both files on the same split; diffs are informational (int8 is not exact)."""
    from training.tasks import auroc

    out32, out8 = run_all(fp32, input_name, x), run_all(int8, input_name, x)
    if task_kind == "autoencode":
        metric = "auroc"
        m32, m8 = auroc(y, out32[1]), auroc(y, out8[1])
    else:
        metric = "accuracy"
        m32, m8 = float((out32[0].argmax(1) == y).mean()), float((out8[0].argmax(1) == y).mean())
    t32, t8 = seconds_per_pass(fp32, input_name, x), seconds_per_pass(int8, input_name, x)
    return {"metric": metric, "fp32": m32, "int8": m8, "change": m8 - m32,
            "fp32_seconds_per_test_pass": t32, "int8_seconds_per_test_pass": t8, "speedup": t32 / t8,
            "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size,
            "max_abs_diff_vs_fp32": max(float(np.max(np.abs(a - b))) for a, b in zip(out32, out8, strict=True)),
            "samples": len(y), "method": "onnxruntime.quantization.quantize_dynamic, QInt8 weights of MatMul/Gemm"}
