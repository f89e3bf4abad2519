"""The module catalogue: every swappable part, its hyperparameters and its tags.

Each registry declares its modules where the parts are defined (`SAMPLER_MODULES` beside
`SAMPLERS`, `GRAPH_MODULES` beside `GRAPH_BUILDERS`, ...); this file gathers them. A module
says what it *provides* and what it *needs* (tags such as `topic_graph`, `row_losses`,
`plain_logits`). A configuration picks one module of each kind; it is a valid combination when
every need of a chosen module is provided by another chosen module or by the configuration
itself (`provided`). `problems` names, for an invalid one, the config key, the unmet need and
what would meet it (`pipeline.config.build_config` turns them into the exit-2 error).

The hyperparameters are config keys with a type, a default (the config's own, checked by a
test) and a range: what a sweep may vary.

    nucleus modules list [--json]      every module, its tags and hyperparameters
    nucleus modules show NAME [--json] one of them
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

from pipeline.errors import unknown_choice
from pipeline.module_spec import Module


# kind -> the config key that chooses it. `model` and `growth` are chosen by two keys each (see
# `chosen`); every other kind by one registry-valued key.
KINDS: dict[str, str] = {
    "model": "model.base",
    "graph": "graph.kind",
    "sampler": "train.sampler",
    "loss": "train.loss",
    "growth": "train.relora_every",
    "policy": "explore.policy",
    "merge": "adapters.merge_method",
}

# The kinds a sweep's trial may choose (`sweep.space`): what changes without re-indexing the
# corpus or training another tokenizer.
SWEEPABLE_KINDS = ("sampler", "growth")

# Tags every configuration provides: the training loop reports per-row losses, the index stage
# builds a topic graph from embeddings, `explore` probes candidate topics.
ALWAYS: frozenset[str] = frozenset({"row_losses", "topics", "topic_graph", "embeddings", "probe_losses",
                                    "learning_progress"})
# Hugging Face model types whose logits are their output embedding applied to the last hidden
# state, unscaled (what `train.loss: chunked` computes by hand; pipeline/loss.py).
PLAIN_LOGIT_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2", "phi3", "olmo", "olmo2"})


@functools.cache
def catalogue() -> dict[str, dict[str, Module]]:
    """kind -> name -> Module, from every registry's declarations (built once; read-only)."""
    from curriculum.curiosity import POLICY_MODULES
    from curriculum.samplers import SAMPLER_MODULES
    from curriculum.tethers import MERGE_MODULES
    from pipeline.loss import LOSS_MODULES
    from pipeline.model import MODEL_MODULES
    from pipeline.relora import GROWTH_MODULES
    from retrieval.graph import GRAPH_MODULES

    out: dict[str, dict[str, Module]] = {k: {} for k in KINDS}
    for m in (*MODEL_MODULES, *GRAPH_MODULES, *SAMPLER_MODULES, *LOSS_MODULES, *GROWTH_MODULES,
              *POLICY_MODULES, *MERGE_MODULES):
        out[m.kind][m.name] = m
    return out


def find(name: str) -> list[Module]:
    """Every module called `name` (a name may exist in two kinds, `random`...), or a UserError."""
    cat = catalogue()
    kind, _, short = name.rpartition(".")  # ("", "", name) without a kind
    hits = [m for k, ms in cat.items() for n, m in ms.items() if n == short and kind in ("", k)]
    if not hits:
        raise unknown_choice("module", name, {n for ms in cat.values() for n in ms})
    return hits


def _hf_plain_logits(base: str) -> bool:
    """Whether a local Hugging Face base declares a model type with plain logits."""
    cfg = Path(base) / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") in PLAIN_LOGIT_TYPES
    except (OSError, ValueError):
        return False


def chosen(cfg) -> dict[str, str]:
    """kind -> the module name a configuration picks."""
    return {
        "model": cfg.model.size if cfg.model.base == "scratch" else "hf",
        "graph": cfg.graph.kind,
        "sampler": cfg.train.sampler,
        "loss": cfg.train.loss,
        "growth": "full_rank" if cfg.train.relora_every is None else "relora",
        "policy": cfg.explore.policy,
        "merge": cfg.adapters.merge_method,
    }


def provided(cfg, picks: dict[str, str] | None = None) -> set[str]:
    """Tags a configuration provides: ALWAYS, the chosen modules', and those of its data."""
    cat = catalogue()
    picks = picks or chosen(cfg)
    tags = set(ALWAYS)
    for kind, name in picks.items():
        tags |= cat[kind][name].provides
    if picks["model"] == "hf" and _hf_plain_logits(cfg.model.base):
        tags.add("plain_logits")
    if cfg.split.validation_fraction > 0:
        tags.add("validation_split")
    return tags


def unmet(picks: dict[str, str], tags: set[str]) -> list[tuple[Module, str]]:
    """(module, need) for every need of a chosen module that `tags` does not hold."""
    cat = catalogue()
    return [(cat[k][n], need) for k, n in picks.items() for need in sorted(cat[k][n].needs) if need not in tags]


# What provides a tag besides the modules: the configuration's own data.
NEED_NOTES = {"plain_logits": "a Hugging Face base of a Llama-style model_type",
              "validation_split": "split.validation_fraction > 0"}


def providers(need: str) -> list[str]:
    """How to provide `need`: 'key=name' of every module that provides it (the scratch presets as
    one `model.base=scratch`), and the data's own source of it (NEED_NOTES)."""
    out: list[str] = []
    for ms in catalogue().values():
        for m in ms.values():
            if need in m.provides:
                hint = ("model.base=scratch" if m.kind == "model" and m.name != "hf"
                        else f"{KINDS[m.kind]}={m.name}")
                if hint not in out:
                    out.append(hint)
    return out + ([NEED_NOTES[need]] if need in NEED_NOTES else [])


def problems(cfg) -> list[str]:
    """One line per unmet need of a chosen module: the config key, its value, the need and what
    would provide it."""
    picks = chosen(cfg)
    lines = []
    for m, need in unmet(picks, provided(cfg, picks)):
        by = providers(need)
        fix = f"use {' or '.join(by)}" if by else "no module provides it"
        lines.append(f"`{KINDS[m.kind]}`: '{m.name}' needs `{need}`, which this configuration does not "
                     f"provide ({fix}).")
    return lines


def valid_combinations(kinds: tuple[str, ...], base_tags: set[str] | None = None) -> list[dict[str, str]]:
    """Every combination of one module per kind in `kinds` whose needs the combination itself
    (plus `base_tags`, default ALWAYS) meets. What the compatibility tests enumerate."""
    cat = catalogue()
    base = set(ALWAYS if base_tags is None else base_tags)
    out = []
    for names in itertools.product(*(sorted(cat[k]) for k in kinds)):
        picks = dict(zip(kinds, names))
        tags = base | set().union(*(cat[k][n].provides for k, n in picks.items()))
        if not unmet(picks, tags):
            out.append(picks)
    return out
