"""Does knowledge-nucleated, curiosity-driven ordering reach a target perplexity with fewer tokens?

One model (not adapters) is trained from scratch under each arm, side by side in one run:

  uniform     shuffled blocks: what a user would do with a plain `Trainer`
  stratified  equal tokens per topic (`curriculum.samplers.StratifiedSampler`)
  odm         online data mixing: EXP3 over topics, rewarded by the training loss
              (`curriculum.samplers.OdmSampler`, from Albalak et al. 2023)
  nucleus     the nucleus first, then neighbourhoods in the order the curiosity policy picks,
              with replay, then the natural mixture (`curriculum.sequential.CuriosityCurriculum`)
  community   community traversal of the topic graph (`curriculum.samplers.CommunitySampler`)

An arm may carry parameters: `nucleus:replay=0.5,coverage=0.25,policy=nearest,k=2,nucleus_size=3`
(replay fraction, share of the steps the curriculum takes before the natural mixture, curiosity
policy, neighbours joined to each chosen topic, the N most central topics as the nucleus instead of
the nucleated one), `nucleus:expanding=0` (each phase draws `1 - replay` of its blocks from the new
neighbourhood; the default, `expanding=1`, draws uniformly over everything explored so far: an
expanding window, which RESULTS.md section 8 found better), `nucleus:weighting=stratified` (every
stretch draws its topics equally instead of in proportion to their sizes), `nucleus:weighting=manifold`
(each stretch's batches from the manifold sampler restricted to its blocks; with the `manifold`
arm's parameters but `k`), `community:k=3`, and
for the arms that read the topic graph (`nucleus`, `community`, `skillit`) another graph built
from the bundle's centroids by the product's builder: `graph=knn,graph_k=10` or
`graph=erdos_renyi,graph_p=0.1`. `skillit` is Skill-It (`curriculum.samplers.SkillItSampler`). `manifold` is community
traversal on a graph rebuilt from the model being trained (`curriculum.manifold`):
`manifold:space=activation` (default; `layers=each` for one graph per hidden layer, `layers=N`
for layer N), `space=learned` (block vectors from the bundle's block embeddings, moved by
gradient alignment), `traversal=walk|aligned|bandit|grow` (`aligned` reads the bundle's
validation split as its probe; `grow` opens the manifold from one cluster outwards, all of it
after `grow=F` of the steps, default 0.5, batches drawn uniformly from what is open), and
`clusters`, `k`, `community_k`, `rebuild`, `refresh`, `prefix` as the `manifold` config section
names them; its rebuilds are the arm's overhead. Any arm may also
grow its model another way (`pipeline/relora.py`): `growth=relora,rank=64,every=100` (ReLoRA:
a LoRA plus embeddings and norms, merged into the weights and restarted every `every` steps, the
learning rate re-warmed; `warm=N` trains every weight for the first N steps, the paper's warm start) or `growth=lora,rank=64` (the same LoRA, never merged); each row then
records tokens/s, peak GPU memory and the optimizer's state, and `--model-size base` trains
another preset on the same bundle. Every arm of a seed gets the same model initialisation, blocks (full 256-token
blocks, each from one topic, so that tokens = steps x batch x block size exactly), optimizer,
learning-rate schedule and evaluation points, through the product's training loop
(`pipeline.trainer.fit`); `run` checks that and stops loudly if any of it differs.

A bundle also carries the validation split (`split.validation_fraction` of every topic, trained
on by no arm): each arm's final model is scored on it too (`val_loss`), which is what
`benchmarks/sweep_curriculum.py` chooses by. Evaluation: the held-out split that `index` drew before any arm ran (a fixed fraction of every
topic's passages, so the natural mixture), never reweighted: held-out perplexity, macro (mean)
and worst per-topic perplexity, every `--eval-every` steps. Wall-clock per arm: training time
(evaluation excluded), plus the curriculum's own overhead (curiosity features and choices, in
the nucleus arm), plus the preparation it needs: embedding, clustering and graph (`index`) for
every arm but uniform, and `nucleate` for the nucleus arm, as measured by `prepare` on its
machine. `benchmarks/curriculum_report.py` reads the JSON without Nucleus: the table, the
tokens-to-target ratios R, the plot.

    python benchmarks/curriculum.py prepare --run-dir runs/bench-curriculum --bundle .device/curriculum
    python benchmarks/curriculum.py run --bundle .device/curriculum --seeds 0 1 2 \\
        --steps 600 --eval-every 25 --json-out out.json --plot curves.png

`prepare` (CPU, full install) runs `nucleus index` and `nucleate` with
`configs/bench-curriculum.yaml`, then writes the bundle: tokenizer, packed blocks, held-out
split and topic graph, a few MB, all that `run` needs (torch, transformers, numpy: no faiss,
datasets, pydantic or embedder). `run` starts one process per (seed, arm), `--jobs` at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import curriculum_report as report  # noqa: E402
from benchmarks._procs import run_all  # noqa: E402

ARMS = ("uniform", "stratified", "odm", "nucleus", "community", "skillit", "manifold")
NEEDS_TOPICS = {"stratified", "odm", "nucleus", "community", "skillit"}  # pay for embedding and clustering
# manifold:space=...,traversal=...,layers=N|each,clusters=,k=,community_k=,rebuild=,refresh=,prefix=,grow=,
# order= (curriculum/manifold.py; rebuild = rebuild_every, prefix = prefix_tokens, grow = grow_fraction,
# order = grow_order; the rest as named there)
MANIFOLD_PARAMS = {"space", "traversal", "layers", "clusters", "k", "community_k", "rebuild", "refresh", "prefix",
                   "grow", "order"}
PROBE_MAX_BLOCKS = 128  # the manifold's probe: validation tokens packed into at most this many blocks
GRAPH_PARAMS = {"graph", "graph_k", "graph_p"}  # another topic graph than the bundle's, built from its centroids
PROBE_BLOCKS = 8  # blocks per topic on which the nucleus arm measures loss and learning progress
# How any arm's model trains (pipeline/relora.py): `full` (full rank, the default), `relora` (a LoRA
# of rank `rank` plus embeddings and norms, merged into the weights and restarted every `every`
# steps), `lora` (the same LoRA never merged: the control that shows what the merges add).
GROWTH = ("full", "relora", "lora")
# warm: ReLoRA's full-rank warm-start steps; lr: the peak learning rate times this (low-rank
# training usually wants a higher rate than full rank; the full-rank arm can take it too)
GROWTH_PARAMS = {"growth", "rank", "every", "warm", "lr"}
RELORA_WARMUP = 20  # FitSettings' default re-warm-up after each merge


# ------------------------------------------------------------------------------ prepare


def prepare(run_dir: Path, bundle: Path, config: Path, sets: list[str]) -> None:
    """Index and nucleate with the product's CLI (skipped when done), then export the bundle."""
    flags = [x for s in sets for x in ("--set", s)]
    for stage in ("index", "nucleate"):
        subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--run-dir", str(run_dir),
                        "--config", str(config), *flags], check=True, cwd=REPO)
    export_bundle(run_dir, bundle)


