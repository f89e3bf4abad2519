"""ACE as an Optuna sampler, and the objective-side helper that asks a trial for a `Space`'s values.

A trial's whole point is chosen at its first `suggest_*`: random for the first `startup`
trials (seeded by the study's seed and the trial's number, so that workers sharing a study draw
different points and a rerun draws the same ones; never a point measured or running already),
then `ace.propose` over the completed trials,
with the running ones as pending. The point is kept on the trial (`ace_proposal`, and ACE's
predicted mean and sd in `ace_predicted`), so that the parameters it then suggests are the
point's and other workers see it as pending.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from curriculum.ace import PREDICTED, PROPOSAL, Space, point_key, propose


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Ask `trial` for every dimension active under its own choices, parents first."""
    out: dict[str, Any] = {}
    for d in space.dims:
        if not d.active(out):
            continue
        if d.categorical:
            out[d.name] = trial.suggest_categorical(d.name, list(d.choices))
        elif d.integer:
            out[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log)
        else:
            out[d.name] = trial.suggest_float(d.name, float(d.low), float(d.high), log=d.log)
    return out


def random_point(space: Space, rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in space.dims:
        if d.active(out):
            out[d.name] = d.choices[int(rng.integers(len(d.choices)))] if d.categorical else d.draw(rng)
    return out


class AceSampler(BaseSampler):
    def __init__(self, space: Space, startup: int = 8, kappa: float = 1.0, seed: int = 0):
        self.space, self.startup, self.kappa, self.seed = space, startup, kappa, seed
        self._points: dict[int, dict] = {}  # trial id -> its point, for the suggests that follow
        self._fallback = RandomSampler(seed)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def _point(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        if trial._trial_id in self._points:
            return self._points[trial._trial_id]
        point = trial.system_attrs.get(PROPOSAL)  # chosen by this trial's earlier suggests (another sampler object)
        if point is None:
            rng = np.random.default_rng([self.seed, trial.number])
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.value is not None and np.isfinite(t.value)]
            predicted = None
            pending = [t.system_attrs.get(PROPOSAL) or t.params
                       for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t._trial_id != trial._trial_id]
            if len(done) < self.startup:
                # a random point not measured or running already: a combination without numbers
                # (a deterministic training) would otherwise be paid for again and again
                seen = {point_key(p) for p in (*(t.params for t in done), *pending) if p}
                point = random_point(self.space, rng)
                for _ in range(100):
                    if point_key(point) not in seen:
                        break
                    point = random_point(self.space, rng)
            else:
                point, mean, sd = propose(self.space, [t.params for t in done], [t.value for t in done],
                                          [p for p in pending if p], rng, self.kappa)
                predicted = {"mean": mean, "sd": sd, "fit_on": len(done)}
            study._storage.set_trial_system_attr(trial._trial_id, PROPOSAL, point)
            if predicted:
                study._storage.set_trial_user_attr(trial._trial_id, PREDICTED, predicted)
        self._points[trial._trial_id] = point
        return point

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution):
        point = self._point(study, trial)
        if param_name in point:
            value = point[param_name]
            try:
                if param_distribution._contains(param_distribution.to_internal_repr(value)):
                    return value
            except (ValueError, TypeError):
                pass
        # a parameter outside the space, or one whose range the objective changed
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._points.pop(trial._trial_id, None)
