"""FAISS indexes: choose a kind by corpus size, build, save, memory-map on load, search.

All indexes use inner product on unit vectors, i.e. cosine similarity. Exact `Flat` up to
`flat_max` vectors; above that an IVF index with 8-bit scalar-quantised codes, whose `nprobe`
default was tuned for recall@10 >= 0.95 (benchmarks/ann_recall.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from pipeline.errors import UserError, unknown_choice


def _ivf_nlist(n: int) -> int:
    # ~4 sqrt(n) lists, a power of two, and at least ~39 training points per list (FAISS's minimum).
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39)))


# Index kinds by name -> FAISS factory string for n vectors.
INDEX_KINDS: dict[str, Callable[[int], str]] = {
    "flat": lambda n: "Flat",
    "ivf": lambda n: f"IVF{_ivf_nlist(n)},SQ8",
    "hnsw": lambda n: "HNSW32,Flat",
}


def choose_factory(n: int, factory: str = "auto", flat_max: int = 200_000) -> str:
    """FAISS factory string for `n` vectors: a kind name, `auto`, or a raw factory string."""
    if factory == "auto":
        return INDEX_KINDS["flat" if n <= flat_max else "ivf"](n)
    if factory.lower() in INDEX_KINDS:
        return INDEX_KINDS[factory.lower()](n)
    if factory[:1].isupper():  # raw FAISS syntax ("IVF1024,PQ32", "HNSW64", ...)
        return factory
    raise unknown_choice("index kind (index.factory)", factory, [*INDEX_KINDS, "auto"])


def default_nprobe(nlist: int) -> int:
    """IVF lists probed per query: 1/16 of the lists (at least 8) reached recall@10 >= 0.95."""
    return int(min(nlist, max(8, nlist // 16)))


def build_index(vectors: np.ndarray, factory: str, seed: int = 0) -> faiss.Index:
    """Build and fill an inner-product index over (n, dim) float32 unit vectors."""
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"index.factory: FAISS cannot build '{factory}' for {dim}-dim vectors "
                        f"({str(e).strip().splitlines()[-1]}).") from None
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= 100_000 else vectors[rng.choice(n, 100_000, replace=False)]
        index.train(sample)
    for start in range(0, n, 65_536):
        index.add(vectors[start:start + 65_536])
    return index


def save_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def load_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read an index; memory-mapped (read-only) where the index type allows it."""
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            pass  # this index type cannot be mapped: read it into memory
    return faiss.read_index(str(path))


def _search_params(index: faiss.Index, nprobe: int | None, ef_search: int,
                   selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe or default_nprobe(ivf.nlist)
    elif "HNSW" in type(index).__name__:
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef_search
    elif selector is None:
        return None
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None,
           ef_search: int = 128, restrict_to: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k); ids are -1 where fewer than k results exist.

    `restrict_to`: only these ids may be returned (e.g. the passages of one topic).
    """
    selector = None
    if restrict_to is not None:
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(restrict_to, dtype=np.int64))
    params = _search_params(index, nprobe, ef_search, selector)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if params is None:
        return index.search(queries, k)
    return index.search(queries, k, params=params)
