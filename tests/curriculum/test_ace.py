"""ACE, the combination engine: its predictions, uncertainty, leave-one-out, importance and
choices on a score whose structure is known (main effects, one interaction, a conditional
number, noise), and as an Optuna sampler in a real study."""

import numpy as np
import optuna
import pytest

from curriculum.ace import PREDICTED, PROPOSAL, Ace, Dim, Space, propose
from curriculum.curiosity import spearman
from curriculum.ace_sampler import AceSampler, random_point, suggest

SPACE = Space([
    Dim("sampler", choices=("uniform", "community", "stratified", "nucleus")),
    Dim("k", low=1, high=8, integer=True, when=(("sampler", "community"),)),
    Dim("growth", choices=("full_rank", "relora")),
    Dim("rank", low=4, high=64, log=True, integer=True, when=(("growth", "relora"),)),
    Dim("lr", low=1e-4, high=1e-2, log=True),
    Dim("unused", choices=("a", "b")),  # no effect at all
])
EFFECT = {"uniform": 0.0, "community": 1.0, "stratified": 0.3, "nucleus": -0.2}


def score(p, rng=None):
    v = EFFECT[p["sampler"]] + (0.5 if p["growth"] == "relora" else 0.0) + 2 * (np.log10(p["lr"]) + 2.5) ** 2
    if p["sampler"] == "community":
        v += 0.1 * p["k"]
    if p["sampler"] == "nucleus" and p["growth"] == "relora":  # the interaction
        v += 0.6
    return v + (rng.normal(0, 0.05) if rng is not None else 0.0)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    xs = [random_point(SPACE, rng) for _ in range(n)]
    return xs, [score(p, rng) for p in xs]


def test_the_space_enumerates_valid_combinations_and_activates_children():
    combos = SPACE.combinations()
    assert len(combos) == 4 * 2 * 2
    assert all("k" not in c and "rank" not in c for c in combos)  # numbers are not enumerated
    assert SPACE.active({"sampler": "uniform", "k": 3, "growth": "relora", "rank": 8}) == {
        "sampler": "uniform", "growth": "relora", "rank": 8}
    with pytest.raises(ValueError, match="parent"):
        Space([Dim("k", low=1, high=2, when=(("sampler", "community"),)), Dim("sampler", choices=("community",))])


def test_predictions_of_held_out_points_rank_like_their_scores():
    xs, ys = _data(60)
    model = Ace.fit(SPACE, xs[:40], ys[:40])
    pred = model.predict(xs[40:])
    assert spearman(pred.mean, ys[40:]) > 0.9
    assert np.abs(pred.mean - np.array(ys[40:])).mean() < 0.3
    assert model.pair_var > 0  # the evidence keeps room for the interaction


def test_uncertainty_is_larger_where_nothing_was_measured():
    xs, ys = _data(40)
    seen = [p for p in xs if not (p["sampler"] == "nucleus" and p["growth"] == "relora")]
    model = Ace.fit(SPACE, seen, [score(p) for p in seen])
    probe = {"growth": "relora", "rank": 16, "lr": 3e-3, "unused": "a"}
    sd_new = model.predict([{**probe, "sampler": "nucleus"}]).sd[0]
    sd_old = model.predict([{**probe, "sampler": "stratified"}]).sd[0]
    assert sd_new > 1.25 * sd_old


def test_leave_one_out_equals_a_refit_without_the_point():
    xs, ys = _data(25)
    model = Ace.fit(SPACE, xs, ys)
    hyper = (model.main_var, model.pair_var, model.noise_var)
    for i in (0, 7, 24):
        rest = [j for j in range(25) if j != i]
        refit = Ace.fit(SPACE, [xs[j] for j in rest], [ys[j] for j in rest], hyper=hyper)
        # the closed form keeps the full data's standardisation: equal up to that, closely
        assert model.loo()[i] == pytest.approx(refit.predict([xs[i]]).mean[0], abs=0.05)


def test_importance_ranks_what_matters_and_not_the_unused_dimension():
    xs, ys = _data(60)
    model = Ace.fit(SPACE, xs, ys)
    imp = model.importance(model.candidates(np.random.default_rng(1), draws=32))
    assert max(imp, key=imp.get) in ("lr", "sampler")
    assert imp["unused"] < 0.02 and imp["sampler"] > 5 * imp["unused"]


def test_propose_never_repeats_and_a_pending_point_moves_the_next_one():
    cat = Space([Dim("a", choices=tuple(range(4))), Dim("b", choices=tuple(range(3)))])
    xs = [{"a": a, "b": b} for a in range(4) for b in range(3) if (a, b) != (0, 0) and (a, b) != (0, 1)]
    ys = [a + b for a in range(4) for b in range(3) if (a, b) != (0, 0) and (a, b) != (0, 1)]
    first, mean, sd = propose(cat, xs, ys, kappa=0.0)
    assert first == {"a": 0, "b": 0} and mean < min(ys)  # the untested best, predicted below all measured
    second, _, _ = propose(cat, xs, ys, pending=[first], kappa=0.0)
    assert second == {"a": 0, "b": 1}  # not the pending one again


def test_the_sampler_drives_a_real_study_and_records_its_predictions():
    study = optuna.create_study(sampler=AceSampler(SPACE, startup=8, seed=3))
    rng = np.random.default_rng(0)
    study.optimize(lambda t: score(suggest(t, SPACE), rng), n_trials=24)
    trials = study.get_trials()
    assert all(SPACE.active(t.params) == t.params for t in trials)  # children only under their parent
    assert all(PREDICTED not in t.user_attrs for t in trials[:8])
    chosen = trials[8:]
    assert all(t.user_attrs[PREDICTED]["fit_on"] == t.number for t in chosen)
    assert all(t.system_attrs[PROPOSAL] == t.params for t in chosen)
    # choosing by the model beats its own random start: the best chosen point is at least as good
    assert min(t.value for t in chosen) <= min(t.value for t in trials[:8])
    # the same seed draws the same start; trials take different points
    again = optuna.create_study(sampler=AceSampler(SPACE, startup=8, seed=3))
    again.optimize(lambda t: score(suggest(t, SPACE)), n_trials=3)
    assert [t.params for t in again.get_trials()] == [t.params for t in trials[:3]]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)


def test_the_random_start_never_pays_twice_for_a_combination_without_numbers():
    cat = Space([Dim("a", choices=("x", "y", "z")), Dim("b", choices=(0, 1))])
    study = optuna.create_study(sampler=AceSampler(cat, startup=6, seed=0))
    study.optimize(lambda t: float(len(suggest(t, cat)["a"]) + suggest(t, cat)["b"]), n_trials=6)
    assert len({tuple(sorted(t.params.items())) for t in study.get_trials()}) == 6  # all 6 combinations
