"""A decoder-only Transformer over UTF-8 bytes, in the shape of nanoGPT's model.py: `GPTConfig -> GPT(config)`,
pre-norm blocks of causal self-attention and an MLP, learned positions, the output head tied to the token
embedding.

Two forwards share the weights. `forward(idx)` is training's: the whole window at once, plain causal attention.
`decode(...)` is serving's: new tokens plus an explicit key/value cache in, logits plus the grown cache out, with
per-row positions and a key mask, so one exported graph does prefill (P = 0, T = prompt) and one-step decode
(T = 1) for a batch whose rows have different past lengths (the server pads the caches to the longest past and
masks the padding)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.tokens import VOCAB_SIZE

# Masked keys get this additive bias rather than -inf: exp underflows to exactly 0 all the same, and a query row
# whose keys are all masked (a padding slot in a batched prefill) stays finite instead of turning into NaN.
MASKED = -1e9


@dataclass
class GPTConfig:
    block_size: int = 256  # context length in tokens (= bytes)
    vocab_size: int = VOCAB_SIZE  # token 0 = end of text, tokens 1..256 = bytes 0..255 (training.tokens)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"model.n_embd {config.n_embd} must be a multiple of model.n_head {config.n_head}")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        return tuple(z.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                     for z in (q, k, v))

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_embd)))  # (B, T, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        # No attention dropout: it would leave the fused kernel on the CPU for a few percent of regularisation.
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def decode(self, x: torch.Tensor, bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C), bias (B, 1, T, P+T), past (B, nh, P, hs) -> y (B, T, C), present (B, nh, P+T, hs)."""
        q, k, v = self._heads(x)
        k = torch.cat([past_k, k], dim=2)  # (B, nh, P+T, hs)
        v = torch.cat([past_v, v], dim=2)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)), k, v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias), nn.LayerNorm(config.n_embd,
                                                                                             bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def decode(self, x: torch.Tensor, bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y, k, v = self.attn.decode(self.ln_1(x), bias, past_k, past_v)
        x = x + y
        return x + self.mlp(self.ln_2(x)), k, v


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one (V, C) matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V): position t predicts token t + 1."""
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens, the context is {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
               *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The serving forward. input_ids, position_ids (B, T); attention_mask (B, P+T), 1 = a real key, 0 = padding;
        past: k and v per layer (k0, v0, k1, v1, ...), each (B, nh, P, hs), P may be 0. Returns logits (B, T, V) and
        the present k, v per layer, (B, nh, P+T, hs). Query t sits at cache slot P + t and sees slots <= P + t that
        the mask keeps, so right-padded new tokens never reach a real one."""
        _, t = input_ids.shape
        total = attention_mask.shape[1]  # P + T
        causal = torch.arange(total, device=input_ids.device)[None, :] <= (
            torch.arange(t, device=input_ids.device)[:, None] + (total - t))  # (T, P+T)
        keep = causal[None, None, :, :] & (attention_mask[:, None, None, :] != 0)  # (B, 1, T, P+T)
        zeros = torch.zeros(keep.shape, dtype=self.lm_head.weight.dtype, device=input_ids.device)
        bias = zeros.masked_fill(~keep, MASKED)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        present: list[torch.Tensor] = []
        for i, block in enumerate(self.transformer.h):
            x, k, v = block.decode(x, bias, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.lm_head(self.transformer.ln_f(x)), *present)  # (B, T, V), (B, nh, P+T, hs) ...


class Decoder(nn.Module):
    """`GPT.decode` as a module, so the ONNX exporter traces the serving forward and not the training one."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.gpt.decode(input_ids, position_ids, attention_mask, *past)


def empty_cache(config: GPTConfig, batch: int) -> list[torch.Tensor]:
    """k and v per layer with no past (P = 0)."""
    hs = config.n_embd // config.n_head
    return [torch.zeros(batch, config.n_head, 0, hs) for _ in range(2 * config.n_layer)]


@torch.no_grad()
def greedy(model: GPT, prompt: list[int], max_new: int, end_token: int) -> list[int]:
    """The reference decode the server must reproduce token for token: the whole window through the training
    forward each step (no cache), argmax, stop at the end token or the context."""
    model.eval()
    ids = list(prompt)
    out: list[int] = []
    while len(out) < max_new and len(ids) < model.config.block_size:
        logits = model(torch.tensor([ids]))[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        if nxt == end_token:
            break
        ids.append(nxt)
    return out
