"""Held-out evaluation: one pass over the fixed held-out passages gives every perplexity.

Returns a flat `dict[str, float]` with prefixed names, token-weighted:
`heldout/loss`, `heldout/ppl` (natural mixture), `topic/<t>/ppl`, `nb/<id>/ppl` for the
neighbourhoods asked for, and `nucleus/ppl` (forgetting) when the nucleus is given.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from pipeline.lm_data import EvalSet, pad_batch


@torch.no_grad()
def passage_nll(model: nn.Module, eval_set: EvalSet, batch_size: int, device: torch.device,
                pad_id: int, autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL in nats, predicted tokens) per held-out passage."""
    was_training = model.training
    model.eval()
    nll = np.zeros(len(eval_set.sequences))
    count = np.zeros(len(eval_set.sequences))
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    for start in range(0, len(eval_set.sequences), batch_size):
        seqs = eval_set.sequences[start:start + batch_size]
        ids, mask = (t.to(device) for t in pad_batch(seqs, pad_id))
        with ctx:
            logits = model(input_ids=ids, attention_mask=mask).logits  # (batch, width, vocab)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:]
        tok_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask[:, 1:]  # (batch, width-1)
        nll[start:start + len(seqs)] = tok_nll.sum(1).cpu().numpy()
        count[start:start + len(seqs)] = mask[:, 1:].sum(1).cpu().numpy()
    model.train(was_training)
    return nll, count


def _ppl(nll: float, count: float) -> float:
    return float(math.exp(min(nll / max(count, 1.0), 50.0)))


def evaluate(model: nn.Module, eval_set: EvalSet, batch_size: int, device: torch.device, pad_id: int,
             neighborhoods: dict[str, list[int]] | None = None, nucleus_topics: list[int] | None = None,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Flat metrics over the held-out split (see module docstring)."""
    nll, count = passage_nll(model, eval_set, batch_size, device, pad_id, autocast_dtype)
    out = {"heldout/loss": float(nll.sum() / max(count.sum(), 1.0)), "heldout/ppl": _ppl(nll.sum(), count.sum())}
    topics = eval_set.topics
    for t in np.unique(topics):
        sel = topics == t
        out[f"topic/{int(t)}/ppl"] = _ppl(nll[sel].sum(), count[sel].sum())
    groups = dict(neighborhoods or {})
    if nucleus_topics is not None:
        groups["__nucleus__"] = nucleus_topics
    for name, nb_topics in groups.items():
        sel = np.isin(topics, nb_topics)
        if not sel.any():
            continue
        key = "nucleus" if name == "__nucleus__" else f"nb/{name}"
        out[f"{key}/loss"] = float(nll[sel].sum() / max(count[sel].sum(), 1.0))
        out[f"{key}/ppl"] = _ppl(nll[sel].sum(), count[sel].sum())
    return out
