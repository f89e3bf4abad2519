import json
import math

import numpy as np
import pytest

from curriculum.curiosity import (FEATURES, POLICIES, choose, frontier, learning_progress, make_policy,
                                  spearman, structural_features)
from pipeline.errors import UserError


def test_frontier_is_the_unexplored_neighbourhood_of_the_explored_set():
    adj = {0: [1, 2], 1: [0, 3], 2: [0], 3: [1, 4], 4: [3], 5: []}
    assert frontier(adj, {0}) == [1, 2]
    assert frontier(adj, {0, 1}) == [2, 3]
    assert frontier(adj, {0, 1, 2, 3, 4}) == []  # 5 is unreachable: never on the frontier


def test_learning_progress_is_loss_drop_per_1k_tokens():
    assert learning_progress(5.0, 4.0, 2000) == pytest.approx(0.5)


def test_structural_features(small_run):
    centroids = np.load(small_run / "topics" / "centroids.npy")
    adj = {0: [1, 2], 1: [0], 2: [0]}
    f = structural_features([1, 2], [0], centroids, adj, np.array([0.5, 0.3, 0.2]), np.array([10, 20, 30]),
                            {0: ["storm", "wind"], 1: ["storm", "rain"], 2: ["album"]})
    np.testing.assert_allclose(f["similarity"], centroids[[1, 2]] @ centroids[0], rtol=1e-6)
    np.testing.assert_allclose(f["novelty"], [0.5, 1.0])
    np.testing.assert_allclose(f["log_size"], np.log1p([20, 30]))


def _x(n, rng):
    return rng.normal(size=(n, len(FEATURES)))


def test_heuristic_policies_rank_by_their_feature():
    x = np.zeros((3, len(FEATURES)))
    x[:, FEATURES.index("similarity")] = [0.2, 0.9, 0.5]
    x[:, FEATURES.index("surprise")] = [6.0, 3.0, 7.0]
    assert [t for t, _ in choose(make_policy("nearest"), [10, 11, 12], x, 2)] == [11, 12]
    assert [t for t, _ in choose(make_policy("max_loss"), [10, 11, 12], x, 3)] == [12, 10, 11]


def test_learned_policy_recovers_a_linear_progress_model():
    rng = np.random.default_rng(0)
    w = rng.normal(size=len(FEATURES))
    policy = make_policy("learned", seed=0)
    for _ in range(60):
        x = _x(1, rng)[0]
        policy.update(0, x, float(x @ w + 0.05 * rng.normal()))
    test = _x(50, rng)
    assert spearman(policy.predict(test), test @ w) > 0.95
    # the confidence bonus shrinks as data accumulates
    fresh = make_policy("learned", seed=0)
    gap_fresh = fresh.score([0], test[:1])[0] - 0.0
    gap_trained = policy.score([0], test[:1])[0] - policy.predict(test[:1])[0]
    assert 0 < gap_trained < gap_fresh


def test_exp3s_prefers_the_topic_that_keeps_paying_off():
    policy = make_policy("learning_progress", seed=1, eta=0.3)
    topics = [0, 1, 2, 3]
    x = np.zeros((4, len(FEATURES)))
    for i in range(40):
        chosen = choose(policy, topics, x, 1)[0][0]
        policy.update(chosen, x[0], 1.0 if chosen == 2 else 0.0, topics)
    p = policy._policy(topics)
    assert abs(p.sum() - 1) < 1e-9 and np.argmax(p) == 2 and p[2] > 0.5


def test_policy_state_round_trips_through_json():
    rng = np.random.default_rng(3)
    for name in POLICIES:
        a = make_policy(name, seed=5)
        for _ in range(5):
            a.update(1, _x(1, rng)[0], float(rng.normal()), [0, 1, 2])
        b = make_policy(name, seed=0)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        x = _x(3, rng)
        np.testing.assert_allclose(a.score([0, 1, 2], x), b.score([0, 1, 2], x))


def test_unknown_policy_suggests_the_right_one():
    with pytest.raises(UserError, match="Did you mean 'learned'"):
        make_policy("learnd")


def test_spearman_matches_its_definition():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_learned_policy_separates_probe_offset_from_feature_weights():
    # Probes make more progress per token (shorter trainings); the indicator absorbs the offset,
    # so predictions for full neighbourhoods follow the full trainings' scale.
    from curriculum.curiosity import FEATURES, LearnedPolicy

    rng = np.random.default_rng(0)
    policy = LearnedPolicy(alpha=1e-3)
    for i in range(40):
        x = rng.normal(size=len(FEATURES))
        probe = i % 2 == 0
        policy.update(i, x, 2.0 * x[0] + (5.0 if probe else 0.0), probe=probe)
    test = rng.normal(size=(20, len(FEATURES)))
    assert np.allclose(policy.predict(test), 2.0 * test[:, 0], atol=0.05)
    restored = LearnedPolicy(alpha=1e-3)
    restored.load_state_dict(policy.state_dict())
    assert np.allclose(restored.predict(test), policy.predict(test))


def test_bandit_ignores_probe_trainings():
    from curriculum.curiosity import Exp3SPolicy

    policy = Exp3SPolicy(seed=0)
    before = policy.state_dict()
    policy.update(3, np.zeros(7), 9.0, topics=[1, 3], probe=True)
    assert policy.state_dict() == before
