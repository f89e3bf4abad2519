"""`nucleus explore`: round after round, let curiosity pick what to learn next, and learn it.

Each round: generative rabbit holes add the unexplored topics the model's own continuations
land in to the frontier (unexplored topics next to explored ones); random-walk rabbit holes
probe-train a few topics and teach the curiosity model their realised progress; the candidates
get curiosity features; the policy picks `explore.per_round` topics; each becomes a proposal
(the topic plus `k` sampled unexplored neighbours, its passages expanded by retrieval), is
recorded in the ledger, trains as its own LoRA adapter, and its realised learning progress
updates the policy.

Resuming: a round's rabbit holes and proposals are in the ledger before anything trains, and
the policy's state at the start of the round is saved; a rerun replays the recorded updates and
trains only what is missing. Finished neighbourhoods are never trained again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from curriculum.curiosity import TopicFeatures, choose, frontier, learning_progress, make_policy, spearman
from curriculum.curiosity import structural_features
from curriculum.expansion import propose_topics
from curriculum.ledger import Ledger
from curriculum.neighborhood import NUCLEUS, Neighborhood
from curriculum.nucleation import pagerank
from curriculum.rabbit_holes import landed_topics, random_walk, walk_target
from pipeline import nucleate as nucleate_stage
from pipeline import metrics_log, rabbit_holes
from pipeline import train as train_stage
from pipeline.atomic import atomic_write_json, read_json
from pipeline.config import NucleusConfig
from pipeline.evaluate import passage_nll
from pipeline.lm_data import make_eval_set
from pipeline.model import load_pretrained, resolve_device
from pipeline.retrieve import open_retriever
from pipeline.workspace import Workspace, now

log = logging.getLogger("nucleus.explore")

SECTIONS = train_stage.SECTIONS  # `explore` itself may change between runs (more rounds, ...)
LANDED_PER_HOLE = 2  # unexplored topics a generative rabbit hole may add to the candidates


@dataclass
class ExploreResult:
    rounds_done: int
    neighborhoods: list[dict] = field(default_factory=list)
    spearman_rho: float = float("nan")
    message: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def check(cfg: NucleusConfig, ws: Workspace) -> None:
    """What `run` would reject before its first round: the stages it needs, the device and the
    model's limits for the adapters it trains. Writes nothing."""
    ws.require("nucleate", "explore")
    train_stage.check_model(cfg, ws)


def run(cfg: NucleusConfig, ws: Workspace, executor=None) -> ExploreResult:
    """Explore round after round. Expansions and trainings are jobs of `executor` (default: the
    one `jobs` config asks for: in this process, or Celery workers when a broker is set)."""
    if executor is None:
        from jobs.executor import open_executor

        with open_executor(cfg, ws) as executor:
            return run(cfg, ws, executor)
    ws.require("nucleate", "explore")
    if not ws.is_complete("train"):
        log.info("explore: the nucleus is not trained yet; training it first")
        train_stage.run(cfg, ws)
    ledger = Ledger(ws.root / "ledger.sqlite")
    state_file = ws.root / "explore" / "state.json"
    state = read_json(state_file) if state_file.is_file() else {"rounds_done": 0, "policy": None}
    policy = make_policy(cfg.explore.policy, seed=cfg.seed, beta=cfg.explore.ucb_beta)
    if state["policy"]:
        policy.load_state_dict(state["policy"])
    ctx = _Context.load(cfg, ws)
    message = ""
    for round_ in range(state["rounds_done"], cfg.explore.rounds):
        proposals = ledger.proposals(round_)
        if proposals:  # resuming a round that was interrupted while training
            _replay_walks(ledger, policy, round_)
        else:
            proposals = _propose(cfg, ws, ctx, ledger, policy, round_)
            if not proposals:
                message = "every topic reachable from the nucleus is explored: nothing left on the frontier."
                log.info("explore: %s", message)
                break
        jobs = _submit(executor, proposals)
        for p in proposals:
            _train_and_learn(cfg, ws, ledger, policy, p, executor, jobs)
        state = {"rounds_done": round_ + 1, "policy": policy.state_dict()}
        atomic_write_json(state_file, state)  # the round is complete: its updates are in the policy
    done = [p for p in ledger.proposals() if p["status"] == "done"]
    pairs = [(p["predicted"], p["progress"]) for p in done if p["predicted"] is not None]
    rho = spearman(*zip(*pairs)) if len(pairs) >= 3 else float("nan")
    ws.mark_complete("explore", cfg, SECTIONS, {"rounds_done": state["rounds_done"], "spearman_rho": rho})
    metrics_log.append(ws.logs_dir / "metrics.jsonl",  # beside the training metrics, for reports
                       {"nb": "explore", "time": now(), "rounds_done": state["rounds_done"],
                        "curiosity/spearman_rho": rho, "curiosity/pairs": len(pairs)})
    return ExploreResult(state["rounds_done"], done, rho, message)


