"""Learned manifolds: batch communities in a space that training itself shapes.

The `community` sampler walks the topic graph `index` made once from the embedder's vectors. The
`manifold` sampler (research note "community traversal batch sampling" and its discussion)
walks a graph that is rebuilt from the model being trained:

- **space** (what the graph is built over), every `rebuild_every` batches:
  - `activation`: each block's mean-pooled hidden state at `layers` (the model's own view of
    it). One layer gives one graph; several give one graph per layer, used in turn batch by batch.
  - `learned`: a learnable vector per block, initialised from its embedding (the embedder's
    vectors of the passages it holds), moved by an outer update (`update_vectors`) that pulls a
    block's vector towards the blocks whose gradients align with its own and pushes it from those
    whose gradients oppose it, anchored to where it started. Gradients are last-layer gradient
    features (`curriculum/block_signals.py`): first-order, one forward pass, no backward.
  - `random`: the control: each block a fixed random point, so the clusters are a random
    partition of the blocks, built once, and the model is never read. With `grow` it is a
    growing window over random groups of blocks.
- The blocks are clustered in that space (FAISS spherical k-means, warm-started from the last
  build so that a cluster keeps its identity), and each cluster is joined to its `k` nearest
  clusters (FAISS exact inner-product search): the manifold graph. A batch is drawn from a ROOT
  cluster and `community_k` of its neighbours, as in `community`.
- **traversal** (how ROOT moves):
  - `walk`: to a uniformly random neighbour (the community sampler's rule);
  - `aligned`: to a neighbour (or itself) with probability rising with the alignment of its
    blocks' gradients with the gradient on a probe set (blocks packed from the validation
    split, never the held-out one): the first-order view of learning-to-reweight (LESS, GREATS);
  - `bandit`: Exp3.S over the clusters (Graves et al. 2017), rewarded per batch by the
    learning progress on the drawn community (the drop of its training loss since its last
    visit) and, at each rebuild, penalised by the forgetting on the communities visited before
    (the rise of their loss between the last two rebuilds).
  - `grow`: no root and no narrow community: an open region of the manifold that starts at
    one cluster and grows along it, the closed cluster nearest (centroid cosine) to an open one
    first, until every cluster is open after `grow_fraction` of the run's `total_batches`;
    each batch is drawn uniformly from the open region's blocks (the nucleus arm's expanding
    window, on the model's own graph instead of the topic graph). The runs of RESULTS.md
    section 11 found that the narrower and more topical a batch, the worse; this keeps batches
    mixed and lets the manifold decide only the order in which the corpus opens. Once all is
    open it stops rebuilding (the measuring is the sampler's cost). `grow_order: random` opens
    the same clusters on the same schedule in a random order: the control that says what the
    manifold's order adds to the growing window itself.

The sampler reads the model through `attach` (the training loop calls it) and the per-block
training losses through `observe`; `state_dict` holds everything its stream depends on (vectors,
clusters, bandit, RNG), so a resumed run continues exactly. Arrays in the state are numpy arrays,
which the checkpoint stores as safetensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from curriculum.samplers import BatchStream, _check

SPACES = ("activation", "learned", "random")
RANDOM_DIM = 32  # the random space's dimension: k-means on random points cuts a random partition
TRAVERSALS = ("walk", "aligned", "bandit", "grow")
GROW_ORDERS = ("nearest", "random")

# (indices of blocks) -> {"acts": {layer: (n, d)}, "grads": (n, f), "losses": (n,)}; see block_signals
Features = Callable[[np.ndarray, bool], dict]


@dataclass
class ManifoldSettings:
    """Plain settings of the manifold sampler (the `manifold` config section)."""

    space: str = "activation"
    traversal: str = "walk"
    layers: tuple[int, ...] = (-1,)
    clusters: int = 32
    k: int = 4
    community_k: int = 2
    rebuild_every: int = 100
    refresh: float = 0.5
    prefix_tokens: int = 64
    vector_lr: float = 0.5
    vector_anchor: float = 0.2
    update_blocks: int = 2048
    temperature: float = 0.5
    bandit_lr: float = 0.1
    bandit_explore: float = 0.1
    bandit_share: float = 0.01
    forget_weight: float = 1.0
    grow_fraction: float = 0.5  # grow: the share of the run over which the open region reaches everything
    grow_order: str = "nearest"  # grow: the next cluster to open: nearest to the open region, or random (the control)
    total_batches: int | None = None  # grow: the run's batches (the training loop's steps x accumulation)

    def __post_init__(self):
        if self.space not in SPACES or self.traversal not in TRAVERSALS:
            raise ValueError(f"space must be one of {SPACES} and traversal one of {TRAVERSALS}")
        if len(self.layers) > 1 and (self.space != "activation" or self.traversal in ("bandit", "grow")):
            raise ValueError("several layers (one graph per layer) need space 'activation' and a walk")
        if self.space == "random" and self.traversal not in ("walk", "grow"):
            raise ValueError(f"space 'random' (a control: blocks at fixed random points, the model never read) "
                             f"takes a walk or grow traversal, not {self.traversal!r}")
        if not 0.0 < self.grow_fraction <= 1.0:
            raise ValueError(f"grow_fraction must be in (0, 1], got {self.grow_fraction}")
        if self.grow_order not in GROW_ORDERS:
            raise ValueError(f"grow_order must be one of {GROW_ORDERS}, got {self.grow_order!r}")


# ------------------------------------------------------------------------------ the graph


def knn(vectors: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k most similar other rows (inner product; FAISS exact search)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, len(x) - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, ids = index.search(x, k + 1)
    # drop each row's own id (first in all but exact ties), keep k
    return np.stack([[j for j in row if j != i][:k] for i, row in enumerate(ids)]).astype(np.int64)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class ClusterGraph:
    """Blocks clustered in a space (spherical k-means) and each cluster joined to its k nearest."""

    centroids: np.ndarray  # (C, d) unit
    labels: np.ndarray  # (n_blocks,) cluster of each block
    neighbours: list[np.ndarray]  # per cluster, symmetric kNN neighbours

    def __post_init__(self):
        order = np.argsort(self.labels, kind="stable")
        ends = np.cumsum(np.bincount(self.labels, minlength=len(self.centroids)))
        self.members = [order[e - n:e] for e, n in zip(ends, np.diff(np.concatenate(([0], ends))))]

    @classmethod
    def build(cls, vectors: np.ndarray, clusters: int, k: int, seed: int,
              init: np.ndarray | None = None) -> "ClusterGraph":
        x = unit(vectors)
        c = min(clusters, len(x))
        km = faiss.Kmeans(x.shape[1], c, niter=10 if init is not None else 25, spherical=True, seed=seed,
                          verbose=False, max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(x, init_centroids=init if init is not None and init.shape == (c, x.shape[1]) else None)
        centroids = unit(km.centroids)
        labels = np.argmax(x @ centroids.T, axis=1).astype(np.int64)
        nbrs: list[set[int]] = [set() for _ in range(c)]
        for i, row in enumerate(knn(centroids, k)):
            for j in row:
                nbrs[i].add(int(j))
                nbrs[int(j)].add(i)
        return cls(centroids, labels, [np.array(sorted(s), dtype=np.int64) for s in nbrs])

    def to_state(self, prefix: str) -> dict:
        flat = np.concatenate(self.neighbours) if self.neighbours else np.empty(0, np.int64)
        return {f"{prefix}centroids": self.centroids, f"{prefix}labels": self.labels, f"{prefix}nbr_flat": flat,
                f"{prefix}nbr_len": np.array([len(n) for n in self.neighbours], dtype=np.int64)}

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "ClusterGraph":
        ends = np.cumsum(state[f"{prefix}nbr_len"])
        flat = np.asarray(state[f"{prefix}nbr_flat"], dtype=np.int64)
        return cls(np.asarray(state[f"{prefix}centroids"], dtype=np.float32),
                   np.asarray(state[f"{prefix}labels"], dtype=np.int64),
                   [flat[e - n:e] for e, n in zip(ends, state[f"{prefix}nbr_len"])])


# ------------------------------------------------------------------------------ learned vectors


def update_vectors(vectors: np.ndarray, anchors: np.ndarray, idx: np.ndarray, grads: np.ndarray,
                   lr: float, anchor: float) -> np.ndarray:
    """One outer step on the vectors of blocks `idx` from their gradient features `grads`.

    With A_ij the cosine of blocks i and j's gradients, centred over the sample (so that the
    pull and the push balance, and the vectors cannot all collapse onto one point):

        v_i <- normalise(v_i + lr * sum_j A_ij (v_j - v_i) / sum_j |A_ij| + anchor * lr * (a_i - v_i))

    a block moves towards the blocks whose gradients align with its own, away from those that
    oppose it, and is held near its anchor a_i (its starting embedding): joint learning of data
    weights and the model collapses onto a few points without such a regulariser (Ivanova &
    Ablin 2023). Returns the new vectors (a copy)."""
    out = vectors.copy()
    if len(idx) < 2:
        return out
    g = unit(grads)
    a = g @ g.T
    np.fill_diagonal(a, 0.0)
    off = ~np.eye(len(idx), dtype=bool)
    a[off] -= a[off].mean()
    v = vectors[idx]
    # normalised by each block's total weight, so that the step does not shrink with the sample
    # size or with how small real gradient cosines are (centred, they are a few hundredths)
    pull = (a @ v - a.sum(1, keepdims=True) * v) / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-12)
    out[idx] = unit(v + lr * pull + anchor * lr * (anchors[idx] - v))
    return out


def topic_agreement(vectors: np.ndarray, topics: np.ndarray, k: int = 10, sample: int = 2000,
                    seed: int = 0) -> float:
    """Share of a block's k nearest blocks (in `vectors`) that share its topic: how much of the
    embedder's topic structure a space keeps (on a sample of blocks)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(vectors), min(sample, len(vectors)), replace=False)
    nn = knn(unit(vectors[idx]), k)
    return float((topics[idx][nn] == topics[idx][:, None]).mean())


