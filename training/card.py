"""What a published version carries besides the model: card.json (how it was made and how good it is), the
training curve, and examples.npz (real test rows with their true labels, for clients and smoke tests)."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import sklearn
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def _clean(value: Any) -> Any:
    """JSON has no NaN: an undefined metric (e.g. AUROC with one class present) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def write_card(path: Path, card: dict[str, Any]) -> None:
    path.write_text(json.dumps(_clean(card), indent=2, allow_nan=False) + "\n")


def plot_curve(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Loss and the validation metric per epoch, side by side (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "val_loss"):
        if any(key in r for r in history):
            ax_loss.plot(epochs, [r.get(key, np.nan) for r in history], label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    for key in ("train_accuracy", "val_accuracy", "val_auroc", "train_d_loss", "train_g_loss", "val_kl"):
        if any(key in r for r in history):
            ax_metric.plot(epochs, [r.get(key, np.nan) for r in history], label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def pick_examples(data: Dataset, count: int = 16) -> np.ndarray:
    """Indices into the test split covering the classes in turn (normal and anomalous alike for detectors)."""
    y = data.test.y
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    picked: list[int] = []
    for i in range(count):
        for rows in by_class:
            if i < len(rows) and len(picked) < count:
                picked.append(int(rows[i]))
    return np.asarray(sorted(picked), dtype=np.int64)


def write_examples(path: Path, data: Dataset) -> None:
    idx = pick_examples(data)
    x = data.test.x[idx]
    if x.dtype == np.int64:
        x = x[:, : max(1, int((x != 0).sum(axis=1).max()))]
    arrays: dict[str, np.ndarray] = {data.input_name: x, "label": data.test.y[idx].astype(np.int64)}
    if data.test.text is not None:
        arrays["text"] = np.asarray([data.test.text[i] for i in idx], dtype=np.str_)
    np.savez(path, **arrays)
