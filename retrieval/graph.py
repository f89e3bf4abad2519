"""The topic graph: nodes are topics, edges join related topics.

Builders (a small registry): `knn` joins each topic to its `k` most similar centroids with
cosine-similarity weights; `erdos_renyi` joins each pair with probability `p` (weight 1), the
random graph the community-traversal research note starts from. Later stages add `knowledge`
edges from the seed knowledge graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pipeline.module_spec import Param, module

Edge = tuple[int, int, float]


def knn_edges(centroids: np.ndarray, k: int, p: float, seed: int) -> list[Edge]:
    sims = centroids @ centroids.T  # (topics, topics) cosine
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(centroids) - 1)
    edges: dict[tuple[int, int], float] = {}
    for i in range(len(centroids)):
        for j in np.argsort(-sims[i])[:k]:
            a, b = sorted((i, int(j)))
            edges[(a, b)] = float(sims[a, b])
    return [(a, b, w) for (a, b), w in sorted(edges.items())]


def erdos_renyi_edges(centroids: np.ndarray, k: int, p: float, seed: int) -> list[Edge]:
    rng = np.random.default_rng(seed)
    n = len(centroids)
    return [(a, b, 1.0) for a in range(n) for b in range(a + 1, n) if rng.random() < p]


GRAPH_BUILDERS: dict[str, Callable[[np.ndarray, int, float, int], list[Edge]]] = {
    "knn": knn_edges,
    "erdos_renyi": erdos_renyi_edges,
}

GRAPH_MODULES = (
    module("graph", "knn", "each topic joined to its k most similar centroids, weighted",
           (Param("graph.k", "int", 4, 1, 12),), provides=("topic_graph", "similarity_edges"), needs=("embeddings",)),
    module("graph", "erdos_renyi", "random edges with probability p (a control)",
           (Param("graph.p", "float", 0.1, 0.02, 0.5, log=True),), provides=("topic_graph",)),
)
EDGE_KIND = {"knn": "similarity", "erdos_renyi": "random"}


@dataclass
class TopicGraph:
    """Undirected weighted graph over topic ids; edges carry a kind (similarity, random, knowledge)."""

    nodes: list[int]
    edges: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, kind: str, centroids: np.ndarray, k: int = 4, p: float = 0.1,
              seed: int = 0) -> "TopicGraph":
        edges = GRAPH_BUILDERS[kind](centroids, k, p, seed)
        return cls(nodes=list(range(len(centroids))),
                   edges=[{"source": a, "target": b, "weight": round(w, 6), "kind": EDGE_KIND[kind]}
                          for a, b, w in edges])

    def neighbors(self, topic: int) -> list[int]:
        out = {e["target"] if e["source"] == topic else e["source"]
               for e in self.edges if topic in (e["source"], e["target"])}
        return sorted(out)

    def adjacency(self) -> dict[int, list[int]]:
        adj: dict[int, set[int]] = {n: set() for n in self.nodes}
        for e in self.edges:
            adj[e["source"]].add(e["target"])
            adj[e["target"]].add(e["source"])
        return {n: sorted(v) for n, v in adj.items()}

    def to_json(self) -> dict:
        return {"nodes": self.nodes, "edges": self.edges}

    @classmethod
    def from_json(cls, data: dict) -> "TopicGraph":
        return cls(nodes=list(data["nodes"]), edges=list(data["edges"]))
