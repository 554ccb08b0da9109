"""Layers every net family shares. They live here, not in one family's module, so the family modules (nets,
nets_seq, nets_gen) import this one and never each other."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def norm1d(enabled: bool, width: int) -> nn.Module:
    return nn.BatchNorm1d(width) if enabled else nn.Identity()


def norm2d(enabled: bool, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()
