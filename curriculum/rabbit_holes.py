"""Rabbit holes: cheap excursions that teach the curiosity model before it commits a round.

The research note asks for the curiosity function to be learned "by collecting generative
rabbit hole explorations, and/or wikipedia rabbit hole explorations". Two kinds here:

- **Walks** (the "wikipedia" kind): a random walk over the topic graph from an explored topic;
  the last unexplored topic it reaches gets a short probe training whose realised learning
  progress becomes one more (features -> progress) example for the curiosity model.
- **Generative**: the model continues a prompt drawn from an explored topic; the continuation is
  embedded and retrieved, and the unexplored topics it lands in become candidates for the round
  even when the topic graph does not connect them to what is explored.

This module holds the graph and bookkeeping parts; the model parts (probe training,
generation) are in `pipeline/rabbit_holes.py`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np


def random_walk(adjacency: dict[int, list[int]], start: int, length: int, rng: np.random.Generator) -> list[int]:
    """`start` and up to `length` further topics, each a uniform neighbour of the one before.
    Stops early at a topic with no neighbours."""
    path = [start]
    for _ in range(length):
        neighbours = adjacency.get(path[-1], [])
        if not neighbours:
            break
        path.append(int(neighbours[rng.integers(len(neighbours))]))
    return path


def walk_target(path: list[int], explored: set[int] | Iterable[int]) -> int | None:
    """The last unexplored topic on a walk (the deepest point of the rabbit hole), or None."""
    explored = set(explored)
    unexplored = [t for t in path if t not in explored]
    return unexplored[-1] if unexplored else None


def landed_topics(hit_topics: Iterable[int], explored: set[int] | Iterable[int], limit: int) -> list[int]:
    """Unexplored topics among retrieval hits, most hits first (ties by topic id), at most `limit`."""
    explored = set(explored)
    counts = Counter(int(t) for t in hit_topics if int(t) not in explored)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]
