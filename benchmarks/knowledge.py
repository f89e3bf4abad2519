"""The nucleus hypothesis where the knowledge graph is known: does a nucleus of knowledge,
expanded along the graph, teach facts with fewer tokens than shuffled data? (issue 14)

The corpus is a world from `nucleus synth` (retrieval/known_graph.py): persons, cities and
organisations in communities on a ring, biographies in varied templates, questions about half of
the persons in the text and the other half's held out. The benchmark's topics are the world's
own: each community's entities split at random into `--groups-per-community` groups, one topic
each (so a curriculum has steps smaller than a community); two groups are joined in the topic
graph when a relation links their entities (a person's birth city, employer or mentor, an
organisation's headquarters), so the graph is the true one: cliques inside a community, bridges
to its ring neighbours. No embedder and no clustering: the benchmark measures the curriculum, not
how well `index` recovers the communities (`nucleus index` reports that NMI).

One model from scratch per arm, every arm of a seed with the same initialisation, blocks (256
tokens, each from one topic, the documents of a topic shuffled before packing so that a block
mixes entities), optimizer, schedule and evaluation points (`check_fair` from curriculum.py):

  uniform        shuffled blocks
  stratified     equal tokens per topic
  odm            online data mixing (EXP3 over topics, rewarded by the training loss)
  skillit        Skill-It's online rule with the true topic graph as A (curriculum.samplers)
  nucleus        the true seed graph's nucleus (the groups of the entities in seed_graph.yaml)
                 first, then expansion along the true graph with the product's curriculum
                 (`CuriosityCurriculum`): `policy=learned` (curiosity, the default) or `policy=random`
  random_subset  control: as many groups as the nucleus has, drawn at random from different
                 communities (as small as the nucleus, but not a neighbourhood), first; then
                 random expansion ignoring the graph
  hubs           control: the groups with the most relations first, then on in order of
                 degree, ignoring neighbourhoods
  reverse        control: the periphery first (the community farthest from the nucleus), then
                 expansion along the graph, the nucleus last
  manifold       community traversal on a graph rebuilt from the model's activations
                 (curriculum.manifold; `layers=each`, `traversal=bandit` and the rest as in
                 curriculum.py; the learned space and the aligned traversal need embeddings and a
                 validation split, which this bundle does not have)

Curriculum arms take `coverage` (share of the steps before the natural mixture; default 0.5),
`k` (neighbours joined to each chosen group; default groups-per-community - 1, about a community
per phase), `replay`, `expanding` and `policy`, as `nucleus:policy=random,coverage=0.3`, and
`weighting` (`natural`, `stratified`, or `manifold`: each stretch ordered by the manifold
sampler's activation space, with the manifold arm's parameters but `k`).

`--adapters` adds, per seed, the routed-experts comparison: a base trained on the nucleus
community alone, then one LoRA adapter of rank r per other community (trained on that
community's blocks, steps in proportion to its blocks) against ONE adapter of rank n*r on their
union for the sum of the steps (same tokens, same adapter parameters; checked). Each question is
answered by the adapter of its entity's community (oracle routing: the benchmark asks whether
knowledge split into neighbourhoods is better learned by experts, not how well a router routes).

Evaluation every `--eval-every` steps, never reweighted: question accuracy on a fixed sample of
the held-out questions (`pipeline.evaluate.question_accuracy`: the true answer ranked first among
its candidates by log-likelihood; overall, one-hop, two-hop, and by the entity's distance from
the nucleus), greedy exact match, answer perplexity, accuracy on questions seen in training, and
perplexity of held-out biographies (one biography of 10% of the persons, kept out of training).

    python benchmarks/knowledge.py prepare --bundle .device/knowledge            # CPU, ~1 min
    python benchmarks/knowledge.py run --bundle .device/knowledge --seeds 0 1 2 --adapters \\
        --steps 1000 --eval-every 50 --json-out out.json --plot curves.png     # GPU

`run` needs torch, transformers, peft and numpy only (no faiss, datasets, pydantic or embedder).
R_qa = tokens uniform needs to reach its final question accuracy / tokens the arm needs
(`curriculum_report.ratios`, higher is better), per seed; R_ppl the same on perplexity.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import curriculum_report as report  # noqa: E402
from benchmarks._procs import run_all  # noqa: E402
from benchmarks.curriculum import (MANIFOLD_PARAMS, Settings, _loss_fn, check_fair, manifold_context,  # noqa: E402
                                   parse_spec, read_bundle, sequences, stretch_manifold)

ARMS = ("uniform", "stratified", "odm", "skillit", "nucleus", "random_subset", "hubs", "reverse", "manifold")
CURRICULA = {"nucleus", "random_subset", "hubs", "reverse"}
# `weighting=manifold`: each stretch ordered by the manifold sampler (its activation space; its
# parameters as the manifold arm's, but `k`, which here joins groups to a neighbourhood)
PARAMS = {"coverage", "k", "replay", "expanding", "policy", "weighting", *(MANIFOLD_PARAMS - {"k"})}
QA_KEYS = ("acc", "acc_1hop", "acc_2hop", "acc_nucleus", "acc_near", "acc_far", "em", "answer_ppl")


# ------------------------------------------------------------------------------ prepare


def _groups(world: dict, per_community: int, seed: int) -> dict[str, int]:
    """Entity id -> group (topic) id: each community's persons shuffled and dealt into
    `per_community` groups, its cities and organisations dealt the same way."""
    rng = random.Random(seed)
    group = {}
    for kind in ("person", "city", "org"):
        by_c: dict[int, list[str]] = {}
        for e in world["entities"]:
            if e["type"] == kind:
                by_c.setdefault(e["community"], []).append(e["id"])
        for c, ids in by_c.items():
            rng.shuffle(ids)
            for i, eid in enumerate(ids):
                group[eid] = c * per_community + i % per_community
    return group


def _relation_counts(world: dict, group: dict[str, int], n: int) -> np.ndarray:
    """(n, n) symmetric count of relations between the entities of two groups."""
    w = np.zeros((n, n))
    for e in world["entities"]:
        for target in e["relations"].values():
            a, b = group[e["id"]], group[target]
            if a != b:
                w[a, b] += 1
                w[b, a] += 1
    return w


def prepare(args) -> None:
    import yaml

    from pipeline.atomic import atomic_path
    from pipeline.evaluate import tokenize_questions
    from pipeline.lm_data import pack_by_topic, tokenize
    from pipeline.model import train_tokenizer
    from retrieval.known_graph import KnownGraphSpec, write_corpus

    t0 = time.perf_counter()
    spec = KnownGraphSpec(entities=args.entities, communities=args.communities, docs_per_entity=args.docs_per_entity,
                          seed=args.world_seed)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_corpus(Path(tmp) / "world", spec)  # the files `nucleus synth` writes
        world_dir = Path(tmp) / "world"
        docs = [json.loads(line) for line in (world_dir / "corpus.jsonl").open(encoding="utf-8")]
        questions = [json.loads(line) for line in (world_dir / "questions.jsonl").open(encoding="utf-8")]
        world = json.loads((world_dir / "graph.json").read_text())
        seed_graph = yaml.safe_load((world_dir / "seed_graph.yaml").read_text())
    g = args.groups_per_community
    n_topics = spec.communities * g
    group = _groups(world, g, args.world_seed)
    rng = np.random.default_rng(args.world_seed)

    # Held-out biographies (perplexity): one of each of 10% of the persons; their other
    # biographies still teach the facts.
    persons = sorted({d["entity"] for d in docs if d["kind"] == "bio"})
    held_persons = set(rng.choice(persons, max(1, len(persons) // 10), replace=False).tolist())
    held, train = [], []
    for d in docs:
        if d["kind"] == "bio" and d["entity"] in held_persons and d["doc_id"].endswith("-bio-0"):
            held.append(d)
        else:
            train.append(d)
    train = [train[i] for i in rng.permutation(len(train))]  # a block mixes the entities of its topic
    text = lambda d: f"{d['title']}\n{d['text']}"  # noqa: E731  (as lm_data.passage_texts reads a passage)
    tok = train_tokenizer([text(d) for d in train], args.vocab_size)
    packed = pack_by_topic(tokenize(tok, [text(d) for d in train]), [group[d["entity"]] for d in train],
                           args.block_size, tok.pad_token_id)
    full = packed.mask.all(1).numpy()
    held_ids = [ids[: args.block_size] for ids in tokenize(tok, [text(d) for d in held])]

    # Questions: a fixed sample of the held-out ones (facts seen, question form unseen) and of
    # those seen in training text.
    def sample(split: str, n: int) -> list[dict]:
        pool = [q for q in questions if q["split"] == split]
        return [pool[i] for i in sorted(np.random.default_rng([args.world_seed, len(split)]).choice(
            len(pool), min(n, len(pool)), replace=False))]

    q_held, q_seen = sample("heldout", args.questions), sample("train", args.seen_questions)
    qb_held, qb_seen = tokenize_questions(tok, q_held), tokenize_questions(tok, q_seen)

    weights = _relation_counts(world, group, n_topics)
    adjacency = {t: np.flatnonzero(weights[t]).tolist() for t in range(n_topics)}
    nucleus_entities = {c["id"] for c in seed_graph["concepts"]}
    nucleus = sorted({group[e] for e in nucleus_entities})
    community_of = [t // g for t in range(n_topics)]
    distance = {int(c): d for c, d in world["distance"].items()}
    far = max(distance, key=lambda c: (distance[c] if distance[c] >= 0 else 10**6, -c))
    fields: dict[int, set[str]] = {}
    for e in world["entities"]:
        if e["type"] == "person":
            fields.setdefault(group[e["id"]], set()).add(e["attributes"]["field"])
    centroids = weights + np.diag(weights.sum(1) / max(1, g - 1))  # a group is most like itself
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    info = {
        "spec": asdict(spec), "counts": manifest["counts"], "groups_per_community": g, "topics": n_topics,
        "block_size": args.block_size, "model_size": args.model_size, "batch_size": args.batch_size, "lr": args.lr,
        "warmup_steps": args.warmup_steps, "eval_batch_size": args.eval_batch_size, "policy": "learned",
        "ucb_beta": 1.0, "k": g - 1, "replay": 0.25, "lora": {"rank": args.rank, "alpha": 2.0 * args.rank,
                                                              "lr": args.lora_lr},
        "nucleus": nucleus, "periphery": [t for t in range(n_topics) if community_of[t] == far],
        "nucleus_community": sorted({community_of[t] for t in nucleus}), "community_of": community_of,
        "adjacency": {str(t): ns for t, ns in adjacency.items()},
        "degree": weights.sum(1).tolist(), "keywords": {str(t): sorted(fields.get(t, ())) for t in range(n_topics)},
        "blocks": int(full.sum()), "tokens": int(full.sum()) * args.block_size, "heldout_bios": len(held),
        "questions": {"heldout": len(q_held), "seen": len(q_seen)},
        "question_community": [q["community"] for q in q_held],
        "question_distance": [q["distance"] for q in q_held], "question_hops": [q["hops"] for q in q_held],
    }

    def flat(batch, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_flat": np.concatenate(batch.sequences).astype(np.uint16),
                f"{prefix}_offsets": np.cumsum([0, *map(len, batch.sequences)]).astype(np.int64),
                f"{prefix}_start": np.asarray(batch.answer_start, dtype=np.int32),
                f"{prefix}_question": batch.question.astype(np.int32), f"{prefix}_truth": batch.is_answer}

    with atomic_path(args.bundle) as tmp:
        tmp.mkdir(parents=True)
        tok.save_pretrained(str(tmp / "tokenizer"))
        np.savez_compressed(
            tmp / "data.npz", blocks=packed.tokens[full].numpy().astype(np.uint16),
            block_topics=packed.topics[full].astype(np.int32), centroids=centroids.astype(np.float32),
            eval_flat=np.concatenate(held_ids).astype(np.uint16),
            eval_offsets=np.cumsum([0, *map(len, held_ids)]).astype(np.int64),
            eval_topics=np.asarray([group[d["entity"]] for d in held], dtype=np.int32),
            **flat(qb_held, "qh"), **flat(qb_seen, "qs"))
        info["prep_s"] = round(time.perf_counter() - t0, 1)
        (tmp / "bundle.json").write_text(json.dumps(info, indent=1))
    print(f"bundle {args.bundle}: {manifest['counts']['entities']} entities, {spec.communities} communities x {g} "
          f"groups, {info['blocks']} blocks of {args.block_size} tokens ({info['tokens'] / 1e6:.2f}M tokens), "
          f"{len(q_held)} held-out + {len(q_seen)} seen questions, nucleus {nucleus}, {info['prep_s']} s")


# ------------------------------------------------------------------------------ one arm


@dataclass
class Bundle:
    info: dict
    tokenizer: object
    blocks: object  # pipeline.lm_data.Blocks
    eval_set: object  # pipeline.lm_data.EvalSet
    centroids: np.ndarray
    held: object  # pipeline.evaluate.QuestionBatch: held-out questions
    seen: object  # questions whose answers are in the training text

    @classmethod
    def load(cls, path: Path) -> "Bundle":
        from pipeline.evaluate import QuestionBatch
        from pipeline.lm_data import EvalSet

        info, tok, z, blocks = read_bundle(path)

        def questions(prefix: str, groups: dict[str, np.ndarray]) -> QuestionBatch:
            return QuestionBatch(sequences(z, prefix), z[f"{prefix}_start"].tolist(),
                                 z[f"{prefix}_question"].astype(np.int64), z[f"{prefix}_truth"].astype(bool), groups)

        hops, dist = np.asarray(info["question_hops"]), np.asarray(info["question_distance"])
        groups = {"": np.ones(len(hops), bool), "_1hop": hops == 1, "_2hop": hops == 2}
        groups.update({f"_{d}": dist == d for d in ("nucleus", "near", "far") if (dist == d).any()})
        return cls(info, tok, blocks, EvalSet(sequences(z, "eval"), z["eval_topics"].astype(np.int64)), z["centroids"],
                   questions("qh", groups), questions("qs", {"": np.ones(info["questions"]["seen"], bool)}))


def parse_arm(spec: str) -> tuple[str, dict]:
    """`name` or `name:key=value,...` -> (name, params); numbers become floats."""
    return parse_spec(spec, ARMS, {**{name: PARAMS for name in CURRICULA}, "manifold": MANIFOLD_PARAMS})


class HubPolicy:
    """The `hubs` control's choice: the candidate with the most relations (the `centrality`
    feature, which that arm fills with the groups' degrees)."""

    name = "hubs"

    def __init__(self) -> None:
        from curriculum.curiosity import FEATURES

        self.column = FEATURES.index("centrality")

    def score(self, topics: list[int], x: np.ndarray) -> np.ndarray:
        return x[:, self.column]

    def predict(self, x: np.ndarray) -> None:
        return None

    def update(self, *args, **kwargs) -> None:
        pass


