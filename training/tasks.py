"""What a job optimises and reports: classification, anomaly detection by reconstruction, or (training.generative)
sampling images. The loop is the same for all; it sees a job only through the `Task` interface: the forward pass,
the loss, the metrics."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.spec import SpecError
from training.tokens import PAD_ID


class Task(Protocol):
    """What `training.loop.fit` needs from a job. `out` is whatever `forward` returns (logits; a tuple for nets
    with a regulariser or several losses); tuples' per-row tensors are filtered along with the batch's rows."""

    kind: str

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        """The training forward pass: most nets read x alone; a conditional generator also needs the labels."""
        ...

    def loss(self, out: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def batch_stats(self, out: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Sums over the batch's rows; `epoch_metrics` turns the epoch's sums into the row's train_* figures."""
        ...

    def epoch_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]: ...

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
        """The validation figures of an epoch (val_loss among them, unless early stopping monitors nothing)."""
        ...

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                     labels: list[str] | None) -> dict[str, Any]: ...


def anomaly_score(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared reconstruction error: what the detector is scored by in training and what the
    exported model outputs as `anomaly_score`. One formula, so the two cannot drift apart."""
    return ((reconstruction - features) ** 2).mean(dim=-1)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


class Classify:
    """Cross-entropy on logits, or MSE on probabilities / BCE on logits against one-hot targets (the knobs a
    course asks to compare); accuracy either way."""

    kind = "classify"

    def __init__(self, loss: str, classes: int, label_smoothing: float = 0.0) -> None:
        self.loss_name, self.classes, self.smoothing = loss, classes, label_smoothing

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return net(x)

    def loss(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out, y, label_smoothing=self.smoothing)
        target = F.one_hot(y, self.classes).to(out.dtype)
        if self.loss_name == "mse":
            return F.mse_loss(torch.softmax(out, dim=-1), target)
        return F.binary_cross_entropy_with_logits(out, target)

    def batch_stats(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {"correct": float((out.argmax(-1) == y).sum())}

    def epoch_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        return {"accuracy": sums.get("correct", 0.0) / max(count, 1)}

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
        logits = predict(model, x, batch)
        return {"loss": float(self.loss(logits, x, y)), "accuracy": float((logits.argmax(-1) == y).float().mean())}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                     labels: list[str]) -> dict[str, Any]:
        logits = predict(model, x, batch)
        pred = logits.argmax(-1)
        per_class = {labels[c]: float((pred[y == c] == c).float().mean()) for c in range(self.classes)
                     if (y == c).any()}
        return {"accuracy": float((pred == y).float().mean()), "loss": float(self.loss(logits, x, y)),
                "samples": len(y), "per_class_accuracy": per_class}


class Autoencode:
    """Reconstruct the normal classes; the anomaly score is the per-sample mean squared reconstruction error, the
    same number the exported model outputs. Losses are on normal rows only: anomalies never shape the model."""

    kind = "autoencode"

    def __init__(self, loss: str, kl_weight: float) -> None:
        if loss == "cross_entropy":
            raise SpecError("train.loss = 'cross_entropy' does not fit an autoencoder; expected 'mse' or 'bce'")
        self.loss_name, self.kl_weight = loss, kl_weight

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return net(x)

    def loss(self, out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits, kl = out
        normal = y == 0
        logits, x = logits[normal], x[normal]
        if self.loss_name == "mse":
            rec = F.mse_loss(torch.sigmoid(logits), x)
        else:
            rec = F.binary_cross_entropy_with_logits(logits, x.clamp(0, 1))
        return rec + self.kl_weight * kl

    def batch_stats(self, out: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {}

    def epoch_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        return {}

    @staticmethod
    def scores(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
        return anomaly_score(torch.sigmoid(predict(model, x, batch)), x)

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
        logits = predict(model, x, batch)
        kl = torch.zeros(())
        score = anomaly_score(torch.sigmoid(logits), x)
        return {"loss": float(self.loss((logits, kl), x, y)),
                "auroc": auroc(y.numpy(), score.numpy())}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                     labels: list[str] | None) -> dict[str, Any]:
        score = self.scores(model, x, batch)
        return {"auroc": auroc(y.numpy(), score.numpy()), "samples": len(y), "anomalies": int(y.sum()),
                "mean_score_normal": float(score[y == 0].mean()), "mean_score_anomaly": float(score[y == 1].mean())}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Eval-mode outputs in batches, on the model's device, back on the CPU. Token rows go through sorted by
    length and trimmed per batch (then put back in order), so a few long texts do not pad every batch to 256."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = torch.argsort((x != PAD_ID).sum(dim=1), stable=True) if x.dtype == torch.long else torch.arange(len(x))
    outs = []
    for i in range(0, len(x), batch):
        xb = trim(x[order[i:i + batch]]).to(device)
        out = model(xb)
        outs.append((out[0] if isinstance(out, tuple) else out).cpu())
    model.train(was_training)
    result = torch.cat(outs)
    return result[torch.argsort(order)]


def trim(x: torch.Tensor) -> torch.Tensor:
    """Token batches lose the padding columns no row uses: the cost of attention follows the longest row."""
    if x.dtype != torch.long or x.numel() == 0:
        return x
    return x[:, : max(1, int((x != PAD_ID).sum(dim=1).max()))]


def make_task(spec: dict[str, Any], classes: int) -> Task:
    t = spec["train"]
    if spec["task"] == "generate":
        from training.generative import make_generative_task

        return make_generative_task(spec)
    if spec["task"] == "autoencode":
        return Autoencode(t["loss"], spec["model"].get("kl_weight", 0.0))
    return Classify(t["loss"], classes, t["label_smoothing"])
