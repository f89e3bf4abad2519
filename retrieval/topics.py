"""Topics: spherical k-means over passage embeddings (optionally a title's passages together),
c-TF-IDF keyword labels, held-out split."""

from __future__ import annotations

import math
import re
from collections import Counter

import faiss
import numpy as np

# Words that carry no topic; WikiText's placeholders (<unk>, @-@) are dropped by the regex.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they this
those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves one two three first second new later many may much
became become however although though within without since among upon unk including included
us well would made make also several around used use known
""".split())
_WORD = re.compile(r"[a-z][a-z'\-]{2,}")


def auto_num_topics(n_passages: int) -> int:
    """About sqrt(n / 4) topics (~2% of passages per topic at 10k), in [2, 1024]."""
    return int(min(1024, max(2, round(math.sqrt(n_passages / 4)))))


def spherical_kmeans(vectors: np.ndarray, k: int, niter: int = 25,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors: (centroids (k', dim) unit, assignments (n,)); empty clusters dropped."""
    n, dim = vectors.shape
    k = min(k, n)
    km = faiss.Kmeans(dim, k, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=256, min_points_per_centroid=1)
    km.train(vectors)
    _, assign = km.index.search(vectors, 1)
    assign = assign[:, 0]
    used = np.unique(assign)  # relabel to 0..k'-1 in case a centroid attracted nothing
    remap = np.full(k, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    centroids = km.centroids[used].astype(np.float32)
    # Recompute centroids as normalised means of their members: exact for the final assignment.
    sums = np.zeros_like(centroids)
    np.add.at(sums, remap[assign], vectors)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32), remap[assign].astype(np.int64)


def group_assignments(vectors: np.ndarray, centroids: np.ndarray, keys: list) -> tuple[np.ndarray, np.ndarray]:
    """Passages with the same key (a title: one entity, one article) assigned together, to the
    topic whose centroid is nearest their mean embedding; centroids recomputed as the normalised
    means of their new members, topics left empty dropped. Returns (centroids, assignments)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    assign = np.empty(len(vectors), dtype=np.int64)
    for members in groups.values():
        mean = vectors[members].mean(axis=0)
        assign[members] = int(np.argmax(centroids @ mean))
    used = np.unique(assign)
    remap = np.full(len(centroids), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    assign = remap[assign]
    sums = np.zeros((len(used), vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, assign, vectors)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32), assign


def tokenize_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def ctfidf_keywords(texts: list[str], assignments: np.ndarray, n_topics: int,
                    top_n: int = 6) -> list[list[str]]:
    """Distinctive words per topic by class-based TF-IDF (BERTopic's c-TF-IDF).

    weight(t, c) = tf(t, c) / |c| * log(1 + A / tf(t)), where |c| is the number of words in
    topic c, A the average words per topic and tf(t) the count of t over all topics.
    """
    per_topic = [Counter() for _ in range(n_topics)]
    for text, topic in zip(texts, assignments):
        per_topic[int(topic)].update(tokenize_words(text))
    total = Counter()
    for c in per_topic:
        total.update(c)
    avg_words = sum(total.values()) / max(1, n_topics)
    out = []
    for counts in per_topic:
        size = max(1, sum(counts.values()))
        scored = sorted(counts.items(),
                        key=lambda kv: (-(kv[1] / size) * math.log(1 + avg_words / total[kv[0]]), kv[0]))
        out.append([w for w, _ in scored[:top_n]])
    return out


def validation_mask(assignments: np.ndarray, heldout: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean (n,): `fraction` of each topic's passages from those not held out, leaving at
    least one to train on (a topic with fewer than 3 such passages gives none)."""
    rng = np.random.default_rng([seed, 17])
    mask = np.zeros(len(assignments), dtype=bool)
    if fraction <= 0:
        return mask
    for topic in np.unique(assignments):
        members = np.flatnonzero((assignments == topic) & ~heldout)
        if len(members) < 3:
            continue
        n_val = min(len(members) - 1, max(1, round(fraction * np.sum(assignments == topic))))
        mask[rng.choice(members, n_val, replace=False)] = True
    return mask


def heldout_mask(assignments: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean (n,): a fixed `fraction` of each topic's passages (>= 1 when the topic has >= 2)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(assignments), dtype=bool)
    for topic in np.unique(assignments):
        members = np.flatnonzero(assignments == topic)
        if len(members) < 2:
            continue
        n_held = min(len(members) - 1, max(1, round(fraction * len(members))))
        mask[rng.choice(members, n_held, replace=False)] = True
    return mask
