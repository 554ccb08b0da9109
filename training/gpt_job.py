"""The text_gpt job: chatterbot-corpus's English conversations -> a byte GPT -> held-out bits per byte beside an
interpolated Kneser-Ney n-gram baseline -> ONNX with an explicit key/value cache -> parity -> publish as a decoupled
generation model whose config.pbtxt declares the decode loop for the server (service/generation.py).

Why its own loop rather than training.loop.fit: a language model trains on random windows of one token stream,
counted in optimiser steps, and is judged in bits per byte; fit's epochs over (x, y) rows, padding trims and
length buckets have no meaning here. What is shared is the rest of the path: spec, export helper, publish, card.

Data: chatterbot-corpus (a dependency already, YAML inside the PyPI package, nothing downloaded), English only:
the one English dialogue corpus the environment ships, and dialogue is what a chat-style generate endpoint is asked
for. Each conversation is one document (its lines joined by newlines); exact repeats across the corpus files are
dropped before the split, so no test conversation was seen in training. It is small (~92 KB once deduplicated), which
is what limits the model: see the card's comparison with the n-gram baseline."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training import card as cards
from training.gpt import GPT, GPTConfig, greedy
from training.gpt_export import cache_names, export_decoder, parity
from training.loop import Log, seed_everything
from training.ngram import best_order
from training.publish import ModelSpec, publish
from training.spec import SpecError
from training.tokens import PAD_ID, TOKEN_OFFSET

END = PAD_ID  # token 0 ends (and opens) a document: the byte encoding's padding token; byte b is token b + OFFSET
OFFSET = TOKEN_OFFSET
PROMPTS = ["Hello", "What is your name?\n", "Tell me a joke.\n", "Do you like music?\n"]


@dataclass
class Corpus:
    train: list[list[int]]  # documents as tokens: [END, bytes + OFFSET..., END]
    val: list[list[int]]
    test: list[list[int]]
    info: dict[str, Any]


def encode(text: str) -> list[int]:
    return [b + OFFSET for b in text.encode("utf-8")]


def decode(tokens: list[int]) -> str:
    return bytes(t - OFFSET for t in tokens if t >= OFFSET).decode("utf-8", errors="replace")


def load_corpus(cfg: dict[str, Any]) -> Corpus:
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data"
    docs: list[str] = []
    files = 0
    for lang in cfg["languages"]:
        if not (root / lang).is_dir():
            raise SpecError(f"data.languages: {lang!r} is not in chatterbot-corpus")
        for path in sorted((root / lang).glob("*.yml")):
            files += 1
            for conv in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
                lines = [" ".join(str(line).split()) for line in conv or [] if isinstance(line, str | int | float)]
                if any(lines):
                    docs.append("\n".join(line for line in lines if line))
    unique = list(dict.fromkeys(docs))
    order = np.random.default_rng(cfg["split_seed"]).permutation(len(unique))
    n_test, n_val = int(len(unique) * cfg["test_fraction"]), int(len(unique) * cfg["val_fraction"])
    tokens = [[END, *encode(unique[i]), END] for i in order]
    test, val, train = tokens[:n_test], tokens[n_test:n_test + n_val], tokens[n_test + n_val:]
    info = {"name": "chatterbot-corpus conversations (YAML in the package's data/ folder), one document each",
            "languages": cfg["languages"], "files": files, "conversations": len(docs),
            "unique_conversations": len(unique), "split": "by conversation, seeded by data.split_seed",
            "bytes": {k: sum(len(d) - 2 for d in v) for k, v in (("train", train), ("val", val), ("test", test))}}
    return Corpus(train, val, test, info)


@torch.no_grad()
def bits_per_byte(model: GPT, docs: list[list[int]], batch: int = 32) -> float:
    """-log2 P of every token after each document's opening END (its bytes and its closing END), per token. A
    document longer than the context is scored in windows with a stride of half the context, each token once,
    with at least half a context before it."""
    model.eval()
    block = model.config.block_size
    stride = block // 2
    chunks: list[tuple[list[int], int]] = []  # (window of tokens, index of the first target to score)
    for doc in docs:
        scored = 0
        start = 0
        while scored < len(doc) - 1:
            window = doc[start:start + block + 1]
            chunks.append((window, scored - start))
            scored = start + len(window) - 1
            start += stride
    chunks.sort(key=lambda c: len(c[0]))
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        part = chunks[i:i + batch]
        width = max(len(w) for w, _ in part) - 1
        x = torch.zeros(len(part), width, dtype=torch.long)
        y = torch.full((len(part), width), -1, dtype=torch.long)
        for r, (w, first) in enumerate(part):
            x[r, :len(w) - 1] = torch.tensor(w[:-1])
            y[r, first:len(w) - 1] = torch.tensor(w[1 + first:])
        nll = F.cross_entropy(model(x).reshape(-1, model.config.vocab_size), y.reshape(-1), ignore_index=-1,
                              reduction="sum")
        total += float(nll) / math.log(2)
        count += int((y >= 0).sum())
    return total / count


def train(model: GPT, corpus: Corpus, t: dict[str, Any], log: Log) -> tuple[list[dict[str, float]], float]:
    """AdamW with linear warm-up and cosine decay; the weights of the best validation epoch are kept."""
    block = model.config.block_size
    stream = np.concatenate([np.asarray(d[:-1], np.int64) for d in corpus.train] + [np.full(block + 1, END)])
    starts = np.cumsum([0] + [len(d) - 1 for d in corpus.train[:-1]])  # every window opens a document
    gen = np.random.default_rng(t["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(0.9, 0.99), weight_decay=t["weight_decay"])
    total = t["epochs"] * t["steps_per_epoch"]

    def lr_at(step: int) -> float:
        if step < t["warmup_steps"]:
            return (step + 1) / t["warmup_steps"]
        progress = (step - t["warmup_steps"]) / max(1, total - t["warmup_steps"])
        return t["min_lr_fraction"] + (1 - t["min_lr_fraction"]) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict[str, float]] = []
    best, best_state = math.inf, copy.deepcopy(model.state_dict())
    began = time.perf_counter()
    for epoch in range(t["epochs"]):
        tick = time.perf_counter()
        model.train()
        losses = []
        for _ in range(t["steps_per_epoch"]):
            idx = gen.choice(starts, size=t["batch_size"])
            windows = torch.from_numpy(np.stack([stream[s:s + block + 1] for s in idx]))
            logits = model(windows[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t["clip_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_norm"])
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        val = bits_per_byte(model, corpus.val)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_bits_per_byte":
               float(np.mean(losses)) / math.log(2), "val_bits_per_byte": val, "lr": opt.param_groups[0]["lr"],
               "seconds": round(time.perf_counter() - tick, 3)}
        history.append(row)
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
        log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    model.load_state_dict(best_state)
    return history, time.perf_counter() - began


@torch.no_grad()
def sample(model: GPT, prompt: list[int], max_new: int, temperature: float, top_k: int, seed: int) -> list[int]:
    """Temperature and top-k sampling from the training forward, for the card (the server samples on its own)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ids, out = list(prompt), []
    while len(out) < max_new and len(ids) < model.config.block_size:
        logits = model(torch.tensor([ids]))[0, -1] / temperature
        if top_k:
            logits[logits < torch.topk(logits, top_k).values[-1]] = -math.inf
        nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(nxt)
        if nxt == END:
            break
        ids.append(nxt)
    return out


