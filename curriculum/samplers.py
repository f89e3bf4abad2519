"""Batch samplers: which pre-packed token blocks form each training batch.

Training data is packed into fixed-length token blocks, each from exactly one topic. A sampler
is an infinite, seeded stream of batches (int64 arrays of `batch_size` block indices):

- `uniform`: the baseline; an epoch-wise random permutation of all blocks.
- `community`: community-traversal sampling (research note "community traversal batch
  sampling"): a ROOT topic walks the topic graph; each batch comes from ROOT and `k` of its
  neighbours, so consecutive batches share a neighbourhood the way contributors to a project do.

Resuming: a sampler's stream depends only on its arguments and seed. Re-create it with the same
arguments and call `skip(n)` to continue after the `n`-th batch; `batches_drawn` is the `n` to
store in a checkpoint. A sampler is its own iterator (`iter(s) is s`), so code holding only
`iter(s)` can still call `skip`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from pipeline.errors import unknown_choice


class BlockSampler(Protocol):
    """An infinite, seeded stream of batches; `iter(sampler)` is the sampler itself."""

    batches_drawn: int

    def __iter__(self) -> Iterator[np.ndarray]:
        """Infinite stream of int64 arrays of `batch_size` block indices."""
        ...

    def skip(self, n_batches: int) -> None:
        """Advance the stream by `n_batches` as if they had been drawn."""
        ...


def _check(block_topics: np.ndarray, batch_size: int) -> np.ndarray:
    block_topics = np.asarray(block_topics)
    if block_topics.ndim != 1 or len(block_topics) == 0:
        raise ValueError(f"block_topics must be a non-empty 1-D array, got shape {block_topics.shape}")
    if not np.issubdtype(block_topics.dtype, np.integer):
        raise ValueError(f"block_topics must hold integer topic ids, got dtype {block_topics.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return block_topics.astype(np.int64, copy=False)


class UniformSampler:
    """Every block once per epoch in a fresh random order; batches are consecutive slices.

    The stream is the concatenation of per-epoch permutations, so the first `n_blocks` indices
    cover every block exactly once (a batch that straddles two epochs may repeat a block). With
    fewer blocks than `batch_size`, each batch is drawn with replacement.
    """

    def __init__(self, block_topics: np.ndarray, batch_size: int, seed: int = 0) -> None:
        self.n_blocks = len(_check(block_topics, batch_size))
        self.batch_size = batch_size
        self.seed = seed
        self.batches_drawn = 0
        self._rng = np.random.default_rng(seed)
        self._perm = np.empty(0, dtype=np.int64)
        self._pos = 0  # next index into self._perm; == len(_perm) means "draw a new epoch"

    @property
    def epoch(self) -> int:
        """Completed passes over all blocks."""
        return self.batches_drawn * self.batch_size // self.n_blocks

    def _advance(self, count: int, collect: bool) -> list[np.ndarray]:
        parts = []
        while count:
            if self._pos == len(self._perm):
                self._perm, self._pos = self._rng.permutation(self.n_blocks), 0
            take = min(count, len(self._perm) - self._pos)
            if collect:
                parts.append(self._perm[self._pos:self._pos + take])
            self._pos += take
            count -= take
        return parts

    def next_batch(self) -> np.ndarray:
        """The next batch: (batch_size,) int64 block indices."""
        self.batches_drawn += 1
        if self.n_blocks < self.batch_size:
            return self._rng.integers(0, self.n_blocks, self.batch_size, dtype=np.int64)
        parts = self._advance(self.batch_size, collect=True)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self  # its own iterator, so `iter(sampler).skip(n)` works for resuming

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Advance by `n_batches` batches; costs one permutation per epoch crossed."""
        if self.n_blocks < self.batch_size:
            for _ in range(n_batches):  # replay the draws: the stream must match exactly
                self.next_batch()
            return
        self._advance(n_batches * self.batch_size, collect=False)
        self.batches_drawn += n_batches


