"""Batch samplers: which pre-packed token blocks form each training batch.

Training data is packed into fixed-length token blocks, each from exactly one topic. A sampler
is an infinite, seeded stream of batches (int64 arrays of `batch_size` block indices):

- `uniform`: the baseline; an epoch-wise random permutation of all blocks.
- `community`: community-traversal sampling (research note "community traversal batch
  sampling"): a ROOT topic walks the topic graph; each batch comes from ROOT and `k` of its
  neighbours, so consecutive batches share a neighbourhood the way contributors to a project do.
- `stratified`: equal tokens per topic (every topic gets a slot in turn, whatever its size).
- `odm`: online data mixing (Albalak et al. 2023): an EXP3 bandit over topics whose reward is
  the training loss, so topics the model still finds hard are drawn more often. It learns from
  feedback: the training loop calls `observe(batch, per_block_losses)` after each forward pass
  on any sampler that has that method.
- `skillit`: Skill-It's online rule (Chen et al. 2023) with the topic graph as its skills graph:
  topics whose graph neighbourhood still has a high training loss are drawn more.
- `manifold`: community traversal on a graph rebuilt from the model being trained (its
  activations, or learned block vectors), `curriculum/manifold.py`; it reads the model through
  `bind`, which the training loop calls.

Resuming: a sampler's stream depends only on its arguments and seed. Re-create it with the same
arguments and call `skip(n)` to continue after the `n`-th batch; `batches_drawn` is the `n` to
store in a checkpoint. A sampler is its own iterator (`iter(s) is s`), so code holding only
`iter(s)` can still call `skip`. A sampler whose stream also depends on feedback (`odm`) has
`state_dict()` / `load_state_dict()` instead, which the checkpoint stores.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from pipeline.errors import unknown_choice
from pipeline.module_spec import Param, module


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


class _ByTopic:
    """Blocks grouped by topic once: the topic at position i (of `topics`, sorted) owns blocks
    `order[starts[i] : starts[i] + counts[i]]`; `position[b]` is block b's topic position."""

    def __init__(self, block_topics: np.ndarray) -> None:
        self.order = np.argsort(block_topics, kind="stable")
        self.topics, self.starts, self.counts = np.unique(block_topics[self.order], return_index=True,
                                                          return_counts=True)
        self.position = np.searchsorted(self.topics, block_topics)

    def blocks(self, i: int) -> np.ndarray:
        return self.order[self.starts[i]:self.starts[i] + self.counts[i]]


class BatchStream:
    """What every sampler shares: it is its own iterator (`iter(s) is s`, so code holding only
    `iter(s)` can still call `skip`), and `skip(n)` draws and drops `n` batches unless the
    sampler has a cheaper way."""

    def next_batch(self) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return self.next_batch()

    def skip(self, n_batches: int) -> None:
        """Advance by `n_batches` batches by drawing them."""
        for _ in range(n_batches):
            self.next_batch()


class UniformSampler(BatchStream):
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

    def skip(self, n_batches: int) -> None:
        """Advance by `n_batches` batches; costs one permutation per epoch crossed."""
        if self.n_blocks < self.batch_size:
            for _ in range(n_batches):  # replay the draws: the stream must match exactly
                self.next_batch()
            return
        self._advance(n_batches * self.batch_size, collect=False)
        self.batches_drawn += n_batches


class CommunitySampler(BatchStream):
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

        by = _ByTopic(block_topics)
        self.topics, self._order, self._starts, self._counts = by.topics, by.order, by.starts, by.counts
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


