"""The one training loop every job uses: optimiser, loss, penalties, schedule, early stopping, progress bar,
per-epoch metrics and a checkpoint every epoch, single-process or under DistributedDataParallel.

Determinism and resume come from the same idea: every source of randomness in an epoch (shuffle order,
augmentation, dropout) is seeded from (seed, epoch), so a run resumed after epoch k replays epochs k+1.. exactly as
the uninterrupted run would have, without having to capture RNG states mid-flight."""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from training.augment import make_augment
from training.distributed import Dist, all_reduce, digest, from_main, gather, shard, sync_buffers
from training.spec import SpecError
from training.tasks import Task, trim
from training.tokens import PAD_ID

if TYPE_CHECKING:
    from training.data import Dataset

Log = Callable[[str], None]


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None
    train_seconds: float = 0.0
    samples_per_epoch: int = 0  # summed over ranks: len(train) when the shards cover the data once
    rank_digests: list[str] = field(default_factory=list)  # sha256 of the final weights, per rank


@dataclass
class Checkpoint:
    """What checkpoint.pt holds after each epoch: enough to go on as if never stopped. The field names are the
    file's keys (tests and users read `best_model` from it), written and read only through this class."""

    fingerprint: str
    epoch: int  # epochs done
    model: dict[str, Any]
    optimizer: dict[str, Any]
    schedule: dict[str, Any] | None
    history: list[dict[str, float]]
    best_value: float
    bad_epochs: int
    best_model: dict[str, Any]
    best_epoch: int
    stopped_early: bool

    def save(self, path: Path) -> None:
        """Write-then-rename: a kill during the write leaves the previous checkpoint intact."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, tmp)  # not asdict: it deep-copies
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, device: torch.device) -> Checkpoint:
        return cls(**torch.load(path, map_location=device, weights_only=False))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params: Any, t: dict[str, Any]) -> torch.optim.Optimizer:
    name, lr, wd = t["optimizer"], t["lr"], t["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t["momentum"], nesterov=t["momentum"] > 0, weight_decay=wd)
    betas = (t.get("beta1", 0.9), 0.999)  # torch's default unless a spec has beta1 (a GAN's is 0.5)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    return torch.optim.RMSprop(params, lr=lr, momentum=t["momentum"], weight_decay=wd)


def make_schedule(opt: torch.optim.Optimizer, t: dict[str, Any], steps_per_epoch: int,
                  ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per batch, so every schedule means the same thing whatever the data size."""
    total = t["epochs"] * steps_per_epoch
    name = t["schedule"]
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, t["step_epochs"]) * steps_per_epoch,
                                               gamma=t["gamma"])
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t["lr"], total_steps=total,
                                                   pct_start=t["warmup_fraction"])
    return None


def penalty(model: nn.Module, l1: float, l2: float) -> torch.Tensor | float:
    """L1/L2 on weight matrices and kernels only: penalising biases and norm scales just fights the data."""
    if l1 == 0 and l2 == 0:
        return 0.0
    weights = [p for p in model.parameters() if p.ndim > 1 and p.requires_grad]
    total = sum(l1 * p.abs().sum() for p in weights) if l1 else 0.0
    if l2:
        total = total + sum(l2 * p.pow(2).sum() for p in weights)
    return total


def _order(n: int, seed: int, epoch: int, dist: Dist) -> tuple[list[int], set[int]]:
    """This rank's sample order for the epoch and its padding repeats: DistributedSampler under torchrun, a seeded
    permutation otherwise."""
    if dist.world > 1:
        return shard(n, seed, epoch, dist)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist(), set()


