"""Rabbit holes, the model side: probe trainings for walks, continuations for generative holes.

A probe trains a fresh LoRA adapter on one topic for `explore.probe_steps` steps, with the
same optimiser settings as a real neighbourhood, and measures the drop of the topic's validation
loss. Probe adapters live in memory only: they teach the curiosity model and are never saved,
so `adapters/` keeps exactly one adapter per explored neighbourhood.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from curriculum.curiosity import learning_progress
from curriculum.samplers import make_sampler
from pipeline.config import NucleusConfig
from pipeline.evaluate import passage_nll
from pipeline.lm_data import make_eval_set, pack_by_topic, passage_texts, tokenize
from pipeline.train import RunData, add_lora, autocast_dtype, fit_settings
from pipeline.trainer import fit


@dataclass
class ProbeResult:
    topic: int
    progress: float  # validation loss drop per 1k training tokens
    tokens: int
    loss_before: float
    loss_after: float


def probe_training(cfg: NucleusConfig, base, tokenizer, data: RunData, topic: int,
                   device: torch.device) -> ProbeResult | None:
    """Train a throwaway adapter on `topic` (on a copy of `base`); None when the topic has no
    training or no validation passages to measure on."""
    rows = data.train_rows([topic])
    held = data.signal_rows([topic])  # the validation split: what the curiosity model learns from
    if not rows or not held:
        return None
    block_size, pad = cfg.train.block_size, tokenizer.pad_token_id
    blocks = pack_by_topic(tokenize(tokenizer, passage_texts(data.corpus, rows)), [topic] * len(rows),
                           block_size, pad)
    eval_set = make_eval_set(tokenizer, data.corpus, held, [topic] * len(held), block_size)
    autocast = autocast_dtype(cfg, device)

    def loss(m) -> float:
        nll, n = passage_nll(m, eval_set, cfg.train.eval_batch_size, device, pad, autocast)
        return float(nll.sum() / max(n.sum(), 1))

    model = add_lora(cfg, copy.deepcopy(base)).to(device)  # `base` itself stays untouched
    before = loss(model)  # a fresh LoRA adapter is the identity (B = 0): this is the base's loss
    settings = fit_settings(cfg, cfg.explore.probe_steps, cfg.lora.lr, device, replay=False)
    torch.manual_seed(cfg.seed)
    fitted = fit(model, blocks, lambda: iter(make_sampler("uniform", blocks.topics, cfg.train.batch_size,
                                                          seed=cfg.seed + topic)),
                 settings, device, desc=f"probe topic-{topic}")
    after = loss(model)
    del model
    return ProbeResult(topic, learning_progress(before, after, fitted.tokens), fitted.tokens, before, after)


def topic_prompt(tokenizer, data: RunData, topic: int, n_tokens: int, rng: np.random.Generator) -> list[int]:
    """The first `n_tokens` tokens of a random training passage of `topic`."""
    rows = data.train_rows([topic])
    row = int(rows[rng.integers(len(rows))])
    ids = tokenize(tokenizer, passage_texts(data.corpus, [row]))[0]
    return [tokenizer.eos_token_id] + ids[:n_tokens]  # EOS doubles as BOS, as in evaluation


@torch.no_grad()
def continue_text(model, tokenizer, prompt: list[int], n_tokens: int, seed: int, device: torch.device) -> str:
    """The model's sampled continuation of `prompt` (top-k 50, temperature 1), decoded."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    was_training = model.training
    model.eval()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=True,
                         top_k=50, temperature=1.0, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