def _stage_seconds(meta: dict, command: str) -> float:
    """Wall-clock of the successful `command` recorded in the run's meta.json that did the work
    (the longest: later runs found the stage done and returned at once)."""
    from datetime import datetime

    return max((datetime.fromisoformat(c["ended"]) - datetime.fromisoformat(c["started"])).total_seconds()
               for c in meta["commands"] if c["command"] == command and c.get("status") == "ok")


def export_bundle(run_dir: Path, bundle: Path) -> None:
    from curriculum.manifold import block_vectors
    from curriculum.neighborhood import NUCLEUS
    from curriculum.nucleation import pagerank
    from pipeline import nucleate as nucleate_stage
    from pipeline.atomic import atomic_path, read_json
    from pipeline.config import resolve_config
    from pipeline.lm_data import make_eval_set, pack_by_topic, passage_texts, tokenize
    from pipeline.model import train_tokenizer
    from pipeline.train import RunData
    from pipeline.workspace import Workspace

    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, [])
    t0 = time.perf_counter()
    data = RunData.load(ws)
    train_rows = np.flatnonzero(data.trainable).tolist()  # neither held out nor validation
    held_rows = data.heldout_rows()
    val_rows = np.flatnonzero(data.validation).tolist()
    texts = passage_texts(data.corpus, train_rows)
    tok = train_tokenizer(texts, cfg.model.vocab_size)
    bs = cfg.train.block_size
    ids = tokenize(tok, texts)
    packed = pack_by_topic(ids, data.topic_of[train_rows].tolist(), bs, tok.pad_token_id)
    full = packed.mask.all(1).numpy()  # drop each topic's padded tail: every block is bs tokens
    # each block's embedding (the manifold's learned space starts there), packed as the blocks are
    vectors = block_vectors([len(x) for x in ids], data.topic_of[train_rows].tolist(), bs,
                            np.load(ws.index_dir / "embeddings.npy", mmap_mode="r")[train_rows].astype(np.float32))
    eval_set = make_eval_set(tok, data.corpus, held_rows, data.topic_of[held_rows].tolist(), bs)
    val_set = make_eval_set(tok, data.corpus, val_rows, data.topic_of[val_rows].tolist(), bs)
    graph = nucleate_stage.load_topic_graph(ws)
    topics = read_json(ws.topics_dir / "topics.json")["topics"]
    meta = read_json(ws.meta_path)
    info = {
        "source": str(run_dir), "corpus": cfg.corpus.paths, "model_size": cfg.model.size, "block_size": bs,
        "batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
        "eval_batch_size": cfg.train.eval_batch_size, "community_k": cfg.train.community_k,
        "policy": cfg.explore.policy, "ucb_beta": cfg.explore.ucb_beta, "k": cfg.explore.k,
        "replay": cfg.lora.replay_fraction, "nucleus": nucleate_stage.load_neighborhood(ws, NUCLEUS).topics,
        "adjacency": {str(t): ns for t, ns in graph.adjacency().items()},
        "centrality": pagerank(graph).tolist(), "keywords": {str(t["id"]): t["keywords"] for t in topics},
        "passages": {"train": len(train_rows), "heldout": len(held_rows), "validation": len(val_rows)},
        "blocks": int(full.sum()), "dropped_tail_blocks": int((~full).sum()),
        "prep_s": {"index": _stage_seconds(meta, "index"), "nucleate": _stage_seconds(meta, "nucleate")},
    }
    lengths = [len(s) for s in eval_set.sequences]
    val_lengths = [len(s) for s in val_set.sequences]
    with atomic_path(bundle) as tmp:
        tmp.mkdir(parents=True)
        tok.save_pretrained(str(tmp / "tokenizer"))
        np.savez_compressed(
            tmp / "data.npz", blocks=packed.tokens[full].numpy().astype(np.uint16),
            block_topics=packed.topics[full].astype(np.int32),
            eval_flat=np.concatenate(eval_set.sequences).astype(np.uint16),
            eval_offsets=np.cumsum([0, *lengths]).astype(np.int64), eval_topics=eval_set.topics.astype(np.int32),
            val_flat=np.concatenate(val_set.sequences or [[]]).astype(np.uint16),
            val_offsets=np.cumsum([0, *val_lengths]).astype(np.int64), val_topics=val_set.topics.astype(np.int32),
            centroids=np.load(ws.topics_dir / "centroids.npy").astype(np.float32),
            block_vectors=vectors[full].astype(np.float16))
        info["export_s"] = round(time.perf_counter() - t0, 1)
        (tmp / "bundle.json").write_text(json.dumps(info, indent=1))
    print(f"bundle {bundle}: {info['blocks']} blocks of {bs} tokens, {len(held_rows)} held-out and "
          f"{len(val_rows)} validation passages, "
          f"{len(topics)} topics, nucleus {info['nucleus']}, prep {info['prep_s']}")