def continuations(model: GPT, max_new: int = 80) -> list[dict[str, str]]:
    rows = []
    for i, prompt in enumerate(PROMPTS):
        ids = [END, *encode(prompt)]
        rows.append({"prompt": prompt, "greedy": decode(greedy(model, ids, max_new, END)),
                     "sampled": decode(sample(model, ids, max_new, 0.8, 40, i)),
                     "sampled_with": "temperature 0.8, top_k 40, torch seed " + str(i)})
    return rows


def generation_config(name: str, cfg: GPTConfig, serve: dict[str, Any]) -> str:
    """config.pbtxt: the graph's tensors, the decoupled policy, the decode loop as parameters (documented in
    service/generation.py) and a warm-up that is one real decode step (P = 1, T = 1)."""
    from google.protobuf import text_format

    from service._proto import model_config_pb2 as mc

    hs = cfg.n_embd // cfg.n_head
    past, present = cache_names(cfg.n_layer, "past"), cache_names(cfg.n_layer, "present")
    c = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=serve["max_generations"])
    for n in ("input_ids", "position_ids", "attention_mask"):
        c.input.add(name=n, data_type=mc.TYPE_INT64, dims=[-1])
    for n in past:
        c.input.add(name=n, data_type=mc.TYPE_FP32, dims=[cfg.n_head, -1, hs])
    c.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[-1, cfg.vocab_size])
    for n in present:
        c.output.add(name=n, data_type=mc.TYPE_FP32, dims=[cfg.n_head, -1, hs])
    c.model_transaction_policy.decoupled = True
    c.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    params = {"generation_ids_input": "input_ids", "generation_positions_input": "position_ids",
              "generation_mask_input": "attention_mask", "generation_cache_inputs": ",".join(past),
              "generation_cache_outputs": ",".join(present), "generation_logits_output": "logits",
              "generation_end_token": str(END), "generation_prefix_tokens": str(END),
              "generation_token_offset": str(OFFSET), "generation_context_length": str(cfg.block_size),
              "generation_max_tokens": str(cfg.block_size - 1),
              "generation_default_max_tokens": str(serve["default_max_tokens"]),
              "max_generations": str(serve["max_generations"]), "generation_max_queue": str(serve["max_queue"]),
              "generation_text_input": "text_input", "generation_text_output": "text_output"}
    for k, v in params.items():
        c.parameters[k].string_value = v
    warm = c.model_warmup.add(name="decode_step", batch_size=1, count=1)
    for n, dims in (("input_ids", [1]), ("position_ids", [1]), ("attention_mask", [2])):
        warm.inputs[n].data_type, warm.inputs[n].zero_data = mc.TYPE_INT64, True
        warm.inputs[n].dims.extend(dims)
    for n in past:
        warm.inputs[n].data_type, warm.inputs[n].zero_data = mc.TYPE_FP32, True
        warm.inputs[n].dims.extend([cfg.n_head, 1, hs])
    return text_format.MessageToString(c)


