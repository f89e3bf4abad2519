"""Data-parallel training of one model on several processes: PyTorch DDP, launched by torchrun.

    torchrun --nproc_per_node 4 -m pipeline.cli train --run-dir runs/demo      # 4 GPUs
    torchrun --nproc_per_node 2 -m pipeline.cli train --run-dir runs/demo --set train.device=cpu

Every process (rank) builds the same data, model and sampler from the same run directory and
seed, so all ranks draw the same global batch of `train.batch_size` blocks; rank r trains on its
r-th contiguous share and DDP averages the gradients, each share's loss weighted by its part of
the batch's target tokens, which makes the average the global batch's gradient. The batch, and
so the results, do not depend on the number of processes, within the rounding of the reductions.
Only rank 0 writes: the run's records, checkpoints, metrics, the trained model; it alone
evaluates. A resumed training loads the one checkpoint on every rank.

Outside torchrun (WORLD_SIZE unset) nothing here does anything.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0, the one process that writes (true outside torchrun)."""
    return rank() == 0


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (once per process) and return this rank's device:
    `cuda:LOCAL_RANK` on GPUs (NCCL), the CPU otherwise (gloo)."""
    if world_size() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if not is_main():  # one copy of the progress log is enough
            logging.getLogger("nucleus").setLevel(logging.WARNING)
    return device


def share(idx: np.ndarray) -> np.ndarray:
    """This rank's contiguous share of a global batch of block indices."""
    return np.array_split(idx, world_size())[rank()] if active() else idx


def gather(local: np.ndarray) -> np.ndarray:
    """Every rank's `local` array, concatenated in rank order (so shares give back the batch)."""
    if not active():
        return local
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, np.asarray(local))
    return np.concatenate(parts)


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (in place)."""
    if active():
        dist.all_reduce(x)
        x /= world_size()
    return x


def minimum(x: int) -> int:
    """The smallest of the ranks' `x` (itself outside torchrun)."""
    if not active():
        return x
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([x], dtype=torch.int64, device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def check_batch(batch_size: int, replay_rows: int) -> str | None:
    """What is wrong with splitting a global batch over the ranks, or None."""
    w = world_size()
    if w > 1 and (batch_size - replay_rows) % w:
        return (f"train.batch_size: {batch_size} blocks ({batch_size - replay_rows} sampled, {replay_rows} replayed) "
                f"do not split evenly over {w} processes; use a multiple of {w}")
    if w > 1 and replay_rows % w:
        return (f"lora.replay_fraction: its {replay_rows} replay blocks per batch do not split evenly over {w} "
                f"processes; choose a fraction that gives a multiple of {w}")
    return None