def curriculum_plan(name: str, params: dict, info: dict, seed: int):
    """(first topics, adjacency the expansion follows, policy name or 'hubs', centrality) of a
    curriculum arm."""
    n = info["topics"]
    adjacency = {int(t): ns for t, ns in info["adjacency"].items()}
    complete = {t: [o for o in range(n) if o != t] for t in range(n)}  # "ignoring the graph"
    degree = np.asarray(info["degree"], dtype=float)
    centrality = degree / degree.sum()
    policy = str(params.get("policy", info["policy"]))
    size = len(info["nucleus"])
    if name == "nucleus":
        return info["nucleus"], adjacency, policy, centrality
    if name == "reverse":
        return info["periphery"], adjacency, policy, centrality
    if name == "hubs":
        return np.argsort(-degree, kind="stable")[:size].tolist(), complete, "hubs", centrality
    # random_subset: one random group from each of `size` random communities (all of them, and
    # then more than one of some, if there are fewer communities than the nucleus has groups)
    rng = np.random.default_rng([seed, 31])
    by_c: dict[int, list[int]] = {}
    for t, c in enumerate(info["community_of"]):
        by_c.setdefault(c, []).append(t)
    picks: list[int] = []
    while len(picks) < size:
        for c in rng.permutation(sorted(by_c)):
            left = [t for t in by_c[int(c)] if t not in picks]
            if left and len(picks) < size:
                picks.append(int(rng.choice(left)))
    return sorted(picks), complete, "random", centrality