def _batches(order: list[int], lengths: torch.Tensor | None, size: int, gen: torch.Generator) -> list[list[int]]:
    """Mini-batches in the epoch's order. For token rows, rows of similar length are batched together (sorted
    within chunks of 32 batches, batch order shuffled): a random batch almost always holds one 250-byte line and
    pays attention over 250 positions for all 64 rows; bucketed, the median batch is ~40 positions."""
    if lengths is None:
        return [order[i:i + size] for i in range(0, len(order), size)]
    batches = []
    for i in range(0, len(order), size * 32):
        chunk = sorted(order[i:i + size * 32], key=lambda j: int(lengths[j]))
        batches += [chunk[k:k + size] for k in range(0, len(chunk), size)]
    return [batches[p] for p in torch.randperm(len(batches), generator=gen).tolist()]


def _rows(out: Any, keep: torch.Tensor) -> Any:
    """The kept rows of a batch's outputs (a tuple's per-batch scalars, like a VAE's KL term, stay as they are)."""
    if isinstance(out, tuple):
        return tuple(o[keep] if o.ndim and o.shape[0] == len(keep) else o for o in out)
    return out[keep]


def fit(model: nn.Module, task: Task, data: Dataset, spec: dict[str, Any], *, run_dir: Path | None = None,
        resume: bool = False, device: torch.device | None = None, fingerprint: str = "", log: Log = print,
        dist: Dist | None = None, quiet: bool = False) -> FitResult:
    """Train `model` in place and leave it holding the best validation weights (early stopping restores them).
    `run_dir` holds checkpoint.pt (None: no checkpoints); `fingerprint` is the spec's, so `resume` refuses a
    checkpoint of other settings."""
    dist = dist or Dist()
    device = device or torch.device("cpu")
    t = spec["train"]
    seed, epochs = t["seed"], t["epochs"]
    x_train, y_train = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y)
    x_val, y_val = torch.as_tensor(data.val.x), torch.as_tensor(data.val.y)
    per_rank = max(1, math.ceil(t["batch_size"] / dist.world))
    shard = math.ceil(len(y_train) / dist.world)
    steps = max(1, math.ceil(shard / per_rank))
    lengths = (x_train != PAD_ID).sum(dim=1) if x_train.dtype == torch.long else None
    seed_everything(seed)
    model.to(device)
    net: nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # A 1-input-channel conv kernel's gradient has an arbitrary (equivalent) stride on its size-1 axis; DDP
        # warns about it every step, although the values are the same.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    opt = make_optimizer(model.parameters(), t)
    sched = make_schedule(opt, t, steps)
    augment = make_augment(spec)
    monitor = t["early_stopping_metric"]
    sign = -1.0 if monitor == "val_accuracy" else 1.0  # lower is better after the sign
    result = FitResult()
    best_value, best_state, bad, start = math.inf, copy.deepcopy(model.state_dict()), 0, 0
    ckpt = run_dir / "checkpoint.pt" if run_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        state = Checkpoint.load(ckpt, device)
        if state.fingerprint != fingerprint:
            raise SpecError(f"--resume: {ckpt} was written for a different spec; rerun with the same options, or "
                            "without --resume to start over")
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        if sched is not None and state.schedule is not None:
            sched.load_state_dict(state.schedule)
        result.history, best_value, bad = state.history, state.best_value, state.bad_epochs
        best_state, result.best_epoch = state.best_model, state.best_epoch
        result.stopped_early, start = state.stopped_early, state.epoch
        result.resumed_from = start
        log(f"resumed from {ckpt} after epoch {start}/{epochs}")
    elif resume:
        log(f"--resume: no checkpoint at {ckpt}, starting from scratch")
    starts = gather(start, dist)
    if len(set(starts)) > 1:
        raise SpecError(f"--resume: the ranks found different checkpoints in {ckpt} (epochs {starts} by rank); "
                        "expected --runs on a filesystem every node shares")
    began = time.perf_counter()
    for epoch in range(start, epochs):
        if result.stopped_early:
            break
        tick = time.perf_counter()
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout and sampling noise: a function of (seed, epoch)
        aug_gen = torch.Generator().manual_seed(seed * 7_919 + epoch)
        order, repeats = _order(len(y_train), seed, epoch, dist)
        batches = _batches(order, lengths, per_rank, torch.Generator().manual_seed(seed * 31 + epoch))
        net.train()
        loss_sum, count, sums = 0.0, 0, {}
        bar = tqdm(total=steps, desc=f"{spec['job']} {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                   disable=quiet or not dist.main or None, mininterval=0.5)
        for batch in batches:
            idx = torch.tensor(batch)
            clean, yb = trim(x_train[idx]), y_train[idx].to(device)
            xb, clean = augment(clean, aug_gen).to(device), clean.to(device)
            out = task.forward(net, xb, yb)
            loss = task.loss(out, clean, yb)  # an autoencoder rebuilds the clean input from the noisy one
            total = loss + penalty(model, t["l1"], t["l2"])
            opt.zero_grad(set_to_none=True)
            total.backward()
            if t["clip_norm"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), t["clip_norm"])
            opt.step()
            if sched is not None:
                sched.step()
            seen, seen_loss = out, loss.detach()
            if repeats and any(i in repeats for i in batch):  # a DistributedSampler repeat: trained, not counted
                keep = torch.tensor([i not in repeats for i in batch], device=device)
                xb, clean, yb, seen = xb[keep], clean[keep], yb[keep], _rows(out, keep)
                with torch.no_grad():
                    seen_loss = task.loss(seen, clean, yb) if len(yb) else torch.zeros(())
            n = len(yb)
            loss_sum += float(seen_loss) * n
            count += n
            for k, v in task.batch_stats(seen, xb, yb).items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}", refresh=False)
        bar.close()
        keys = sorted(sums)
        reduced = all_reduce([loss_sum, float(count), *(sums[k] for k in keys)], dist, device)
        loss_sum, count, sums = reduced[0], int(reduced[1]), dict(zip(keys, reduced[2:], strict=True))
        result.samples_per_epoch = count
        row: dict[str, float] = {"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1)}
        row.update({f"train_{k}": v for k, v in task.epoch_metrics(sums, count).items()})
        if len(y_val):
            sync_buffers(model, dist)  # every rank validates (and keeps) the weights rank 0 publishes
            val = task.evaluate(model, x_val, y_val, 512)
            names = list(val)  # the same order on every rank
            row.update({f"val_{k}": v for k, v in zip(names, from_main([val[k] for k in names], dist, device),
                                                       strict=True)})
        row["lr"] = opt.param_groups[0]["lr"]
        row["seconds"] = round(time.perf_counter() - tick, 3)
        result.history.append(row)
        value = sign * row[monitor] if monitor in row else row["train_loss"]  # no validation split: train loss
        if monitor == "last":  # a GAN's losses do not say which epoch samples best: keep the last
            value = -float(epoch)
        if value < best_value:
            best_value, bad, result.best_epoch = value, 0, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            result.stopped_early = 0 < t["patience"] <= bad
        if dist.main and not quiet:
            log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if ckpt is not None and dist.main:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            Checkpoint(fingerprint=fingerprint, epoch=epoch + 1, model=model.state_dict(),
                       optimizer=opt.state_dict(), schedule=sched.state_dict() if sched else None,
                       history=result.history, best_value=best_value, bad_epochs=bad, best_model=best_state,
                       best_epoch=result.best_epoch, stopped_early=result.stopped_early).save(ckpt)
        if result.stopped_early and dist.main and not quiet:
            log(f"early stopping: {monitor} has not improved for {bad} epochs; best epoch {result.best_epoch}")
    result.train_seconds = time.perf_counter() - began
    model.load_state_dict(best_state)
    model.eval()
    result.rank_digests = gather(digest(model), dist)
    if len(set(result.rank_digests)) > 1 and dist.main:
        log(f"warning: the ranks finished with different weights: {result.rank_digests}")
    return result