class StratifiedSampler(BatchStream):
    """Equal tokens per topic: batch slots go to the topics in turn, a fresh random topic order
    per cycle, so after every whole cycle each topic has had the same number of blocks (and, with
    full blocks, tokens) whatever its size. A topic's blocks come in a fresh random order each
    time they run out, so small topics repeat more often than large ones."""

    def __init__(self, block_topics: np.ndarray, batch_size: int, seed: int = 0) -> None:
        self._by = _ByTopic(_check(block_topics, batch_size))
        self.topics = self._by.topics
        self.batch_size = batch_size
        self.seed = seed
        self.batches_drawn = 0
        self._rng = np.random.default_rng(seed)
        self._cycle, self._cycle_pos = np.empty(0, dtype=np.int64), 0
        self._perms = [np.empty(0, dtype=np.int64) for _ in self.topics]
        self._pos = [0] * len(self.topics)

    def _next_block(self) -> int:
        if self._cycle_pos == len(self._cycle):
            self._cycle, self._cycle_pos = self._rng.permutation(len(self.topics)), 0
        i = int(self._cycle[self._cycle_pos])
        self._cycle_pos += 1
        if self._pos[i] == len(self._perms[i]):
            own = self._by.blocks(i)
            self._perms[i], self._pos[i] = own[self._rng.permutation(len(own))], 0
        self._pos[i] += 1
        return int(self._perms[i][self._pos[i] - 1])

    def next_batch(self) -> np.ndarray:
        """The next batch: (batch_size,) int64 block indices."""
        self.batches_drawn += 1
        return np.fromiter((self._next_block() for _ in range(self.batch_size)), dtype=np.int64,
                           count=self.batch_size)


class OdmSampler(BatchStream):
    """Online data mixing (Albalak et al. 2023, "Efficient Online Data Mixing for Language Model
    Pre-Training"), implemented from the paper's description with topics as its domains.

    An EXP3 bandit whose arms are the K topics. Before batch t the mixture is

        eps_t = min(1/K, sqrt(ln K / (K t)))
        pi_t  = (1 - K eps_t) * softmax(eps_{t-1} * R) + eps_t

    each slot of the batch draws a topic from pi_t and a uniformly random block of it, and after
    the forward pass `observe` turns the batch's per-block training losses into rewards: for each
    topic i in the batch, R_i <- smoothing * R_i + (1 - smoothing) * mean_loss_i / pi_t(i)
    (an importance-weighted moving average). A high loss means much left to learn, so the mixture
    leans towards it; the decaying eps_t keeps every topic in play.

    Resuming needs the rewards, which depend on the losses seen: `state_dict()` /
    `load_state_dict()` restore it exactly; `skip` only replays the draws (no feedback).
    """

    def __init__(self, block_topics: np.ndarray, batch_size: int, seed: int = 0,
                 smoothing: float = 0.9) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self._by = _ByTopic(_check(block_topics, batch_size))
        self.topics = self._by.topics
        self.batch_size = batch_size
        self.seed = seed
        self.smoothing = smoothing
        self.batches_drawn = 0
        self.rewards = np.zeros(len(self.topics))
        self._rng = np.random.default_rng(seed)
        self._last_mixture: np.ndarray | None = None

    def _exploration(self, t: int) -> float:
        k = len(self.topics)
        return min(1.0 / k, math.sqrt(math.log(k) / (k * max(t, 1)))) if k > 1 else 1.0

    def mixture(self) -> np.ndarray:
        """pi for the next batch: the probability of each topic (in `topics` order)."""
        t = self.batches_drawn + 1
        eps, eps_prev = self._exploration(t), self._exploration(t - 1)
        z = eps_prev * self.rewards
        w = np.exp(z - z.max())
        return (1.0 - len(self.topics) * eps) * w / w.sum() + eps

    def next_batch(self) -> np.ndarray:
        """The next batch: (batch_size,) int64 block indices drawn from the current mixture."""
        p = self._last_mixture = self.mixture()
        slots = self._rng.choice(len(self.topics), size=self.batch_size, p=p)
        offsets = (self._rng.random(self.batch_size) * self._by.counts[slots]).astype(np.int64)
        self.batches_drawn += 1
        return self._by.order[self._by.starts[slots] + offsets].astype(np.int64, copy=False)

    def observe(self, batch: np.ndarray, losses: np.ndarray) -> None:
        """Rewards from the per-block training losses (nats/token) of the batch just drawn."""
        p = self._last_mixture if self._last_mixture is not None else self.mixture()
        where = self._by.position[np.asarray(batch)]
        losses = np.asarray(losses, dtype=float)
        for i in np.unique(where):
            gain = losses[where == i].mean() / p[i]
            self.rewards[i] = self.smoothing * self.rewards[i] + (1.0 - self.smoothing) * gain

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "rewards": self.rewards.tolist(),
                "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.rewards = np.asarray(state["rewards"], dtype=float)
        self.batches_drawn = int(state["batches_drawn"])
        self._last_mixture = None


