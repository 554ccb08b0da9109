"""text_gpt's ONNX graph and its check. One graph does prefill and one-step decode, with the key/value cache as
explicit inputs and outputs, so the server owns the cache and can batch generations whose pasts differ:

    input_ids INT64 [B, T], position_ids INT64 [B, T], attention_mask INT64 [B, P+T],
    past_key_<i>, past_value_<i> FP32 [B, H, P, D] per layer      ->  logits FP32 [B, T, V],
    present_key_<i>, present_value_<i> FP32 [B, H, P+T, D]

The parity check runs both kinds of step, at several batch sizes and lengths, with rows of different past lengths
(padded pasts masked) and right-padded prompts, against the torch model's own `decode`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.export import ExportError, onnx_export, session
from training.gpt import GPT, Decoder

BATCHES = (1, 3, 8)
PREFILL_LENGTHS = (1, 7, 64)  # prompt lengths, P = 0
DECODE_PASTS = (1, 40, 200)  # past lengths of one-step decodes, T = 1


def cache_names(n_layer: int, kind: str) -> list[str]:
    """past_key_0, past_value_0, past_key_1, ... (kind "past") or the same with "present": k and v alternate."""
    return [f"{kind}_{kv}_{i}" for i in range(n_layer) for kv in ("key", "value")]


def export_decoder(model: GPT, path: Path) -> None:
    from torch.export import Dim

    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    # Every axis is left to the exporter (Dim.DYNAMIC): the mask's length must be P + T, a relation it derives
    # itself. The example avoids sizes 0 and 1, which torch.export would specialise on.
    b, t, p = 2, 3, 4
    example = (torch.randint(1, cfg.vocab_size, (b, t)), torch.arange(p, p + t).repeat(b, 1),
               torch.ones(b, p + t, dtype=torch.long),
               *(torch.randn(b, cfg.n_head, p, hs) for _ in range(2 * cfg.n_layer)))
    dyn = Dim.DYNAMIC
    # The cache arrives as Decoder.forward's *past: its dims are one nested entry, as torch.export wants.
    dims: list[Any] = [{0: dyn, 1: dyn}, {0: dyn, 1: dyn}, {0: dyn, 1: dyn},
                       tuple({0: dyn, 2: dyn} for _ in range(2 * cfg.n_layer))]
    names = ["input_ids", "position_ids", "attention_mask", *cache_names(cfg.n_layer, "past")]
    onnx_export(Decoder(model).eval(), example, path, names, ["logits", *cache_names(cfg.n_layer, "present")],
                dims)


def _case(model: GPT, rng: np.random.Generator, batch: int, new: int, past: int) -> dict[str, np.ndarray]:
    """Feeds for one step: rows have random past lengths <= `past` (the rest of the past masked, as the server pads
    it) and random new lengths <= `new` (right-padded, masked); row 0 is full on both."""
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    pasts = rng.integers(0, past + 1, size=batch)
    news = rng.integers(1, new + 1, size=batch)
    pasts[0], news[0] = past, new
    mask = np.zeros((batch, past + new), np.int64)
    positions = np.zeros((batch, new), np.int64)
    for i in range(batch):
        mask[i, :pasts[i]] = 1
        mask[i, past:past + news[i]] = 1
        positions[i] = np.minimum(pasts[i] + np.arange(new), cfg.block_size - 1)
    feeds = {"input_ids": rng.integers(1, cfg.vocab_size, size=(batch, new)).astype(np.int64),
             "position_ids": positions, "attention_mask": mask}
    for name in cache_names(cfg.n_layer, "past"):
        feeds[name] = rng.standard_normal((batch, cfg.n_head, past, hs)).astype(np.float32)
    return feeds


def parity(model: GPT, path: Path, tolerance: float, seed: int = 0) -> dict[str, Any]:
    """Max |torch - onnxruntime| over logits and the present cache, on the real (unmasked) positions, for prefill
    (P = 0) and decode (T = 1) steps. Raises ExportError above `tolerance`; the report goes into the card."""
    model = model.cpu().eval()
    sess = session(path)
    outputs = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(seed)
    cases = []
    plan = [("prefill", n, 0) for n in PREFILL_LENGTHS] + [("decode", 1, p) for p in DECODE_PASTS]
    plan.append(("chunk", 5, 30))  # a prompt continued on a cache: T > 1 and P > 0 at once
    for kind, new, past in plan:
        for batch in BATCHES:
            feeds = _case(model, rng, batch, new, past)
            with torch.no_grad():
                ref = [t.numpy() for t in model.decode(*(torch.from_numpy(feeds[n]) for n in feeds))]
            got = sess.run(outputs, feeds)
            keep = feeds["attention_mask"].astype(bool)  # (B, P+T): the slots that mean something
            new_keep = keep[:, past:]
            diffs = {"logits": float(np.abs(ref[0] - got[0])[new_keep].max())}
            diffs["present"] = max(float(np.abs(r - g).transpose(0, 2, 1, 3)[keep].max())
                                   for r, g in zip(ref[1:], got[1:], strict=True))
            cases.append({"step": kind, "batch": batch, "new_tokens": new, "past": past,
                          "max_abs_diff": max(diffs.values()), "outputs": diffs})
    worst = max(c["max_abs_diff"] for c in cases)
    report = {"tolerance": tolerance, "cases": cases, "max_abs_diff": worst, "passed": bool(worst <= tolerance)}
    if not report["passed"]:
        raise ExportError(f"parity check failed: max |torch - onnxruntime| = {worst:.3g} > tolerance {tolerance:g} "
                          f"(cases: {[(c['step'], c['batch'], c['max_abs_diff']) for c in cases]})")
    return report