class CommunitySampler:
    """Community traversal: batches come from a ROOT topic and `k` of its neighbours; ROOT walks the graph.

    Per batch: ROOT moves to a uniformly random neighbour (the first ROOT is a random topic);
    `k` distinct neighbours of ROOT are picked (all of them if it has fewer); the blocks of those
    topics and ROOT's form the batch community, from which `batch_size` blocks are drawn (without
    replacement when the community has enough, else with). Only topics that have blocks count as
    nodes. A ROOT with no neighbours jumps to a uniformly random topic instead; `jumps` counts
    those moves. `history` keeps (root, sorted community topics) for the last `history_size` batches.
    """

    def __init__(self, block_topics: np.ndarray, batch_size: int,
                 adjacency: dict[int, list[int]], k: int = 2, seed: int = 0,
                 history_size: int = 10_000) -> None:
        block_topics = _check(block_topics, batch_size)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.n_blocks = len(block_topics)
        self.batch_size = batch_size
        self.k = k
        self.seed = seed
        self.batches_drawn = 0
        self.jumps = 0
        self.history: deque[tuple[int, tuple[int, ...]]] = deque(maxlen=history_size)
        self._rng = np.random.default_rng(seed)

        # Blocks grouped by topic once: topic t (by position i in self.topics) owns
        # self._order[self._starts[i] : self._starts[i] + self._counts[i]].
        self._order = np.argsort(block_topics, kind="stable")
        self.topics, self._starts, self._counts = np.unique(
            block_topics[self._order], return_index=True, return_counts=True)
        pos = {int(t): i for i, t in enumerate(self.topics)}
        # Neighbours as positions, restricted to topics that have blocks; keys may be str (JSON).
        self._neighbours = [np.empty(0, dtype=np.int64) for _ in self.topics]
        for t, nbrs in adjacency.items():
            i = pos.get(int(t))
            if i is not None:
                self._neighbours[i] = np.array(
                    sorted({pos[int(n)] for n in nbrs if int(n) in pos} - {i}), dtype=np.int64)
        self._root: int | None = None  # position of ROOT in self.topics

    def _move_root(self) -> int:
        if self._root is None:
            return int(self._rng.integers(len(self.topics)))
        nbrs = self._neighbours[self._root]
        if len(nbrs) == 0:
            self.jumps += 1
            return int(self._rng.integers(len(self.topics)))
        return int(nbrs[self._rng.integers(len(nbrs))])

    def next_batch(self) -> np.ndarray:
        """The next batch: (batch_size,) int64 block indices, all from the batch community."""
        rng = self._rng
        root = self._root = self._move_root()
        nbrs = self._neighbours[root]
        m = min(self.k, len(nbrs))
        # m distinct neighbours; permutation of the (small) degree is cheaper than rng.choice
        picked = nbrs[rng.permutation(len(nbrs))[:m]] if m else nbrs[:0]
        community = np.concatenate(([root], picked))  # (m + 1,) topic positions

        # Draw positions in the community's concatenated block lists, then map each position
        # to (topic, offset) with the cumulative counts: O(batch_size + k), no per-block loop.
        counts = self._counts[community]
        ends = np.cumsum(counts)
        total = int(ends[-1])
        if total >= self.batch_size:
            flat = rng.choice(total, size=self.batch_size, replace=False)
        else:
            flat = rng.integers(0, total, self.batch_size)
        which = np.searchsorted(ends, flat, side="right")
        offsets = flat - (ends[which] - counts[which])
        batch = self._order[self._starts[community][which] + offsets]

        self.batches_drawn += 1
        self.history.append((int(self.topics[root]), tuple(sorted(self.topics[community].tolist()))))
        return batch.astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self  # its own iterator, so `iter(sampler).skip(n)` works for resuming

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Advance by `n_batches` batches by drawing them (tens of microseconds each)."""
        for _ in range(n_batches):
            self.next_batch()


SamplerFactory = Callable[[np.ndarray, int, dict[int, list[int]] | None, int, int], BlockSampler]


def _community(block_topics: np.ndarray, batch_size: int, adjacency: dict[int, list[int]] | None,
               k: int, seed: int) -> CommunitySampler:
    if adjacency is None:
        raise ValueError("the community sampler needs the topic graph's adjacency")
    return CommunitySampler(block_topics, batch_size, adjacency, k=k, seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {
    "uniform": lambda block_topics, batch_size, adjacency, k, seed: UniformSampler(
        block_topics, batch_size, seed=seed),
    "community": _community,
}


def make_sampler(name: str, block_topics: np.ndarray, batch_size: int,
                 adjacency: dict[int, list[int]] | None = None, k: int = 2,
                 seed: int = 0) -> BlockSampler:
    """Build the sampler registered as `name`; `UserError` with a suggestion for unknown names."""
    if name not in SAMPLERS:
        raise unknown_choice("sampler (train.sampler)", name, SAMPLERS)
    return SAMPLERS[name](block_topics, batch_size, adjacency, k, seed)
