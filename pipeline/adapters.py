"""`nucleus adapters`: use a run's neighbourhood adapters together.

    list      the adapters with their neighbourhoods (topics, passages, tokens, perplexity)
    route     which neighbourhood each text goes to (nearest centroid in the embedder's space)
    score     perplexity of texts, each under its routed adapter (or a top-k mixture)
    generate  continue a prompt with its routed adapter
    compat    tether compatibility: per-layer cosine of every pair's LoRA deltas, and the mean
    merge     fold groups above `adapters.merge_threshold` into one adapter each (stock peft,
              `adapters/merge-<hash>/`), keep the others apart, record each merge in the ledger
    eval      routing accuracy, diagonal fraction, specialisation matrix, base/routed/merged ppl

Routing targets are the neighbourhood adapters plus the nucleus (its adapter, or on a scratch
run the base model its training made). Merged adapters take their members' place only where
asked (`eval`'s merged perplexity); everything else uses the adapters as trained.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curriculum.adapter_eval import BASE, evaluate_adapters
from curriculum.adapters import AdapterSet, Target
from curriculum.neighborhood import NUCLEUS, check_nb_id
from curriculum.tethers import (add_merged_adapter, compat_matrix, merge_groups, merge_id, read_adapter_config,
                                read_lora, read_merges, record_merge)
from pipeline import __version__, question_set
from pipeline import nucleate as nucleate_stage
from pipeline.atomic import TMP_PREFIX, atomic_path, atomic_write_json, read_json, remove_path
from pipeline.config import NucleusConfig, section_hash
from pipeline.evaluate import question_accuracy, tokenize_questions
from pipeline.errors import UserError, unknown_choice
from pipeline.lm_data import passage_texts
from pipeline.model import load_pretrained, resolve_device
from pipeline.train import RunData
from pipeline.workspace import Workspace, now
from retrieval.embed import get_embedder

log = logging.getLogger("nucleus.adapters")

ACTIONS = ("list", "route", "score", "generate", "compat", "merge", "eval")
MERGED_ALL = "(merged-all)"  # the in-memory merge of every explored adapter that `eval` scores


@dataclass
class AdaptersResult:
    action: str
    data: Any = None

    def to_json(self) -> Any:
        return self.data


def run(cfg: NucleusConfig, ws: Workspace, action: str, texts: list[str] | None = None,
        prompt: str | None = None) -> AdaptersResult:
    ws.require("train", f"adapters {action}")
    if action not in ACTIONS:
        raise unknown_choice("adapters action", action, ACTIONS)
    entries = scan(ws)
    if action == "list":
        return AdaptersResult(action, [e.summary() for e in entries])
    if not [e for e in entries if e.explored]:
        raise UserError(f"adapters {action}: '{ws.root / 'adapters'}' holds no neighbourhood adapter yet. Train "
                        f"some with `nucleus explore --run-dir {ws.root}` or `nucleus train -n topic-N`.")
    if action in ("route", "score") and not texts:
        raise UserError(f"adapters {action}: give at least one text (arguments, or --file with one text per line).")
    if action == "generate" and not (prompt or "").strip():
        raise UserError("adapters generate: the prompt is empty; give the text to continue.")
    if action == "route":
        return AdaptersResult(action, route(cfg, ws, entries, texts))
    if action == "compat":
        return AdaptersResult(action, compat(entries))
    if action == "merge":
        return AdaptersResult(action, merge(cfg, ws, entries))
    aset = open_adapter_set(cfg, ws, entries)
    if action == "score":
        return AdaptersResult(action, score(cfg, aset, texts))
    if action == "generate":
        text, target = aset.generate(prompt, cfg.adapters.max_new_tokens, cfg.adapters.gen_temperature, seed=cfg.seed)
        return AdaptersResult(action, {"prompt": prompt, "adapter": target, "text": text})
    return AdaptersResult(action, evaluate(cfg, ws, entries, aset))


# ------------------------------------------------------------------------- the adapters


@dataclass
class Entry:
    """One adapter directory of the run: `adapters/<id>/` with its neighbourhood record."""

    id: str
    path: Path
    info: dict
    config: dict
    topics: list[int] = field(default_factory=list)
    passage_ids: list[int] = field(default_factory=list)

    @property
    def merged_from(self) -> list[str]:
        return list(self.info.get("merged_from", []))

    @property
    def explored(self) -> bool:
        """A neighbourhood adapter as trained (not the nucleus's, not a merge)."""
        return self.id != NUCLEUS and not self.merged_from

    def summary(self) -> dict:
        metrics, before = self.info.get("metrics", {}), self.info.get("result", {}).get("metrics_before", {})
        return {"id": self.id, "path": str(self.path), "topics": self.topics, "passages": len(self.passage_ids),
                "tokens_seen": self.info.get("tokens_seen"), "rank": self.config.get("r"),
                "alpha": self.config.get("lora_alpha"), "target_modules": self.config.get("target_modules"),
                "merged_from": self.merged_from, "ppl_before": before.get(f"nb/{self.id}/ppl"),
                "ppl_after": metrics.get(f"nb/{self.id}/ppl"), "finished": self.info.get("finished")}


def scan(ws: Workspace) -> list[Entry]:
    """Every complete adapter directory of the run, checked to belong to this run's base."""
    root = ws.root / "adapters"
    entries = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if not d.is_dir() or d.name.startswith(TMP_PREFIX):
            continue
        check_nb_id(d.name)
        record = d / "neighborhood.json"
        if not record.is_file():
            raise UserError(f"adapter '{d}' has no neighborhood.json, so its neighbourhood is unknown. Remove the "
                            f"directory, or retrain it with `nucleus train --run-dir {ws.root} -n {d.name} --force`.")
        info = read_json(record)
        nb = nucleate_stage.load_neighborhood(ws, d.name)
        passages = list(nb.passage_ids) if nb is not None else []
        entries.append(Entry(d.name, d, info, read_adapter_config(d), list(info.get("topics", [])), passages))
    by_id = {e.id: e for e in entries}
    for e in entries:  # a merge routes over (and is centred on) the union of its members' passages
        if e.merged_from and not e.passage_ids:
            e.passage_ids = sorted({p for m in e.merged_from if m in by_id for p in by_id[m].passage_ids})
    _check_same_base(ws, entries)
    return entries


@functools.lru_cache(maxsize=8)
def _fingerprint(base_dir: str) -> str:
    """sha256 of a saved model's config and weights (what makes two bases the same base)."""
    h = hashlib.sha256()
    d = Path(base_dir)
    for f in sorted([d / "config.json", *d.glob("*.safetensors")]):
        if f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def _check_same_base(ws: Workspace, entries: list[Entry]) -> None:
    """Adapters trained on another base are bad input: one trained before this run's base was
    (re)trained, or one whose recorded base is another, existing model with other weights.
    (Shapes are checked against the base when an adapter loads.)"""
    base_dir = ws.root / "model" / "base"
    nucleus_record = ws.root / "model" / "nucleus.json"
    base_finished = read_json(nucleus_record).get("finished") if nucleus_record.is_file() else None
    for e in entries:
        if e.id == NUCLEUS or e.merged_from:
            continue
        finished = e.info.get("finished")
        if base_finished and finished and finished < base_finished:
            raise UserError(f"adapter '{e.path}' was trained on another base: it finished at {finished}, before "
                            f"this run's base model was trained ({base_finished}). Retrain it with `nucleus train "
                            f"--run-dir {ws.root} -n {e.id} --force`, or remove it.")
        recorded = e.config.get("base_model_name_or_path")
        if recorded and Path(recorded).is_dir() and Path(recorded).resolve() != base_dir.resolve() \
                and _fingerprint(str(Path(recorded).resolve())) != _fingerprint(str(base_dir)):
            raise UserError(f"adapter '{e.path}' was trained on another base: its adapter_config.json names "
                            f"'{recorded}', whose weights differ from this run's base '{base_dir}'.")


def _centroids(cfg: NucleusConfig, ws: Workspace, data: RunData, groups: dict[str, tuple[list[int], list[int]]]
               ) -> dict[str, np.ndarray]:
    """Routing centroid per target from {id: (topics, passage ids)} (see `adapters.centroid`)."""
    if cfg.adapters.centroid == "topics":
        topic_centroids = np.load(ws.topics_dir / "centroids.npy")
        return {k: topic_centroids[ts].mean(0) for k, (ts, _) in groups.items()}
    vectors = np.load(ws.index_dir / "embeddings.npy", mmap_mode="r")
    return {k: np.asarray(vectors[data.train_rows(ts, ps)], dtype=np.float32).mean(0) for k, (ts, ps) in groups.items()}


def _targets(cfg: NucleusConfig, ws: Workspace, entries: list[Entry], data: RunData) -> list[Target]:
    """Routing targets: every adapter (merges too), and the nucleus as the base when it has none."""
    groups = {e.id: (e.topics, e.passage_ids) for e in entries}
    paths: dict[str, Path | None] = {e.id: e.path for e in entries}
    if cfg.adapters.route_nucleus and NUCLEUS not in groups:
        nucleus = nucleate_stage.load_neighborhood(ws, NUCLEUS)
        groups[NUCLEUS], paths[NUCLEUS] = (nucleus.topics, list(nucleus.passage_ids)), None
    centroids = _centroids(cfg, ws, data, groups)
    return [Target(k, paths[k], centroids[k]) for k in groups]


def _routing_ids(cfg: NucleusConfig, entries: list[Entry], merged: bool = False) -> list[str]:
    """Targets routed among: the explored adapters (merges in place of their members when
    `merged`) and the nucleus."""
    ids = [e.id for e in entries if e.explored]
    if merged:
        merges = [e for e in entries if e.merged_from and set(e.merged_from) <= set(ids)]
        folded = {m for e in merges for m in e.merged_from}
        ids = [i for i in ids if i not in folded] + [e.id for e in merges]
    if cfg.adapters.route_nucleus:
        ids.append(NUCLEUS)
    return ids


def open_adapter_set(cfg: NucleusConfig, ws: Workspace, entries: list[Entry], data: RunData | None = None) -> AdapterSet:
    data = data or RunData.load(ws)
    model, tokenizer = load_pretrained(str(ws.root / "model" / "base"))
    embedder = get_embedder(cfg.embed.model, cfg.embed.device, cfg.embed.dtype, cfg.embed.batch_size)
    device = resolve_device(cfg.train.device)
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.train.precision in ("auto", "bf16") else None
    aset = AdapterSet(model, tokenizer, _targets(cfg, ws, entries, data), embedder.encode, cfg.adapters.lru_size,
                      device, cfg.train.block_size, cfg.train.eval_batch_size, autocast)
    for target in aset.targets.values():  # every adapter readable and made for this base, before any work
        aset.check(target.id)
    aset.set_targets(_routing_ids(cfg, entries))
    return aset


# ------------------------------------------------------------------------------ actions


def route(cfg: NucleusConfig, ws: Workspace, entries: list[Entry], texts: list[str]) -> list[dict]:
    """Routing needs only the embedder and the centroids: no language model is loaded."""
    from curriculum.adapters import Router

    targets = {t.id: t for t in _targets(cfg, ws, entries, RunData.load(ws))}
    ids = _routing_ids(cfg, entries)
    router = Router(ids, np.stack([targets[i].centroid for i in ids]))
    embedder = get_embedder(cfg.embed.model, cfg.embed.device, cfg.embed.dtype, cfg.embed.batch_size)
    vectors = embedder.encode(texts)
    dist = router.distances(vectors)
    routes = router.route(vectors, cfg.adapters.top_k, cfg.adapters.temperature)
    return [{"text": text, "routes": [{"adapter": a, "weight": round(w, 6), "distance": round(float(d[ids.index(a)]), 6)}
                                      for a, w in r]} for text, r, d in zip(texts, routes, dist)]


def score(cfg: NucleusConfig, aset: AdapterSet, texts: list[str]) -> dict:
    scored = aset.score(texts, cfg.adapters.top_k, cfg.adapters.temperature)
    nll, tokens = sum(s.nll for s in scored), sum(s.tokens for s in scored)
    return {"ppl": float(np.exp(min(nll / max(tokens, 1), 50.0))), "tokens": tokens, "top_k": cfg.adapters.top_k,
            "texts": [{"text": t, "ppl": s.ppl, "nll": s.nll, "tokens": s.tokens,
                       "routes": [{"adapter": a, "weight": round(w, 6)} for a, w in s.route]}
                      for t, s in zip(texts, scored)]}


def compat(entries: list[Entry]) -> dict:
    """Tether compatibility of every pair of adapters as trained (merges left out)."""
    factors = [read_lora(e.path, e.id) for e in entries if not e.merged_from]
    matrix, per_pair = compat_matrix(factors)
    return {"adapters": [f.name for f in factors], "matrix": np.round(matrix, 6).tolist(),
            "pairs": [{"a": a, "b": b, "mean": c["mean"], "layers": {k: v for k, v in c.items() if k != "mean"}}
                      for (a, b), c in per_pair.items()]}


def merge(cfg: NucleusConfig, ws: Workspace, entries: list[Entry]) -> dict:
    """Fold every group whose pairs are all above the threshold into one stock peft adapter."""
    a = cfg.adapters
    explored = [e for e in entries if e.explored]
    factors = [read_lora(e.path, e.id) for e in explored]
    matrix, per_pair = compat_matrix(factors)
    names = [e.id for e in explored]
    groups = merge_groups(names, matrix, a.merge_threshold)
    by_id = {e.id: e for e in entries}
    done = []
    for members in groups:
        mid = merge_id(members, a.merge_method)
        weights = [1.0 / len(members) if a.merge_weights == "mean" else 1.0] * len(members)
        pairs = {f"{x}|{y}": per_pair[(x, y)] for i, x in enumerate(members) for y in members[i + 1:]}
        skipped = mid in by_id
        if not skipped:
            _save_merge(cfg, ws, [by_id[m] for m in members], weights, mid, pairs)
        record_merge(ws.root / "ledger.sqlite", mid, members, a.merge_method, weights, a.merge_threshold, pairs,
                     f"adapters/{mid}", by_id[mid].info["finished"] if skipped else now())
        done.append({"id": mid, "members": members, "weights": weights, "method": a.merge_method, "skipped": skipped,
                     "compat_min": min(c["mean"] for c in pairs.values())})
        log.info("merge %s -> adapters/%s (%s)%s", members, mid, a.merge_method, " (already there)" if skipped else "")
    merged = {m for g in groups for m in g}
    return {"threshold": a.merge_threshold, "method": a.merge_method, "merges": done,
            "apart": [n for n in names if n not in merged], "ledger": read_merges(ws.root / "ledger.sqlite")}


def _save_merge(cfg: NucleusConfig, ws: Workspace, members: list[Entry], weights: list[float], mid: str,
                pairs: dict) -> None:
    from peft import PeftModel

    model, _ = load_pretrained(str(ws.root / "model" / "base"))
    peft_model = PeftModel.from_pretrained(model, str(members[0].path), adapter_name=members[0].id)
    for e in members[1:]:
        peft_model.load_adapter(str(e.path), adapter_name=e.id)
    add_merged_adapter(peft_model, [e.id for e in members], weights, mid, cfg.adapters.merge_method,
                       cfg.adapters.merge_density, cfg.seed)
    out = ws.root / "adapters" / mid
    with atomic_path(out) as tmp:
        staging = tmp.with_name(f"{tmp.name}-peft")
        peft_model.save_pretrained(str(staging), selected_adapters=[mid])  # non-default names go to a subfolder
        os.replace(staging / mid, tmp)
        remove_path(staging)
        topics = sorted({t for e in members for t in e.topics})
        atomic_write_json(tmp / "neighborhood.json", {
            "neighborhood": {"id": mid, "topics": topics, "passage_ids": [], "parent": NUCLEUS, "source": "merge"},
            "topics": topics, "merged_from": [e.id for e in members], "weights": weights,
            "method": cfg.adapters.merge_method, "threshold": cfg.adapters.merge_threshold, "compat": pairs,
            "tokens_seen": sum(e.info.get("tokens_seen") or 0 for e in members),
            "config_hash": section_hash(cfg, ("adapters",)), "version": __version__, "finished": now()})


def evaluate(cfg: NucleusConfig, ws: Workspace, entries: list[Entry], aset: AdapterSet) -> dict:
    data = RunData.load(ws)
    explored = [e.id for e in entries if e.explored]
    neighborhoods = {e.id: e.topics for e in entries if not e.merged_from}
    if cfg.adapters.route_nucleus and NUCLEUS not in neighborhoods:
        neighborhoods[NUCLEUS] = nucleate_stage.load_neighborhood(ws, NUCLEUS).topics
    rows = [r for r in data.heldout_rows() if any(data.topic_of[r] in ts for ts in neighborhoods.values())]
    texts = passage_texts(data.corpus, rows)
    merged_ids = _routing_ids(cfg, entries, merged=True)
    a = cfg.adapters
    weights = [1.0 / len(explored) if a.merge_weights == "mean" else 1.0] * len(explored)
    aset.add_merged(MERGED_ALL, explored, weights, a.merge_method, a.merge_density)
    metrics = evaluate_adapters(aset, aset.sequences(texts), aset.embed(texts), data.topic_of[rows], neighborhoods,
                                explored, max(2, a.top_k), a.temperature,
                                merged_ids if merged_ids != _routing_ids(cfg, entries) else None, MERGED_ALL)
    metrics.setdefault("ppl/merged", metrics["ppl/routed"])  # no merge yet: the routed set is the merged set
    metrics["merges"] = float(len([e for e in entries if e.merged_from]))
    names = [BASE, *explored]
    cols = [nb for nb in neighborhoods if f"spec/{BASE}/{nb}/ppl" in metrics]
    result = {k: v for k, v in metrics.items() if not k.startswith("spec/")}
    result["mixture_top_k"] = max(2, a.top_k)
    result["merge_method"] = a.merge_method
    result["specialisation"] = {"adapters": ["base" if n == BASE else n for n in names], "neighborhoods": cols,
                                "ppl": [[round(metrics[f"spec/{n}/{nb}/ppl"], 4) for nb in cols] for n in names]}
    if question_set.has_questions(ws):
        result.update(_question_accuracy(cfg, ws, aset))
    atomic_write_json(ws.root / "reports" / "adapters_eval.json", {"finished": now(), **result})
    return result


def _question_accuracy(cfg: NucleusConfig, ws: Workspace, aset: AdapterSet) -> dict[str, float]:
    """`qa/<way>/acc` on the run's held-out questions: the base alone, every adapter merged, and
    routed (each question to the adapter its prompt routes to)."""
    questions = question_set.load_questions(question_set.qa_dir(ws) / "questions.jsonl")
    routes = aset.route([q["prompt"] for q in questions], top_k=1)
    pad, bs, device = aset.tokenizer.pad_token_id, cfg.train.eval_batch_size, aset.device

    def accuracy(target: str, subset: list[dict]) -> float:
        with aset.using(target) as model:
            return question_accuracy(model, tokenize_questions(aset.tokenizer, subset), bs, device, pad,
                                     aset.autocast_dtype)["qa/acc"]

    out = {"qa/base/acc": accuracy(BASE, questions), "qa/merged_all/acc": accuracy(MERGED_ALL, questions)}
    by_target: dict[str, list[dict]] = {}
    for q, r in zip(questions, routes):
        by_target.setdefault(r[0][0], []).append(q)
    out["qa/routed/acc"] = sum(accuracy(t, qs) * len(qs) for t, qs in by_target.items()) / len(questions)
    out["qa/questions"] = float(len(questions))
    return out


# ------------------------------------------------------------------------------ display


def human(action: str, r: Any) -> str:
    """What `nucleus adapters <action>` prints without --json."""
    if action == "list":
        if not r:
            return "no adapters yet."
        return "\n".join(f"{e['id']:<16} topics {e['topics']}  {e['passages']} passages  {e['tokens_seen'] or 0:,} tokens"
                         f"  rank {e['rank']}" + (f"  merged from {e['merged_from']}" if e["merged_from"] else "")
                         + (f"  ppl {e['ppl_before']:.1f} -> {e['ppl_after']:.1f}" if e["ppl_after"] else "") for e in r)
    if action == "route":
        return "\n".join(", ".join(f"{x['adapter']} ({x['weight']:.2f}, d={x['distance']:.3f})" for x in t["routes"])
                         + f"  <- {' '.join(t['text'].split())[:80]}" for t in r)
    if action == "score":
        lines = [f"{t['ppl']:>10.2f}  {'+'.join(x['adapter'] for x in t['routes'])}  {' '.join(t['text'].split())[:70]}"
                 for t in r["texts"]]
        return "\n".join(lines + [f"perplexity over {r['tokens']} tokens: {r['ppl']:.2f}"])
    if action == "generate":
        return f"[{r['adapter']}] {r['prompt']}{r['text']}"
    if action == "compat":
        names = r["adapters"]
        head = " " * 14 + "".join(f"{n[:10]:>11}" for n in names)
        return "\n".join([head] + [f"{a[:13]:<14}" + "".join(f"{v:>11.3f}" for v in row)
                                   for a, row in zip(names, r["matrix"])])
    if action == "merge":
        lines = [f"merged {m['members']} -> {m['id']} ({m['method']}, weights {m['weights']}, min compat "
                 f"{m['compat_min']:.3f})" + (" (already there)" if m["skipped"] else "") for m in r["merges"]]
        lines.append(f"kept apart (compat < {r['threshold']}): {', '.join(r['apart']) or 'none'}")
        return "\n".join(lines)
    spec = r["specialisation"]
    lines = [f"routing accuracy {r['routing_accuracy']:.3f}, diagonal fraction {r['diagonal_fraction']:.3f} "
             f"({int(r['passages'])} held-out passages, {int(r['neighborhoods'])} neighbourhoods)",
             f"perplexity: base {r['ppl/base']:.2f}, routed {r['ppl/routed']:.2f}, top-{r['mixture_top_k']} mixture "
             f"{r['ppl/mixture']:.2f}, own adapter {r['ppl/own']:.2f}, merged {r['ppl/merged']:.2f}, all merged "
             f"({r['merge_method']}) {r['ppl/merged_all']:.2f}",
             "specialisation (rows: adapter, columns: neighbourhood held-out perplexity):",
             " " * 14 + "".join(f"{n[:10]:>11}" for n in spec["neighborhoods"])]
    lines += [f"{a[:13]:<14}" + "".join(f"{v:>11.2f}" for v in row) for a, row in zip(spec["adapters"], spec["ppl"])]
    if "qa/routed/acc" in r:
        lines.append(f"question accuracy ({int(r['qa/questions'])} held-out questions): base {r['qa/base/acc']:.3f}, "
                     f"routed {r['qa/routed/acc']:.3f}, all merged {r['qa/merged_all/acc']:.3f}")
    return "\n".join(lines)
