"""The training loop shared by the nucleus (full) and neighbourhood (LoRA) trainings.

AdamW with linear warm-up and cosine decay, gradient accumulation and clipping, optional top-k
gradient sparsification, bf16 autocast on GPU, periodic held-out evaluation, resumable
checkpoints. Batches are packed token blocks chosen by a block sampler; samplers are
deterministic, so a resumed run re-creates them and skips the batches already consumed, or,
for a sampler that learns from feedback (it has `observe`), restores its stored state.
A sampler with `observe(batch, losses)` gets each drawn batch's per-block training losses; one
with `bind(model, tokens, mask, autocast_dtype)` reads the model itself (the manifold sampler,
`curriculum/manifold.py`). A sampler's state may hold numpy arrays: the checkpoint keeps them
as safetensors beside its JSON.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from pipeline import distributed, micro_batch, relora
from pipeline.atomic import atomic_path, read_json, restore_aside
from pipeline.errors import reading
from pipeline.lm_data import Blocks
from pipeline.loss import StepLoss, row_means, token_nll

log_fn = Callable[[dict], None]


@dataclass
class FitSettings:
    """Optimisation settings (plain values; taken from the `train` config section)."""

    steps: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    micro_batch_size: int | str | None = None  # pieces of a drawn batch (pipeline/micro_batch.py); None = whole
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_topk: float | None = None
    replay_fraction: float = 0.0
    eval_every: int = 50
    checkpoint_every: int = 50
    log_every: int = 10
    autocast_dtype: torch.dtype | None = None
    compile: bool = False  # torch.compile the training forward (and its loss); evaluation stays eager
    loss: str = "full"  # "full" (the model's own) or "chunked" (pipeline/loss.py)
    attention: str = "auto"  # SDPA kernel order on CUDA: PyTorch's own ("auto"), or "flash" / "cudnn" first
    relora_every: int | None = None  # ReLoRA (pipeline/relora.py): merge and restart the adapter every N steps
    relora_warmup: int = 20
    relora_prune: float = 0.99
    relora_warm_start: int = 0  # full-rank steps before the first cycle (the model wrapped with warm_start=True)
    residual_bf16: bool = False  # with bf16 autocast: the residual stream in bf16 (pipeline/loss.py)


@dataclass
class FitResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    micro_batch_size: int = 0  # rows per forward pass this process used (its whole share: no pieces)


def lr_lambda(step: int, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


ATTENTION_KERNELS = ("auto", "flash", "cudnn")


def attention_context(kind: str, device: torch.device):
    """The scaled-dot-product-attention kernels the training forward may use, best first.

    `auto` leaves PyTorch's own order, which depends on its version and the GPU: PyTorch 2.11
    on an H100 ran cuDNN's fused attention (RESULTS.md section 3, from the profile's kernel
    names). `flash` puts FlashAttention-2 first, `cudnn` cuDNN's attention (on Hopper it uses
    the chip's own instructions). The choice is made when the forward is traced, so `fit` wraps
    every call of the (compiled or eager) forward in it."""
    if kind not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {kind!r}")
    if device.type != "cuda" or kind == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]
    # the others stay allowed, behind it: a shape the first does not take falls back to them
    rest = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


def sparsify_gradients(params: list[nn.Parameter], keep: float) -> None:
    """Keep the `keep` fraction of largest-magnitude entries of each gradient tensor, zero the rest
    (the research note's "truncate the gradient to the highest-magnitude values")."""
    for p in params:
        if p.grad is None or p.grad.numel() < 2:
            continue
        flat = p.grad.abs().flatten()
        k = max(1, int(keep * flat.numel()))
        threshold = torch.topk(flat, k, sorted=False).values.min()
        p.grad.mul_(p.grad.abs() >= threshold)


def checkpoint_step(directory: Path, tag: str | None = None) -> int | None:
    """The step of the resumable checkpoint in `directory`, or None when there is none (or, given
    a `tag`, none made by a training with that tag: another config's checkpoint never resumes)."""
    restore_aside(directory / "latest")  # a kill between the renames of a checkpoint save
    state = directory / "latest" / "state.json"
    if not state.is_file():
        return None
    counters = read_json(state)
    if tag is not None and counters.get("tag") not in (None, tag):
        return None
    return int(counters["step"])


class _Checkpoint:
    """`<dir>/latest/`: trainable weights (safetensors), optimizer/scheduler/RNG state, counters."""

    def __init__(self, directory: Path | None, tag: str | None = None):
        self.dir = directory
        self.tag = tag

    def exists(self) -> bool:
        return self.dir is not None and checkpoint_step(self.dir, self.tag) is not None

    def save(self, model: nn.Module, trained: set[str], opt, sched, step: int, tokens: int,
             sampler_state: dict | None = None, tethers_state: dict | None = None) -> None:
        if self.dir is None:
            return
        with atomic_path(self.dir / "latest") as tmp:
            tmp.mkdir(parents=True)
            weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in trained}
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
            arrays = {k: v for k, v in (sampler_state or {}).items() if isinstance(v, np.ndarray)}
            if arrays:  # large sampler state (the manifold's vectors) as safetensors, not JSON
                save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / "sampler.safetensors"))
                sampler_state = {k: v for k, v in sampler_state.items() if k not in arrays}
            (tmp / "state.json").write_text(json.dumps({"step": step, "tokens": tokens, "sampler": sampler_state,
                                                        "sampler_arrays": sorted(arrays), "tag": self.tag,
                                                        "tethers": tethers_state}))

    def load(self, model: nn.Module, opt, sched) -> tuple[int, int, dict | None, dict | None]:
        latest = self.dir / "latest"
        with reading(latest, "training checkpoint"):
            weights = load_file(str(latest / "trainable.safetensors"))
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value.to(params[name].device))
            # weights_only: the file holds tensors and plain containers, never arbitrary objects.
            state = torch.load(latest / "optim.pt", weights_only=True, map_location="cpu")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            counters = read_json(latest / "state.json")
            sampler_state = counters.get("sampler")
            if counters.get("sampler_arrays"):
                sampler_state = {**sampler_state, **load_numpy(str(latest / "sampler.safetensors"))}
        return int(counters["step"]), int(counters["tokens"]), sampler_state, counters.get("tethers")


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Mean next-token loss (nats) of each row of a batch; rows without targets get 0."""
    return row_means(token_nll(logits, labels), labels).cpu().numpy()


def _skip(sampler, n: int, state: dict | None = None) -> None:
    if state is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
    elif hasattr(sampler, "skip"):
        sampler.skip(n)
    else:
        for _ in range(n):
            next(sampler)


def fit(model: nn.Module, blocks: Blocks, make_sampler: Callable[[], Iterator[np.ndarray]],
        settings: FitSettings, device: torch.device, *,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        replay: Blocks | None = None, make_replay_sampler: Callable[[], Iterator[np.ndarray]] | None = None,
        checkpoint_dir: Path | None = None, resume: bool = False, checkpoint_tag: str | None = None,
        log: log_fn | None = None, on_batch: Callable[[np.ndarray], None] | None = None,
        tethers=None, desc: str = "train") -> FitResult:
    """Train `model`'s trainable parameters for `settings.steps` optimizer steps.

    With `resume`, a checkpoint in `checkpoint_dir` saved under the same `checkpoint_tag` (the
    caller's config hash) is continued; any other is ignored and later overwritten.
    `on_batch(block_indices)` runs before each drawn batch's forward passes (joint adapter
    training switches the active expert there). `tethers` (curriculum/plateau_tethers.py) sees
    every logged loss and may merge adapter layers there; its state is checkpointed."""
    s = settings
    # Every parameter trainable at the start is optimised; one that a step leaves without a
    # gradient (an idle expert in joint training) is skipped by AdamW and the clipping.
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for n, p in model.named_parameters() if n in trained]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    every, warm = s.relora_every, s.relora_warm_start
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_lambda(step, s.warmup_steps, s.steps, s.min_lr_ratio)
        * (relora.jagged(step, every, s.relora_warmup, warm) if every else 1.0))
    ckpt = _Checkpoint(checkpoint_dir, checkpoint_tag)
    # ReLoRA's merges change the frozen weights too: its checkpoints keep every weight
    saved = {n for n, _ in model.named_parameters()} if every else trained
    step, tokens, sampler_state = 0, 0, None
    if resume and ckpt.exists():
        step, tokens, sampler_state, tethers_state = ckpt.load(model, opt, sched)
        if tethers is not None and tethers_state is not None:
            tethers.load_state_dict(tethers_state)
        if every and warm and step >= warm:  # past the warm start: the wrapped weights stay frozen
            relora.freeze_base(model)
    start_step = step

    n_replay = int(round(s.replay_fraction * s.batch_size)) if replay is not None and len(replay) else 0
    sampler = make_sampler()
    _skip(sampler, step * s.grad_accum, sampler_state)
    observe = getattr(sampler, "observe", None)  # a sampler that learns from the training loss
    replay_sampler = make_replay_sampler() if n_replay else None
    if replay_sampler is not None:
        _skip(replay_sampler, step * s.grad_accum)

    # Blocks live on the device for the whole fit: a batch is then one gather, with no host
    # copy per step. Token counts come from a host-side copy of the mask, so no step waits for
    # the GPU just to count tokens.
    tokens_on = (blocks.tokens.to(device), blocks.mask.to(device))
    replay_on = (replay.tokens.to(device), replay.mask.to(device)) if n_replay else None
    if hasattr(sampler, "bind"):  # a sampler that reads the model (its activations, gradient features)
        sampler.bind(model, tokens_on[0], tokens_on[1], s.autocast_dtype)
    block_len = blocks.mask.sum(1).numpy()
    replay_len = replay.mask.sum(1).numpy() if n_replay else None
    # Target tokens per block (the loss is their mean): what weighs a rank's share of a batch, or a
    # piece of a batch (pipeline/micro_batch.py), so the pieces' gradients add up to the whole batch's.
    block_targets = blocks.mask[:, 1:].sum(1).numpy()
    replay_targets = replay.mask[:, 1:].sum(1).numpy() if n_replay else None
    # Blocks without padding need no attention mask: the model then takes SDPA's causal path
    # (flash attention on GPU) instead of building a dense mask per step.
    padded = bool((block_len < blocks.tokens.shape[1]).any() or
                  (n_replay and (replay_len < replay.tokens.shape[1]).any()))
    # The step's loss as one module (pipeline/loss.py), so that DDP and torch.compile wrap all of it.
    wrapped = StepLoss(model, s.loss, rows=observe is not None,
                       residual_bf16=s.residual_bf16 and s.autocast_dtype == torch.bfloat16)
    ddp = distributed.active()
    if ddp:  # several processes (torchrun): DDP averages the gradients of the ranks' shares
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    main = distributed.is_main()  # only rank 0 logs, evaluates and checkpoints
    log = log if main else None
    # Static shapes (every piece is micro x block_size), so compilation happens once.
    forward = torch.compile(wrapped, dynamic=False) if s.compile else wrapped

    def on_device(idx: np.ndarray) -> torch.Tensor:
        """Block indices for a gather on the device. From pinned memory the copy is asynchronous:
        a plain (pageable) copy would make the host wait for the GPU's queue at every step."""
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

    def next_batch() -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, int, np.ndarray, int]:
        """(global batch, this rank's share of it, the share's tokens and mask, the global batch's
        token count, the share's target tokens per row, the global batch's target tokens):
        every rank draws the same global batch."""
        idx = next(sampler)[: s.batch_size - n_replay]
        mine = distributed.share(idx)
        at = on_device(mine)
        ids, mask = tokens_on[0][at], tokens_on[1][at]
        n, targets, all_targets = int(block_len[idx].sum()), block_targets[mine], int(block_targets[idx].sum())
        if replay_sampler is not None:
            r = next(replay_sampler)[:n_replay]
            r_mine = distributed.share(r)
            at = on_device(r_mine)
            ids, mask = torch.cat([ids, replay_on[0][at]]), torch.cat([mask, replay_on[1][at]])
            n, targets = n + int(replay_len[r].sum()), np.concatenate([targets, replay_targets[r_mine]])
            all_targets += int(replay_targets[r].sum())
        return idx, mine, ids, mask, n, targets, max(all_targets, 1)

    autocast = (torch.autocast(device.type, dtype=s.autocast_dtype) if s.autocast_dtype else nullcontext())
    attention_context(s.attention, device)  # a bad name fails here, before any step
    model.train()

    def probe_step(m: int) -> None:
        """One forward and backward of `m` real blocks, as a training step runs them (no gradient
        sync between ranks: one rank may run out of memory alone)."""
        at = torch.arange(m, device=device) % tokens_on[0].shape[0]
        ids, mask = tokens_on[0][at], tokens_on[1][at]
        with (wrapped.no_sync() if ddp else nullcontext()), autocast, attention_context(s.attention, device):
            forward(ids, mask.long() if padded else None, ids.masked_fill(~mask, -100))[0].backward()

    share_rows = (len(distributed.share(np.arange(s.batch_size - n_replay)))  # this rank's rows of a batch
                  + len(distributed.share(np.arange(n_replay))))
    micro = distributed.minimum(micro_batch.resolve(  # every rank the same pieces: the smallest any rank needs
        s.micro_batch_size, share_rows, device, probe_step, micro_batch.pending_optimizer_bytes(opt),
        lambda: model.zero_grad(set_to_none=True)))
    world = distributed.world_size() if ddp else 1
    if micro < share_rows:
        logging.getLogger("nucleus").info("%s: batches of %d blocks per process run in pieces of %d "
                                          "(train.micro_batch_size: %s)", desc, share_rows, micro, s.micro_batch_size)
    metrics: dict[str, float] = {}
    recent_loss = torch.zeros((), device=device)
    recent_n, last_loss = 0, float("nan")
    bar = tqdm(total=s.steps, initial=step, desc=desc, unit="step", disable=None if main else True)
    t0, tokens_at_t0 = time.perf_counter(), tokens
    while step < s.steps:
        for _ in range(s.grad_accum):
            idx, mine, ids, mask, n_tokens, targets, all_targets = next_batch()
            if on_batch is not None:
                on_batch(idx)
            labels = ids.masked_fill(~mask, -100)
            piece_rows = []
            for lo in range(0, len(ids), micro):
                hi = lo + micro
                with autocast, attention_context(s.attention, device):  # a fresh one: each is single-use
                    loss, rows = forward(ids[lo:hi], mask[lo:hi].long() if padded else None, labels[lo:hi])
                # The piece's part of the batch's mean loss (DDP averages over the ranks, hence
                # `world`): exactly 1 for one piece on one process.
                weight = float(targets[lo:hi].sum()) * world / all_targets
                if weight != 1.0:
                    loss = loss * weight
                if observe is not None:  # the sampled blocks only (every rank's), not the replay rows,
                    piece_rows.append(rows)  # after the last piece's forward, before its backward
                    if hi >= len(ids):
                        observe(idx, distributed.gather(torch.cat(piece_rows)[: len(mine)].float().cpu().numpy()))
                (loss / s.grad_accum).backward()
                recent_loss += loss.detach()
            recent_n += 1
            tokens += n_tokens
        if s.grad_topk is not None:
            sparsify_gradients(params, s.grad_topk)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if every and relora.merges_at(step, every, warm) and step < s.steps:  # ReLoRA: fold in, start afresh
            relora.merge_and_reset(model)
            relora.prune_optimizer_state(opt, model, s.relora_prune)
            if step == warm:  # the warm start ends: from here on only the adapter trains
                relora.freeze_base(model, opt)

        is_last = step == s.steps
        if step % s.log_every == 0 or is_last:
            last_loss = float(distributed.mean(recent_loss)) / max(recent_n, 1)  # every rank's
            elapsed = time.perf_counter() - t0
            tps = (tokens - tokens_at_t0) / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}")
            # every rank: the same loss and gradient norm, so the same merges
            extra = tethers.on_log(step, last_loss, float(grad_norm), opt, is_last) if tethers is not None else {}
            if log:
                log({"step": step, "tokens": tokens, "train/loss": last_loss, "lr": sched.get_last_lr()[0],
                     "grad_norm": float(grad_norm), "tokens_per_s": tps, **extra})
            recent_loss.zero_()
            recent_n = 0
        if evaluate is not None and main and (step % s.eval_every == 0 or is_last):
            metrics = evaluate(model)
            if log:
                log({"step": step, "tokens": tokens, **metrics})
            model.train()
        if step % s.checkpoint_every == 0 and not is_last and main:
            ckpt.save(model, saved, opt, sched, step, tokens,
                      sampler.state_dict() if hasattr(sampler, "state_dict") else None,
                      tethers.state_dict() if tethers is not None else None)
    bar.close()
    elapsed = time.perf_counter() - t0
    return FitResult(steps=step, tokens=tokens, seconds=round(elapsed, 3),
                     tokens_per_s=(tokens - tokens_at_t0) / max(elapsed, 1e-9), train_loss=last_loss,
                     metrics=metrics, resumed_from=start_step, micro_batch_size=micro)
