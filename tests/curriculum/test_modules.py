"""The module catalogue: every registry's parts declared with tags and hyperparameters, combinations
checked by their needs, and every valid combination run for a few real training steps.

The compatibility tests enumerate the catalogue: a module added to a registry (and declared
beside it) is tested here with no test code written."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from curriculum import modules
from curriculum.curiosity import FEATURES, POLICIES, choose, make_policy
from curriculum.samplers import SAMPLERS, make_sampler
from curriculum.tethers import MERGE_METHODS
from pipeline import relora
from pipeline.config import NucleusConfig, config_fields, resolve_config
from pipeline.errors import UserError
from pipeline.lm_data import pack_by_topic, tokenize
from pipeline.loss import LOSSES
from pipeline.model import PRESETS, build_scratch_model, train_tokenizer
from pipeline.trainer import FitSettings, fit
from retrieval.corpus import split_wikitext_articles
from retrieval.graph import GRAPH_BUILDERS, TopicGraph

TRAINING_KINDS = ("graph", "sampler", "loss", "growth")
TRAINING_COMBINATIONS = modules.valid_combinations(TRAINING_KINDS, modules.ALWAYS | {"scratch_model", "plain_logits"})
POLICY_COMBINATIONS = modules.valid_combinations(("graph", "policy"))


def test_the_catalogue_holds_every_registry_entry_once():
    cat = modules.catalogue()
    assert set(cat["sampler"]) == set(SAMPLERS)
    assert set(cat["graph"]) == set(GRAPH_BUILDERS)
    assert set(cat["policy"]) == set(POLICIES)
    assert set(cat["merge"]) == set(MERGE_METHODS)
    assert set(cat["loss"]) == set(LOSSES)
    assert set(cat["model"]) == set(PRESETS) | {"hf"}
    assert set(cat["growth"]) == {"full_rank", "relora"}


def test_every_hyperparameter_is_a_config_key_with_the_configs_default():
    keys = dict(config_fields())
    defaults = NucleusConfig().model_dump()
    for ms in modules.catalogue().values():
        for m in ms.values():
            for p in m.params:
                assert p.key in keys, f"{m.kind}.{m.name}: {p.key} is no config key"
                section, _, name = p.key.partition(".")
                default = defaults[section][name]
                if default is not None:  # an option off by default (relora_every) has a sweep default
                    assert default == p.default, f"{p.key}: catalogue {p.default}, config {default}"
                    assert isinstance(default, {"int": int, "float": float, "bool": bool}.get(p.kind, object))


def test_needs_decide_which_combinations_are_valid():
    # chunked loss needs plain logits: a scratch model gives them, an unknown HF model does not
    assert not modules.unmet({"model": "tiny", "loss": "chunked"}, modules.provided(NucleusConfig()))
    hf = NucleusConfig.model_validate({"model": {"base": "/nonexistent/model"}})
    assert [(m.name, need) for m, need in modules.unmet({"model": "hf", "loss": "chunked"},
                                                        modules.provided(hf, {**modules.chosen(hf)}))] == \
        [("chunked", "plain_logits")]
    combos = modules.valid_combinations(("model", "loss", "growth"))
    assert {"model": "hf", "loss": "chunked", "growth": "full_rank"} not in combos
    assert {"model": "hf", "loss": "full", "growth": "relora"} in combos  # ReLoRA trains any base
    assert {"model": "tiny", "loss": "chunked", "growth": "relora"} in combos
    assert len(combos) == 3 * 2 * 2 + 2  # every scratch preset with anything; hf with the full loss only


def test_a_llama_style_hf_base_provides_plain_logits(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = resolve_config(sets=[f"model.base={tmp_path}", "train.loss=chunked"])  # no error
    assert "plain_logits" in modules.provided(cfg)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))  # scales its logits
    with pytest.raises(UserError, match=r"`train.loss`: 'chunked' needs `plain_logits`.*model.base=scratch"):
        resolve_config(sets=[f"model.base={tmp_path}", "train.loss=chunked"])


def test_modules_list_json_lists_every_module_with_tags_and_hyperparameters():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "modules", "list", "--json"], capture_output=True,
                         text=True, check=True).stdout
    listed = json.loads(out)
    cat = modules.catalogue()
    assert {k: [m["name"] for m in ms] for k, ms in listed.items()} == {k: list(ms) for k, ms in cat.items()}
    community = next(m for m in listed["sampler"] if m["name"] == "community")
    assert community["needs"] == ["topic_graph"]
    assert community["params"] == [{"key": "train.community_k", "kind": "int", "default": 2, "low": 0, "high": 6}]
    shown = json.loads(subprocess.run([sys.executable, "-m", "pipeline.cli", "modules", "show", "policy.random",
                                       "--json"], capture_output=True, text=True, check=True).stdout)
    assert [(m["kind"], m["name"]) for m in shown] == [("policy", "random")]


@pytest.fixture(scope="module")
def tiny_world(wikitext_dir):
    """Real WikiText-2 blocks in 6 topics, a tiny scratch model's tokenizer, topic centroids."""
    arts = [f"{t}\n{b}" for t, b in split_wikitext_articles((wikitext_dir / "valid.txt").read_text("utf-8"))[:12]]
    tok = train_tokenizer(arts, 512)
    topics = [i // 2 for i in range(len(arts))]
    blocks = pack_by_topic(tokenize(tok, arts), topics, 32, tok.pad_token_id)
    centroids = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    return tok, blocks, centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def test_the_compatibility_tests_cover_every_valid_combination():
    # 2 graphs x 6 samplers x 2 losses x 2 growths; all valid on a scratch model (none needs more)
    assert len(TRAINING_COMBINATIONS) == 2 * 6 * 2 * 2
    assert len(POLICY_COMBINATIONS) == 2 * 5


@pytest.mark.parametrize("combo", TRAINING_COMBINATIONS, ids=lambda c: "-".join(c.values()))
def test_every_valid_training_combination_trains(combo, tiny_world):
    tok, blocks, centroids = tiny_world
    graph = TopicGraph.build(combo["graph"], centroids, k=2, p=0.5, seed=0)
    adjacency = {t: graph.neighbors(t) for t in graph.nodes}
    model = build_scratch_model(tok, "tiny", seed=0)
    relora_every = 2 if combo["growth"] == "relora" else None
    if relora_every:
        model = relora.wrap(model, rank=4, seed=0)
    settings = FitSettings(steps=4, lr=3e-3, batch_size=4, warmup_steps=1, eval_every=10**9,
                           checkpoint_every=10**9, log_every=1, loss=combo["loss"], relora_every=relora_every,
                           relora_warmup=1)
    rows = []
    result = fit(model, blocks, lambda: iter(make_sampler(combo["sampler"], blocks.topics, 4, adjacency, 1, 0)),
                 settings, torch.device("cpu"), log=rows.append)
    assert result.steps == 4 and len(rows) == 4
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] + 0.5  # it trains, it does not blow up


@pytest.mark.parametrize("combo", POLICY_COMBINATIONS, ids=lambda c: "-".join(c.values()))
def test_every_valid_policy_combination_chooses_and_learns(combo, tiny_world):
    _, _, centroids = tiny_world
    graph = TopicGraph.build(combo["graph"], centroids, k=2, p=0.5, seed=0)
    frontier = sorted({n for t in (0,) for n in graph.neighbors(t)} | {1, 2, 3})
    policy = make_policy(combo["policy"], seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):  # a few rounds: choose, realise progress, learn
        x = rng.normal(size=(len(frontier), len(FEATURES)))
        picked = choose(policy, frontier, x, 2)
        assert len(picked) == 2 and {t for t, _ in picked} <= set(frontier)
        for t, _ in picked:
            policy.update(t, x[frontier.index(t)], float(rng.random()), frontier)
    state = policy.state_dict()
    policy.load_state_dict(json.loads(json.dumps(state, default=lambda o: o.tolist() if hasattr(o, "tolist") else o)))