# ------------------------------------------------------------------------------ one arm


def read_bundle(path: Path) -> tuple[dict, object, dict, object]:
    """A bundle's info, tokenizer, arrays (`data.npz`) and full training blocks."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from pipeline.lm_data import Blocks

    info = json.loads((path / "bundle.json").read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    z = np.load(path / "data.npz")
    tokens = torch.from_numpy(z["blocks"].astype(np.int64))
    blocks = Blocks(tokens, torch.ones_like(tokens, dtype=torch.bool), z["block_topics"].astype(np.int64))
    return info, tok, z, blocks


def sequences(z, prefix: str) -> list[list[int]]:
    """Variable-length token sequences stored flat: `<prefix>_flat` cut at `<prefix>_offsets`."""
    flat, off = z[f"{prefix}_flat"].astype(np.int64), z[f"{prefix}_offsets"]
    return [flat[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]


@dataclass
class Bundle:
    info: dict
    tokenizer: object
    blocks: object  # pipeline.lm_data.Blocks
    eval_set: object  # pipeline.lm_data.EvalSet: the held-out split, what results are scored on
    centroids: np.ndarray
    val_set: object | None = None  # the validation split, what a sweep chooses by (bundles since issue 16)
    block_vectors: np.ndarray | None = None  # each block's embedding (bundles since issue 17)

    @classmethod
    def load(cls, path: Path) -> "Bundle":
        from pipeline.lm_data import EvalSet

        info, tok, z, blocks = read_bundle(path)
        val = EvalSet(sequences(z, "val"), z["val_topics"].astype(np.int64)) if "val_flat" in z.files else None
        vectors = z["block_vectors"].astype(np.float32) if "block_vectors" in z.files else None
        return cls(info, tok, blocks, EvalSet(sequences(z, "eval"), z["eval_topics"].astype(np.int64)),
                   z["centroids"], val, vectors)

    def probe(self, block_size: int):
        """The manifold's probe: the validation split's tokens cut into full blocks (tokens, mask)."""
        import torch

        if self.val_set is None:
            raise SystemExit("this bundle has no validation split: re-export it (prepare)")
        flat = np.concatenate(self.val_set.sequences)
        n = min(len(flat) // block_size, PROBE_MAX_BLOCKS)
        tokens = torch.from_numpy(flat[: n * block_size].reshape(n, block_size).astype(np.int64))
        return tokens, torch.ones_like(tokens, dtype=torch.bool)


def parse_spec(spec: str, arms: tuple[str, ...], allowed: dict[str, set[str]]) -> tuple[str, dict]:
    """`name` or `name:key=value,key=value` -> (name, params); numbers become floats. `arms`
    are the names, `allowed` the parameters each name takes (none when absent)."""
    name, _, rest = spec.partition(":")
    if name not in arms:
        raise SystemExit(f"unknown arm '{name}' in '{spec}': choose from {', '.join(arms)}")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"arm '{spec}': parameter '{item}' is not key=value")
        try:
            params[key] = float(value)
        except ValueError:
            params[key] = value
    ok = allowed.get(name, set())
    if set(params) - ok:
        raise SystemExit(f"arm '{spec}': unknown parameters {sorted(set(params) - ok)}; "
                         f"'{name}' takes {sorted(ok) or 'none'}")
    return name, params


def parse_arm(spec: str) -> tuple[str, dict]:
    # nucleus:weighting=manifold orders each stretch with the manifold sampler, which takes the
    # manifold's parameters but `k` (the nucleus arm's own k joins topics to a neighbourhood)
    own = {"nucleus": {"replay", "coverage", "policy", "k", "beta", "nucleus_size", "expanding", "weighting",
                       *GRAPH_PARAMS, *(MANIFOLD_PARAMS - {"k"})},
           "community": {"k", *GRAPH_PARAMS}, "skillit": GRAPH_PARAMS, "manifold": MANIFOLD_PARAMS}
    name, params = parse_spec(spec, ARMS, {arm: own.get(arm, set()) | GROWTH_PARAMS for arm in ARMS})
    if params.get("growth", "full") not in GROWTH:
        raise SystemExit(f"arm '{spec}': growth must be one of {', '.join(GROWTH)}")
    return name, params


def topic_graph(info: dict, centroids: np.ndarray, params: dict):
    """The arm's topic graph: the bundle's, or one the product's builder (`retrieval.graph`)
    makes from the bundle's centroids when the arm names `graph`, `graph_k` or `graph_p`."""
    from retrieval.graph import TopicGraph

    if not GRAPH_PARAMS & set(params):
        return None
    return TopicGraph.build(str(params.get("graph", "knn")), centroids, k=int(params.get("graph_k", 6)),
                            p=float(params.get("graph_p", 0.1)), seed=0)


