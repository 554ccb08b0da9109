"""The image and feature nets (CNN, (variational) autoencoder) and `build`, which makes any job's net from its spec.

Each net takes one config dataclass (nanoGPT's `GPTConfig -> GPT(config)`): its fields are named like the keys of
the spec's [model] section, so `build` fills any config the same way (`from_spec`) and a new knob is one field and
one spec key. Activation, dropout and batch norm are options of every net, so one spec key changes them
everywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from training.layers import activation, norm1d
from training.nets_gen import CGAN, CVAE, CGANConfig, CVAEConfig
from training.nets_seq import ByteTransformer, ByteTransformerConfig, RecurrentConfig, RecurrentNet

C = TypeVar("C")


def from_spec(cls: type[C], model: dict[str, Any], **sized: Any) -> C:
    """The config `cls` from the spec's [model] keys of the same names, plus what is sized from the data."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in model.items() if k in names}, **sized)


@dataclass
class CNNConfig:
    height: int = 8
    width: int = 8
    classes: int = 10
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    activation: str = "relu"
    dropout: float = 0.25
    batch_norm: bool = True


class CNN(nn.Module):
    """conv-bn-act x2 then pool, per stage; a dropout-regularised MLP head. Padding keeps 8x8 inputs usable."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = []
        c_in, height, width = 1, c.height, c.width
        for ch in c.channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, ch, 3, padding=1, bias=not c.batch_norm),
                           nn.BatchNorm2d(ch) if c.batch_norm else nn.Identity(), activation(c.activation)]
                c_in = ch
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(c.dropout), nn.Linear(c_in * height * width, c.hidden),
                                  activation(c.activation), nn.Dropout(c.dropout), nn.Linear(c.hidden, c.classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))  # (B, classes)


@dataclass
class AutoEncoderConfig:
    features: int = 64
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    latent: int = 8
    activation: str = "gelu"
    dropout: float = 0.0
    batch_norm: bool = True
    variational: bool = False


class AutoEncoder(nn.Module):
    """MLP encoder to a small code and back. forward returns (reconstruction logits, KL term): the KL term is the
    VAE's regulariser (0 for a plain autoencoder) and the mean code is used in eval, so the export is deterministic."""

    def __init__(self, config: AutoEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.variational = c.variational

        def mlp(sizes: list[int]) -> nn.Sequential:
            layers: list[nn.Module] = []
            for a, b in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(a, b), norm1d(c.batch_norm, b), activation(c.activation), nn.Dropout(c.dropout)]
            return nn.Sequential(*layers)

        self.encoder = mlp([c.features, *c.hidden])
        self.code = nn.Linear(c.hidden[-1], c.latent * (2 if c.variational else 1))
        self.decoder = mlp([c.latent, *c.hidden[::-1]])
        self.out = nn.Linear(c.hidden[0], c.features)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.code(self.encoder(features))
        kl = code.new_zeros(())
        if self.variational:
            mu, logvar = code.chunk(2, dim=-1)
            kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1))
            code = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.out(self.decoder(code)), kl  # (B, features) logits, ()


def build(spec: dict[str, Any], example: torch.Tensor, classes: int) -> nn.Module:
    """The job's net, sized from one example input (so user data with other shapes gets a fitting net)."""
    m = spec["model"]
    arch = m["arch"]
    if arch == "cnn":
        return CNN(from_spec(CNNConfig, m, height=example.shape[-2], width=example.shape[-1], classes=classes))
    if arch == "rnn":
        return RecurrentNet(from_spec(RecurrentConfig, m, classes=classes))
    if arch == "transformer":
        return ByteTransformer(from_spec(ByteTransformerConfig, m, classes=classes))
    if arch == "gan":
        return CGAN(from_spec(CGANConfig, m, height=example.shape[-2], width=example.shape[-1], classes=classes))
    if arch == "cvae":
        return CVAE(from_spec(CVAEConfig, m, height=example.shape[-2], width=example.shape[-1], classes=classes))
    return AutoEncoder(from_spec(AutoEncoderConfig, m, features=example.shape[-1]))
