"""Training-time augmentation, on by spec per job: small translations, amplitude jitter and noise are the
variations the data sets themselves are built from (scanned digits, MNIST-1D's shifted and scaled templates).
Each takes the loop's seeded generator, so augmented runs stay reproducible and resumable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def shift_images(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Translate each [C,H,W] image by up to `shift` pixels in each direction, filling with zeros (background)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    oy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [B,H,1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [B,1,W]
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # [B,H,W,C]
    return out.permute(0, 3, 1, 2).contiguous()


def jitter_signals(x: torch.Tensor, gen: torch.Generator, shift: int, scale: float, noise: float) -> torch.Tensor:
    """Shift [B,T,1] signals in time by up to `shift` steps (edge values repeat), scale them and add noise."""
    b, t, _ = x.shape
    if shift:
        s = torch.randint(-shift, shift + 1, (b,), generator=gen)
        idx = (torch.arange(t)[None, :] - s[:, None]).clamp(0, t - 1)
        x = torch.gather(x, 1, idx[:, :, None])
    if scale:
        x = x * (1 + scale * torch.randn(b, 1, 1, generator=gen))
    if noise:
        x = x + noise * torch.randn(x.shape, generator=gen)
    return x


def crop_tokens(x: torch.Tensor, gen: torch.Generator, length: int) -> torch.Tensor:
    """Rows longer than `length` tokens become a random window of that length: a language shows in any stretch
    of its text, and attention over the long tail of rows dominated the cost of an epoch."""
    n = (x != 0).sum(dim=1)
    if x.shape[1] <= length:
        return x
    start = (torch.rand(len(x), generator=gen) * (n - length).clamp(min=0)).long()
    idx = start[:, None] + torch.arange(length)[None, :]
    return torch.gather(x, 1, idx.clamp(max=x.shape[1] - 1))


def add_noise(x: torch.Tensor, gen: torch.Generator, noise: float) -> torch.Tensor:
    return x + noise * torch.randn(x.shape, generator=gen)


def make_augment(spec: dict[str, Any]) -> Augment:
    """Identity unless the spec's [augment] section asks for something."""
    a = spec.get("augment", {})
    arch = spec["model"]["arch"]
    if arch == "cnn" and a.get("shift", 0) > 0:
        return lambda x, g: shift_images(x, g, a["shift"])
    if arch == "rnn" and (a.get("shift", 0) or a.get("scale", 0.0) or a.get("noise", 0.0)):
        return lambda x, g: jitter_signals(x, g, a["shift"], a["scale"], a["noise"])
    if arch == "autoencoder" and a.get("noise", 0.0) > 0:
        return lambda x, g: add_noise(x, g, a["noise"])
    if arch == "transformer" and a.get("crop", 0) > 0:
        return lambda x, g: crop_tokens(x, g, a["crop"])
    return lambda x, g: x