def _qa_eval(b: Bundle, device, autocast, batch_size: int):
    """Evaluation function: question accuracy (held-out and seen) and held-out perplexity."""
    import torch

    from pipeline.evaluate import evaluate, question_accuracy

    pad = b.tokenizer.pad_token_id

    def run(model) -> dict[str, float]:
        met = evaluate(model, b.eval_set, batch_size, device, pad, autocast_dtype=autocast)
        qa = question_accuracy(model, b.held, batch_size * 4, device, pad, autocast)
        seen = question_accuracy(model, b.seen, batch_size * 4, device, pad, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out = {"ppl": met["heldout/ppl"], "acc_seen": seen["qa/acc"], "chance": qa["qa/chance"]}
        out.update({k: qa[f"qa/{k}"] for k in QA_KEYS if f"qa/{k}" in qa})
        return out

    return run


def run_arm(bundle_dir: Path, spec: str, seed: int, settings: Settings) -> dict:
    import torch

    from curriculum.curiosity import make_policy
    from curriculum.samplers import make_sampler
    from curriculum.sequential import CuriosityCurriculum, TopicInfo
    from pipeline.model import build_scratch_model
    from pipeline.trainer import FitSettings, fit

    name, params = parse_arm(spec)
    b = Bundle.load(bundle_dir)
    info, s = b.info, settings
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    model = build_scratch_model(b.tokenizer, info["model_size"], seed=seed).to(device)
    fs = FitSettings(steps=s.steps, lr=s.lr, batch_size=s.batch_size, warmup_steps=s.warmup_steps,
                     eval_every=s.eval_every, checkpoint_every=s.steps + 1, log_every=s.eval_every,
                     autocast_dtype=autocast)
    adjacency = {int(t): ns for t, ns in info["adjacency"].items()}
    sampler_box = []

    def new_sampler():
        if name in CURRICULA:
            first, graph, policy_name, centrality = curriculum_plan(name, params, info, seed)
            policy = HubPolicy() if policy_name == "hubs" else make_policy(policy_name, seed=seed, beta=info["ucb_beta"])
            sampler = CuriosityCurriculum(
                b.blocks.topics, s.batch_size, s.steps, first,
                TopicInfo(graph, b.centroids, centrality, {int(t): w for t, w in info["keywords"].items()}),
                policy, _loss_fn(model, b, seed, device, autocast), coverage=float(params.get("coverage", 0.5)),
                replay=float(params.get("replay", info["replay"])), k=int(params.get("k", info["k"])),
                block_size=s.block_size, expanding=bool(params.get("expanding", 1)),
                weighting=str(params.get("weighting", "natural")),
                manifold=stretch_manifold(params, b.blocks.topics, s.batch_size, seed, model,
                                          total_batches=s.steps), seed=seed)
        elif name == "manifold":  # the activation space only: this bundle has no embeddings, no validation split
            sampler = make_sampler(name, b.blocks.topics, s.batch_size, seed=seed,
                                   manifold=manifold_context(params, model, total_batches=s.steps))
        else:
            sampler = make_sampler(name, b.blocks.topics, s.batch_size, adjacency, 2, seed)
        sampler_box.append(sampler)
        return iter(sampler)

    evaluate_qa = _qa_eval(b, device, autocast, s.eval_batch_size)
    eval_s = [0.0]

    def evaluate_fn(m) -> dict[str, float]:
        t0 = time.perf_counter()
        out = evaluate_qa(m)
        eval_s[0] += time.perf_counter() - t0
        return out

    logged: dict[int, dict] = {}
    curve = [{"step": 0, "tokens": 0, "lr": 0.0, **evaluate_fn(model)}]
    eval_s[0] = 0.0
    result = fit(model, b.blocks, new_sampler, fs, device, evaluate=evaluate_fn,
                 log=lambda row: logged.setdefault(row["step"], {}).update(row), desc=spec)
    keys = [k for k in curve[0] if k not in ("step", "tokens", "lr")]
    for step in sorted(logged):
        row = logged[step]
        if "acc" in row:
            curve.append({"step": step, "tokens": row["tokens"], "lr": row.get("lr"), **{k: row[k] for k in keys}})
    sampler = sampler_box[0]
    overhead = getattr(sampler, "overhead_s", 0.0)
    return {"seed": seed, "arm": spec, "name": name, "params": params, "settings": asdict(settings),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "steps": result.steps, "tokens": result.tokens, "curve": curve,
            "train_s": round(result.seconds - eval_s[0] - overhead, 2), "eval_s": round(eval_s[0], 2),
            "overhead_s": round(overhead, 2), "prep_s": 0.0,
            "phases": sampler.summary() if hasattr(sampler, "summary") else None}


# ------------------------------------------------------------------------------ adapters


def run_adapters(bundle_dir: Path, seed: int, settings: Settings, base_steps: int, adapter_steps: int) -> dict:
    """Routed per-community LoRA adapters against one union adapter (module docstring)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from curriculum.samplers import make_sampler
    from pipeline.evaluate import question_scores
    from pipeline.lm_data import Blocks
    from pipeline.model import build_scratch_model, count_parameters
    from pipeline.trainer import FitSettings, fit

    b = Bundle.load(bundle_dir)
    info, s = b.info, settings
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    community_of = np.asarray(info["community_of"])
    block_c = community_of[b.blocks.topics]

    def subset(mask: np.ndarray) -> Blocks:
        idx = np.flatnonzero(mask)
        return Blocks(b.blocks.tokens[idx], b.blocks.mask[idx], b.blocks.topics[idx])

    def train(model, blocks: Blocks, steps: int, lr: float, desc: str) -> int:
        fs = FitSettings(steps=steps, lr=lr, batch_size=s.batch_size, warmup_steps=min(s.warmup_steps, steps // 10),
                         eval_every=steps + 1, checkpoint_every=steps + 1, log_every=max(1, steps // 4),
                         autocast_dtype=autocast)
        torch.manual_seed(seed)
        return fit(model, blocks, lambda: iter(make_sampler("uniform", blocks.topics, s.batch_size, seed=seed)),
                   fs, device, desc=desc).tokens

    t0 = time.perf_counter()
    base = build_scratch_model(b.tokenizer, info["model_size"], seed=seed).to(device)
    nucleus_c = info["nucleus_community"]
    base_tokens = train(base, subset(np.isin(block_c, nucleus_c)), base_steps, s.lr, "base (nucleus)")
    others = sorted(set(community_of.tolist()) - set(nucleus_c))
    shares = np.array([(block_c == c).sum() for c in others], dtype=float)
    steps = np.maximum(1, np.round(adapter_steps * shares / shares.sum())).astype(int)
    lora = info["lora"]
    q_comm = np.asarray(info["question_community"])
    pad = b.tokenizer.pad_token_id

    def lora_model(rank: int):
        torch.manual_seed(seed)
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2.0 * rank, lora_dropout=0.0,
                                                              target_modules="all-linear", task_type="CAUSAL_LM"))

    def scores(model, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct, answer NLL sum and token count) of the held-out questions selected by `sel`."""
        sc = question_scores(model, b.held, s.eval_batch_size * 4, device, pad, autocast)
        return sc.correct[sel], np.array([sc.answer_nll[sel].sum(), sc.answer_tokens[sel].sum()])

    routed_ok, routed_nll, routed_tokens, routed_params = [], np.zeros(2), 0, 0
    for c, n in zip(others, steps):
        model = lora_model(lora["rank"])
        routed_params += count_parameters(model, trainable_only=True)
        routed_tokens += train(model, subset(block_c == c), int(n), lora["lr"], f"adapter community {c}")
        ok, nll = scores(model.eval(), q_comm == c)  # each question under its own community's adapter
        routed_ok.append(ok)
        routed_nll += nll
        del model
    union = lora_model(lora["rank"] * len(others))
    union_params = count_parameters(union, trainable_only=True)
    union_tokens = train(union, subset(np.isin(block_c, others)), int(steps.sum()), lora["lr"], "union adapter")
    if routed_tokens != union_tokens or routed_params != union_params:
        raise SystemExit(f"unfair adapters: tokens {routed_tokens} vs {union_tokens}, "
                         f"parameters {routed_params} vs {union_params}")
    sel = np.isin(q_comm, others)
    union_ok, union_nll = scores(union.eval(), sel)
    base_ok, base_nll = scores(base.eval(), sel)
    ppl = lambda nll: float(np.exp(nll[0] / max(nll[1], 1.0)))  # noqa: E731
    routed_acc, union_acc, base_acc = (float(np.concatenate(routed_ok).mean()), float(union_ok.mean()),
                                       float(base_ok.mean()))
    routed_answer_ppl, union_ppl, base_ppl = ppl(routed_nll), ppl(union_nll), ppl(base_nll)
    return {"seed": seed, "arm": "adapters", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "base_steps": base_steps, "base_tokens": base_tokens, "adapter_steps": steps.tolist(),
            "tokens": union_tokens, "parameters": union_params, "rank": lora["rank"], "communities": others,
            "questions": int(sel.sum()), "routed_acc": routed_acc, "union_acc": union_acc, "base_acc": base_acc,
            "routed_answer_ppl": routed_answer_ppl, "union_answer_ppl": union_ppl, "base_answer_ppl": base_ppl,
            "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------ summary


def _stats(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per arm, mean and spread over seeds: R_qa, R_ppl, the final figures, train seconds."""
    r_qa, r_ppl = report.ratios(rows, "acc", higher=True), report.ratios(rows, "ppl")
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        entry = {"seeds": len(mine)}
        for name, table in (("R_qa", r_qa), ("R_ppl", r_ppl)):
            values = [table[(r["seed"], arm)] for r in mine]
            entry[name] = _stats([v for v, _ in values])
            entry[name + "_reached"] = f"{sum(ok for _, ok in values)}/{len(values)}"
        for key in (*QA_KEYS, "acc_seen", "ppl", "chance"):
            vals = [r["curve"][-1][key] for r in mine if key in r["curve"][-1]]
            if vals:
                entry[key] = _stats(vals)
        entry["acc_untrained"] = _stats([r["curve"][0]["acc"] for r in mine])  # the floor: step 0
        entry["gain"] = _stats([r["curve"][-1]["acc"] - _uniform(rows, r["seed"])["curve"][-1]["acc"] for r in mine])
        entry["train_s"] = _stats([r["train_s"] + r["overhead_s"] for r in mine])
        out[arm] = entry
    return out


def _uniform(rows: list[dict], seed: int) -> dict:
    return next(r for r in rows if r["seed"] == seed and r["arm"] == "uniform")


def summarise_adapters(rows: list[dict]) -> dict:
    gain_acc = [r["routed_acc"] / r["union_acc"] - 1 if r["union_acc"] else float("nan") for r in rows]
    gain_ppl = [1 - r["routed_answer_ppl"] / r["union_answer_ppl"] for r in rows]
    return {k: _stats([r[k] for r in rows]) for k in ("routed_acc", "union_acc", "base_acc", "routed_answer_ppl",
                                                      "union_answer_ppl")} | {
        "acc_gain": _stats(gain_acc), "answer_ppl_gain": _stats(gain_ppl), "seeds": len(rows)}


def _f(stat, digits: int = 3) -> str:
    return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def table(summary: dict[str, dict]) -> str:
    lines = ["| arm | R_qa | R_ppl | qa acc | 1-hop | 2-hop | nucleus | near | far | seen | held-out ppl | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, e in summary.items():
        def ratio(name: str) -> str:
            reached, n = e[name + "_reached"].split("/")
            return _f(e[name], 2) + ("" if reached == n else f" (own final {int(n) - int(reached)}/{n})")

        cells = [_f(e[k]) if k in e else "–" for k in ("acc", "acc_1hop", "acc_2hop", "acc_nucleus", "acc_near",
                                                         "acc_far", "acc_seen")]
        lines.append(f"| `{arm}` | {ratio('R_qa')} | {ratio('R_ppl')} | " + " | ".join(cells)
                     + f" | {_f(e['ppl'], 2)} | {_f(e['train_s'], 1)} |")
    return "\n".join(lines)


def headline(summary: dict[str, dict]) -> str:
    e = summary.get("nucleus")
    if e is None:
        return "knowledge tokens-to-target ratio (nucleus vs uniform): no nucleus arm"
    reached, n = e["R_qa_reached"].split("/")
    note = "" if reached == n else (f" (it never reaches uniform's final accuracy in {int(n) - int(reached)} of {n} "
                                    f"seeds; there R is taken at its own final accuracy)")
    return f"knowledge tokens-to-target ratio (nucleus vs uniform): {e['R_qa'][0]:.2f}{note}"


def plot(rows: list[dict], path: Path) -> None:
    """Question accuracy (all, two-hop, far) and held-out perplexity against tokens, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("acc", "held-out question accuracy"), ("acc_2hop", "two-hop accuracy"),
            ("acc_far", "accuracy, far from the nucleus"), ("ppl", "held-out biography perplexity")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r["curve"] for r in rows if r["arm"] == arm]
        n = min(len(c) for c in mine)
        tokens = [statistics.fmean(c[i]["tokens"] for c in mine) / 1e6 for i in range(n)]
        for ax, (key, _) in zip(axes, keys):
            if key in mine[0][0]:
                ax.plot(tokens, [statistics.fmean(c[i][key] for c in mine) for i in range(n)], label=arm)
    for ax, (key, title) in zip(axes, keys):
        ax.set_xlabel("training tokens (M)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "ppl":
            ax.set_yscale("log")
    axes[0].axhline(rows[0]["curve"][0].get("chance", 0), color="grey", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="generate the world, tokenizer, blocks, questions (CPU)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--entities", type=int, default=5000)
    p.add_argument("--communities", type=int, default=10)
    p.add_argument("--docs-per-entity", type=int, default=3)
    p.add_argument("--groups-per-community", type=int, default=4)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--questions", type=int, default=1200, help="held-out questions scored per evaluation")
    p.add_argument("--seen-questions", type=int, default=300)
    p.add_argument("--model-size", default="small")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of each community adapter")
    p.add_argument("--lora-lr", type=float, default=5e-3, help="the product's lora.lr default")
    r = sub.add_parser("run", help="every (seed, arm), then the comparison")
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--arms", nargs="+", default=list(ARMS) + ["nucleus:policy=random"])
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--eval-every", type=int, default=50)
    r.add_argument("--adapters", action="store_true", help="also the routed-adapters comparison, per seed")
    r.add_argument("--base-steps", type=int, help="adapters: base steps on the nucleus (default steps / 5)")
    r.add_argument("--adapter-steps", type=int, help="adapters: steps of all adapters together (default steps / 2)")
    r.add_argument("--jobs", type=int, help="processes at once (default: all)")
    r.add_argument("--work", type=Path, default=Path("/tmp/bench-knowledge"))
    r.add_argument("--json-out", type=Path)
    r.add_argument("--plot", type=Path)
    rp = sub.add_parser("report", help="the table, headline and plot again from run's JSON (several: merged)")
    rp.add_argument("results", type=Path, nargs="+")
    rp.add_argument("--plot", type=Path)
    rp.add_argument("--json-out", type=Path, help="write the merged rows with their summary here")
    a1 = sub.add_parser("arm", help="internal: one (seed, arm)")
    a1.add_argument("bundle", type=Path)
    a1.add_argument("spec")
    a1.add_argument("seed", type=int)
    a1.add_argument("out", type=Path)
    a1.add_argument("--settings", required=True)
    a1.add_argument("--base-steps", type=int, default=0)
    a1.add_argument("--adapter-steps", type=int, default=0)
    a = ap.parse_args()

    if a.cmd == "prepare":
        prepare(a)
        return
    if a.cmd == "report":
        runs = [json.loads(path.read_text()) for path in a.results]
        rows = [row for run in runs for row in run["rows"]]
        adapter_rows = [row for run in runs for row in run.get("adapters", {}).get("rows", [])]
        check_fair(rows)
        merged = {**{k: v for k, v in runs[0].items() if k not in ("rows", "summary", "adapters", "command")},
                  "commands": [r["command"] for r in runs], "seeds": sorted({r["seed"] for r in rows})}
        _print_and_save(rows, adapter_rows, merged, a.json_out, a.plot)
        return
    if a.cmd == "arm":
        settings = Settings(**json.loads(a.settings))
        row = (run_adapters(a.bundle, a.seed, settings, a.base_steps, a.adapter_steps) if a.spec == "adapters"
               else run_arm(a.bundle, a.spec, a.seed, settings))
        a.out.write_text(json.dumps(row))
        return
    for spec in a.arms:
        parse_arm(spec)
    if "uniform" not in a.arms:
        sys.exit("--arms must include uniform: every ratio is against it")
    info = json.loads((a.bundle / "bundle.json").read_text())
    settings = Settings(a.steps, info["batch_size"], info["lr"], info["warmup_steps"], a.eval_every,
                        info["block_size"], info["model_size"], info["eval_batch_size"])
    base_steps, adapter_steps = a.base_steps or max(1, a.steps // 5), a.adapter_steps or max(1, a.steps // 2)
    specs = list(a.arms) + (["adapters"] if a.adapters else [])
    t0 = time.perf_counter()
    out = {(s, spec): a.work / f"s{s}-{spec.replace(':', '_').replace(',', '_').replace('=', '-')}.json"
           for s in a.seeds for spec in specs}
    extra = ["--base-steps", str(base_steps), "--adapter-steps", str(adapter_steps)]
    run_all(__file__, [(["arm", str(a.bundle), spec, str(s), str(path), "--settings", json.dumps(asdict(settings)),
                         *extra], path.with_suffix(".log")) for (s, spec), path in out.items()],
            a.jobs or len(out))
    rows = [json.loads(path.read_text()) for (s, spec), path in out.items() if spec != "adapters"]
    adapter_rows = [json.loads(path.read_text()) for (s, spec), path in out.items() if spec == "adapters"]
    check_fair(rows)
    result = {"device": rows[0]["device"], "command": " ".join(sys.argv), "settings": asdict(settings),
              "bundle": {k: info[k] for k in ("spec", "counts", "groups_per_community", "blocks", "tokens",
                                              "questions", "nucleus", "periphery", "prep_s")},
              "seeds": a.seeds, "arms": a.arms, "total_s": round(time.perf_counter() - t0, 1)}
    _print_and_save(rows, adapter_rows, result, a.json_out, a.plot)


def _print_and_save(rows: list[dict], adapter_rows: list[dict], result: dict, json_out: Path | None,
                    plot_to: Path | None) -> None:
    summary = summarise(rows)
    print(table(summary))
    print()
    print(headline(summary))
    result = {**result, "summary": summary, "rows": rows}
    if adapter_rows:
        result["adapters"] = {"summary": summarise_adapters(adapter_rows), "rows": adapter_rows}
        ad = result["adapters"]["summary"]
        print(f"\nadapters ({ad['seeds']} seeds): routed acc {_f(ad['routed_acc'])}, union {_f(ad['union_acc'])}, "
              f"base {_f(ad['base_acc'])}; answer ppl routed {_f(ad['routed_answer_ppl'], 2)}, "
              f"union {_f(ad['union_answer_ppl'], 2)}; gain acc {_f(ad['acc_gain'])}, ppl {_f(ad['answer_ppl_gain'])}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1))
    if plot_to:
        plot(rows, plot_to)

if __name__ == "__main__":
    main()
