"""The image and feature nets (CNN, (variational) autoencoder) and `build`, which makes any job's net from its spec.
Activation, dropout and batch norm are constructor options of every net, so one spec key changes them everywhere."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def norm1d(enabled: bool, width: int) -> nn.Module:
    return nn.BatchNorm1d(width) if enabled else nn.Identity()


class CNN(nn.Module):
    """conv-bn-act x2 then pool, per stage; a dropout-regularised MLP head. Padding keeps 8x8 inputs usable."""

    def __init__(self, height: int, width: int, classes: int, channels: list[int], hidden: int, act: str,
                 dropout: float, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm),
                           nn.BatchNorm2d(c) if batch_norm else nn.Identity(), activation(act)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * height * width, hidden),
                                  activation(act), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class AutoEncoder(nn.Module):
    """MLP encoder to a small code and back. forward returns (reconstruction logits, KL term): the KL term is the
    VAE's regulariser (0 for a plain autoencoder) and the mean code is used in eval, so the export is deterministic."""

    def __init__(self, features: int, hidden: list[int], latent: int, act: str, dropout: float, batch_norm: bool,
                 variational: bool) -> None:
        super().__init__()
        self.variational = variational

        def mlp(sizes: list[int]) -> nn.Sequential:
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(a, b), norm1d(batch_norm, b), activation(act), nn.Dropout(dropout)]
            return nn.Sequential(*layers)

        self.encoder = mlp([features, *hidden])
        self.code = nn.Linear(hidden[-1], latent * (2 if variational else 1))
        self.decoder = mlp([latent, *hidden[::-1]])
        self.out = nn.Linear(hidden[0], features)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.code(self.encoder(features))
        kl = code.new_zeros(())
        if self.variational:
            mu, logvar = code.chunk(2, dim=-1)
            kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1))
            code = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.out(self.decoder(code)), kl


def build(spec: dict[str, Any], example: torch.Tensor, classes: int) -> nn.Module:
    """The job's net, sized from one example input (so user data with other shapes gets a fitting net)."""
    from training.nets_seq import ByteTransformer, RecurrentNet

    m = spec["model"]
    arch = m["arch"]
    if arch == "cnn":
        return CNN(example.shape[-2], example.shape[-1], classes, m["channels"], m["hidden"], m["activation"],
                   m["dropout"], m["batch_norm"])
    if arch == "rnn":
        return RecurrentNet(classes, m["conv_channels"], m["kernel_size"], m["dilations"], m["cell"], m["hidden"],
                            m["layers"], m["bidirectional"], m["activation"], m["dropout"], m["batch_norm"])
    if arch == "transformer":
        return ByteTransformer(classes, m["dim"], m["heads"], m["layers"], m["ff_mult"], m["activation"],
                               m["dropout"], m["max_length"], m["conv_kernel"], m["positions"])
    return AutoEncoder(example.shape[-1], m["hidden"], m["latent"], m["activation"], m["dropout"], m["batch_norm"],
                       m["variational"])
