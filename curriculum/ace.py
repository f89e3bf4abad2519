"""ACE, the Adaptive Combination Engine: from the trials a sweep has measured, predict the score
of every combination it has not, and choose what to test next.

The space is a list of `Dim`s: a categorical choice (which sampler, which growth, ...) or a
number, each active only when its parent takes a given value (a module's hyperparameter exists
only when that module is chosen).

The model (`Ace.fit`) is Bayesian linear regression of the score on
- main effects: an indicator per categorical value; for a number `u` scaled to [0, 1] (log scale
  where the range is), `u - 1/2` and `(u - 1/2)^2 - 1/12`, so that an optimum inside the range
  can be represented. An inactive dimension's features are 0;
- every pairwise interaction: the products of two dimensions' main features.

Main effects and interactions get their own Gaussian prior variance, and the noise its own
variance; the three are chosen on a grid by the marginal likelihood (the evidence) of the
measured scores. The posterior is closed form, so every prediction comes with its standard
deviation. Why this and not a low-rank factorisation of the interactions: a sweep has tens of
trials, too few to fit a factorisation machine's non-convex factors stably or to calibrate its
uncertainty; shrinking all pairs together, by as much as the evidence asks, keeps the same
"module effects plus small interactions" structure with an exact posterior. Computed in the
dual (a kernel over trials, `n x n`), so the pair features' number does not matter.

Choosing (`propose`): the lowest lower confidence bound `mean - kappa * sd` (scores are
minimised) over every categorical combination, each with random draws of its numbers; trials
still running count as measured at their predicted mean (the "kriging believer"), so parallel
workers do not all pick the same point. `AceSampler` wraps that as an Optuna sampler.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Params = Mapping[str, Any]
PROPOSAL = "ace_proposal"  # trial attributes: the point ACE chose, and its predicted mean and sd there
PREDICTED = "ace_predicted"


@dataclass(frozen=True)
class Dim:
    """One parameter of the space. `choices` for a categorical one, `low`/`high` (and `log`,
    `integer`) for a number; active when any `(parent, value)` of `when` holds (always when empty)."""

    name: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    when: tuple[tuple[str, Any], ...] = ()

    @property
    def categorical(self) -> bool:
        return bool(self.choices)

    def active(self, params: Params) -> bool:
        return not self.when or any(params.get(p) == v for p, v in self.when)

    def unit(self, value: float) -> float:
        """`value` scaled to [0, 1] over the range (log scale where the range is)."""
        lo, hi = float(self.low), float(self.high)
        if hi == lo:
            return 0.5
        if self.log:
            return (math.log(value) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (float(value) - lo) / (hi - lo)

    def draw(self, rng: np.random.Generator) -> Any:
        u = rng.random()
        lo, hi = float(self.low), float(self.high)
        x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if self.log else lo + u * (hi - lo)
        return int(min(max(round(x), lo), hi)) if self.integer else float(x)


class Space:
    """The dimensions, in an order where every parent precedes its children."""

    def __init__(self, dims: Sequence[Dim]):
        self.dims = list(dims)
        seen: set[str] = set()
        for d in self.dims:
            for parent, _ in d.when:
                if parent not in seen:
                    raise ValueError(f"dimension '{d.name}': its parent '{parent}' must come before it")
            seen.add(d.name)
        if len(seen) != len(self.dims):
            raise ValueError("dimension names must be unique")

    def active(self, params: Params) -> dict[str, Any]:
        """The parameters of `params` that are active under its own choices."""
        out: dict[str, Any] = {}
        for d in self.dims:
            if d.name in params and d.active(out):
                out[d.name] = params[d.name]
        return out

    def combinations(self) -> list[dict[str, Any]]:
        """Every valid assignment of the categorical dimensions (numbers left out)."""
        combos: list[dict[str, Any]] = [{}]
        for d in self.dims:
            if not d.categorical:
                continue
            combos = [{**c, d.name: v} if d.active(c) else c
                      for c in combos for v in (d.choices if d.active(c) else (None,))]
        return combos

    def complete(self, combo: Params, rng: np.random.Generator) -> dict[str, Any]:
        """`combo` with a random draw of every number it makes active."""
        out = dict(combo)
        for d in self.dims:
            if not d.categorical and d.active(out):
                out[d.name] = d.draw(rng)
        return out

    def key(self, params: Params) -> tuple:
        """What identifies a combination: its categorical choices."""
        return tuple(params.get(d.name) for d in self.dims if d.categorical)


# ------------------------------------------------------------------------------ features


def _main_features(space: Space, params: Params) -> list[np.ndarray]:
    """Per dimension, its main-effect features for `params` (zeros when inactive)."""
    act = space.active(params)
    out = []
    for d in space.dims:
        if d.categorical:
            f = np.array([1.0 if d.name in act and act[d.name] == c else 0.0 for c in d.choices])
        elif d.name in act:
            u = d.unit(act[d.name]) - 0.5
            f = np.array([u, u * u - 1.0 / 12.0])
        else:
            f = np.zeros(2)
        out.append(f)
    return out


def features(space: Space, rows: Iterable[Params]) -> tuple[np.ndarray, np.ndarray]:
    """(main, pairwise) feature matrices of `rows`."""
    mains, pairs = [], []
    for p in rows:
        m = _main_features(space, p)
        mains.append(np.concatenate(m))
        pairs.append(np.concatenate([np.outer(a, b).ravel() for a, b in itertools.combinations(m, 2)] or [np.zeros(0)]))
    return np.array(mains), np.array(pairs)


# --------------------------------------------------------------------------------- model


MAIN_VARS = (0.03, 0.1, 0.3, 1.0, 3.0)  # prior variances on the standardised score
PAIR_VARS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3)
NOISE_VARS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
BIAS_VAR = 1.0


@dataclass
class Prediction:
    mean: np.ndarray
    sd: np.ndarray


@dataclass
class Ace:
    """A fitted model: call `predict` on any parameter dicts of the space."""

    space: Space
    rows: list[dict]
    y: np.ndarray  # measured scores
    main_var: float = 1.0
    pair_var: float = 0.1
    noise_var: float = 0.1
    log_evidence: float = float("nan")
    _mu: float = 0.0
    _sd: float = 1.0
    _alpha: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _chol: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    _feats: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros((0, 0)), np.zeros((0, 0))))

    @classmethod
    def fit(cls, space: Space, rows: Sequence[Params], scores: Sequence[float],
            hyper: tuple[float, float, float] | None = None) -> "Ace":
        """Fit on measured (`rows`, `scores`); `hyper` = (main, pair, noise) variances to reuse,
        else chosen by the evidence."""
        if len(rows) != len(scores) or not rows:
            raise ValueError("ACE needs at least one measured trial, with a score per trial")
        y = np.asarray(scores, dtype=float)
        m = cls(space, [dict(r) for r in rows], y)
        m._mu = float(y.mean())
        m._sd = float(y.std()) or 1.0
        z = (y - m._mu) / m._sd
        m._feats = features(space, m.rows)
        km, kp = m._feats[0] @ m._feats[0].T, m._feats[1] @ m._feats[1].T
        grid = [hyper] if hyper else itertools.product(MAIN_VARS, PAIR_VARS, NOISE_VARS)
        best = None
        for a, b, s in grid:
            c = BIAS_VAR + a * km + b * kp + s * np.eye(len(z))
            try:
                chol = np.linalg.cholesky(c)
            except np.linalg.LinAlgError:
                continue
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
            ev = -0.5 * z @ alpha - np.log(np.diag(chol)).sum() - 0.5 * len(z) * math.log(2 * math.pi)
            if best is None or ev > best[0]:
                best = (ev, a, b, s, chol, alpha)
        ev, m.main_var, m.pair_var, m.noise_var, m._chol, m._alpha = best
        m.log_evidence = float(ev)
        return m

    def _cross(self, rows: Sequence[Params]) -> tuple[np.ndarray, np.ndarray]:
        fm, fp = features(self.space, rows)
        k = BIAS_VAR + self.main_var * fm @ self._feats[0].T + self.pair_var * fp @ self._feats[1].T
        kss = BIAS_VAR + self.main_var * (fm * fm).sum(1) + self.pair_var * (fp * fp).sum(1)
        return k, kss

    def predict(self, rows: Sequence[Params]) -> Prediction:
        """Posterior mean and standard deviation of the (noise-free) score of each row."""
        if not rows:
            return Prediction(np.zeros(0), np.zeros(0))
        k, kss = self._cross(rows)
        mean = k @ self._alpha
        v = np.linalg.solve(self._chol, k.T)
        var = np.maximum(kss - (v * v).sum(0), 1e-12)
        return Prediction(self._mu + self._sd * mean, self._sd * np.sqrt(var))

    def loo(self) -> np.ndarray:
        """Leave-one-out prediction of each measured score (closed form for this model: the
        mean of trial i from a fit on the others, at the same prior and noise variances)."""
        cinv = np.linalg.solve(self._chol.T, np.linalg.solve(self._chol, np.eye(len(self.y))))
        z = (self.y - self._mu) / self._sd
        return self._mu + self._sd * (z - self._alpha / np.diag(cinv))

    def with_pending(self, pending: Sequence[Params]) -> "Ace":
        """The same model with `pending` trials counted as measured at their predicted mean."""
        if not pending:
            return self
        guess = self.predict(pending).mean
        return Ace.fit(self.space, [*self.rows, *pending], [*self.y, *guess],
                       hyper=(self.main_var, self.pair_var, self.noise_var))

    # ------------------------------------------------------------------- what it says

    def candidates(self, rng: np.random.Generator, draws: int = 16) -> list[dict]:
        """Every categorical combination, each with `draws` random completions of its numbers
        (one when it has none)."""
        out = []
        for combo in self.space.combinations():
            numeric = any(not d.categorical and d.active(combo) for d in self.space.dims)
            out += [self.space.complete(combo, rng) for _ in range(draws if numeric else 1)]
        return out

    def importance(self, pool: Sequence[Params]) -> dict[str, float]:
        """Per dimension, the share of the variance of the predicted score over `pool` that its
        value alone explains (a first-order, fANOVA-style index on the model; numbers in quartile
        bins). A conditional dimension is judged where it is active, so that it is not credited
        with its parent's effect."""
        mean = self.predict(pool).mean
        total = float(mean.var())
        out: dict[str, float] = {}
        for d in self.space.dims:
            act = [self.space.active(p).get(d.name) for p in pool]
            on = np.array([a is not None for a in act])
            if total <= 0 or not on.any():
                out[d.name] = 0.0
                continue
            vals = [a for a in act if a is not None]
            if d.categorical:
                groups = np.array([str(v) for v in vals])
            else:
                u = np.array([d.unit(v) for v in vals])
                groups = np.searchsorted(np.quantile(u, [0.25, 0.5, 0.75]), u)
            sub = mean[on]
            between = sum((groups == g).sum() * (sub[groups == g].mean() - sub.mean()) ** 2 for g in np.unique(groups))
            out[d.name] = float(between / len(pool) / total)
        return out

    def best_per_combination(self, pool: Sequence[Params]) -> list[dict]:
        """For each categorical combination in `pool`, its draw with the lowest predicted score,
        sorted best first: {"params", "mean", "sd"}."""
        pred = self.predict(pool)
        best: dict[tuple, int] = {}
        for i, p in enumerate(pool):
            k = self.space.key(p)
            if k not in best or pred.mean[i] < pred.mean[best[k]]:
                best[k] = i
        rows = [{"params": dict(pool[i]), "mean": float(pred.mean[i]), "sd": float(pred.sd[i])} for i in best.values()]
        return sorted(rows, key=lambda r: r["mean"])


def propose(space: Space, measured: Sequence[Params], scores: Sequence[float], pending: Sequence[Params] = (),
            rng: np.random.Generator | None = None, kappa: float = 1.0, draws: int = 16) -> tuple[dict, float, float]:
    """The next point to test: the candidate with the lowest `mean - kappa * sd`, never an exact
    repeat of a measured or pending one. Returns (params, predicted mean, predicted sd)."""
    rng = rng or np.random.default_rng()
    model = Ace.fit(space, measured, scores).with_pending(pending)
    seen = {point_key(p) for p in (*measured, *pending)}
    pool = [c for c in model.candidates(rng, draws) if point_key(c) not in seen]
    if not pool:  # a small categorical space, all of it tried: the best one again
        pool = [dict(measured[int(np.argmin(scores))])]
    pred = model.predict(pool)
    i = int(np.argmin(pred.mean - kappa * pred.sd))
    return pool[i], float(pred.mean[i]), float(pred.sd[i])


def point_key(p: Params) -> tuple:
    """What makes two points the same point (every value, numbers included)."""
    return tuple(sorted((k, repr(v)) for k, v in p.items()))
