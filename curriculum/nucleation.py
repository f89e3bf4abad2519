"""Choosing the nucleus: map seed concepts to topics by retrieval votes, or take the most
central topics of the topic graph (PageRank) when there is no seed graph."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np

from retrieval.graph import TopicGraph

# (texts, k) -> topic id of each retrieved passage, per text
SearchTopics = Callable[[list[str], int], list[list[int]]]


def concept_votes(texts: list[str], search_topics: SearchTopics, hits: int) -> dict[int, float]:
    """Fraction of the retrieved passages (over all of a concept's texts) that fall in each topic."""
    votes: Counter[int] = Counter()
    for topics in search_topics(texts, hits):
        votes.update(topics)
    total = sum(votes.values()) or 1
    return {t: n / total for t, n in votes.most_common()}


def map_concepts(concept_texts: dict[str, list[str]], search_topics: SearchTopics, hits: int,
                 threshold: float) -> tuple[dict[str, list[int]], dict[str, dict[int, float]]]:
    """({concept: mapped topics}, {concept: vote fractions}); a topic maps when its share >= threshold."""
    mapping, votes = {}, {}
    for concept, texts in concept_texts.items():
        votes[concept] = concept_votes(texts, search_topics, hits)
        mapping[concept] = sorted(t for t, share in votes[concept].items() if share >= threshold)
    return mapping, votes


def knowledge_edges(relations: list[tuple[str, str, str]], mapping: dict[str, list[int]]) -> list[dict]:
    """Topic-graph edges for the seed relations: every mapped topic of the source to every mapped
    topic of the target (self-loops dropped, duplicates merged with their relations listed)."""
    edges: dict[tuple[int, int], dict] = {}
    for source, relation, target in relations:
        for a in mapping.get(source, []):
            for b in mapping.get(target, []):
                if a == b:
                    continue
                key = (min(a, b), max(a, b))
                edge = edges.setdefault(key, {"source": key[0], "target": key[1], "weight": 1.0,
                                              "kind": "knowledge", "relations": []})
                edge["relations"].append(f"{source} {relation} {target}")
    return [edges[k] for k in sorted(edges)]


def pagerank(graph: TopicGraph, damping: float = 0.85, iters: int = 100) -> np.ndarray:
    """Weighted PageRank over the undirected topic graph (power iteration)."""
    n = len(graph.nodes)
    w = np.zeros((n, n))
    for e in graph.edges:
        w[e["source"], e["target"]] += e["weight"]
        w[e["target"], e["source"]] += e["weight"]
    out = w.sum(axis=1, keepdims=True)
    trans = np.divide(w, out, out=np.full_like(w, 1.0 / n), where=out > 0)  # dangling -> uniform
    rank = np.full(n, 1.0 / n)
    for _ in range(iters):
        rank = (1 - damping) / n + damping * rank @ trans
    return rank / rank.sum()


def central_topics(graph: TopicGraph, fraction: float) -> list[int]:
    """The `fraction` most central topics (at least one), by PageRank."""
    rank = pagerank(graph)
    n = max(1, math.ceil(fraction * len(rank)))
    return sorted(int(t) for t in np.argsort(-rank, kind="stable")[:n])