class SkillItSampler(BatchStream):
    """Skill-It's online rule (Chen et al. 2023, "Skill-it! A data-driven skills framework for
    understanding and training language models"; HazyResearch/skill-it), implemented from the
    paper's Algorithm 1 with topics as skills and the topic graph as the skills graph A.

    Training runs in rounds of `round_batches` batches. Before round t the mixture is

        p_t(i)  proportional to  exp(eta * sum over the last `window` rounds of sum_j A_ij * L_j)

    where L_j is topic j's mean training loss (nats/token) in that round, fed by `observe` like
    `odm`'s (a topic not drawn in a round keeps its last loss; the first round, before any
    loss, is uniform over topics). A = the adjacency with self-loops, rows normalised to sum 1:
    Skill-It's graphs have a handful of skills; on a topic graph whose degrees vary, raw row
    sums would make a topic's degree, not its neighbours' losses, decide its weight. A topic
    whose neighbourhood still has much to learn is drawn more. Each slot of a batch draws a topic
    from p_t and a uniformly random block of it. `state_dict()` / `load_state_dict()` resume it.
    """

    def __init__(self, block_topics: np.ndarray, batch_size: int, adjacency: dict[int, list[int]] | None,
                 seed: int = 0, eta: float = 0.5, window: int = 3, round_batches: int = 25) -> None:
        if adjacency is None:
            raise ValueError("the skillit sampler needs the topic graph's adjacency (its skills graph)")
        if eta < 0 or window < 1 or round_batches < 1:
            raise ValueError(f"need eta >= 0, window >= 1, round_batches >= 1; got {eta}, {window}, {round_batches}")
        self._by = _ByTopic(_check(block_topics, batch_size))
        self.topics = self._by.topics
        index = {int(t): i for i, t in enumerate(self.topics)}
        a = np.eye(len(self.topics))
        for t, ns in adjacency.items():
            for n in ns:
                if int(t) in index and int(n) in index:
                    a[index[int(t)], index[int(n)]] = a[index[int(n)], index[int(t)]] = 1.0
        self.graph = a / a.sum(1, keepdims=True)
        self.batch_size, self.seed = batch_size, seed
        self.eta, self.window, self.round_batches = eta, window, round_batches
        self.batches_drawn = 0
        self.last_loss = np.full(len(self.topics), np.nan)  # per topic, latest round it was seen
        self.history: list[list[float]] = []  # A @ L per finished round (the last `window` kept)
        self._round_sum = np.zeros(len(self.topics))
        self._round_n = np.zeros(len(self.topics))
        self._rng = np.random.default_rng(seed)

    def mixture(self) -> np.ndarray:
        """p for the current round (in `topics` order)."""
        if not self.history:
            return np.full(len(self.topics), 1.0 / len(self.topics))
        z = self.eta * np.sum(self.history[-self.window:], axis=0)
        w = np.exp(z - z.max())
        return w / w.sum()

    def _end_round(self) -> None:
        seen = self._round_n > 0
        self.last_loss[seen] = self._round_sum[seen] / self._round_n[seen]
        # a topic never drawn yet counts as the hardest seen: nothing says it is learned
        loss = np.where(np.isnan(self.last_loss), np.nanmax(self.last_loss), self.last_loss)
        self.history = [*self.history, (self.graph @ loss).tolist()][-self.window:]
        self._round_sum[:], self._round_n[:] = 0.0, 0.0

    def next_batch(self) -> np.ndarray:
        """The next batch: (batch_size,) int64 block indices drawn from the round's mixture."""
        if self.batches_drawn and self.batches_drawn % self.round_batches == 0 and self._round_n.any():
            self._end_round()
        slots = self._rng.choice(len(self.topics), size=self.batch_size, p=self.mixture())
        offsets = (self._rng.random(self.batch_size) * self._by.counts[slots]).astype(np.int64)
        self.batches_drawn += 1
        return self._by.order[self._by.starts[slots] + offsets].astype(np.int64, copy=False)

    def observe(self, batch: np.ndarray, losses: np.ndarray) -> None:
        """Accumulate the per-block training losses (nats/token) of the batch just drawn."""
        where = self._by.position[np.asarray(batch)]
        np.add.at(self._round_sum, where, np.asarray(losses, dtype=float))
        np.add.at(self._round_n, where, 1.0)

    def state_dict(self) -> dict:
        return {"rng": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn,
                "last_loss": [None if np.isnan(x) else float(x) for x in self.last_loss], "history": self.history,
                "round_sum": self._round_sum.tolist(), "round_n": self._round_n.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.batches_drawn = int(state["batches_drawn"])
        self.last_loss = np.array([np.nan if x is None else x for x in state["last_loss"]], dtype=float)
        self.history = [list(h) for h in state["history"]]
        self._round_sum = np.asarray(state["round_sum"], dtype=float)
        self._round_n = np.asarray(state["round_n"], dtype=float)


SamplerFactory = Callable[[np.ndarray, int, dict[int, list[int]] | None, int, int], BlockSampler]


def _community(block_topics: np.ndarray, batch_size: int, adjacency: dict[int, list[int]] | None,
               k: int, seed: int) -> CommunitySampler:
    if adjacency is None:
        raise ValueError("the community sampler needs the topic graph's adjacency")
    return CommunitySampler(block_topics, batch_size, adjacency, k=k, seed=seed)


def _manifold(block_topics: np.ndarray, batch_size: int, adjacency: dict[int, list[int]] | None, k: int,
              seed: int, manifold: dict | None = None) -> BlockSampler:
    from curriculum.manifold import ManifoldSampler, ManifoldSettings

    m = manifold or {}
    return ManifoldSampler(block_topics, batch_size, m.get("settings") or ManifoldSettings(),
                           block_vectors=m.get("block_vectors"), probe=m.get("probe"), seed=seed)


SAMPLERS: dict[str, SamplerFactory] = {
    "uniform": lambda block_topics, batch_size, adjacency, k, seed: UniformSampler(
        block_topics, batch_size, seed=seed),
    "community": _community,
    "stratified": lambda block_topics, batch_size, adjacency, k, seed: StratifiedSampler(
        block_topics, batch_size, seed=seed),
    "odm": lambda block_topics, batch_size, adjacency, k, seed: OdmSampler(block_topics, batch_size, seed=seed),
    "skillit": lambda block_topics, batch_size, adjacency, k, seed: SkillItSampler(
        block_topics, batch_size, adjacency, seed=seed),
    "manifold": _manifold,
}

# The catalogue's view of the samplers (curriculum/modules.py): tags and sweepable keys.
SAMPLER_MODULES = (
    module("sampler", "uniform", "shuffled blocks, every block once per pass"),
    module("sampler", "community", "community traversal: a root topic and its graph neighbours per batch",
           (Param("train.community_k", "int", 2, 0, 6),), needs=("topic_graph",)),
    module("sampler", "stratified", "equal tokens per topic", needs=("topics",)),
    module("sampler", "odm", "online data mixing: an EXP3 bandit over topics rewarded by training loss",
           needs=("topics", "row_losses")),
    module("sampler", "skillit", "Skill-It: topics whose graph neighbourhood has the highest loss drawn more",
           needs=("topic_graph", "row_losses")),
    module("sampler", "manifold", "community traversal on a graph rebuilt from the model's activations or learned "
           "block vectors", (Param("manifold.clusters", "int", 32, 8, 64),
                             Param("manifold.rebuild_every", "int", 100, 25, 200, log=True)),
           needs=("row_losses",)),
)


def make_sampler(name: str, block_topics: np.ndarray, batch_size: int,
                 adjacency: dict[int, list[int]] | None = None, k: int = 2,
                 seed: int = 0, manifold: dict | None = None) -> BlockSampler:
    """Build the sampler registered as `name`; `UserError` with a suggestion for unknown names.
    `manifold`: the manifold sampler's `settings`, `block_vectors` and `probe` (others ignore it)."""
    if name not in SAMPLERS:
        raise unknown_choice("sampler (train.sampler)", name, SAMPLERS)
    if name == "manifold":
        return _manifold(block_topics, batch_size, adjacency, k, seed, manifold)
    return SAMPLERS[name](block_topics, batch_size, adjacency, k, seed)
