"""Curiosity: which frontier topic would the model learn most from next?

The frontier is the unexplored topics adjacent to explored ones in the topic graph (knowledge
edges included). Each frontier topic gets a feature vector; a policy (small registry) turns
features into scores and learns from the realised learning progress of what it chose:

- `random`: uniform scores (the control).
- `nearest`: breadth-first, the topic most similar to what is already explored.
- `max_loss`: the topic the current model finds most surprising.
- `learning_progress`: Exp3.S over topics with learning-progress rewards (Graves et al. 2017).
- `learned` (default): Bayesian linear regression from features to realised learning progress,
  chosen by an upper confidence bound (mean + `beta` * posterior std).

Learning progress = drop in a neighbourhood's held-out loss per 1k training tokens.
Policies keep JSON-serialisable state, so an interrupted `explore` resumes with what it learned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import unknown_choice
from pipeline.module_spec import Param, module

FEATURES = ("similarity", "degree", "centrality", "log_size", "surprise", "base_loss", "novelty")


def frontier(adjacency: dict[int, list[int]], explored: set[int] | list[int]) -> list[int]:
    """Unexplored topics with at least one explored neighbour, sorted."""
    explored = set(explored)
    return sorted({n for t in explored for n in adjacency.get(t, []) if n not in explored})


def learning_progress(loss_before: float, loss_after: float, tokens: int) -> float:
    """Drop in held-out loss (nats) per 1k training tokens."""
    return (loss_before - loss_after) / max(tokens / 1000.0, 1e-9)


@dataclass
class TopicFeatures:
    """Raw features of candidate topics; `matrix()` stacks them in FEATURES order."""

    topics: list[int]
    similarity: np.ndarray  # max cosine of the topic centroid to an explored centroid
    degree: np.ndarray  # edges in the topic graph
    centrality: np.ndarray  # PageRank
    log_size: np.ndarray  # log(1 + passages)
    surprise: np.ndarray  # current model's loss on a probe sample of the topic (nats/token)
    base_loss: np.ndarray  # the base model's loss on the same probe
    novelty: np.ndarray  # fraction of the topic's keywords absent from explored topics' keywords

    def matrix(self) -> np.ndarray:
        return np.stack([np.asarray(getattr(self, f), dtype=np.float64) for f in FEATURES], axis=1)


def structural_features(topics: list[int], explored: list[int], centroids: np.ndarray,
                        adjacency: dict[int, list[int]], centrality: np.ndarray, sizes: np.ndarray,
                        keywords: dict[int, list[str]]) -> dict[str, np.ndarray]:
    """The features that need no model: similarity, degree, centrality, size, keyword novelty."""
    sims = centroids[topics] @ centroids[explored].T  # (candidates, explored)
    seen = {w for t in explored for w in keywords.get(t, [])}
    novelty = [np.mean([w not in seen for w in keywords.get(t, [])]) if keywords.get(t) else 1.0
               for t in topics]
    return {"similarity": sims.max(axis=1), "degree": np.array([len(adjacency.get(t, [])) for t in topics], float),
            "centrality": centrality[topics], "log_size": np.log1p(sizes[topics].astype(float)),
            "novelty": np.asarray(novelty, dtype=float)}


# --------------------------------------------------------------------------------- policies


class RandomPolicy:
    name = "random"

    def __init__(self, seed: int = 0, **_: float):
        self.rng = np.random.default_rng(seed)

    def score(self, topics: list[int], x: np.ndarray) -> np.ndarray:
        return self.rng.random(len(topics))

    def predict(self, x: np.ndarray) -> np.ndarray | None:
        return None

    def update(self, topic: int, x: np.ndarray, progress: float, topics: list[int] | None = None,
               probe: bool = False) -> None:
        """Learn from the realised learning progress of `topic` (chosen among `topics`); `probe`
        marks a rabbit-hole probe training (shorter than a neighbourhood's)."""

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class NearestPolicy(RandomPolicy):
    """Breadth-first: expand next to what is known (highest similarity to the explored set)."""

    name = "nearest"

    def score(self, topics: list[int], x: np.ndarray) -> np.ndarray:
        return x[:, FEATURES.index("similarity")]


class MaxLossPolicy(RandomPolicy):
    """Most surprising first: the highest current-model loss on the topic's probe."""

    name = "max_loss"

    def score(self, topics: list[int], x: np.ndarray) -> np.ndarray:
        return x[:, FEATURES.index("surprise")]


class Exp3SPolicy(RandomPolicy):
    """Exp3.S over topics (Graves et al. 2017), rewards = learning progress rescaled to [-1, 1]
    by the 20th/80th percentiles of the rewards seen so far, as in the paper."""

    name = "learning_progress"

    def __init__(self, seed: int = 0, eta: float = 0.1, beta: float = 0.0, epsilon: float = 0.05, **_: float):
        super().__init__(seed)
        self.eta, self.beta, self.epsilon = eta, beta, epsilon
        self.log_weights: dict[int, float] = {}
        self.history: list[float] = []

    def _policy(self, topics: list[int]) -> np.ndarray:
        w = np.array([self.log_weights.get(t, 0.0) for t in topics])
        p = np.exp(w - w.max())
        p /= p.sum()
        return (1 - self.epsilon) * p + self.epsilon / len(topics)

    def score(self, topics: list[int], x: np.ndarray) -> np.ndarray:
        # Sampling without replacement in proportion to pi: Gumbel-top-k on log pi.
        p = self._policy(topics)
        return np.log(p) + self.rng.gumbel(size=len(topics))

    def update(self, topic: int, x: np.ndarray, progress: float, topics: list[int] | None = None,
               probe: bool = False) -> None:
        if probe:  # the bandit's rewards are for pulled arms; a probe is not a pull
            return
        self.history.append(progress)
        lo, hi = np.percentile(self.history, [20, 80])
        reward = 0.0 if hi <= lo else float(np.clip(2 * (progress - lo) / (hi - lo) - 1, -1, 1))
        arms = topics or sorted(set(self.log_weights) | {topic})
        p = dict(zip(arms, self._policy(arms)))
        n = len(arms)
        # Exp3.S: importance-weighted reward for the chosen arm, then mix towards uniform (beta);
        # log-weights are kept up to a constant, which the softmax ignores.
        for t in arms:
            gain = reward / p[t] if t == topic else 0.0
            self.log_weights[t] = self.log_weights.get(t, 0.0) + self.eta * gain
        if self.beta > 0:
            w = np.array([self.log_weights[t] for t in arms])
            mixed = np.log((1 - self.beta) * np.exp(w - w.max()) + self.beta / n * np.exp(w - w.max()).sum())
            self.log_weights.update(dict(zip(arms, mixed.tolist())))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_weights": {str(k): v for k, v in self.log_weights.items()},
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.log_weights = {int(k): v for k, v in state["log_weights"].items()}
        self.history = list(state["history"])


class LearnedPolicy(RandomPolicy):
    """Bayesian linear regression features -> learning progress, chosen by UCB.

    Features are standardised with running statistics; the prior is N(0, 1/alpha); the noise
    variance is estimated from the residuals. Before any observation the mean is 0 and the
    bonus alone decides, i.e. the first choices explore.

    Rabbit-hole probes are examples too, with an indicator column: a probe trains for fewer
    steps, so its progress per token runs higher; the indicator absorbs that offset while the
    feature weights are shared, and predictions are for full neighbourhoods (indicator 0).
    """

    name = "learned"

    def __init__(self, seed: int = 0, alpha: float = 1.0, beta: float = 1.0, **_: float):
        super().__init__(seed)
        self.alpha, self.beta = alpha, beta
        self.xs: list[list[float]] = []
        self.ys: list[float] = []
        self.probes: list[bool] = []

    def _design(self, x: np.ndarray, probe: list[bool] | None = None) -> np.ndarray:
        if self.xs:
            ref = np.asarray(self.xs)
            mu, sd = ref.mean(0), ref.std(0)
            sd[sd < 1e-9] = 1.0
        else:
            mu, sd = 0.0, 1.0
        z = (np.atleast_2d(x) - mu) / sd
        flag = np.zeros((len(z), 1)) if probe is None else np.asarray(probe, dtype=float).reshape(-1, 1)
        return np.hstack([np.ones((len(z), 1)), flag, z])  # intercept, probe indicator, features

    def _posterior(self) -> tuple[np.ndarray, np.ndarray, float]:
        d = len(FEATURES) + 2
        if not self.ys:
            return np.zeros(d), np.eye(d) / self.alpha, 1.0
        phi, y = self._design(np.asarray(self.xs), self.probes), np.asarray(self.ys)
        precision = self.alpha * np.eye(d) + phi.T @ phi
        cov = np.linalg.inv(precision)
        mean = cov @ phi.T @ y
        resid = y - phi @ mean
        noise = float(resid @ resid / max(len(y) - 1, 1)) if len(y) > 1 else float(np.var(y) + 1e-6) or 1.0
        return mean, cov, max(noise, 1e-9)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted learning progress per row of `x`."""
        mean, _, _ = self._posterior()
        return self._design(x) @ mean

    def score(self, topics: list[int], x: np.ndarray) -> np.ndarray:
        mean, cov, noise = self._posterior()
        phi = self._design(x)
        std = np.sqrt(np.einsum("ij,jk,ik->i", phi, cov, phi) * noise)
        return phi @ mean + self.beta * std

    def update(self, topic: int, x: np.ndarray, progress: float, topics: list[int] | None = None,
               probe: bool = False) -> None:
        self.xs.append(np.asarray(x, dtype=float).ravel().tolist())
        self.ys.append(float(progress))
        self.probes.append(bool(probe))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "xs": self.xs, "ys": self.ys, "probes": self.probes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.xs, self.ys = [list(r) for r in state["xs"]], list(state["ys"])
        self.probes = list(state.get("probes", [False] * len(self.ys)))


POLICIES: dict[str, Callable[..., RandomPolicy]] = {
    p.name: p for p in (RandomPolicy, NearestPolicy, MaxLossPolicy, Exp3SPolicy, LearnedPolicy)}

POLICY_MODULES = (
    module("policy", "random", "frontier topics in random order (the control)"),
    module("policy", "nearest", "the frontier topics most similar to what is explored", needs=("embeddings",)),
    module("policy", "max_loss", "the frontier topics of highest probe loss", needs=("probe_losses",)),
    module("policy", "learning_progress", "Exp3.S over frontier topics rewarded by learning progress",
           needs=("learning_progress",)),
    module("policy", "learned", "a Bayesian linear model of learning progress from topic features, UCB",
           (Param("explore.ucb_beta", "float", 1.0, 0.0, 3.0),), needs=("probe_losses", "learning_progress")),
)


def make_policy(name: str, seed: int = 0, **params: float) -> RandomPolicy:
    if name not in POLICIES:
        raise unknown_choice("curiosity policy (explore.policy)", name, POLICIES)
    return POLICIES[name](seed=seed, **params)


def choose(policy: RandomPolicy, topics: list[int], x: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The `n` best-scoring topics with their scores, best first (ties broken by topic id)."""
    scores = policy.score(topics, x)
    order = sorted(range(len(topics)), key=lambda i: (-scores[i], topics[i]))[:n]
    return [(topics[i], float(scores[i])) for i in order]


def spearman(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    """Spearman rank correlation with average ranks for ties; nan for fewer than 3 pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or len(a) != len(b):
        return math.nan

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share the average rank
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])