def manifold_context(params: dict, model, block_vectors: np.ndarray | None = None, probe=None,
                     total_batches: int | None = None) -> dict:
    """A `manifold:` arm's settings (its parameters over the product's defaults), the blocks'
    embeddings (the learned space's start) and `probe()`, the aligned traversal's probe blocks.
    `layers=each`: one graph per hidden layer; `layers=N`: layer N; `grow=F`: the `grow`
    traversal's `grow_fraction` of the run's `total_batches`; `order=random`: its `grow_order`."""
    from curriculum.manifold import ManifoldSettings

    layers = params.get("layers", -1)
    layers = tuple(range(1, model.config.num_hidden_layers + 1)) if layers == "each" else (int(layers),)
    named = {"space": str, "traversal": str, "clusters": int, "k": int, "community_k": int,
             "rebuild": int, "refresh": float, "prefix": int, "grow": float, "order": str}
    renamed = {"rebuild": "rebuild_every", "prefix": "prefix_tokens", "grow": "grow_fraction", "order": "grow_order"}
    sets = {renamed.get(key, key): cast(params[key]) for key, cast in named.items() if key in params}
    settings = ManifoldSettings(**sets, layers=layers, total_batches=total_batches)
    if settings.space == "learned" and block_vectors is None:
        raise SystemExit("manifold:space=learned needs the blocks' embeddings, which this bundle lacks")
    if settings.traversal == "aligned" and probe is None:
        raise SystemExit("manifold:traversal=aligned needs a validation split, which this bundle lacks")
    return {"settings": settings, "block_vectors": block_vectors,
            "probe": probe() if settings.traversal == "aligned" else None}