# ---------------------------------------------------------------------------- context


@dataclass
class _Context:
    """What proposals need from the run directory, loaded once per `explore`."""

    data: train_stage.RunData
    adjacency: dict[int, list[int]]
    centrality: np.ndarray
    centroids: np.ndarray
    sizes: np.ndarray
    keywords: dict[int, list[str]]
    nucleus: list[int]

    @classmethod
    def load(cls, cfg: NucleusConfig, ws: Workspace) -> "_Context":
        graph = nucleate_stage.load_topic_graph(ws)
        topics = read_json(ws.topics_dir / "topics.json")["topics"]
        return cls(train_stage.RunData.load(ws), graph.adjacency(), pagerank(graph),
                   np.load(ws.topics_dir / "centroids.npy"), np.array([t["size"] for t in topics]),
                   {t["id"]: t["keywords"] for t in topics}, nucleate_stage.load_neighborhood(ws, NUCLEUS).topics)


def _explored(ws: Workspace, ctx: _Context) -> tuple[set[int], dict[str, list[int]]]:
    """Explored topics and the explore adapters already trained ({nb id: topics})."""
    adapters = {}
    for path in sorted((ws.root / "neighborhoods").glob("*.json")):
        nb = Neighborhood.from_json(read_json(path))
        if nb.source == "explore" and (train_stage.adapter_dir(ws, nb.id) / "neighborhood.json").is_file():
            adapters[nb.id] = nb.topics
    return set(ctx.nucleus) | {t for ts in adapters.values() for t in ts}, adapters


# -------------------------------------------------------------------------- proposals


def _propose(cfg: NucleusConfig, ws: Workspace, ctx: _Context, ledger: Ledger, policy, round_: int) -> list[dict]:
    explored, adapters = _explored(ws, ctx)
    device = resolve_device(cfg.train.device)
    model, tok = load_pretrained(str(ws.root / "model" / "base"))
    model.to(device)
    retriever = open_retriever(cfg, ws)
    try:
        landed = _generative_holes(cfg, ctx, ledger, round_, explored, model, tok, retriever, device)
        candidates = sorted(set(frontier(ctx.adjacency, explored)) | set(landed))
        if not candidates:
            return []
        walks = _walk_probes(cfg, ctx, ledger, round_, explored, model, tok, device)
        probed = sorted({w["topic"] for w in walks} - set(candidates))
        feats = _features(cfg, ws, ctx, candidates + probed, sorted(explored), adapters, model, tok, device)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    x_all = feats.matrix()
    row = {t: i for i, t in enumerate(feats.topics)}
    for w in walks:  # the walks' probes teach the policy before it chooses
        w["features"] = x_all[row[w["topic"]]].tolist()
        ledger.record_rabbit_hole(round_, "walk", w["idx"], w["topic"], w["path"], features=w["features"],
                                  progress=w["progress"], tokens=w["tokens"], loss_before=w["loss_before"],
                                  loss_after=w["loss_after"])
    _replay_walks(ledger, policy, round_)

    x = x_all[: len(candidates)]
    predicted = policy.predict(x)
    rng = np.random.default_rng(cfg.seed * 1000 + round_)
    unexplored_adj = {t: [n for n in ns if n not in explored] for t, ns in ctx.adjacency.items()}
    taken: set[int] = set()
    made = 0
    for topic, score in choose(policy, candidates, x, len(candidates)):
        if made == cfg.explore.per_round:
            break
        if topic in taken:  # already joined to an earlier proposal of this round
            continue
        made += 1
        i = candidates.index(topic)
        topics = sorted({topic} | {t for t in propose_topics(topic, unexplored_adj, cfg.explore.k, rng)
                                   if t not in taken})
        taken.update(topics)
        nb_id = f"r{round_:02d}-t{topic}"  # its passages: the `expand` job (see _submit)
        ledger.propose(round_, nb_id, topic, topics, 0, score, None if predicted is None else float(predicted[i]),
                       x[i].tolist())
        log.info("round %d: %s topics %s (score %.3f)", round_, nb_id, topics, score)
    return ledger.proposals(round_)


