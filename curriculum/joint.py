"""Shared + expert LoRA: neighbourhood adapters that also learn from each other's tokens.

Trained apart, each neighbourhood's adapter relearns from its own slice what all
neighbourhoods share (syntax, frequent words), and one adapter of the same total rank trained
on their union beats them all (benchmarks/RESULTS.md §6). Trained jointly, the adapters split
into a part they agree on and a part where they drift apart, as the tethers note has it:

    delta_k = shared + expert_k        (per layer: B_s A_s s_s + B_k A_k s_k)

Every step takes a batch from ONE neighbourhood k and trains `shared` and `expert_k` on it, so
the shared adapter sees every neighbourhood's tokens and each expert only its own. The total
rank is shared_rank + n * expert_rank, which a union adapter of that rank matches exactly.

A neighbourhood's adapter is exported as a stock peft LoRA of rank shared_rank + expert_rank
(the two concatenated along the rank, scales folded into B: the same delta, exactly), so it
loads with plain peft and routes, scores and merges like an adapter trained alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from curriculum.samplers import BatchStream, UniformSampler, _check

SHARED = "shared"


def add_joint_lora(model, experts: list[str], shared_rank: int, expert_rank: int, scale: float, *,
                   dropout: float = 0.0, target_modules: str | list[str] = "all-linear", seed: int = 0):
    """`model` wrapped in peft with adapter `shared` (rank `shared_rank`) and one adapter per name
    in `experts` (rank `expert_rank`), all with LoRA scale `scale` (alpha = scale * rank)."""
    from peft import LoraConfig, get_peft_model

    if SHARED in experts:
        raise ValueError(f"an expert may not be called '{SHARED}'")

    def config(rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=dropout, target_modules=target_modules,
                          bias="none", task_type="CAUSAL_LM")

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config(shared_rank), adapter_name=SHARED)
    for name in experts:
        peft_model.add_adapter(name, config(expert_rank))
    for name, p in peft_model.named_parameters():  # all trainable from the start: `fit` optimises
        p.requires_grad_(".lora_" in name)         # what is trainable when it begins
    return peft_model


def activate(peft_model, expert: str) -> None:
    """Make `shared` + `expert` the active adapters; every other expert is idle, gets no
    gradient, and the optimizer leaves it alone this step."""
    peft_model.base_model.set_adapter([SHARED, expert])


def trainable_parameters(peft_model) -> int:
    """Parameters of the shared adapter and all experts (what a union adapter must match)."""
    return sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)


class GroupBatches(BatchStream):
    """Batches that each come from one group: group g gets a share of the batches equal to its
    share of the blocks, in a seeded random order (a fresh order per cycle of `cycle` batches);
    within a group, blocks are drawn as the `uniform` sampler draws them.

    `group` is the group of the last batch drawn (the expert to activate for it)."""

    def __init__(self, block_groups: np.ndarray, batch_size: int, seed: int = 0, cycle: int = 1000) -> None:
        block_groups = _check(block_groups, batch_size)
        self.groups, counts = np.unique(block_groups, return_counts=True)
        self._members = [np.flatnonzero(block_groups == g) for g in self.groups]
        self._streams = [UniformSampler(np.zeros(len(m), dtype=np.int64), batch_size, seed + 1 + i)
                         for i, m in enumerate(self._members)]
        # Batches per group in a cycle, by largest remainder so they sum to `cycle` exactly.
        share = counts / counts.sum() * cycle
        per = np.floor(share).astype(int)
        per[np.argsort(per - share)[: cycle - per.sum()]] += 1
        self._cycle = np.repeat(np.arange(len(self.groups)), per)
        self._rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)
        self.batches_drawn = 0
        self.group = int(self.groups[0])

    def next_batch(self) -> np.ndarray:
        pos = self.batches_drawn % len(self._cycle)
        if pos == 0:
            self._order = self._rng.permutation(self._cycle)
        self.batches_drawn += 1
        i = int(self._order[pos])
        self.group = int(self.groups[i])
        return self._members[i][self._streams[i].next_batch()]


def export_expert(peft_model, expert: str, out: Path, expert_at: dict[str, str] | None = None) -> None:
    """Write `shared` + `expert` as ONE stock peft LoRA adapter in `out` (rank r_s + r_e):
    A = [A_s; A_e], B = [B_s * s_s / s, B_e * s_e / s] with s = 1, so B A s = the summed delta.
    `expert_at` (layer label -> expert) takes a layer's expert factors from another expert: the
    one that owns it after tethers tied them (curriculum/plateau_tethers.py)."""
    from peft import get_peft_model_state_dict

    from curriculum.tethers import layer_label

    expert_at = expert_at or {}
    configs = peft_model.peft_config
    names = {expert, *expert_at.values()}
    scales = {name: configs[name].lora_alpha / configs[name].r for name in (SHARED, *names)}
    parts = {name: get_peft_model_state_dict(peft_model, adapter_name=name) for name in scales}
    state = {}
    for key, a in parts[SHARED].items():
        source = expert_at.get(layer_label(key.removeprefix("base_model.model.")), expert)
        b = parts[source][key]
        if key.endswith("lora_A.weight"):
            state[key] = torch.cat([a, b], dim=0)
        elif key.endswith("lora_B.weight"):
            state[key] = torch.cat([a * scales[SHARED], b * scales[source]], dim=1)
        else:
            raise ValueError(f"export_expert: unexpected adapter tensor '{key}' (only LoRA A/B are supported)")
    shared_cfg, expert_cfg = configs[SHARED], configs[expert]
    merged = copy.deepcopy(shared_cfg)
    merged.r = shared_cfg.r + expert_cfg.r
    merged.lora_alpha = merged.r  # scale 1: the scales live in B
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