@dataclass
class Settings:
    """What must be identical across arms (checked by `check_fair`)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    block_size: int
    model_size: str
    eval_batch_size: int


def stretch_manifold(params: dict, block_topics: np.ndarray, batch_size: int, seed: int, model,
                     block_vectors: np.ndarray | None = None, probe=None, total_batches: int | None = None):
    """The manifold sampler a curriculum arm with `weighting=manifold` orders its stretches with
    (its `MANIFOLD_PARAMS` among the arm's), or None for another weighting."""
    if params.get("weighting") != "manifold":
        return None
    from curriculum.samplers import make_sampler

    mparams = {k: v for k, v in params.items() if k in MANIFOLD_PARAMS}
    return make_sampler("manifold", block_topics, batch_size, seed=seed,
                        manifold=manifold_context(mparams, model, block_vectors, probe, total_batches))


def _loss_fn(model, b: Bundle, seed: int, device, autocast_dtype):
    """Mean next-token loss of the current model on each topic's fixed probe blocks (training
    blocks: the held-out split stays untouched by every arm's choices)."""
    import torch

    from pipeline.trainer import row_losses

    rng = np.random.default_rng([seed, 11])
    probes = {}
    for t in np.unique(b.blocks.topics):
        own = np.flatnonzero(b.blocks.topics == t)
        probes[int(t)] = rng.choice(own, min(PROBE_BLOCKS, len(own)), replace=False)

    @torch.no_grad()
    def losses(topics: list[int]) -> dict[int, float]:
        idx = np.concatenate([probes[t] for t in topics])
        ids = b.blocks.tokens[idx].to(device)
        was_training = model.training
        model.eval()
        rows = []
        for start in range(0, len(ids), 64):
            chunk = ids[start:start + 64]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=chunk).logits
            rows.append(row_losses(logits, chunk))
        model.train(was_training)
        per_row = np.concatenate(rows)
        out, i = {}, 0
        for t in topics:
            out[t] = float(per_row[i:i + len(probes[t])].mean())
            i += len(probes[t])
        return out

    return losses