def project_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA to 2-D: (coordinates, mean, components), so other points can be projected alike."""
    mean = vectors.mean(0)
    _, _, vt = np.linalg.svd(vectors - mean, full_matrices=False)
    return (vectors - mean) @ vt[:2].T, mean, vt[:2]


# ------------------------------------------------------------------------------ the bandit


class Exp3S:
    """Exp3.S (Auer et al. 2002) as Graves et al. 2017 use it for curricula: arm weights w,
    policy pi = (1 - explore) softmax(w) + explore / N; a reward is rescaled to [-1, 1] by the
    20th and 80th percentiles of the recent raw rewards, importance-weighted by 1 / pi, and
    `share` of every weight is spread over the others (so the bandit can follow a moving best arm)."""

    def __init__(self, n: int, lr: float, explore: float, share: float, history: int = 1000):
        self.n, self.lr, self.explore, self.share, self.history = n, lr, explore, share, history
        self.weights = np.zeros(n)
        self.raw: list[float] = []

    def policy(self, active: np.ndarray | None = None) -> np.ndarray:
        """pi over the arms (arms outside `active`, a boolean mask, get 0)."""
        active = np.ones(self.n, dtype=bool) if active is None else active
        w = np.where(active, self.weights, -np.inf)
        p = np.exp(w - w[active].max())
        p = (1 - self.explore) * p / p.sum() + self.explore * active / active.sum()
        return p / p.sum()

    def scaled(self, reward: float) -> float:
        self.raw = [*self.raw, float(reward)][-self.history:]
        lo, hi = np.quantile(self.raw, [0.2, 0.8])
        if hi <= lo:
            return 0.0
        return float(np.clip(2 * (reward - lo) / (hi - lo) - 1, -1.0, 1.0))

    def update(self, arm: int, reward: float, prob: float) -> None:
        """Credit `reward` (raw) to `arm`, which was drawn with probability `prob`."""
        gain = np.zeros(self.n)
        gain[arm] = self.lr * self.scaled(reward) / max(prob, 1e-6)
        z = self.weights + gain
        e = np.exp(z - z.max())
        mixed = (1 - self.share) * e + self.share * (e.sum() - e) / max(self.n - 1, 1)
        self.weights = np.log(mixed) + z.max()
        self.weights -= self.weights.max()  # keep them bounded; the policy is shift-invariant

    def state(self) -> dict:
        return {"weights": self.weights.tolist(), "raw": self.raw}

    def load(self, state: dict) -> None:
        self.weights, self.raw = np.asarray(state["weights"], dtype=float), list(state["raw"])


# ------------------------------------------------------------------------------ the sampler


@dataclass
class _Measured:
    """What the rebuilds measured: each block's latest loss (nan = never measured), which
    clusters were ever roots, and how often each was a root since the last rebuild (bandit)."""

    block_loss: np.ndarray
    visited: np.ndarray  # bool per cluster: ever a root
    drawn: np.ndarray  # roots drawn per cluster since the last rebuild


class ManifoldSampler(BatchStream):
    """Batches from communities of a manifold graph rebuilt from the model (module docstring).

    `block_vectors` (n_blocks, d): the blocks' embeddings, the learned space's starting point
    (needed for `space='learned'`). `features`: set by `attach` (the training loop calls it with
    the model); `features(idx, with_grads)` measures blocks. `probe_features()`: the probe set's
    mean gradient feature (for `traversal='aligned'`)."""

    def __init__(self, block_topics: np.ndarray, batch_size: int, settings: ManifoldSettings,
                 block_vectors: np.ndarray | None = None, probe=None, seed: int = 0) -> None:
        block_topics = _check(block_topics, batch_size)
        if settings.space == "learned" and (block_vectors is None or len(block_vectors) != len(block_topics)):
            raise ValueError("the learned space needs one starting vector (embedding) per block")
        if settings.traversal == "aligned" and probe is None:
            raise ValueError("the aligned traversal needs probe blocks (the validation split, packed)")
        if settings.traversal == "grow" and not (settings.total_batches and settings.total_batches > 0):
            raise ValueError("the grow traversal needs the run's total_batches (the training loop's batches)")
        self.probe = probe  # (tokens, mask) CPU tensors, or None
        self.s = settings
        self.block_topics = block_topics
        self.n_blocks = len(block_topics)
        self.batch_size, self.seed = batch_size, seed
        self.batches_drawn = 0
        self.builds = 0
        self.overhead_s = 0.0
        self._rng = np.random.default_rng(seed)
        self._refresh_order = np.random.default_rng([seed, 1]).permutation(self.n_blocks)
        learned = settings.space == "learned"  # the learned space keeps vectors of its own, moved by training
        self.anchors = unit(block_vectors) if learned else None
        self.vectors = self.anchors.copy() if learned else None
        if settings.space == "random":  # fixed points: built once, never re-measured
            self.vectors = unit(np.random.default_rng([seed, 3]).normal(size=(self.n_blocks, RANDOM_DIM)))
        self.acts: dict[int, np.ndarray] = {}  # activation space: per layer, the latest vector of each block
        self.graphs: list[ClusterGraph] = []
        self.alignment = np.zeros(0)  # per cluster: probe alignment of its blocks' gradients
        self.bandit = Exp3S(settings.clusters, settings.bandit_lr, settings.bandit_explore, settings.bandit_share)
        self.loss_ema = np.full(settings.clusters, np.nan)  # per cluster: recent training loss (bandit)
        self.forgetting = np.zeros(settings.clusters)  # per cluster: forgetting charged to it (bandit)
        self.m = _Measured(np.full(self.n_blocks, np.nan), np.zeros(settings.clusters, bool),
                           np.zeros(settings.clusters))
        self._root: int | None = None
        self._last: tuple[int, float] | None = None  # (root, prob) of the batch just drawn
        self.features: Features | None = None
        self.probe_features: Callable[[], np.ndarray] | None = None
        self.path: list[int] = []  # root of every batch
        self.snapshots: dict[str, dict] = {}  # "start", "end": the manifold in 2-D (`summary`)
        self.rebuild_s: list[float] = []
        # Only the bandit learns from the training loss; without `observe` the training loop
        # does not copy the per-block losses to the host at every step (a wait for the GPU).
        self.observe = self._observe if settings.traversal == "bandit" else None
        self.allowed: np.ndarray | None = None  # `restrict`: the blocks batches may come from (None = all)
        self.open_clusters: list[int] = []  # grow: the open region's clusters, in the order they opened

    # -- wiring

    def attach(self, features: Features, probe_features: Callable[[], np.ndarray] | None = None) -> None:
        """Measure blocks with `features(idx, with_grads)` (and the probe with `probe_features()`)."""
        self.features, self.probe_features = features, probe_features

    def bind(self, model, tokens, mask, autocast_dtype=None) -> None:
        """Measure with `model` (the training loop calls this with the blocks on its device)."""
        from curriculum.block_signals import make_features

        probe = None if self.probe is None else (self.probe[0].to(tokens.device), self.probe[1].to(tokens.device))
        self.attach(*make_features(model, tokens, mask, self.s.layers, self.s.prefix_tokens, self.seed,
                                   autocast_dtype, probe=probe))

    def restrict(self, blocks: np.ndarray | None) -> None:
        """Draw only from `blocks` (None = every block) while the graph stays built over all of
        them: the sequential curriculum (curriculum/sequential.py) opens the corpus stretch by
        stretch and the manifold orders the batches within what is open."""
        if blocks is None:
            self.allowed = None
            return
        allowed = np.zeros(self.n_blocks, dtype=bool)
        allowed[np.asarray(blocks, dtype=np.int64)] = True
        if not allowed.any():
            raise ValueError("restrict() needs at least one block")
        self.allowed = allowed
        self._root = None  # a fresh start inside the open blocks

    def _open(self, graph: ClusterGraph) -> np.ndarray:
        """Per cluster of `graph`: whether it holds a block batches may come from."""
        labels = graph.labels if self.allowed is None else graph.labels[self.allowed]
        return np.bincount(labels, minlength=len(graph.centroids))[: len(graph.centroids)] > 0

    # -- building

    def _due(self) -> bool:
        """Whether this batch rebuilds: every `rebuild_every` batches, but never again once nothing
        can change: the random space once built, `grow` once all is open (the measuring is the cost)."""
        if self.graphs and (self.s.space == "random" or (
                self.s.traversal == "grow" and len(self.open_clusters) == len(self.graphs[0].centroids))):
            return False
        return self.batches_drawn % self.s.rebuild_every == 0 and (self.batches_drawn // self.s.rebuild_every
                                                                   >= self.builds)

    def _sample(self) -> np.ndarray:
        """Blocks re-measured at this build: all at the first, else the next `refresh` share of a
        fixed random order (every block in turn: a stale vector is at most 1/refresh builds old)."""
        if self.builds == 0 and self.s.space == "activation":
            return np.arange(self.n_blocks)
        n = max(2, int(round(self.s.refresh * self.n_blocks)))
        if self.s.space == "learned":
            n = min(n, self.s.update_blocks)
        start = (self.builds * n) % self.n_blocks
        return np.take(self._refresh_order, np.arange(start, start + n), mode="wrap")

    def _rebuild(self) -> None:
        t0 = time.perf_counter()
        s = self.s
        first = not self.graphs
        if s.space == "random":  # nothing to measure: the fixed points, clustered once (see _due)
            spaces = [self.vectors]
        else:
            idx, f, spaces = self._measure(first)
        self.graphs = [ClusterGraph.build(x, s.clusters, s.k, self.seed + self.builds,
                                          None if first else self.graphs[i].centroids)
                       for i, x in enumerate(spaces)]
        if s.traversal == "aligned":
            probe = unit(self.probe_features()[None])[0]
            per_block = unit(f["grads"]) @ probe
            labels = self.graphs[0].labels[idx]
            sums = np.bincount(labels, per_block, minlength=s.clusters)
            counts = np.bincount(labels, minlength=s.clusters)
            self.alignment = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        self.builds += 1
        if first:
            self.snapshots["start"] = self._snapshot()
        self.rebuild_s.append(time.perf_counter() - t0)
        self.overhead_s += self.rebuild_s[-1]

    def _measure(self, first: bool) -> tuple[np.ndarray, dict, list[np.ndarray]]:
        """Re-measure this build's blocks with the model: (their indices, the features, the
        spaces to cluster: one per layer, or the learned vectors after their outer update)."""
        if self.features is None:
            raise RuntimeError("the manifold sampler reads the model: call attach() first (the training loop does)")
        s = self.s
        idx = self._sample()
        needs_grads = s.space == "learned" or s.traversal == "aligned"
        f = self.features(idx, needs_grads)
        old_loss = self.m.block_loss.copy()
        self.m.block_loss[idx] = f["losses"]
        if s.space == "activation":
            for layer, x in f["acts"].items():
                self.acts.setdefault(layer, np.zeros((self.n_blocks, x.shape[1]), np.float32))[idx] = unit(x)
            spaces = [self.acts[layer] for layer in sorted(self.acts)]
        else:
            if self.builds > 0:
                self.vectors = update_vectors(self.vectors, self.anchors, idx, f["grads"], s.vector_lr, s.vector_anchor)
            spaces = [self.vectors]
        if not first:
            self._forget(idx, old_loss)
        return idx, f, spaces

    def _forget(self, idx: np.ndarray, old_loss: np.ndarray) -> None:
        """Bandit: forgetting = the mean rise in loss, since they were last measured, of the
        re-measured blocks of clusters visited before but not drawn since the last build; it is
        charged to each cluster drawn since (a moving average per cluster, `forgetting`), which
        `observe` subtracts from that cluster's progress."""
        if self.s.traversal != "bandit" or not self.m.drawn.any():
            return
        labels = self.graphs[0].labels[idx]
        rise = self.m.block_loss[idx] - old_loss[idx]
        idle = self.m.visited & (self.m.drawn == 0)
        sel = idle[labels] & ~np.isnan(rise)
        forgetting = float(np.clip(rise[sel], 0, None).mean()) if sel.any() else 0.0
        drawn = self.m.drawn > 0
        self.forgetting[drawn] = 0.5 * self.forgetting[drawn] + 0.5 * forgetting
        self.m.drawn[:] = 0

    def _snapshot(self) -> dict:
        """The manifold in 2-D (PCA of up to 1000 blocks' vectors, the same blocks every time)."""
        space = self.vectors if self.s.space in ("learned", "random") else self.acts[sorted(self.acts)[0]]
        idx = np.sort(np.random.default_rng([self.seed, 2]).choice(self.n_blocks, min(1000, self.n_blocks),
                                                                      replace=False))
        xy, mean, comps = project_2d(space[idx])
        g = self.graphs[0]
        return {"step": self.batches_drawn, "blocks": idx.tolist(), "xy": np.round(xy, 4).tolist(),
                "topics": self.block_topics[idx].tolist(), "clusters": g.labels[idx].tolist(),
                "centroids_xy": np.round((g.centroids - mean) @ comps.T, 4).tolist(),
                "topic_agreement": topic_agreement(space, self.block_topics, seed=self.seed)}

    # -- drawing

    def _active(self) -> np.ndarray:
        """Per bandit arm (one per cluster of the first graph): whether it can be drawn."""
        open_ = self._open(self.graphs[0])[: self.s.clusters]
        return np.concatenate([open_, np.zeros(self.s.clusters - len(open_), dtype=bool)])

    def _move_root(self, graph: ClusterGraph) -> tuple[int, float]:
        s, rng = self.s, self._rng
        active = self._open(graph)
        if s.traversal == "bandit":
            p = self.bandit.policy(self._active())
            arm = int(rng.choice(len(p), p=p))
            return arm, float(p[arm])
        if self._root is None or not active[self._root]:
            return int(rng.choice(np.flatnonzero(active))), 1.0
        nbrs = graph.neighbours[self._root]
        nbrs = nbrs[active[nbrs]]
        if s.traversal == "walk":
            if len(nbrs) == 0:
                return int(rng.choice(np.flatnonzero(active))), 1.0
            return int(nbrs[rng.integers(len(nbrs))]), 1.0
        cand = np.concatenate(([self._root], nbrs))  # aligned: itself or a neighbour, by alignment
        z = self.alignment[cand] / s.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(cand[rng.choice(len(cand), p=p)]), 1.0

    def _grow(self, graph: ClusterGraph) -> np.ndarray:
        """Grow: open clusters up to this batch's target, nearest first; the open region's blocks
        (those batches may come from)."""
        c = len(graph.centroids)
        span = max(1, round(self.s.grow_fraction * self.s.total_batches))
        target = min(c, 1 + self.batches_drawn * (c - 1) // span)
        usable = self._open(graph)
        closed = [j for j in range(c) if j not in self.open_clusters]
        if not self.open_clusters:  # the seed: a random cluster with blocks batches may come from
            first = int(self._rng.choice(np.flatnonzero(usable)))
            self.open_clusters.append(first)
            closed.remove(first)
        while closed and (len(self.open_clusters) < target or not usable[self.open_clusters].any()):
            if self.s.grow_order == "random":  # the control: same clusters and schedule, no manifold order
                pick = closed.pop(int(self._rng.integers(len(closed))))
            else:
                nearest = (graph.centroids[closed] @ graph.centroids[self.open_clusters].T).max(axis=1)
                pick = closed.pop(int(np.argmax(nearest)))
            self.open_clusters.append(pick)
        members = np.concatenate([graph.members[j] for j in self.open_clusters])
        return members if self.allowed is None else members[self.allowed[members]]

    def next_batch(self) -> np.ndarray:
        """The next batch: (batch_size,) block indices from the current root's community."""
        if self._due():
            self._rebuild()
        graph = self.graphs[self.batches_drawn % len(self.graphs)]  # one graph per layer, in turn
        if self.s.traversal == "grow":
            members = self._grow(graph)
            batch = members[self._rng.choice(len(members), self.batch_size, replace=len(members) < self.batch_size)]
            self.batches_drawn += 1
            self.path.append(self.open_clusters[-1])  # the newest open cluster
            return batch.astype(np.int64, copy=False)
        root, prob = self._move_root(graph)
        self._root = root
        nbrs = graph.neighbours[root]
        picked = nbrs[self._rng.permutation(len(nbrs))[: self.s.community_k]]
        members = np.concatenate([graph.members[int(c)] for c in (root, *picked)])
        if self.allowed is not None:
            members = members[self.allowed[members]]  # the root holds some: it is open
        batch = members[self._rng.choice(len(members), self.batch_size, replace=len(members) < self.batch_size)]
        self.batches_drawn += 1
        self.path.append(root)
        self._last = (root, prob)
        if self.s.traversal == "bandit":
            self.m.drawn[root] += 1
            self.m.visited[root] = True
        return batch.astype(np.int64, copy=False)

    def _observe(self, batch: np.ndarray, losses: np.ndarray) -> None:
        """Bandit: learning progress on the community just drawn = its loss's drop since the
        root's last visit (a moving average of its batches' training losses)."""
        if self._last is None:
            return
        root, prob = self._last
        loss = float(np.mean(losses))
        before = self.loss_ema[root]
        if not np.isnan(before):
            self.bandit.update(root, before - loss - self.s.forget_weight * self.forgetting[root], prob)
        self.loss_ema[root] = loss if np.isnan(before) else 0.5 * before + 0.5 * loss

    # -- state

    def state_dict(self) -> dict:
        state: dict = {"rng": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn,
                       "builds": self.builds, "root": self._root, "last": self._last, "bandit": self.bandit.state(),
                       "n_graphs": len(self.graphs), "layers": sorted(self.acts), "path": self.path,
                       "snapshots": self.snapshots, "overhead_s": self.overhead_s, "rebuild_s": self.rebuild_s,
                       "loss_ema": [None if np.isnan(x) else float(x) for x in self.loss_ema],
                       "forgetting": self.forgetting.tolist(),
                       "alignment": self.alignment.tolist(), "block_loss": self.m.block_loss,
                       "visited": self.m.visited.astype(np.int64), "drawn": self.m.drawn,
                       "open_clusters": list(self.open_clusters)}
        if self.vectors is not None:
            state["vectors"] = self.vectors
        for layer, x in self.acts.items():
            state[f"acts{layer}"] = x
        for i, g in enumerate(self.graphs):
            state.update(g.to_state(f"g{i}_"))
        return state

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.batches_drawn, self.builds = int(state["batches_drawn"]), int(state["builds"])
        self._root = state["root"]
        self._last = tuple(state["last"]) if state["last"] is not None else None
        self.bandit.load(state["bandit"])
        self.path, self.snapshots = list(state["path"]), dict(state["snapshots"])
        self.overhead_s, self.rebuild_s = float(state["overhead_s"]), list(state["rebuild_s"])
        self.loss_ema = np.array([np.nan if x is None else x for x in state["loss_ema"]], dtype=float)
        self.alignment = np.asarray(state["alignment"], dtype=float)
        self.forgetting = np.asarray(state["forgetting"], dtype=float)
        self.m = _Measured(np.asarray(state["block_loss"], dtype=float), np.asarray(state["visited"]).astype(bool),
                           np.asarray(state["drawn"], dtype=float))
        if "vectors" in state:
            self.vectors = np.asarray(state["vectors"], dtype=np.float32)
        self.acts = {int(layer): np.asarray(state[f"acts{layer}"], dtype=np.float32) for layer in state["layers"]}
        self.graphs = [ClusterGraph.from_state(state, f"g{i}_") for i in range(int(state["n_graphs"]))]
        self.open_clusters = [int(j) for j in state.get("open_clusters", [])]

    def summary(self) -> dict:
        """What the run did to the manifold: 2-D snapshots at the start and now, the roots'
        path, rebuild cost, and how far the learned vectors moved from their embeddings."""
        if self.graphs:
            self.snapshots["end"] = self._snapshot()
        out = {"space": self.s.space, "traversal": self.s.traversal, "builds": self.builds,
               "rebuild_every": self.s.rebuild_every,
               "rebuild_s": round(float(sum(self.rebuild_s)), 3),
               "rebuild_s_each": round(float(np.mean(self.rebuild_s)), 4) if self.rebuild_s else 0.0,
               "path": self.path, "snapshots": self.snapshots,
               "roots_visited": len(set(self.path))}
        if self.anchors is not None:  # cosine of each block's vector with its starting embedding
            cos = np.sum(self.vectors * self.anchors, axis=1)
            out["vector_drift"] = round(float(cos.mean()), 4)
            out["vector_drift_p5"] = round(float(np.quantile(cos, 0.05)), 4)  # the 5% that moved most
        if self.s.traversal == "grow":
            out["open_order"] = list(self.open_clusters)
        if self.s.traversal == "bandit":
            out["bandit_policy"] = np.round(self.bandit.policy(self._active()), 4).tolist() if self.graphs else []
        return out


def block_vectors(token_counts: list[int], topics: list[int], block_size: int,
                  passage_vectors: np.ndarray) -> np.ndarray:
    """Each packed block's embedding: the token-weighted mean of the vectors of the passages it
    holds, following `pipeline.lm_data.pack_by_topic`'s packing exactly (a topic's passages in
    order, cut every `block_size` tokens, the tail padded)."""
    by_topic: dict[int, list[int]] = {}
    for i, topic in enumerate(topics):
        by_topic.setdefault(int(topic), []).append(i)
    out = []
    for topic in sorted(by_topic):
        rows = by_topic[topic]
        total = sum(token_counts[i] for i in rows)
        n = max(1, math.ceil(total / block_size))
        acc = np.zeros((n, passage_vectors.shape[1]))
        pos = 0
        for i in rows:
            start, end = pos, pos + token_counts[i]
            while start < end:
                b = start // block_size
                stop = min(end, (b + 1) * block_size)
                acc[b] += (stop - start) * passage_vectors[i]
                start = stop
            pos = end
        out.append(acc)
    return unit(np.concatenate(out))