# ------------------------------------------------------------------------- rabbit holes


def _generative_holes(cfg: NucleusConfig, ctx: _Context, ledger: Ledger, round_: int, explored: set[int],
                      model, tok, retriever, device: torch.device) -> list[int]:
    """Unexplored topics that the model's continuations of explored-topic prompts land in.
    Holes already in the ledger (an interrupted round) are reused, not generated again."""
    done = {r["idx"]: r for r in ledger.rabbit_holes(round_, "generative")}
    rng = np.random.default_rng([cfg.seed, round_, 1])
    with_text = set(np.unique(ctx.data.topic_of[ctx.data.trainable]).tolist())
    sources = [t for t in sorted(explored) if t in with_text]
    if not sources:
        return []
    landed: list[int] = []
    for idx in range(cfg.explore.generative):
        topic = int(sources[rng.integers(len(sources))])
        prompt = rabbit_holes.topic_prompt(tok, ctx.data, topic, cfg.explore.prompt_tokens, rng)
        if idx not in done:
            text = rabbit_holes.continue_text(model, tok, prompt, cfg.explore.gen_tokens,
                                              cfg.seed * 1000 + round_ * 10 + idx, device)
            hits = retriever.search_vectors(retriever.embedder.encode([text]), cfg.explore.hits_per_query)[1][0]
            topics = landed_topics(ctx.data.topic_of[hits[hits >= 0]], explored, LANDED_PER_HOLE)
            ledger.record_rabbit_hole(round_, "generative", idx, topic, topics, text=text)
            done[idx] = {"path": topics, "text": text}
            log.info("round %d: generative rabbit hole from topic %d landed in %s: %r", round_, topic, topics,
                     text[:80])
        landed += done[idx]["path"]
    return sorted(set(landed))


def _walk_probes(cfg: NucleusConfig, ctx: _Context, ledger: Ledger, round_: int, explored: set[int],
                 model, tok, device: torch.device) -> list[dict]:
    """Random walks from explored topics; each walk's last unexplored topic gets a probe
    training. Walks already in the ledger are not trained again (their rows are returned)."""
    done = {r["idx"]: r for r in ledger.rabbit_holes(round_, "walk")}
    rng = np.random.default_rng([cfg.seed, round_, 2])
    sources = sorted(explored)
    walks = []
    for idx in range(cfg.explore.walks):
        path = random_walk(ctx.adjacency, int(sources[rng.integers(len(sources))]), cfg.explore.walk_length, rng)
        if idx in done:
            walks.append(done[idx])
            continue
        target = walk_target(path, explored)
        probe = None if target is None else rabbit_holes.probe_training(cfg, model, tok, ctx.data, target, device)
        if probe is None:
            log.info("round %d: walk %s found nothing to probe", round_, path)
            continue
        log.info("round %d: walk %s probed topic %d: learning progress %.4f", round_, path, target, probe.progress)
        walks.append({"idx": idx, "topic": target, "path": path, **{k: getattr(probe, k) for k in (
            "progress", "tokens", "loss_before", "loss_after")}})
    return walks


def _replay_walks(ledger: Ledger, policy, round_: int) -> None:
    """Feed a round's recorded walk probes to the policy (it was restored to the round's start)."""
    for w in ledger.rabbit_holes(round_, "walk"):
        if w["features"] is not None:
            policy.update(w["topic"], np.asarray(w["features"]), w["progress"], probe=True)


# -------------------------------------------------------------------------- features


