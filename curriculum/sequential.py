"""One model trained in sequence: the nucleus first, then the neighbourhoods curiosity picks.

`nucleus explore` trains each neighbourhood as its own adapter. This is the same curriculum for
a single model trained straight through (the `nucleus` arm of `benchmarks/curriculum.py`): a
block sampler whose stream is a sequence of phases.

1. The nucleus phase draws only the nucleus topics' blocks.
2. Each later phase adds one neighbourhood: the curiosity policy scores the frontier (unexplored
   topics next to explored ones; any unexplored topic when the frontier is empty) with the same
   features `explore` uses, the best topic joins `k` of its unexplored neighbours, and the phase's
   batches draw uniformly from every block explored so far, the new topics included: an
   expanding window over the natural mixture (the default: batches stay close to the natural
   mixture, which the curriculum benchmark found decisive, RESULTS.md section 8). With
   `expanding=False` they draw `1 - replay` of their blocks from the new topics and `replay`
   from the topics explored before instead. At the end of the phase the drop in the current model's
   loss on the new topics' probe blocks (per 1k new-topic tokens) is the realised learning
   progress that the policy learns from.
3. A phase lasts in proportion to the blocks it adds: the curriculum as a whole takes
   `coverage` of the total batches. What is left after it (or once every topic is explored) is
   uniform over all blocks, the natural mixture.

Every stretch draws its topics in their natural proportions (`weighting="natural"`, uniform over
their blocks) or equally (`"stratified"`, equal blocks per topic), the final stretch included:
which simple mixture is best depends on the corpus, and the curriculum should be able to start
from either. With `weighting="manifold"` a stretch's batches come from the manifold sampler
(curriculum/manifold.py) restricted to the stretch's blocks: the curriculum decides what is open,
the manifold the order of communities within it (its graph spans every block and is rebuilt from
the model as it trains; replay rows, with `expanding=False`, stay uniform).

The sampler never sees the model: `loss_fn(topics)` returns the current model's loss on each
topic's probe blocks, and is called only at phase boundaries. `phases` records the order taken
and `overhead_s` the time spent choosing (the curiosity overhead), plus the manifold's rebuilds
when it orders the stretches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from curriculum.curiosity import TopicFeatures, choose, frontier, learning_progress, structural_features
from curriculum.expansion import propose_topics
from curriculum.samplers import BatchStream, StratifiedSampler, UniformSampler

LossFn = Callable[[list[int]], dict[int, float]]  # topic -> loss (nats/token) on its probe blocks
# How every stretch weights the topics it draws from: `natural`, uniform over their blocks (so
# in proportion to their sizes), or `stratified`, equal blocks per topic.
WEIGHTINGS = {"natural": UniformSampler, "stratified": StratifiedSampler}


@dataclass
class Phase:
    """One stretch of the curriculum: which topics it added, how long, and what it taught."""

    topics: list[int]
    start: int  # first batch of the phase (batches drawn before it)
    batches: int
    kind: str  # "nucleus", "neighborhood" or "uniform"
    chosen: int | None = None  # the frontier topic the policy picked
    score: float | None = None
    predicted: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    progress: float | None = None


@dataclass
class TopicInfo:
    """What the curiosity features need to know of the topics (as `explore` has them)."""

    adjacency: dict[int, list[int]]
    centroids: np.ndarray  # (n_topics, dim), L2-normalised
    centrality: np.ndarray  # PageRank per topic
    keywords: dict[int, list[str]]


class CuriosityCurriculum(BatchStream):
    """Nucleus, then curiosity-chosen neighbourhoods, then uniform (module docstring). `skip`
    draws, so phase choices made while skipping ask `loss_fn` about the model as it is then."""

    def __init__(self, block_topics: np.ndarray, batch_size: int, total_batches: int, nucleus: list[int],
                 info: TopicInfo, policy, loss_fn: LossFn, *, coverage: float = 0.5, replay: float = 0.25,
                 k: int = 1, block_size: int = 1, expanding: bool = True, weighting: str = "natural",
                 manifold=None, seed: int = 0) -> None:
        self.block_topics = np.asarray(block_topics, dtype=np.int64)
        present = set(np.unique(self.block_topics).tolist())
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage}")
        if not 0.0 <= replay < 1.0:
            raise ValueError(f"replay must be in [0, 1), got {replay}")
        self.nucleus = sorted(t for t in nucleus if t in present)
        if not self.nucleus:
            raise ValueError(f"none of the nucleus topics {sorted(nucleus)} has training blocks")
        self.batch_size, self.total_batches = batch_size, total_batches
        self.info, self.policy, self.loss_fn = info, policy, loss_fn
        self.coverage, self.replay, self.k, self.block_size = coverage, replay, k, block_size
        if weighting not in (*WEIGHTINGS, "manifold"):
            raise ValueError(f"weighting must be one of {sorted((*WEIGHTINGS, 'manifold'))}, got {weighting!r}")
        if (weighting == "manifold") != (manifold is not None):
            raise ValueError("weighting 'manifold' takes a ManifoldSampler over the same blocks (manifold=), "
                             "and only it does")
        self.expanding, self.weighting = expanding, weighting
        self.manifold = manifold
        if manifold is not None:  # the training loop binds the model and feeds the bandit through these
            self.bind = manifold.bind
            if manifold.observe is not None:
                self.observe = manifold.observe
        self.seed = seed
        self.topics = sorted(present)
        self.sizes = np.bincount(self.block_topics, minlength=max(self.topics) + 1)
        self.curriculum_batches = max(1, round(coverage * total_batches))
        self.batches_drawn = 0
        self.phases: list[Phase] = []
        self.explored: list[int] = []
        self._choose_s = 0.0
        self._rng = np.random.default_rng([seed, 7])
        self._base_loss: dict[int, float] = {}
        self._pending: tuple[Phase, np.ndarray] | None = None  # (phase, its candidates' features row)
        self._left = 0
        self._new: tuple[np.ndarray, Iterator[np.ndarray]] | None = None
        self._old: tuple[np.ndarray, Iterator[np.ndarray]] | None = None
        self._n_old = 0

    # ----------------------------------------------------------------------- the stream

    def next_batch(self) -> np.ndarray:
        if self._left == 0:
            t0 = time.perf_counter()
            self._next_phase()
            self._choose_s += time.perf_counter() - t0
        self._left -= 1
        self.batches_drawn += 1
        pool, it = self._new
        batch = pool[next(it)]
        if self._n_old:
            old_pool, old_it = self._old
            batch = np.concatenate([batch, old_pool[next(old_it)]])
        return batch

    # ----------------------------------------------------------------------- phases

    def _blocks_of(self, topics: list[int]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.block_topics, topics))

    def _start(self, phase: Phase, new_topics: list[int], old_topics: list[int]) -> None:
        new = self._blocks_of(new_topics)
        old = self._blocks_of(old_topics) if old_topics else np.empty(0, dtype=np.int64)
        self._n_old = int(round(self.replay * self.batch_size)) if len(old) else 0
        n_new = self.batch_size - self._n_old
        seed = self.seed * 1000 + len(self.phases)
        draw = WEIGHTINGS.get(self.weighting, UniformSampler)
        if self.manifold is not None:  # global block indices from the open blocks' communities
            self.manifold.restrict(new)
            self.manifold.batch_size = n_new
            self._new = (np.arange(len(self.block_topics)), iter(self.manifold))
        else:
            self._new = (new, iter(draw(self.block_topics[new], n_new, seed=seed)))
        if self._n_old:
            self._old = (old, iter(draw(self.block_topics[old], self._n_old, seed=seed + 500)))
        self._left = phase.batches
        self.phases.append(phase)

    def _phase_length(self, topics: list[int]) -> int:
        share = self.sizes[topics].sum() / self.sizes[self.topics].sum()
        left = self.total_batches - self.batches_drawn
        return int(min(max(1, round(self.curriculum_batches * share)), max(left, 1)))

    def _mean_loss(self, losses: dict[int, float], topics: list[int]) -> float:
        w = self.sizes[topics].astype(float)
        return float(np.dot([losses[t] for t in topics], w) / w.sum())

    def _finish_pending(self) -> None:
        """Measure what the last neighbourhood phase taught, and teach the policy."""
        if self._pending is None:
            return
        phase, x = self._pending
        self._pending = None
        phase.loss_after = self._mean_loss(self.loss_fn(phase.topics), phase.topics)
        new_tokens = phase.batches * (self.batch_size - self._n_old) * self.block_size
        if self.expanding:  # the new topics' share of a batch drawn over everything explored
            new_tokens *= self.sizes[phase.topics].sum() / self.sizes[self.explored].sum()
        phase.progress = learning_progress(phase.loss_before, phase.loss_after, new_tokens)
        self.policy.update(phase.chosen, x, phase.progress)

    def _next_phase(self) -> None:
        start = self.batches_drawn
        if not self.phases:
            self._start(Phase(self.nucleus, start, self._phase_length(self.nucleus), "nucleus"), self.nucleus, [])
            self.explored = list(self.nucleus)
            return
        if self.phases[-1].kind == "nucleus":  # the "base" the features compare against
            self._base_loss = self.loss_fn(self.topics)
        self._finish_pending()
        unexplored = sorted(set(self.topics) - set(self.explored))
        if self.phases[-1].kind == "uniform" or not unexplored or start >= self.curriculum_batches:
            left = max(self.total_batches - start, 1) if start < self.total_batches else 1 << 40
            self._start(Phase(self.topics, start, left, "uniform"), self.topics, [])
            return
        candidates = [t for t in frontier(self.info.adjacency, self.explored) if t in unexplored] or unexplored
        x = self._features(candidates)
        predicted = self.policy.predict(x)
        topic, score = choose(self.policy, candidates, x, 1)[0]
        adjacency = {t: [n for n in ns if n in unexplored] for t, ns in self.info.adjacency.items()}
        topics = sorted({topic, *(t for t in propose_topics(topic, adjacency, self.k, self._rng) if t in unexplored)})
        i = candidates.index(topic)
        phase = Phase(topics, start, self._phase_length(topics), "neighborhood", chosen=topic, score=float(score),
                      predicted=None if predicted is None else float(predicted[i]),
                      loss_before=self._mean_loss(self.loss_fn(topics), topics))
        if self.expanding:
            self._start(phase, sorted(set(self.explored) | set(topics)), [])
        else:
            self._start(phase, topics, list(self.explored))
        self._pending = (phase, x[i])
        self.explored = sorted(set(self.explored) | set(topics))

    def _features(self, candidates: list[int]) -> np.ndarray:
        s = structural_features(candidates, self.explored, self.info.centroids, self.info.adjacency,
                                self.info.centrality, self.sizes, self.info.keywords)
        surprise = self.loss_fn(candidates)
        return TopicFeatures(candidates, s["similarity"], s["degree"], s["centrality"], s["log_size"],
                             np.array([surprise[t] for t in candidates]),
                             np.array([self._base_loss.get(t, surprise[t]) for t in candidates]),
                             s["novelty"]).matrix()

    def summary(self) -> list[dict]:
        """The phases as plain dicts (for a benchmark's JSON)."""
        return [asdict(p) for p in self.phases]

    @property
    def overhead_s(self) -> float:
        """Seconds the curriculum spent on its own: choosing phases, and the manifold's rebuilds."""
        return self._choose_s + (self.manifold.overhead_s if self.manifold is not None else 0.0)
