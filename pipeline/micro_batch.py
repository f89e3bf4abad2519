"""Micro-batches: each drawn batch cut into pieces that fit the device, their gradients
accumulated, so that `train.batch_size` stays the batch the optimiser sees.

`train.micro_batch_size: auto` (the default) takes the largest piece that fits. On a GPU, before
the first step, the training's own step (forward and backward, compiled if the training is)
runs on the whole of this process's share of a batch; while that runs out of memory, or leaves
no room for the optimizer state the first step will allocate, the piece is halved (to the next
divisor of the share, so every piece has the same shape and a compiled step compiles once per
size). On a CPU the whole share is one piece. A number fixes the piece; it must divide the share.

Each piece's mean loss is weighted by its share of the batch's target tokens, so the gradient is
the whole batch's up to the order of floating-point sums (tests/pipeline/test_micro_batch.py).
The probe's gradients are dropped and the random state restored: it changes no weight and no
later batch.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from pipeline.errors import UserError
from pipeline.micro_batch_rule import divisors, micro_batch_problem

# Of the memory free when the probe starts, what a piece may use with the optimizer state added:
# the rest is left to the allocator's fragmentation and to later steps' temporaries.
HEADROOM = 0.9


def largest_fitting(rows: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of `rows` for which `fits` holds, trying `rows` first, then halving
    (to the next divisor at most half the size); an error when not even one row fits."""
    size = rows
    while not fits(size):
        smaller = [d for d in divisors(rows) if d <= size // 2]
        if not smaller:
            raise UserError("train.micro_batch_size: auto found no piece that fits: not even one block of "
                            "train.block_size tokens fits in the GPU's memory for a training step; lower "
                            "train.block_size or use a smaller model")
        size = smaller[0]
    return size


def is_oom(e: BaseException) -> bool:
    """An allocation failure on the GPU, also when torch.compile wraps it in its own error."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__
    return False


def step_fits(step: Callable[[int], None], size: int, device: torch.device, optimizer_bytes: int,
              zero_grad: Callable[[], None]) -> bool:
    """Whether `step(size)` (one forward and backward of `size` rows) runs on `device` with
    `optimizer_bytes` more still to come. Leaves no gradient and no cached block behind."""
    free, _ = torch.cuda.mem_get_info(device)
    room = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ok = True
    try:
        step(size)
        torch.cuda.synchronize(device)
        used = torch.cuda.max_memory_allocated(device) - before
        ok = used + optimizer_bytes <= HEADROOM * room
    except Exception as e:  # noqa: BLE001 - anything but an allocation failure is re-raised
        if not is_oom(e):
            raise
        ok = False  # the traceback (and the tensors it holds) is dropped on leaving this block
    zero_grad()
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def resolve(setting: int | str | None, rows: int, device: torch.device, step: Callable[[int], None],
            optimizer_bytes: int, zero_grad: Callable[[], None]) -> int:
    """The piece size a training uses for a share of `rows` blocks: a fixed setting as given,
    `auto` probed on a GPU (the whole share elsewhere), None the whole share."""
    if setting is None or (setting == "auto" and device.type != "cuda"):
        return rows
    if setting != "auto":
        problem = micro_batch_problem(setting, rows)
        if problem:
            raise ValueError(problem)
        return int(setting)
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    try:
        return largest_fitting(rows, lambda m: step_fits(step, m, device, optimizer_bytes, zero_grad))
    finally:
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], device)


def pending_optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    """What AdamW's two moments will take for the parameters that have no state yet."""
    return sum(2 * p.numel() * p.element_size() for group in opt.param_groups for p in group["params"]
               if not opt.state.get(p))