def model_config(spec: dict[str, Any]) -> GPTConfig:
    m = spec["model"]
    return GPTConfig(block_size=m["block_size"], vocab_size=256 + OFFSET, n_layer=m["n_layer"], n_head=m["n_head"],
                     n_embd=m["n_embd"], dropout=m["dropout"], bias=m["bias"])


def run_gpt(spec: dict[str, Any], opts: Any, log: Log = print) -> dict[str, Any]:
    began = time.perf_counter()
    job, t = spec["job"], spec["train"]
    if spec["train"]["device"] != "cpu":
        raise SpecError(f"train.device = {t['device']!r}: {job} trains on the CPU only; expected 'cpu'")
    unsupported = [flag for flag, used in (("--data", opts.data), ("--resume", opts.resume),
                                           ("--quantize", opts.quantize)) if used]
    if unsupported or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SpecError(f"{job} does not take {', '.join(unsupported) or '--nproc'} (it trains one process on its "
                        "shipped corpus, without checkpoints); expected `deepserve train text_gpt [--epochs N] "
                        "[--seed S] [--set KEY=VALUE] [--config FILE]`")
    if t["threads"] > 0:
        torch.set_num_threads(t["threads"])
    corpus = load_corpus(spec["data"])
    log(f"{job}: {corpus.info['name']}; bytes {corpus.info['bytes']}")
    baseline_began = time.perf_counter()
    ngram, by_order = best_order(corpus.train, corpus.val, spec["baseline"]["orders"], 256 + OFFSET)
    ngram_bits, ngram_count = ngram.bits(corpus.test)
    baseline_seconds = time.perf_counter() - baseline_began
    log(f"{job}: n-gram baseline val bits/byte by order {({k: round(v, 4) for k, v in by_order.items()})}; "
        f"order {ngram.order}: test {ngram_bits / ngram_count:.4f}")
    seed_everything(t["seed"])
    cfg = model_config(spec)
    model = GPT(cfg)
    history, train_seconds = train(model, corpus, t, log)
    model.eval()
    test_bpb = bits_per_byte(model, corpus.test)
    base_bpb = ngram_bits / ngram_count
    test = {"bits_per_byte": test_bpb, "ngram_bits_per_byte": base_bpb, "ngram_order": ngram.order,
            "ngram_val_bits_per_byte_by_order": by_order, "reduction_vs_ngram": 1 - test_bpb / base_bpb,
            "val_bits_per_byte": min(r["val_bits_per_byte"] for r in history), "tokens": ngram_count,
            "documents": len(corpus.test)}
    change = test["reduction_vs_ngram"]
    log(f"{job}: test bits/byte {test_bpb:.4f} vs n-gram (order {ngram.order}) {base_bpb:.4f}: "
        f"{100 * abs(change):.1f}% {'lower' if change >= 0 else 'higher'}")
    samples = continuations(model)
    trained = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"deepserve-{job}-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_decoder(model, onnx_path)
        checked = parity(model, onnx_path, spec["export"]["tolerance"], t["seed"])
        log(f"{job}: export ok, parity max |torch - onnxruntime| = {checked['max_abs_diff']:.2e} over "
            f"{len(checked['cases'])} prefill/decode cases")
        card: dict[str, Any] = {
            "job": job, "task": "generate", "data": corpus.info, "spec": spec, "model": asdict(cfg),
            "parameters": model.num_params(), "history": history, "test": test, "samples": samples,
            "parity": checked, "seed": t["seed"], "device": "cpu", "torch_threads": torch.get_num_threads(),
            "versions": cards.versions(),
            "seconds": {"train": round(train_seconds, 2), "ngram_baseline": round(baseline_seconds, 2),
                        "until_trained": round(trained - began, 2)}}
        out = ModelSpec(job, [], [], text=generation_config(job, cfg, spec["serve"]))

        def write(folder: Path, version: int) -> None:
            (folder / "model.onnx").write_bytes(onnx_path.read_bytes())
            card["seconds"]["total"] = round(time.perf_counter() - began, 2)
            cards.write_card(folder / "card.json", {"name": job, "version": version, **card})
            curve = [{"epoch": r["epoch"], "train_loss": r["train_bits_per_byte"],
                      "val_loss": r["val_bits_per_byte"]} for r in history]
            cards.plot_curve(curve, folder / "training_curve.png", f"{job} v{version} (bits per byte)")
            np.savez(folder / "examples.npz", prompt=np.asarray(PROMPTS, dtype=np.str_))

        version, where = publish(opts.repository, out, write)
    seconds = time.perf_counter() - began
    log(f"{job}: published {where} (version {version}) in {seconds:.1f} s")
    return {"job": job, "version": version, "path": str(where), "seconds": round(seconds, 1),
            "train_seconds": round(train_seconds, 1), "test": test, "target": spec.get("target", {})}
