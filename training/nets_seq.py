"""Sequence nets: a recurrent classifier with a causal convolutional front end, its one-step streaming form, and a
byte-level Transformer encoder. Both take a dynamic length; both ignore what lies after a row's end (padding)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.layers import activation, norm1d
from training.tokens import PAD_ID, VOCAB_SIZE


class CausalConv(nn.Module):
    """Conv1d padded on the left only: output t sees inputs <= t, so the net can run one step at a time (streaming)
    and the same weights give the same answer whether a sequence arrives whole or sample by sample."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(c_in, c_out, kernel, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))


@dataclass
class RecurrentConfig:
    classes: int = 10
    conv_channels: int = 64  # 0 = raw samples straight into the recurrent net
    kernel_size: int = 5
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    cell: str = "gru"  # gru | lstm
    hidden: int = 64
    layers: int = 1
    bidirectional: bool = False
    activation: str = "gelu"
    dropout: float = 0.1
    batch_norm: bool = True


class RecurrentNet(nn.Module):
    """Causal dilated convs (local shape features) feeding a GRU/LSTM whose final state is classified. The GRU
    alone reads raw samples poorly (~91% on MNIST-1D); the causal front end keeps the model streamable when the
    recurrent part is unidirectional, which is the default."""

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        self.config = c = config
        front: list[nn.Module] = []
        c_in = 1
        for d in c.dilations if c.conv_channels > 0 else []:
            front += [CausalConv(c_in, c.conv_channels, c.kernel_size, d), norm1d(c.batch_norm, c.conv_channels),
                      activation(c.activation)]
            c_in = c.conv_channels
        self.front = nn.Sequential(*front)
        rnn = nn.GRU if c.cell == "gru" else nn.LSTM
        self.cell, self.hidden, self.layers = c.cell, c.hidden, c.layers
        self.directions = 2 if c.bidirectional else 1
        self.rnn = rnn(c_in, c.hidden, c.layers, batch_first=True, bidirectional=c.bidirectional,
                       dropout=c.dropout if c.layers > 1 else 0.0)
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.hidden * self.directions, c.classes))

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        z = self.front(signal.transpose(1, 2)).transpose(1, 2)
        _, state = self.rnn(z)
        h = state[0] if self.cell == "lstm" else state  # [layers * directions, B, H]
        last = torch.cat([h[-2], h[-1]], dim=-1) if self.directions == 2 else h[-1]
        return self.head(last)


class StreamCell(nn.Module):
    """One time step of a unidirectional RecurrentNet with all of its state explicit: the causal convs' input
    windows and the recurrent h (and c) per layer, flattened into one [B, S] tensor, so a server can keep it per
    sequence and the ONNX graph needs no loop. Shares the trained net's weights; nothing new is learned."""

    def __init__(self, net: RecurrentNet) -> None:
        super().__init__()
        if net.directions != 1:
            raise ValueError("a bidirectional recurrent net cannot run one step at a time; set model.bidirectional "
                             "= false to publish a stream variant")
        self.net = net
        self.convs = [m for m in net.front if isinstance(m, CausalConv)]
        self.pieces: list[tuple[int, ...]] = [(c.conv.in_channels, c.pad) for c in self.convs]
        per_layer = 2 if net.cell == "lstm" else 1
        self.pieces += [(net.hidden,)] * (net.layers * per_layer)
        self.state_size = sum(math.prod(p) for p in self.pieces)

    def forward(self, x_t: torch.Tensor, h_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x_t.shape[0]
        parts = []
        offset = 0
        for p in self.pieces:
            n = math.prod(p)
            parts.append(h_in[:, offset:offset + n].reshape(batch, *p))
            offset += n
        new_state = []
        inp = x_t[:, :, None]  # [B, channels=1, time=1]
        modules = list(self.net.front)
        for i, conv in enumerate(self.convs):
            window = torch.cat([parts[i], inp], dim=2)  # [B, C, pad + 1]: exactly what the kernel spans
            new_state.append(window[:, :, 1:])
            norm, act = modules[3 * i + 1], modules[3 * i + 2]
            inp = act(norm(conv.conv(window)))
        feature = inp[:, :, 0]
        rnn = self.net.rnn
        k = len(self.convs)
        for layer in range(self.net.layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
            gi = feature @ w_ih.T + b_ih
            if self.net.cell == "gru":
                h = parts[k + layer]
                gh = h @ w_hh.T + b_hh
                i_r, i_z, i_n = gi.chunk(3, dim=1)
                h_r, h_z, h_n = gh.chunk(3, dim=1)
                r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                feature = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
                new_state.append(feature)
            else:
                h, c = parts[k + 2 * layer], parts[k + 2 * layer + 1]
                i, f, g, o = (gi + h @ w_hh.T + b_hh).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                feature = torch.sigmoid(o) * torch.tanh(c)
                new_state += [feature, c]
        h_out = torch.cat([s.reshape(batch, -1) for s in new_state], dim=1)
        return self.net.head(feature), h_out


class Block(nn.Module):
    """Pre-norm Transformer block (nanoGPT-style, bidirectional) with padding keys masked by an additive bias."""

    def __init__(self, dim: int, heads: int, ff_mult: int, act: str, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), activation(act), nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`bias` [B,1,1,T]: 0 for real keys, -1e9 for padding. Finite, unlike a boolean mask's -inf: exp
        underflows to exactly 0 for padding, and an all-padding row (empty text) stays finite instead of NaN."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # no attention dropout: keeps the fused kernel
        y = y.transpose(1, 2).reshape(b, t, c)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ff(self.ln2(x)))


@dataclass
class ByteTransformerConfig:
    classes: int = 2
    dim: int = 128
    heads: int = 4
    layers: int = 1
    ff_mult: int = 2
    activation: str = "gelu"
    dropout: float = 0.2
    max_length: int = 256  # bytes; longer texts are truncated (the server does the same)
    conv_kernel: int = 0  # byte n-gram conv before attention; 0 = off
    positions: bool = True  # learned position embeddings


class ByteTransformer(nn.Module):
    """Transformer encoder over UTF-8 byte tokens, mean-pooled over the real (non-padding) positions: a row padded
    with zeros gives the same answer as the row alone, which lets a server batch texts of different lengths."""

    def __init__(self, config: ByteTransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.dim % c.heads:
            raise ValueError(f"model.dim {c.dim} must be a multiple of model.heads {c.heads}")
        self.embed = nn.Embedding(VOCAB_SIZE, c.dim, padding_idx=PAD_ID)
        # Byte n-gram features before attention: a language shows in its letter sequences, and attention alone
        # needs many epochs to build them. Padding embeds to exactly zero and the conv pads with zeros, so a
        # text's last bytes see the same neighbours whether or not padding follows.
        k = c.conv_kernel
        self.stem = nn.Conv1d(c.dim, c.dim, k, padding=k // 2) if k > 1 else None
        self.stem_act = activation(c.activation)
        self.pos = nn.Parameter(torch.randn(c.max_length, c.dim) * 0.02) if c.positions else None
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.ff_mult, c.activation, c.dropout) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.dim)
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.dim, c.classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != PAD_ID
        x = self.embed(tokens)
        if self.stem is not None:
            x = x + self.stem_act(self.stem(x.transpose(1, 2)).transpose(1, 2)) * keep.unsqueeze(-1).to(x.dtype)
        if self.pos is not None:
            x = x + self.pos[: tokens.shape[1]]
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, -1e9)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        w = keep.unsqueeze(-1).to(x.dtype)
        pooled = (self.ln(x) * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)