def _features(cfg: NucleusConfig, ws: Workspace, ctx: _Context, candidates: list[int], explored: list[int],
              adapters: dict[str, list[int]], model, tok, device: torch.device) -> TopicFeatures:
    """Structural features plus probe losses: under the base (`base_loss`) and under the
    explored adapter closest to the topic, the current knowledge (`surprise`). Loads adapters
    into `model`: it is not the plain base afterwards."""
    s = structural_features(candidates, explored, ctx.centroids, ctx.adjacency, ctx.centrality, ctx.sizes,
                            ctx.keywords)
    rng = np.random.default_rng(cfg.seed)
    probes = {}
    for t in candidates:  # the topic's validation passages (its training ones when it has none)
        rows = np.flatnonzero(ctx.data.validation & (ctx.data.topic_of == t)).tolist() or ctx.data.train_rows([t])
        probes[t] = sorted(rng.choice(rows, min(cfg.explore.probe_passages, len(rows)), replace=False).tolist())

    def losses(m, topics: list[int]) -> dict[int, float]:
        out = {}
        for t in topics:
            es = make_eval_set(tok, ctx.data.corpus, probes[t], [t] * len(probes[t]), cfg.train.block_size)
            nll, n = passage_nll(m, es, cfg.train.eval_batch_size, device, tok.pad_token_id)
            out[t] = float(nll.sum() / max(n.sum(), 1))
        return out

    base = losses(model, candidates)
    surprise = dict(base)
    if adapters:
        from peft import PeftModel

        ids = list(adapters)
        centroid_of = np.stack([ctx.centroids[adapters[a]].mean(0) for a in ids])
        nearest = {t: ids[int(np.argmax(centroid_of @ ctx.centroids[t]))] for t in candidates}
        peft_model = None
        for nb_id in sorted(set(nearest.values())):
            path = str(train_stage.adapter_dir(ws, nb_id))
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=nb_id)
            else:
                peft_model.load_adapter(path, adapter_name=nb_id)
            peft_model.set_adapter(nb_id)
            surprise.update(losses(peft_model, [t for t in candidates if nearest[t] == nb_id]))
    return TopicFeatures(candidates, s["similarity"], s["degree"], s["centrality"], s["log_size"],
                         np.array([surprise[t] for t in candidates]), np.array([base[t] for t in candidates]),
                         s["novelty"])


# ---------------------------------------------------------------------------- training


def _submit(executor, proposals: list[dict]) -> dict[str, tuple[str, str]]:
    """Queue each unfinished proposal's expansion (retrieval: its passages) and, behind it, its
    training. With workers the next proposals expand while the first ones train."""
    jobs = {}
    for p in proposals:
        if p["status"] != "done":
            expand = executor.submit("expand", nb_id=p["nb_id"], topics=p["topics"])
            jobs[p["nb_id"]] = (expand, executor.submit("train", after=[expand], nb_id=p["nb_id"]))
    return jobs


def _train_and_learn(cfg: NucleusConfig, ws: Workspace, ledger: Ledger, policy, p: dict, executor,
                     jobs: dict[str, tuple[str, str]]) -> None:
    """Wait for a proposal's adapter (skipped when already trained) and feed back its progress."""
    if p["status"] != "done":
        expand, train = jobs[p["nb_id"]]
        ledger.set_passages(p["nb_id"], executor.wait([expand])[expand]["passages"])
        executor.wait([train])
        result = train_stage.run(cfg, ws, p["nb_id"])  # the job's adapter: its stored result
        # measured on the validation split (`val/...`; the held-out keys for a run without one),
        # so the curiosity model never learns from the split its comparisons are scored on
        val = "val/" if f"val/nb/{p['nb_id']}/loss" in result.metrics else ""
        key = f"{val}nb/{p['nb_id']}"
        before, after = result.metrics_before[f"{key}/loss"], result.metrics[f"{key}/loss"]
        forgetting = result.metrics[f"{val}nucleus/loss"] - result.metrics_before[f"{val}nucleus/loss"]
        progress = learning_progress(before, after, result.tokens)
        ledger.finish(p["nb_id"], progress, forgetting, result.tokens, before, after)
        p = {**p, "progress": progress}
        log.info("%s: learning progress %.4f nats per 1k tokens (forgetting %+.4f)", p["nb_id"], progress,
                 forgetting)
    policy.update(p["topic"], np.asarray(p["features"]), p["progress"])
