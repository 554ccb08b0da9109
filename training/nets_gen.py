"""Conditional generative nets for small images: a DCGAN-style GAN (generator + projection discriminator) and a
conditional VAE. Each trains through the common loop (its forward returns its losses' parts) and publishes only
its sampler, `sampler()`: (z [B, latent], label [B]) -> image [B, 1, H, W] in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.layers import activation, norm1d, norm2d


@dataclass
class CGANConfig:
    height: int = 8
    width: int = 8
    classes: int = 10
    latent: int = 32
    channels: int = 16  # generator and discriminator width; the 8x8 digits need few
    label_dim: int = 16  # size of the generator's label embedding
    batch_norm: bool = True  # in the generator (the discriminator has none: its real and fake batches differ)
    aux_weight: float = 1.0  # AC-GAN term: the discriminator also names the digit, the generator must make it named


class Generator(nn.Module):
    """(z, label embedding) -> a 2x-downsampled feature map -> transposed conv up to H x W -> sigmoid."""

    def __init__(self, c: CGANConfig) -> None:
        super().__init__()
        if c.height % 2 or c.width % 2:
            raise ValueError(f"the GAN generator needs even image sides, got {c.height}x{c.width}")
        self.shape = (2 * c.channels, c.height // 2, c.width // 2)
        width = 2 * c.channels * (c.height // 2) * (c.width // 2)
        self.embed = nn.Embedding(c.classes, c.label_dim)
        self.project = nn.Sequential(nn.Linear(c.latent + c.label_dim, width), norm1d(c.batch_norm, width), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * c.channels, c.channels, 4, stride=2, padding=1),
                                norm2d(c.batch_norm, c.channels), nn.ReLU(), nn.Conv2d(c.channels, 1, 3, padding=1))

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(label)], dim=1))  # (B, 2C * H/2 * W/2)
        return torch.sigmoid(self.up(h.view(-1, *self.shape)))  # (B, 1, H, W)


class Discriminator(nn.Module):
    """Strided convs with LeakyReLU; a projection head (real/fake logit + <label embedding, features>, Miyato &
    Koyama 2018) and an auxiliary classifier (AC-GAN): conditioning that the generator cannot ignore."""

    def __init__(self, c: CGANConfig) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c.channels, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c.channels, 2 * c.channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c.channels, 2 * c.channels, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Flatten())
        width = 2 * c.channels * (-(-c.height // 4)) * (-(-c.width // 4))  # two stride-2 convs: ceil(n / 4)
        self.real = nn.Linear(width, 1)
        self.embed = nn.Embedding(c.classes, width)
        self.classify = nn.Linear(width, c.classes)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(image)  # (B, width)
        return self.real(h)[:, 0] + (self.embed(label) * h).sum(dim=1), self.classify(h)  # (B,), (B, classes)


class CGAN(nn.Module):
    """forward(real images, labels) -> (discriminator loss, generator loss), both from one fresh batch of fakes.

    One backward of their sum trains both nets at once (simultaneous gradient steps, one optimiser): the
    discriminator's loss sees the fakes detached, and the generator's loss goes through the discriminator with
    its parameters detached (torch.func.functional_call), so neither loss moves the other net. That keeps the
    common loop's one-loss, one-optimiser step, and DDP sees one forward."""

    def __init__(self, config: CGANConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def sampler(self) -> nn.Module:
        return self.generator

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, d = self.config, self.discriminator
        fake = self.generator(torch.randn(len(label), c.latent, device=image.device), label)
        real_logit, real_class = d(image, label)
        fake_logit, _ = d(fake.detach(), label)
        d_loss = (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                  + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
                  + c.aux_weight * F.cross_entropy(real_class, label))
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        g_logit, g_class = torch.func.functional_call(d, frozen, (fake, label))
        g_loss = (F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit))  # non-saturating
                  + c.aux_weight * F.cross_entropy(g_class, label))
        return d_loss, g_loss


@dataclass
class CVAEConfig:
    height: int = 8
    width: int = 8
    classes: int = 10
    latent: int = 16
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    label_dim: int = 16
    activation: str = "gelu"


def _mlp(sizes: list[int], act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), activation(act)]
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """p(x | z, label): pixel logits; `forward` gives the Bernoulli means, the image the published model returns."""

    def __init__(self, c: CVAEConfig) -> None:
        super().__init__()
        self.shape = (1, c.height, c.width)
        self.embed = nn.Embedding(c.classes, c.label_dim)
        self.body = _mlp([c.latent + c.label_dim, *c.hidden[::-1]], c.activation)
        self.out = nn.Linear(c.hidden[0], c.height * c.width)

    def logits(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([z, self.embed(label)], dim=1)))  # (B, H*W)

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z, label)).view(-1, *self.shape)  # (B, 1, H, W)


class CVAE(nn.Module):
    """q(z | x, label) = N(mu, diag sigma^2) and the decoder. forward(images, labels) -> (pixel logits (B, H*W),
    KL(q || N(0, I)) per image (B,)), with z sampled by the reparameterisation trick in training and evaluation
    alike: the ELBO is defined with the sample."""

    def __init__(self, config: CVAEConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.classes, c.label_dim)
        self.encoder = _mlp([c.height * c.width + c.label_dim, *c.hidden], c.activation)
        self.code = nn.Linear(c.hidden[-1], 2 * c.latent)
        self.decoder = Decoder(c)

    def sampler(self) -> nn.Module:
        return self.decoder

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat([image.flatten(1), self.embed(label)], dim=1))
        mu, logvar = self.code(h).chunk(2, dim=-1)  # (B, latent) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)
        return self.decoder.logits(z, label), kl
