"""Jobs that learn to draw (digits_gan, digits_vae): their tasks for the common loop, and the export and parity
check of what they publish, the sampler (z FP32 [B, latent], label INT64 [B]) -> image FP32 [B, 1, H, W] in [0, 1].
How good the samples are is measured in training.quality."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.export import BATCHES, ExportError, onnx_export, session

SAMPLER_INPUTS = ["z", "label"]
SAMPLER_OUTPUTS = ["image"]
ELBO_SAMPLES = 16  # z draws per test image in the test ELBO: its Monte Carlo error is then far below the figure


class GANTask:
    """The loss is d_loss + g_loss, each moving only its own net (see nets_gen.CGAN); train_d_loss and
    train_g_loss are reported apart, since their sum says little about a GAN."""

    kind = "generate"

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return net(x, y)

    def loss(self, out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out[0] + out[1]

    def batch_stats(self, out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    ) -> dict[str, float]:
        return {"d_loss": float(out[0].detach()) * len(y), "g_loss": float(out[1].detach()) * len(y)}

    def epoch_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        return {k: v / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        d_sum = g_sum = 0.0
        for i in range(0, len(y), batch):
            d, g = model(x[i:i + batch].to(device), y[i:i + batch].to(device))
            d_sum, g_sum = d_sum + float(d) * len(y[i:i + batch]), g_sum + float(g) * len(y[i:i + batch])
        model.train(was_training)
        n = max(len(y), 1)
        return {"loss": (d_sum + g_sum) / n, "d_loss": d_sum / n, "g_loss": g_sum / n}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                     labels: list[str] | None) -> dict[str, Any]:
        return {**self.evaluate(model, x, y, batch), "samples": len(y)}


class VAETask:
    """Loss = the negative ELBO per image in nats: Bernoulli log-likelihood of the pixel intensities in [0, 1]
    (binary cross-entropy summed over pixels) plus the analytic KL of q(z | x, label) from N(0, I)."""

    kind = "generate"

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return net(x, y)

    @staticmethod
    def parts(out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction nats, KL nats), per image."""
        logits, kl = out
        rec = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(dim=1)
        return rec, kl

    def loss(self, out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rec, kl = self.parts(out, x)
        return (rec + kl).mean()

    def batch_stats(self, out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    ) -> dict[str, float]:
        rec, kl = self.parts(out, x)
        return {"reconstruction": float(rec.detach().sum()), "kl": float(kl.detach().sum())}

    def epoch_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        return {k: v / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                 draws: int = 1) -> dict[str, float]:
        """Mean negative ELBO ("loss"), its reconstruction and KL parts, averaged over `draws` samples of z."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        rec_sum = kl_sum = 0.0
        for _ in range(draws):
            for i in range(0, len(y), batch):
                xb = x[i:i + batch].to(device)
                rec, kl = self.parts(model(xb, y[i:i + batch].to(device)), xb)
                rec_sum, kl_sum = rec_sum + float(rec.sum()), kl_sum + float(kl.sum())
        model.train(was_training)
        n = max(len(y) * draws, 1)
        return {"loss": (rec_sum + kl_sum) / n, "reconstruction": rec_sum / n, "kl": kl_sum / n}

    def test_metrics(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                     labels: list[str] | None) -> dict[str, Any]:
        """The test ELBO (nats per image, higher is better) with ELBO_SAMPLES draws of z per image, seeded."""
        torch.manual_seed(0)
        m = self.evaluate(model, x, y, batch, draws=ELBO_SAMPLES)
        pixels = math.prod(x.shape[1:])
        return {"elbo": -m["loss"], "elbo_bits_per_pixel": m["loss"] / pixels / math.log(2),
                "reconstruction_nats": m["reconstruction"], "kl_nats": m["kl"], "elbo_draws_per_image": ELBO_SAMPLES,
                "likelihood": "Bernoulli on pixel intensities in [0, 1]", "samples": len(y)}


def make_generative_task(spec: dict[str, Any]) -> GANTask | VAETask:
    return GANTask() if spec["model"]["arch"] == "gan" else VAETask()


def export_sampler(sampler: nn.Module, latent: int, path: Path) -> list[str]:
    """The sampler alone, batch axis dynamic on both inputs. Returns the output names."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    example = (torch.randn(2, latent), torch.tensor([0, 1], dtype=torch.long))
    onnx_export(sampler.cpu().eval(), example, path, SAMPLER_INPUTS, SAMPLER_OUTPUTS, [{0: batch}, {0: batch}])
    return SAMPLER_OUTPUTS


def sampler_feeds(latent: int, classes: int, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """z from N(0, I) and labels cycling through every class (a batch of >= classes rows holds them all)."""
    return {"z": rng.standard_normal((batch, latent)).astype(np.float32),
            "label": (np.arange(batch) % classes).astype(np.int64)}


def sampler_parity(sampler: nn.Module, latent: int, classes: int, path: Path, tolerance: float,
                   seed: int = 0) -> dict[str, Any]:
    """Max |torch - onnxruntime| of the image at batch 1, 7, 64; the same report (and failure) as export.parity."""
    sampler = sampler.cpu().eval()
    sess = session(path)
    rng = np.random.default_rng(seed)
    cases = []
    for batch in BATCHES:
        feeds = sampler_feeds(latent, classes, batch, rng)
        with torch.no_grad():
            ref = sampler(torch.from_numpy(feeds["z"]), torch.from_numpy(feeds["label"])).numpy()
        (got,) = sess.run(SAMPLER_OUTPUTS, feeds)
        diff = float(np.max(np.abs(ref - got)))
        cases.append({"batch": batch, "length": None, "max_abs_diff": diff, "outputs": {"image": diff}})
    worst = max(c["max_abs_diff"] for c in cases)
    report = {"tolerance": tolerance, "cases": cases, "max_abs_diff": worst, "passed": bool(worst <= tolerance)}
    if not report["passed"]:
        raise ExportError(f"parity check failed: max |torch - onnxruntime| = {worst:.3g} > tolerance {tolerance:g} "
                          f"(cases: {[(c['batch'], c['max_abs_diff']) for c in cases]})")
    return report


def write_sampler_examples(path: Path, latent: int, classes: int, seed: int, count: int = 16) -> None:
    """examples.npz: inputs a client can send as they are (`deepserve infer MODEL --examples`)."""
    np.savez(path, **sampler_feeds(latent, classes, count, np.random.default_rng(seed)))
