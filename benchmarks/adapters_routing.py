"""Routed neighbourhood adapters against one adapter on their union, same tokens, same adapter
parameters; a random-split control; and merges. The issue-6 benchmark.

Data (fixed across seeds): WikiText-2 articles chunked as `nucleus index` chunks them,
embedded with all-MiniLM-L6-v2, clustered into topics (spherical k-means: scikit-learn
k-means on unit vectors), a kNN topic graph, a held-out split of 10% of every topic. The
nucleus is the 20% most central topics (PageRank), as `nucleate` picks it without a seed
graph; `--neighbourhoods` neighbourhoods are explored from it breadth-first (the frontier
topic most similar to the explored set, plus its most similar unexplored graph neighbour).

Per seed (the BPE tokenizer is trained once): a scratch base (`--preset`) trained in full on
the nucleus, then on that base

  routed    one LoRA adapter of rank r per neighbourhood, `--epochs` over its train passages,
            routed per held-out passage to the nearest neighbourhood centroid (full passage,
            and the title line only, which barely overlaps the scored tokens)
  mixture   the same adapters, top-2 c-BTM mixture (weights softmax(-d / 0.1))
  own       each passage under its own neighbourhood's adapter (label routing, a reference)
  union     ONE adapter of rank n*r (the same parameter count) trained on the union of the
            same passages for the sum of the steps (the same tokens)
  random    the control: the union's passages split at random into n groups of the
            neighbourhoods' sizes, one rank-r adapter each with the same steps, routed the same way
  merged    the neighbourhood adapters merged into one (`linear`: the exact weighted sum of
            deltas, rank n*r like union), with weights 1/n (mean) and 1 (sum)

With `--shared-rank S` the neighbourhoods train jointly instead (curriculum/joint.py): a shared
adapter of rank S plus one expert of rank r per neighbourhood, every step a batch from one
neighbourhood training the shared adapter and that neighbourhood's expert; each
neighbourhood's adapter (shared + its expert, one stock peft adapter of rank S + r) is routed,
mixed, merged as above. The random control trains the same way on its random groups, and the
union adapter gets rank S + n*r.

All scored on the held-out passages of the explored topics (token-weighted perplexity).
gain = 1 - ppl(routed) / ppl(union); control recovery = (ppl(union) - ppl(random)) /
(ppl(union) - ppl(routed)). The script stops if the arms' tokens or parameters differ.

Imports only torch, transformers, peft, sentence-transformers, numpy and scikit-learn (no
faiss, datasets, pydantic or celery: the GPU image lacks them).

    python benchmarks/adapters_routing.py --tiny --json-out /tmp/adapters_tiny.json       # CPU check
    python benchmarks/adapters_routing.py --data /tmp/wt2/train.txt \\
        --embedder .device/minilm-fp16 --seeds 0 1 2 --json-out $OUT/adapters_routing.json  # H100
    ... --shared-rank 32 --rank 4                                   # joint: shared 32 + 8 experts of 4
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curriculum.adapter_eval import evaluate_adapters  # noqa: E402
from curriculum.adapters import AdapterSet, Target  # noqa: E402
from curriculum.nucleation import central_topics  # noqa: E402
from curriculum.samplers import make_sampler  # noqa: E402
from pipeline.lm_data import Blocks, pack_by_topic, tokenize  # noqa: E402
from pipeline.model import build_scratch_model, count_parameters, train_tokenizer  # noqa: E402
from pipeline.trainer import FitSettings, fit  # noqa: E402
from retrieval.chunking import chunk_documents, embedding_text  # noqa: E402
from retrieval.corpus import split_wikitext_articles  # noqa: E402
from retrieval.embed import Embedder  # noqa: E402
from retrieval.graph import TopicGraph  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "train.txt"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WikiText-2 file (train.txt)")
    p.add_argument("--articles", type=int, default=None, help="use only the first N articles")
    p.add_argument("--embedder", default="default", help="sentence-transformers path; default = bundled MiniLM")
    p.add_argument("--topics", type=int, default=64)
    p.add_argument("--graph-k", type=int, default=6)
    p.add_argument("--neighbourhoods", type=int, default=8, help="explored neighbourhoods (adapters)")
    p.add_argument("--topics-per-nb", type=int, default=2, help="a frontier topic plus this many - 1 neighbours")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-steps", type=int, default=500, help="about 4 passes over the nucleus at the defaults")
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8, help="rank of each neighbourhood's adapter (its expert, with --shared-rank)")
    p.add_argument("--shared-rank", type=int, default=0,
                   help="> 0: train the neighbourhoods jointly, a shared adapter of this rank plus one expert each "
                        "(curriculum/joint.py); the union adapter's rank becomes shared + n * rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--union-scale", type=float, default=None,
                   help="LoRA scale (alpha / rank) of the union adapter; default: the arms' alpha / rank")
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=float, default=3.0, help="adapter passes over its neighbourhood's blocks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--work", type=Path, default=None, help="scratch folder for adapters (default: a temp dir)")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: WikiText-2 valid, few articles, tiny model")
    p.add_argument("--tether-thresholds", type=tether_arm, nargs="*", default=[],
                   help="with --shared-rank: also train jointly with tethers during training at each of these "
                        "thresholds (curriculum/plateau_tethers.py), and merge the untethered adapters after "
                        "training (`adapters merge`, down to half as many). An arm may set its own "
                        "compare, max_group or window over the --tether-* flags: 0.9:max_group=2, "
                        "0:compare=expert (the arms of one process share the base, `never` and the merges after)")
    p.add_argument("--skip-controls", action="store_true",
                   help="train neither the union adapter nor the random split (their numbers are NaN): "
                        "for the tethers comparison, which needs only the routed adapters")
    p.add_argument("--tether-window", type=int, default=6)
    p.add_argument("--tether-loss-delta", type=float, default=0.01)
    p.add_argument("--tether-max-merges", type=int, default=8,
                   help="merges per epoch: layer merges, or with --tether-scope adapter adapters merged away")
    p.add_argument("--tether-formula", default="svd", choices=["svd", "factors"])
    p.add_argument("--tether-compare", default="adapter", choices=["adapter", "expert"],
                   help="compatibility of whole adapters (shared + expert) or of the experts alone")
    p.add_argument("--tether-scope", default="layer", choices=["layer", "adapter"],
                   help="merge each layer on its own, or whole adapters (every layer passing) at once")
    p.add_argument("--tether-keep", type=int, default=None,
                   help="with --tether-scope adapter: stop merging at this many served adapters "
                        "(default: half the neighbourhoods)")
    p.add_argument("--tether-max-group", type=int, default=0,
                   help="with --tether-scope adapter: the most neighbourhoods one adapter may tie (2 = pairs; "
                        "0 = no limit)")
    args = p.parse_args()
    if args.tiny:
        args.data = args.data if args.data != DEFAULT_DATA else DEFAULT_DATA.with_name("valid.txt")
        args.articles = args.articles or 24
        args.topics, args.graph_k, args.neighbourhoods, args.preset, args.vocab = 10, 3, 3, "tiny", 2048
        args.block_size, args.batch_size, args.base_steps, args.base_lr = 64, 16, 60, 3e-3
        args.lora_lr, args.epochs, args.seeds, args.device = 5e-3, 2.0, args.seeds[:2], "cpu"
    return args


# ----------------------------------------------------------------------------- data


def load_passages(path: Path, articles: int | None, embedder: Embedder) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    docs = [{"doc_id": i, "title": t, "text": b} for i, (t, b) in enumerate(split_wikitext_articles(text))]
    docs = docs[:articles] if articles else docs
    return list(chunk_documents(docs, embedder.tokenizer, max_tokens=128, min_tokens=24))


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels, unit centroids) of k-means on unit vectors (cosine geometry)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(vectors)
    centroids = km.cluster_centers_ / np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True)
    return (vectors @ centroids.T).argmax(1), centroids.astype(np.float32)


def heldout_split(topic_of: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    held = np.zeros(len(topic_of), dtype=bool)
    for t in np.unique(topic_of):
        rows = np.flatnonzero(topic_of == t)
        n = max(1, int(round(fraction * len(rows)))) if len(rows) > 2 else 0
        held[rng.choice(rows, n, replace=False)] = True
    return held


def explore_breadth_first(centroids: np.ndarray, adjacency: dict[int, list[int]], nucleus: list[int],
                          n: int, per_nb: int) -> list[list[int]]:
    """Neighbourhoods in the order the `nearest` policy takes them: the frontier topic most
    similar to the explored set, plus its most similar unexplored neighbours."""
    explored, out = set(nucleus), []
    while len(out) < n:
        frontier = sorted({t for e in explored for t in adjacency[e]} - explored)
        if not frontier:
            frontier = sorted(set(range(len(centroids))) - explored)
        if not frontier:
            break
        mean = centroids[sorted(explored)].mean(0)
        topic = max(frontier, key=lambda t: float(centroids[t] @ mean))
        unexplored = [x for x in adjacency[topic] if x not in explored and x != topic]
        extra = sorted(unexplored, key=lambda x: -float(centroids[x] @ centroids[topic]))[: per_nb - 1]
        nb = sorted({topic, *extra})
        out.append(nb)
        explored |= set(nb)
    return out


# ------------------------------------------------------------------------- training


def blocks_for(tokenizer, texts: list[str], groups: list[int], block_size: int) -> Blocks:
    return pack_by_topic(tokenize(tokenizer, texts), groups, block_size, tokenizer.pad_token_id)


def train_model(model, blocks: Blocks, steps: int, lr: float, args, seed: int, desc: str,
                make_batches=None, on_batch=None, tethers=None) -> int:
    """Tokens seen training `model` (uniform batches unless `make_batches` makes the stream)."""
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    # tethers read the logged losses: log every 10 steps as the product does
    settings = FitSettings(steps=steps, lr=lr, batch_size=args.batch_size, warmup_steps=min(20, steps // 10),
                           eval_every=10**9, checkpoint_every=10**9,
                           log_every=10 if tethers is not None else max(1, steps // 5), autocast_dtype=autocast)
    torch.manual_seed(seed)
    make_batches = make_batches or (lambda: iter(make_sampler("uniform", blocks.topics, args.batch_size, seed=seed)))
    result = fit(model.to(device), blocks, make_batches, settings, device, on_batch=on_batch, tethers=tethers,
                 desc=desc)
    return result.tokens


TETHER_ARM_KEYS = {"compare": str, "max_group": int, "window": int}


def tether_arm(spec: str) -> tuple[float, dict]:
    """'T' or 'T:key=value,...' (keys of TETHER_ARM_KEYS): a during arm's threshold and the
    --tether-* settings it overrides."""
    head, _, rest = spec.partition(":")
    try:
        threshold = float(head)
        pairs = [kv.split("=", 1) for kv in rest.split(",")] if rest else []
        overrides = {k: TETHER_ARM_KEYS[k](v) for k, v in pairs}
    except (ValueError, KeyError) as e:
        raise argparse.ArgumentTypeError(f"'{spec}': expected THRESHOLD or THRESHOLD:key=value,... with keys "
                                         f"{sorted(TETHER_ARM_KEYS)} ({type(e).__name__}: {e})") from None
    return threshold, overrides


def arm_args(args, overrides: dict):
    """The command line's arguments with one during arm's tether settings in place."""
    return argparse.Namespace(**{**vars(args), **{f"tether_{k}": v for k, v in overrides.items()}})


def train_joint(base_dir: Path, groups: list[Blocks], steps: int, args, seed: int, out: Path,
                tether_threshold: float | None = None) -> tuple[int, int, dict | None]:
    """(tokens, trainable parameters, tethers' summary) of a shared adapter + one expert per
    group trained jointly (batches from one group at a time, in proportion to the groups'
    blocks); each group's adapter is exported to `out/nb<g>` as one stock peft adapter. With a
    `tether_threshold`, tethers act during the training (experts tie at plateaus) and a tied
    group's adapters are exported from its one expert."""
    from transformers import AutoModelForCausalLM

    from curriculum.joint import GroupBatches, activate, add_joint_lora, export_expert, trainable_parameters
    from curriculum.plateau_tethers import JointTethers, TetherSettings, summary

    names = [f"nb{g}" for g in range(len(groups))]
    blocks = Blocks(torch.cat([b.tokens for b in groups]), torch.cat([b.mask for b in groups]),
                    np.concatenate([np.full(len(b), g, dtype=np.int64) for g, b in enumerate(groups)]))
    model = add_joint_lora(AutoModelForCausalLM.from_pretrained(base_dir), names, args.shared_rank, args.rank,
                           args.alpha / args.rank, seed=seed)
    params = trainable_parameters(model)
    tethers, on_batch = None, (lambda idx: activate(model, names[int(blocks.topics[idx[0]])]))
    if tether_threshold is not None:
        share = (np.bincount(blocks.topics, minlength=len(groups)) / len(blocks)).tolist()
        tethers = JointTethers(model.to(args.device), names, names, share,
                               TetherSettings(window=args.tether_window, loss_delta=args.tether_loss_delta,
                                              threshold=tether_threshold, max_merges_per_epoch=args.tether_max_merges,
                                              formula=args.tether_formula, compare=args.tether_compare,
                                              scope=args.tether_scope,
                                              keep_at_least=args.tether_keep or max(1, len(groups) // 2),
                                              max_group=args.tether_max_group),
                               steps_per_epoch=math.ceil(len(blocks) / args.batch_size))
        on_batch = lambda idx: tethers.activate(int(blocks.topics[idx[0]]))  # noqa: E731
    tokens = train_model(model, blocks, steps, args.lora_lr, args, seed, out.name,
                         make_batches=lambda: GroupBatches(blocks.topics, args.batch_size, seed=seed),
                         on_batch=on_batch, tethers=tethers)
    for g, name in enumerate(names):
        expert_at = {layer: names[owners[g]] for layer, owners in tethers.owner.items()} if tethers else None
        export_expert(model, name, out / name, expert_at)
    if tethers is None:
        return tokens, params, None
    checks = [e["compat"] for e in tethers.events if e["b"]]
    return tokens, params, {**summary(tethers), "served_count": len(tethers.served()),
                            "compat_seen": [min(checks), float(np.median(checks)), max(checks)] if checks else []}


def train_adapter(base_dir: Path, blocks: Blocks, steps: int, rank: int, alpha: float, args, seed: int,
                  out: Path) -> tuple[int, int]:
    """(tokens, trainable parameters) of one LoRA adapter saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    params = count_parameters(model, trainable_only=True)
    tokens = train_model(model, blocks, steps, args.lora_lr, args, seed, desc=out.name)
    model.save_pretrained(out)
    return tokens, params


# ----------------------------------------------------------------------------- one seed


def run_seed(seed: int, args, data: dict, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    texts, topic_of, held, tokenizer = data["texts"], data["topic_of"], data["heldout"], data["tokenizer"]
    train_rows = np.flatnonzero(~held)
    base = build_scratch_model(tokenizer, args.preset, seed)
    nuc_rows = [i for i in train_rows if topic_of[i] in data["nucleus"]]
    base_tokens = train_model(base, blocks_for(tokenizer, [texts[i] for i in nuc_rows], [0] * len(nuc_rows),
                                               args.block_size), args.base_steps, args.base_lr, args, seed, "base")
    base_dir = work / f"seed{seed}" / "base"
    base.cpu().save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    nbs, n = data["neighbourhoods"], len(data["neighbourhoods"])
    nb_rows = [[i for i in train_rows if topic_of[i] in nb] for nb in nbs]
    rng = np.random.default_rng(1000 + seed)
    union_rows = [i for rows in nb_rows for i in rows]
    shuffled = rng.permutation(union_rows).tolist()
    cuts = np.cumsum([0] + [len(r) for r in nb_rows])
    random_rows = [shuffled[cuts[g]:cuts[g + 1]] for g in range(n)]

    def blocks(rows, group=0):
        return blocks_for(tokenizer, [texts[i] for i in rows], [group] * len(rows), args.block_size)

    arms = {"routed": {}, "random": {}}
    tokens = {"routed": 0, "random": 0, "union": 0}
    params = {"routed": 0, "random": 0, "union": 0}
    nb_blocks = [blocks(rows) for rows in nb_rows]  # tokenized once: they size the steps and train routed
    steps = [max(1, math.ceil(args.epochs * len(b) / args.batch_size)) for b in nb_blocks]
    controls = not args.skip_controls
    for arm, rows_of in (("routed", nb_rows), ("random", random_rows))[: 2 if controls else 1]:
        out = work / f"seed{seed}" / arm
        arms[arm] = {f"nb{g}": (out / f"nb{g}", rows_of[g]) for g in range(n)}
        groups = nb_blocks if arm == "routed" else [blocks(r) for r in rows_of]
        if args.shared_rank:  # one joint training: the shared adapter sees every group's tokens
            tokens[arm], params[arm], _ = train_joint(base_dir, groups, sum(steps), args, seed, out)
            continue
        for g in range(n):  # one adapter per group, trained apart
            t, p = train_adapter(base_dir, groups[g], steps[g], args.rank, args.alpha, args, seed + g, out / f"nb{g}")
            tokens[arm] += t
            params[arm] += p
        print(f"seed {seed}: {arm} trained ({time.perf_counter() - t0:.0f} s)", flush=True)
    union_dir = work / f"seed{seed}" / "union" / "all"
    union_rank = args.shared_rank + n * args.rank
    union_scale = args.union_scale or args.alpha / args.rank
    if controls:
        tokens["union"], params["union"] = train_adapter(base_dir, blocks(union_rows), sum(steps), union_rank,
                                                         union_rank * union_scale, args, seed, union_dir)
    else:  # --skip-controls: the routed arm alone (tethers compare against it)
        tokens, params = {"routed": tokens["routed"]}, {"routed": params["routed"]}
    if len(set(params.values())) != 1:
        raise SystemExit(f"adapter parameters differ between arms: {params}")
    if max(tokens.values()) > 1.01 * min(tokens.values()):
        raise SystemExit(f"training tokens differ between arms by more than 1%: {tokens}")

    # Evaluation on the held-out passages of the explored topics.
    explored = sorted({t for nb in nbs for t in nb})
    eval_rows = [i for i in np.flatnonzero(held) if topic_of[i] in explored]
    eval_texts = [texts[i] for i in eval_rows]
    vectors = data["vectors"][eval_rows]
    title_vectors = data["title_vectors"][eval_rows]
    topics = topic_of[eval_rows]
    res: dict = {"seed": seed, "tokens": tokens, "adapter_params": params, "steps": steps, "base_tokens": base_tokens,
                 "eval_passages": len(eval_rows)}

    def adapter_set(arm: str) -> AdapterSet:  # room for the merges made of its adapters
        return _adapter_set(base_dir, tokenizer, args, [Target(name, path, data["vectors"][rows].mean(0))
                                                        for name, (path, rows) in arms[arm].items()], 4 * n + 4)

    aset = adapter_set("routed")
    aset.add_merged("merged-mean", list(arms["routed"]), [1.0 / n] * n, "linear")
    aset.add_merged("merged-sum", list(arms["routed"]), [1.0] * n, "linear")
    seqs = aset.sequences(eval_texts)
    m = evaluate_adapters(aset, seqs, vectors, topics, {f"nb{g}": nbs[g] for g in range(n)}, list(arms["routed"]),
                          mixture_k=2, temperature=0.1, merged_all="merged-mean")
    res.update({k: v for k, v in m.items() if not k.startswith("spec/")})
    title_routes = aset.router.route(title_vectors, 1)
    res["ppl/routed_title"] = _ppl(aset.score_routed(seqs, title_routes))
    res["routing_accuracy_title"] = float(np.mean([r[0][0] in {f"nb{g}" for g in range(n) if t in nbs[g]}
                                                   for r, t in zip(title_routes, topics)]))
    res["ppl/merged_sum"] = _ppl(aset.score_routed(seqs, [[("merged-sum", 1.0)]] * len(seqs)))
    res["ppl/merged_mean"] = res.pop("ppl/merged_all")
    print(f"seed {seed}: routed evaluated ({time.perf_counter() - t0:.0f} s)", flush=True)
    nan = float("nan")
    res["ppl/random"] = res["ppl/random_title"] = res["ppl/union"] = nan
    if controls:
        rset = adapter_set("random")
        res["ppl/random"] = _ppl(rset.score_routed(seqs, rset.route(eval_texts, vectors=vectors)))
        res["ppl/random_title"] = _ppl(rset.score_routed(seqs, rset.route(eval_texts, vectors=title_vectors)))
        uset = AdapterSet(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer,
                          [Target("union", union_dir, np.ones(vectors.shape[1], dtype=np.float32))], None,
                          device=args.device, block_size=args.block_size, batch_size=64,
                          autocast_dtype=torch.bfloat16 if args.device.startswith("cuda") else None)
        res["ppl/union"] = _ppl(uset.score_routed(seqs, [[("union", 1.0)]] * len(seqs)))
    if args.tether_thresholds:
        res["tethers"] = tether_arms(args, seed, data, work, base_dir, nb_blocks, sum(steps), tokens["routed"],
                                     aset, arms["routed"], seqs, vectors)
    res["gain"] = 1 - res["ppl/routed"] / res["ppl/union"]
    res["gain_title"] = 1 - res["ppl/routed_title"] / res["ppl/union"]
    res["control_recovery"] = ((res["ppl/union"] - res["ppl/random"]) / (res["ppl/union"] - res["ppl/routed"])
                               if res["ppl/union"] != res["ppl/routed"] else float("nan"))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def tether_arms(args, seed: int, data: dict, work: Path, base_dir: Path, nb_blocks: list[Blocks], steps: int,
                routed_tokens: int, aset: AdapterSet, routed: dict, seqs, vectors) -> dict:
    """Tethers during training (one joint training per threshold, the same data, steps and seed
    as `routed`) against merging the routed adapters after training (`nucleus adapters merge`:
    complete-linkage groups at the product's default threshold 0.5, and at the highest threshold
    that leaves at most half as many adapters), against never merging (`routed` itself).
    Each arm: routed held-out perplexity and the adapters it serves."""
    from curriculum.tethers import compat_matrix, merge_groups, read_lora

    names, n = list(routed), len(routed)
    never = aset.score_routed(seqs, aset.route([], vectors=vectors))
    out: dict = {"never": {"ppl": _ppl(never), "served": n, "ppl_by_route": _ppl_by_route(never)}}

    # after: merge groups of the routed adapters, routed among merges and the rest
    matrix, _ = compat_matrix([read_lora(routed[nm][0], nm) for nm in names])
    pairs = sorted({float(matrix[i, j]) for i in range(n) for j in range(i + 1, n)}, reverse=True)

    def served(groups):
        return n - sum(len(g) - 1 for g in groups)

    half = next((t for t in pairs if served(merge_groups(names, matrix, t)) <= n // 2), pairs[-1])
    for label, threshold in (("after@0.5", 0.5), ("after@half", half)):
        groups = merge_groups(names, matrix, threshold)
        targets = [nm for nm in names if not any(nm in g for g in groups)]
        for i, g in enumerate(groups):
            gid = f"{label.replace('@', '-').replace('.', '_')}-{i}"  # peft adapter names take no dots
            rows = [r for nm in g for r in routed[nm][1]]
            aset.add_merged(gid, g, [1.0 / len(g)] * len(g), "linear", centroid=data["vectors"][rows].mean(0))
            targets.append(gid)
        aset.set_targets(targets)
        out[label] = {"ppl": _ppl(aset.score_routed(seqs, aset.route([], vectors=vectors))), "served": len(targets),
                      "threshold": threshold, "groups": groups}
    aset.set_targets(names)

    # during: tethers tie experts at plateaus while they train
    for threshold, overrides in args.tether_thresholds:
        a = arm_args(args, overrides)
        label = f"during@{threshold:g}" if a.tether_scope == "layer" else f"during:adapter@{threshold:g}"
        if a.tether_scope == "adapter" and a.tether_max_group:
            label += f",max_group={a.tether_max_group}"
        if a.tether_compare != "adapter":
            label += f",compare={a.tether_compare}"
        if a.tether_window != 6:
            label += f",window={a.tether_window}"
        out_dir = work / f"seed{seed}" / label
        t0 = time.perf_counter()
        tokens, _, summary = train_joint(base_dir, nb_blocks, steps, a, seed, out_dir, tether_threshold=threshold)
        if tokens != routed_tokens:
            raise SystemExit(f"{label}: {tokens} training tokens, routed had {routed_tokens}")
        tset = _adapter_set(base_dir, data["tokenizer"], args,
                            [Target(nm, out_dir / nm, data["vectors"][routed[nm][1]].mean(0)) for nm in names])
        # the same routes as `never` (same centroids): per route, where the ties cost
        scored = tset.score_routed(seqs, tset.route([], vectors=vectors))
        out[label] = {"ppl": _ppl(scored), "ppl_by_route": _ppl_by_route(scored),
                      "served": summary["served_count"], "merges": summary["merges"], "checks": summary["checks"],
                      "served_groups": summary["served"], "compat_seen": summary["compat_seen"],
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"seed {seed}: {label}: {out[label]['served']} served, ppl {out[label]['ppl']:.2f} "
              f"({out[label]['seconds']:.0f} s)", flush=True)
    for label, arm in out.items():
        arm["vs_never"] = arm["ppl"] / out["never"]["ppl"] - 1
    return out


def _adapter_set(base_dir: Path, tokenizer, args, targets: list[Target], lru_size: int | None = None) -> AdapterSet:
    from transformers import AutoModelForCausalLM

    return AdapterSet(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, targets, None,
                      lru_size=lru_size or len(targets) + 2, device=args.device, block_size=args.block_size, batch_size=64,
                      autocast_dtype=torch.bfloat16 if args.device.startswith("cuda") else None)


def _ppl(scored) -> float:
    return float(math.exp(sum(s.nll for s in scored) / sum(s.tokens for s in scored)))


def _ppl_by_route(scored) -> dict[str, float]:
    """Perplexity of the passages routed to each adapter (top-1 routes)."""
    by: dict[str, list] = {}
    for s in scored:
        by.setdefault(s.route[0][0], []).append(s)
    return {target: _ppl(rows) for target, rows in sorted(by.items())}


# ------------------------------------------------------------------------------- main


def prepare(args) -> dict:
    t0 = time.perf_counter()
    embedder = Embedder(args.embedder, "cuda" if args.device.startswith("cuda") else "cpu", "auto", 256)
    passages = load_passages(args.data, args.articles, embedder)
    texts = [embedding_text(p["title"], p["text"]) for p in passages]
    vectors = embedder.encode(texts)
    title_vectors = embedder.encode([p["title"] for p in passages])
    topic_of, centroids = spherical_kmeans(vectors, args.topics)
    graph = TopicGraph.build("knn", centroids, k=args.graph_k)
    nucleus = central_topics(graph, 0.2)
    nbs = explore_breadth_first(centroids, graph.adjacency(), nucleus, args.neighbourhoods, args.topics_per_nb)
    held = heldout_split(topic_of, 0.1)
    tokenizer = train_tokenizer([texts[i] for i in np.flatnonzero(~held)], args.vocab)  # the same in every seed
    print(f"data: {len(passages)} passages, {args.topics} topics, nucleus {nucleus}, neighbourhoods {nbs}, "
          f"{int(held.sum())} held out ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"texts": texts, "vectors": vectors, "title_vectors": title_vectors, "topic_of": topic_of,
            "heldout": held, "nucleus": nucleus, "neighbourhoods": nbs, "tokenizer": tokenizer,
            "seconds": round(time.perf_counter() - t0, 1)}


KEYS = ["ppl/base", "ppl/union", "ppl/routed", "ppl/routed_title", "ppl/mixture", "ppl/own", "ppl/random",
        "ppl/random_title", "ppl/merged_mean", "ppl/merged_sum", "gain", "gain_title", "control_recovery",
        "routing_accuracy", "routing_accuracy_title", "diagonal_fraction"]


def summarise(rows: list[dict]) -> dict:
    out = {}
    for k in KEYS:
        vals = [r[k] for r in rows if r[k] == r[k]]
        out[k] = {"mean": statistics.fmean(vals) if vals else float("nan"),
                  "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def main() -> None:
    args = parse_args()
    torch.set_float32_matmul_precision("high")
    data = prepare(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="nucleus-adapters-bench-"))
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args, data, work))
        r = rows[-1]
        print(f"seed {seed}: union {r['ppl/union']:.2f}  routed {r['ppl/routed']:.2f} (title {r['ppl/routed_title']:.2f})"
              f"  random {r['ppl/random']:.2f}  merged {r['ppl/merged_mean']:.2f}  gain {r['gain']:+.3f}"
              f"  control recovery {r['control_recovery']:.2f}  routing {r['routing_accuracy']:.3f}"
              f"  ({r['seconds']} s)", flush=True)
        summary = summarise(rows)
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device,
                  "torch": torch.__version__, "nucleus": data["nucleus"], "neighbourhoods": data["neighbourhoods"],
                  "passages": len(data["texts"]), "prepare_seconds": data["seconds"], "seeds": rows,
                  "summary": summary}
        if args.json_out:  # after every seed: a run cut short keeps what it measured
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(report, indent=2))
    print(f"\n{'metric':<24}{'mean':>10}{'std':>9}   ({len(rows)} seeds, {device})")
    for k in KEYS:
        print(f"{k:<24}{summary[k]['mean']:>10.4f}{summary[k]['std']:>9.4f}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
