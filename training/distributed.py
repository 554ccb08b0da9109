"""torchrun support: under `torchrun --nproc-per-node N -m training JOB` (or `deepserve train JOB --nproc N`) each
process joins one process group (gloo on CPU, nccl on GPU) before the job and leaves it after. Rank 0 alone
checkpoints and publishes (see training.loop and training.jobs); single-process runs skip all of this.

The collectives the loop needs live here too, each with the reason it exists: DDP keeps the parameters equal on
every rank, but not the batch-norm running statistics (each rank updates them from its own last batch), and not
anything a rank decides from its own validation numbers. A decision that differs between ranks (stop now, keep
this epoch) leaves one rank waiting in a collective that the others never enter."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Dist:
    """This process's place in a torchrun job (world 1 = plain single-process training)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def process_group(device: str | None) -> Iterator[None]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():  # `train all`: one group for all its jobs
        yield
        return
    use_cuda = device == "cuda" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield
        dist.barrier()  # rank 0 publishes after the others finish training; nobody exits while a peer still needs it
    finally:
        dist.destroy_process_group()


def shard(n: int, seed: int, epoch: int, dist: Dist) -> tuple[list[int], set[int]]:
    """This rank's sample order for the epoch from DistributedSampler, and which of its entries are padding.

    DistributedSampler pads the permutation to a multiple of the world size by repeating its head, so every rank
    runs the same number of steps (a rank with one step fewer would leave the others waiting in DDP's all-reduce).
    The repeats still train, but must not be counted twice in the epoch's metrics. Entry j of this rank sits at
    position rank + j * world of the padded list; positions >= n are the repeats. A repeat never appears twice
    in one rank's list, so its index identifies it."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return order, {i for j, i in enumerate(order) if dist.rank + j * dist.world >= n}


def all_reduce(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Sums over ranks (sample counts, loss sums, correct counts): the epoch's metrics over all shards."""
    if dist.world == 1:
        return values
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def from_main(values: list[float], dist: Dist, device: torch.device) -> list[float]:
    """Rank 0's numbers on every rank, so every rank makes the same early-stopping and best-epoch decision."""
    if dist.world == 1:
        return values
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, src=0)
    return t.tolist()


def sync_buffers(model: nn.Module, dist: Dist) -> None:
    """Rank 0's buffers (batch-norm running mean/var) on every rank before validating. DDP broadcasts them at the
    start of each forward, but the last forward of the epoch then updates them from each rank's own batch."""
    if dist.world == 1:
        return
    import torch

    for b in model.buffers():
        torch.distributed.broadcast(b.data, src=0)


def digest(model: nn.Module) -> str:
    """sha256 of the state dict (parameters and buffers, in key order): equal digests mean equal weights."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather(value: Any, dist: Dist) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if dist.world == 1:
        return [value]
    import torch

    out: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(out, value)
    return out
