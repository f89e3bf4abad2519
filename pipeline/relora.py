"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates";
Guitaricet/relora): a full model trained through a sequence of low-rank updates.

The base (the scratch preset, or any local unquantised Hugging Face model) has its linear layers
trained as a LoRA adapter of rank `train.relora_rank`; embeddings and norms train in full, as in
the paper. Every `train.relora_every` steps the adapter is merged
into the base weights (W += scale * B A) and re-initialised (A random, B = 0, so the model's
outputs do not change at the merge), most of the adapter's optimizer state is pruned by
magnitude (`train.relora_prune`), and the learning rate re-warms over `train.relora_warmup`
steps: the jagged schedule. With `train.relora_warm_start` N, the first N steps train every
weight in full (the paper's warm start); then the adapter folds in, the wrapped weights freeze
and lose their optimizer state, and the cycles begin. Each cycle adds up to `rank` new directions, so the sum of the
updates can reach full rank while the optimizer holds state for the adapter only. At the end the
last adapter is merged and the model unwrapped: it saves as a plain Hugging Face model.

A checkpoint stores every weight (the merges change the frozen ones), the optimizer and the RNG,
so a training killed mid-cycle resumes to where an uninterrupted one ends.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.module_spec import Param, module

GROWTH_MODULES = (
    module("growth", "full_rank", "plain full-rank training of the base"),
    module("growth", "relora", "ReLoRA: a LoRA merged into the base and restarted every N steps",
           (Param("train.relora_every", "int", 100, 10, 1000, log=True),
            Param("train.relora_rank", "int", 64, 8, 256, log=True))),
)

ADAPTER = "default"


def check_mergeable(base: str) -> None:
    """A UserError when the Hugging Face model at `base` is quantised: ReLoRA adds each cycle's
    adapter into the base weights, which quantised weights cannot take exactly."""
    from pipeline.atomic import read_json
    from pipeline.errors import UserError

    config = read_json(Path(base) / "config.json") if (Path(base) / "config.json").is_file() else {}
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UserError(f"train.relora_every: ReLoRA merges its adapter into the base weights every cycle, and "
                        f"'{base}' is quantised (quantization_config: {method}), which cannot take the merges. "
                        f"Use an unquantised copy of the model, or unset train.relora_every.")


def wrap(model: nn.Module, rank: int, seed: int, warm_start: bool = False) -> nn.Module:
    """The model with a LoRA adapter on every linear layer but the output; everything else (the
    embeddings, norms, biases, an untied output layer) trains in full, as in the paper. With
    `warm_start` the wrapped weights train too, until `freeze_base` (the paper's full-rank warm
    start: the first steps train everything)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                  target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    for name, p in peft_model.named_parameters():
        if ".base_layer." not in name or warm_start:  # else frozen: their update is the adapter
            p.requires_grad_(True)
    return peft_model


def freeze_base(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """End of the warm start: the LoRA-wrapped weights stop training and the optimizer drops their
    state (the memory ReLoRA saves); from here on they change only by merges."""
    for layer in lora_layers(model):
        weight = layer.base_layer.weight
        weight.requires_grad_(False)
        weight.grad = None
        if opt is not None:
            opt.state.pop(weight, None)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


@torch.no_grad()
def merge_and_reset(model: nn.Module) -> None:
    """Fold each adapter into its base weight and start a fresh adapter (B = 0: same outputs)."""
    for layer in lora_layers(model):
        delta = layer.get_delta_weight(ADAPTER)
        layer.base_layer.weight.add_(delta.to(layer.base_layer.weight.dtype))
        layer.reset_lora_parameters(ADAPTER, True)


@torch.no_grad()
def prune_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module, fraction: float) -> None:
    """Zero the `fraction` smallest-magnitude entries of the adapter's Adam moments: the old
    adapter's directions are in the base now, its momentum would push the new one along them."""
    if fraction <= 0:
        return
    params = [p for layer in lora_layers(model) for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
    for p in params:
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if t is None or t.numel() == 0:
                continue
            keep = max(1, int(round((1.0 - fraction) * t.numel())))
            threshold = torch.topk(t.abs().flatten(), keep, sorted=False).values.min()
            t.mul_(t.abs() >= threshold)


def jagged(step: int, every: int, warmup: int, start: int = 0) -> float:
    """The learning-rate factor: a linear re-warm-up over `warmup` steps from each merge. Without
    a warm start the first cycle keeps the ordinary warm-up; after a warm start of `start` steps
    the cycles (and re-warm-ups) begin at `start`."""
    if step < start or (start == 0 and step < every):
        return 1.0
    return min(1.0, ((step - start) % every + 1) / warmup)


def merges_at(step: int, every: int, start: int = 0) -> bool:
    """Whether the adapter folds into the base after `step` steps: at the end of a warm start, then
    every `every` steps from it."""
    return step >= start and step > 0 and (step - start) % every == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The last adapter merged, the plain model returned (it saves as a Hugging Face model)."""
    merge_and_reset(model)
    return model.unload()