def run_arm(bundle_dir: Path, spec: str, seed: int, settings: Settings) -> dict:
    import torch

    from curriculum.curiosity import make_policy
    from curriculum.samplers import make_sampler
    from curriculum.sequential import CuriosityCurriculum, TopicInfo
    from pipeline.evaluate import evaluate
    from pipeline.model import build_scratch_model
    from pipeline.trainer import FitSettings, fit

    name, params = parse_arm(spec)
    b = Bundle.load(bundle_dir)
    info = b.info
    if settings.block_size != info["block_size"]:
        raise SystemExit("the block size comes from the bundle")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    model = build_scratch_model(b.tokenizer, settings.model_size, seed=seed)
    growth = str(params.get("growth", "full"))
    if growth != "full":
        from pipeline import relora

        model = relora.wrap(model, int(params.get("rank", 64)), seed, warm_start=growth == "relora"
                            and int(params.get("warm", 0)) > 0)
    model = model.to(device)
    s = settings
    fs = FitSettings(steps=s.steps, lr=s.lr * float(params.get("lr", 1.0)), batch_size=s.batch_size,
                     warmup_steps=s.warmup_steps,
                     eval_every=s.eval_every, checkpoint_every=s.steps + 1, log_every=s.eval_every,
                     autocast_dtype=autocast, relora_warmup=RELORA_WARMUP,
                     relora_every=int(params.get("every", 100)) if growth == "relora" else None,
                     relora_warm_start=int(params.get("warm", 0)) if growth == "relora" else 0)
    adjacency = {int(t): ns for t, ns in info["adjacency"].items()}
    centrality = np.asarray(info["centrality"])
    graph = topic_graph(info, b.centroids, params)
    if graph is not None:
        from curriculum.nucleation import pagerank

        adjacency, centrality = graph.adjacency(), pagerank(graph)
    sampler_box = []

    def new_sampler():
        if name == "nucleus":
            policy = make_policy(str(params.get("policy", info["policy"])), seed=seed,
                                 beta=float(params.get("beta", info["ucb_beta"])))
            topic_info = TopicInfo(adjacency, b.centroids, centrality,
                                   {int(t): w for t, w in info["keywords"].items()})
            nucleus = info["nucleus"]
            if "nucleus_size" in params:  # the N most central topics (PageRank), as nucleate's default picks
                nucleus = np.argsort(-centrality)[: int(params["nucleus_size"])].tolist()
            weighting = str(params.get("weighting", "natural"))
            manifold = stretch_manifold(params, b.blocks.topics, s.batch_size, seed, model, b.block_vectors,
                                        lambda: b.probe(s.block_size), s.steps)
            sampler = CuriosityCurriculum(
                b.blocks.topics, s.batch_size, s.steps, nucleus, topic_info, policy,
                _loss_fn(model, b, seed, device, autocast), coverage=float(params.get("coverage", 0.5)),
                replay=float(params.get("replay", info["replay"])), k=int(params.get("k", info["k"])),
                block_size=s.block_size, expanding=bool(params.get("expanding", 1)),
                weighting=weighting, manifold=manifold, seed=seed)
        elif name == "manifold":
            sampler = make_sampler(name, b.blocks.topics, s.batch_size, seed=seed,
                                   manifold=manifold_context(params, model, b.block_vectors,
                                                             lambda: b.probe(s.block_size), s.steps))
        else:
            sampler = make_sampler(name, b.blocks.topics, s.batch_size, adjacency,
                                   int(params.get("k", info["community_k"])), seed)
        sampler_box.append(sampler)
        return iter(sampler)

    eval_s = [0.0]

    def evaluate_fn(m) -> dict[str, float]:
        t0 = time.perf_counter()
        met = evaluate(m, b.eval_set, s.eval_batch_size, device, b.tokenizer.pad_token_id,
                       autocast_dtype=autocast)
        topic_ppl = [v for k, v in met.items() if k.startswith("topic/")]
        if device.type == "cuda":
            torch.cuda.synchronize()
        eval_s[0] += time.perf_counter() - t0
        return {"ppl": met["heldout/ppl"], "macro_ppl": float(np.mean(topic_ppl)),
                "worst_ppl": float(np.max(topic_ppl))}

    logged: dict[int, dict] = {}

    def log(row: dict) -> None:
        logged.setdefault(row["step"], {}).update(row)

    curve = [{"step": 0, "tokens": 0, "lr": 0.0, **evaluate_fn(model)}]
    eval_s[0] = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = fit(model, b.blocks, new_sampler, fs, device, evaluate=evaluate_fn, log=log, desc=spec)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    # what the optimizer holds state for at the end (a ReLoRA warm start's frozen weights not)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for step in sorted(logged):
        row = logged[step]
        if "ppl" in row:
            curve.append({"step": step, "tokens": row["tokens"], "lr": row.get("lr"),
                          **{k: row[k] for k in ("ppl", "macro_ppl", "worst_ppl")}})
    sampler = sampler_box[0]
    overhead = getattr(sampler, "overhead_s", 0.0)
    val = {}
    if b.val_set is not None:  # the final model on the validation split: what a sweep scores
        met = evaluate(model, b.val_set, s.eval_batch_size, device, b.tokenizer.pad_token_id, autocast_dtype=autocast)
        val = {"val_ppl": met["heldout/ppl"], "val_loss": met["heldout/loss"]}
    prep = info["prep_s"]
    return {
        "seed": seed, "arm": spec, "name": name, "params": params, "settings": asdict(settings),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "steps": result.steps, "tokens": result.tokens, "curve": curve, **val,
        "train_s": round(result.seconds - eval_s[0] - overhead, 2), "eval_s": round(eval_s[0], 2),
        "overhead_s": round(overhead, 2), "growth": growth, "trainable_params": trainable,
        "optimizer_state_mb": round(trainable * 8 / 2**20, 1),  # AdamW: two fp32 moments per trainable weight
        "peak_mem_mb": round(peak_mb, 1),
        "tokens_per_s": round(result.tokens / max(result.seconds - eval_s[0] - overhead, 1e-9), 1),
        "prep_s": (prep["index"] if name in NEEDS_TOPICS else 0.0) + (prep["nucleate"] if name == "nucleus" else 0.0),
        "phases": sampler.summary() if hasattr(sampler, "summary") else None,
        "mixture": sampler.mixture().tolist() if hasattr(sampler, "mixture") else None,
    }


