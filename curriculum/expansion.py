"""Neighbourhood expansion: from a proposed topic to the passages its adapter trains on.

A proposal is a topic plus `k` sampled graph neighbours. Its passages are the topics' own
training passages plus what retrieval finds around the topics' centroids and keyword queries
(passages of other topics that are about the same thing), deduplicated, never held-out, and
capped at `max_passages` by closeness to the neighbourhood's centroids.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (query vectors (q, dim), k) -> passage ids (q, k), -1 where missing
SearchIds = Callable[[np.ndarray, int], np.ndarray]
Encode = Callable[[list[str]], np.ndarray]


def propose_topics(topic: int, adjacency: dict[int, list[int]], k: int, rng: np.random.Generator) -> list[int]:
    """`topic` and up to `k` of its graph neighbours, sampled without replacement."""
    neighbours = [n for n in adjacency.get(topic, []) if n != topic]
    picked = rng.choice(neighbours, size=min(k, len(neighbours)), replace=False).tolist() if neighbours else []
    return sorted({topic, *map(int, picked)})


def expand_passages(topics: list[int], topic_of: np.ndarray, heldout: np.ndarray, vectors: np.ndarray,
                    centroids: np.ndarray, keywords: dict[int, list[str]], search: SearchIds, encode: Encode,
                    hits_per_query: int = 32, max_passages: int = 2000) -> list[int]:
    """Training passage ids of the neighbourhood, sorted (see module docstring)."""
    own = np.flatnonzero(np.isin(topic_of, topics))
    queries = [centroids[topics]]
    texts = [" ".join(keywords[t]) for t in topics if keywords.get(t)]
    if texts:
        queries.append(encode(texts))
    found = search(np.vstack(queries).astype(np.float32), hits_per_query).ravel()
    candidates = np.unique(np.concatenate([own, found[found >= 0]]))
    candidates = candidates[~heldout[candidates]]  # the held-out split is never trained on
    if len(candidates) > max_passages:
        closeness = (vectors[candidates] @ centroids[topics].T).max(axis=1)
        candidates = candidates[np.argsort(-closeness, kind="stable")[:max_passages]]
    return sorted(int(c) for c in candidates)
