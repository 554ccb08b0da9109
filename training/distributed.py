"""torchrun support: under `torchrun --nproc-per-node N -m training JOB` (or `deepserve train JOB --nproc N`) each
process joins one process group (gloo on CPU, nccl on GPU) before the job and leaves it after. Rank 0 alone
checkpoints and publishes (see training.loop and training.jobs); single-process runs skip all of this."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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