# ------------------------------------------------------------------------------ checks


def check_fair(rows: list[dict]) -> None:
    """Stop loudly unless every arm of a seed had the same settings, steps, tokens, evaluation
    points and learning-rate schedule at them (up to an arm's own `lr=` factor, which its name
    shows, and ReLoRA's re-warm-ups)."""
    problems = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        ref = mine[0]

        def signature(r: dict) -> dict:
            return {"settings": r["settings"], "steps": r["steps"], "tokens": r["tokens"],
                    "eval steps": [p["step"] for p in r["curve"]], "eval tokens": [p["tokens"] for p in r["curve"]],
                    "learning rates": [round(p["lr"] / _jagged(r, p["step"]) / _lr_factor(r), 12) for p in r["curve"]]}

        for r in mine[1:]:
            for key, value in signature(r).items():
                if value != signature(ref)[key]:
                    problems.append(f"seed {seed}: arm '{r['arm']}' differs from '{ref['arm']}' in {key}")
    if problems:
        raise SystemExit("unfair comparison, refusing to report:\n  " + "\n  ".join(problems))


def _lr_factor(row: dict) -> float:
    """An arm's own `lr=` factor on the shared peak learning rate (1 for the others)."""
    return float(row.get("params", {}).get("lr", 1.0))


def _jagged(row: dict, step: int) -> float:
    """ReLoRA's re-warm-up factor on the shared schedule at `step` (1 for the other arms): the
    schedule check compares the schedule beneath it."""
    if row.get("growth") != "relora" or step == 0:
        return 1.0
    from pipeline import relora

    return relora.jagged(step, int(row["params"].get("every", 100)), RELORA_WARMUP, int(row["params"].get("warm", 0)))


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="index, nucleate, export the bundle (CPU)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "bench-curriculum.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[])
    r = sub.add_parser("run", help="every (seed, arm), then the comparison")
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--arms", nargs="+", default=list(ARMS))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=600)
    r.add_argument("--eval-every", type=int, default=25)
    r.add_argument("--batch-size", type=int, help="default: the bundle's train.batch_size")
    r.add_argument("--lr", type=float, help="default: the bundle's train.lr")
    r.add_argument("--warmup-steps", type=int, help="default: the bundle's train.warmup_steps")
    r.add_argument("--eval-batch-size", type=int, help="default: the bundle's train.eval_batch_size")
    r.add_argument("--model-size", help="a scratch preset (default: the bundle's model.size); the tokenizer and "
                                        "blocks stay the bundle's")
    r.add_argument("--jobs", type=int, help="processes at once (default: one seed's arms side by side)")
    r.add_argument("--work", type=Path, default=Path("/tmp/bench-curriculum"))
    r.add_argument("--json-out", type=Path)
    r.add_argument("--plot", type=Path)
    a1 = sub.add_parser("arm", help="internal: one (seed, arm)")
    a1.add_argument("bundle", type=Path)
    a1.add_argument("spec")
    a1.add_argument("seed", type=int)
    a1.add_argument("out", type=Path)
    a1.add_argument("--settings", required=True, help="Settings as JSON")
    a = ap.parse_args()

    if a.cmd == "prepare":
        prepare(a.run_dir, a.bundle, a.config, a.sets)
    elif a.cmd == "arm":
        row = run_arm(a.bundle, a.spec, a.seed, Settings(**json.loads(a.settings)))
        a.out.write_text(json.dumps(row))
    else:
        for spec in a.arms:
            parse_arm(spec)
        if "uniform" not in a.arms:
            sys.exit("--arms must include uniform: every ratio is against it")
        info = json.loads((a.bundle / "bundle.json").read_text())
        settings = Settings(a.steps, a.batch_size or info["batch_size"], a.lr or info["lr"],
                            info["warmup_steps"] if a.warmup_steps is None else a.warmup_steps,
                            a.eval_every, info["block_size"], a.model_size or info["model_size"],
                            a.eval_batch_size or info["eval_batch_size"])
        t0 = time.perf_counter()
        out = {(s, spec): a.work / f"s{s}-{spec.replace(':', '_').replace(',', '_')}.json"
               for s in a.seeds for spec in a.arms}
        run_all(__file__, [(["arm", str(a.bundle), spec, str(s), str(path), "--settings", json.dumps(asdict(settings))],
                            path.with_suffix(".log")) for (s, spec), path in out.items()], a.jobs or len(a.arms))
        rows = [json.loads(path.read_text()) for path in out.values()]
        check_fair(rows)
        summary = report.summarise(rows)
        print(report.table(summary))
        print()
        print(report.headline(summary))
        result = {"device": rows[0]["device"], "command": " ".join(sys.argv), "settings": asdict(settings),
                  "bundle": {k: info[k] for k in ("source", "corpus", "blocks", "passages", "prep_s", "nucleus")},
                  "seeds": a.seeds, "arms": a.arms, "total_s": round(time.perf_counter() - t0, 1),
                  "summary": summary, "rows": rows}
        if a.json_out:
            a.json_out.parent.mkdir(parents=True, exist_ok=True)
            a.json_out.write_text(json.dumps(result, indent=1))
        if a.plot:
            report.plot(rows, a.plot)


if __name__ == "__main__":
    main()
