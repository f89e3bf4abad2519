"""The manifold sampler: its graph, its learned vectors, its traversals, its resume (tiny, real)."""

import numpy as np
import pytest
import torch

from curriculum.manifold import (ClusterGraph, Exp3S, ManifoldSampler, ManifoldSettings, block_vectors, knn,
                                 unit, update_vectors)


def _tiny_lm(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, max_position_embeddings=16))


def _blocks(n_per_topic: int = 24, topics: int = 4):
    """Topic t's blocks repeat a pattern of tokens of its own range: topics differ for real."""
    from pipeline.lm_data import Blocks

    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(4 * t, 4 * t + 4, (n_per_topic, 8), generator=g) for t in range(topics)]
    return Blocks(torch.cat(rows), torch.ones(n_per_topic * topics, 8, dtype=torch.bool),
                  np.repeat(np.arange(topics), n_per_topic))


def test_the_activation_graph_neighbours_match_brute_force_search_over_the_same_activations():
    """The manifold graph is built from a real model's activations: FAISS's kNN equals a
    brute-force search, every block sits in its nearest cluster, and the clusters' graph
    joins each to its nearest clusters by cosine."""
    from curriculum.block_signals import make_features

    b = _blocks()
    model = _tiny_lm()
    features, _ = make_features(model, b.tokens, b.mask, (-1, 1), 8, seed=0)
    f = features(np.arange(len(b)), False)
    for layer in (-1, 1):
        acts = unit(f["acts"][layer])
        sims = acts @ acts.T
        np.fill_diagonal(sims, -np.inf)
        brute = np.argsort(-sims, axis=1, kind="stable")[:, :5]
        got = knn(acts, 5)
        assert (np.sort(sims[np.arange(len(acts))[:, None], got], 1)
                == pytest.approx(np.sort(sims[np.arange(len(acts))[:, None], brute], 1), abs=1e-5))
        g = ClusterGraph.build(acts, clusters=6, k=2, seed=0)
        assert (g.labels == np.argmax(acts @ g.centroids.T, axis=1)).all()
        csims = g.centroids @ g.centroids.T
        np.fill_diagonal(csims, -np.inf)
        for i, row in enumerate(np.argsort(-csims, axis=1)[:, :2]):
            assert set(row) <= set(g.neighbours[i])  # its 2 nearest, plus those that chose it
    # the model is not a stand-in: its activations separate the topics it was fed
    acts = unit(f["acts"][-1])
    assert (np.argsort(-(acts @ acts.T), 1)[:, 1:4] // 24 == np.arange(len(acts))[:, None] // 24).mean() > 0.5


def test_the_outer_update_moves_a_vector_towards_the_blocks_whose_gradients_align_with_its_own():
    """Constructed: blocks 0-3 share a gradient direction, 4-7 the opposite one; the vectors start
    at random. One update moves block 0 towards where blocks 1-3 were and away from where 4-7
    were; a zero step changes nothing; over many steps the groups separate while the anchor keeps
    every vector near its start (no collapse)."""
    rng = np.random.default_rng(0)
    start = unit(rng.normal(size=(8, 6)))
    d = rng.normal(size=5)
    grads = np.concatenate([d + 0.1 * rng.normal(size=(4, 5)), -d + 0.1 * rng.normal(size=(4, 5))])
    idx = np.arange(8)
    moved = update_vectors(start, start, idx, grads, lr=0.5, anchor=0.2)
    aligned, opposed = start[1:4].mean(0), start[4:8].mean(0)
    assert moved[0] @ aligned > start[0] @ aligned
    assert moved[0] @ opposed < start[0] @ opposed
    np.testing.assert_allclose(update_vectors(start, start, idx, grads, lr=0.0, anchor=0.2), start, atol=1e-6)
    held = {}
    for anchor in (0.0, 0.2, 1.0):  # many steps: the groups separate into two, never one point
        v = start
        for _ in range(200):
            v = update_vectors(v, start, idx, grads, lr=0.5, anchor=anchor)
        assert (v[:4] @ v[:4].T).mean() > 0.5 and (v[:4] @ v[4:].T).mean() < -0.4
        held[anchor] = float(np.sum(v * start, 1).mean())  # mean cosine to the starting vector
    assert held[0.0] < held[0.2] < held[1.0]  # the anchor holds them nearer their start


def test_block_vectors_follow_the_packing_exactly():
    """A block's embedding is the token-weighted mean of the passages it holds, cut as
    pack_by_topic cuts: passages of 3, 5 and 2 tokens, blocks of 4."""
    from pipeline.lm_data import pack_by_topic

    vecs = np.eye(3, dtype=np.float32)
    counts, topics = [3, 5, 2], [0, 0, 0]
    packed = pack_by_topic([[1] * 3, [2] * 5, [3] * 2], topics, 4, 0)
    out = block_vectors(counts, topics, 4, vecs)
    assert len(out) == len(packed)
    np.testing.assert_allclose(out, unit(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 2]], dtype=np.float32)))


def test_exp3s_follows_the_arm_with_the_highest_reward():
    bandit, rng = Exp3S(4, lr=0.1, explore=0.1, share=0.01), np.random.default_rng(0)
    for _ in range(400):
        p = bandit.policy()
        arm = int(rng.choice(4, p=p))
        bandit.update(arm, 1.0 if arm == 2 else 0.0, p[arm])
    assert int(np.argmax(bandit.policy())) == 2 and bandit.policy()[2] > 0.5


SETTINGS = [ManifoldSettings(space="activation", layers=(-1,), clusters=4, k=2, rebuild_every=4),
            ManifoldSettings(space="activation", layers=(1, 2), clusters=4, k=2, rebuild_every=4),
            ManifoldSettings(space="learned", traversal="aligned", clusters=4, k=2, rebuild_every=4,
                             update_blocks=32),
            ManifoldSettings(space="activation", traversal="bandit", clusters=4, k=2, rebuild_every=4),
            ManifoldSettings(space="activation", traversal="grow", clusters=4, k=2, rebuild_every=4,
                             grow_fraction=0.75, total_batches=16),
            ManifoldSettings(space="random", traversal="grow", grow_order="random", clusters=4, k=2, rebuild_every=4,
                             grow_fraction=0.75, total_batches=16)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["activation", "per-layer", "learned-aligned", "bandit", "grow",
                                                    "random-grow"])
def test_a_fit_resumed_from_its_checkpoint_ends_exactly_where_the_uninterrupted_one_does(tmp_path, settings):
    """Through the real training loop: the manifold is rebuilt from the model every 4 batches;
    a run stopped at step 10 and resumed from its checkpoint draws the same batches, ends with
    the same vectors, clusters and weights, as one run straight through."""
    from pipeline.trainer import FitSettings, fit

    b = _blocks()
    vectors = unit(np.random.default_rng(0).normal(size=(len(b), 12)))  # stand-in embeddings
    probe = (b.tokens[::12].clone(), b.mask[::12].clone())

    class Killed(Exception):
        pass

    def run(directory, resume, kill_at=None):
        sampler = ManifoldSampler(b.topics, 8, settings, block_vectors=vectors, probe=probe, seed=3)
        drawn = []
        model = _tiny_lm()

        def on_batch(idx):
            drawn.append(idx)
            if len(drawn) == kill_at:
                raise Killed

        try:
            fit(model, b, lambda: iter(sampler), FitSettings(steps=16, lr=1e-2, batch_size=8, checkpoint_every=5,
                                                             log_every=5), torch.device("cpu"),
                checkpoint_dir=directory, resume=resume, on_batch=on_batch)
        except Killed:
            pass
        return sampler, model, drawn

    whole, model_a, drawn_a = run(tmp_path / "a", False)
    run(tmp_path / "b", False, kill_at=13)  # checkpoints at steps 5 and 10, killed in step 13
    resumed, model_b, drawn_b = run(tmp_path / "b", True)
    assert resumed.batches_drawn == whole.batches_drawn == 16 and whole.builds == (1 if settings.space == "random" else 4)
    assert [x.tolist() for x in drawn_b] == [x.tolist() for x in drawn_a[10:]]
    assert resumed.path == whole.path
    for name, value in whole.state_dict().items():
        if isinstance(value, np.ndarray):
            np.testing.assert_allclose(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    summary = whole.summary()
    assert set(summary["snapshots"]) == {"start", "end"} and len(summary["path"]) == 16
    if settings.space == "learned":
        assert summary["vector_drift"] < 1.0  # the outer update moved the vectors


def _arc():
    """Six tight groups of 20 blocks on an arc, 30 degrees apart (group g at angle 30 g): each
    block's group, and `features` that measure a block as its point on the arc."""
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(6), 20)
    angles = np.radians(30.0 * group) + rng.normal(scale=0.01, size=len(group))
    vectors = np.stack([np.cos(angles), np.sin(angles), 0.01 * rng.normal(size=len(group))], 1).astype(np.float32)

    def features(idx, with_grads):
        return {"acts": {-1: vectors[idx]}, "losses": np.zeros(len(idx))}

    return group, features


def test_the_random_space_is_a_fixed_random_partition_built_once_without_reading_the_model():
    """The control space: no `attach` (it never measures a block), one build however many
    batches, clusters that cut across the topics (each of 4 topics spread over most of the 8
    clusters), the same partition for the same seed, and no traversal that needs the model."""
    topics = np.repeat(np.arange(4), 50)
    settings = ManifoldSettings(space="random", traversal="grow", clusters=8, k=2, rebuild_every=5,
                                grow_fraction=0.5, total_batches=40)
    sampler = ManifoldSampler(topics, 4, settings, seed=1)
    batches = [sampler.next_batch() for _ in range(40)]
    assert sampler.builds == 1 and sampler.features is None
    labels = sampler.graphs[0].labels
    assert all(len(set(labels[topics == t].tolist())) >= 6 for t in range(4))
    assert np.concatenate(batches).max() < len(topics) and sorted(sampler.open_clusters) == list(range(8))
    again = ManifoldSampler(topics, 4, settings, seed=1)
    again.next_batch()
    np.testing.assert_array_equal(again.graphs[0].labels, labels)
    for traversal in ("aligned", "bandit"):
        with pytest.raises(ValueError, match="space 'random'"):
            ManifoldSettings(space="random", traversal=traversal)


def test_grow_in_random_order_opens_the_same_clusters_on_the_same_schedule_but_not_outwards():
    """The control for `grow`: on the arc of the test below, `grow_order: random` opens one more
    cluster per batch as `nearest` does and ends with all open, but the open groups are not
    always a contiguous stretch of the arc (the manifold's order is what it leaves out)."""
    group, features = _arc()

    contiguous = []
    for seed in range(4):
        settings = ManifoldSettings(traversal="grow", grow_order="random", clusters=6, k=2, rebuild_every=100,
                                    grow_fraction=0.5, total_batches=10)
        sampler = ManifoldSampler(group, 4, settings, seed=seed)
        sampler.attach(features)
        for t in range(10):
            batch = sampler.next_batch()
            graph = sampler.graphs[0]
            assert len(sampler.open_clusters) == min(6, t + 1)  # the schedule of `nearest`
            now = sorted({int(g) for c in sampler.open_clusters for g in group[graph.members[c]]})
            assert set(group[batch].tolist()) <= set(now)  # still only from the open region
            contiguous.append(now == list(range(now[0], now[0] + len(now))))
        assert now == list(range(6))
    assert not all(contiguous)
    with pytest.raises(ValueError, match="grow_order"):
        ManifoldSettings(traversal="grow", grow_order="farthest")


def test_grow_opens_the_manifold_outwards_from_one_cluster_and_draws_only_from_what_is_open():
    """Constructed: six tight groups of blocks on an arc, 30 degrees apart (group g at angle 30 g).
    The open region starts at one cluster and each new one is the nearest to it, so the groups
    it holds are always a contiguous stretch of the arc; one more cluster opens per batch (6 over
    half of 10 batches); every batch comes from the open blocks only; at the end all are open."""
    group, features = _arc()

    settings = ManifoldSettings(traversal="grow", clusters=6, k=2, rebuild_every=100, grow_fraction=0.5,
                                total_batches=10)
    sampler = ManifoldSampler(group, 4, settings, seed=5)
    sampler.attach(features)
    for t in range(10):
        batch = sampler.next_batch()
        graph = sampler.graphs[0]
        assert len(sampler.open_clusters) == min(6, t + 1)
        now = sorted({int(g) for c in sampler.open_clusters for g in group[graph.members[c]]})
        assert now == list(range(now[0], now[0] + len(now)))  # a contiguous stretch of the arc
        assert set(group[batch].tolist()) <= set(now)  # drawn from the open region only
    assert now == list(range(6)) and sampler.summary()["open_order"] == sampler.open_clusters
    sampler.s.rebuild_every = 2  # once everything is open, no rebuild (the measuring is the cost)
    builds = sampler.builds
    for _ in range(6):
        sampler.next_batch()
    assert sampler.builds == builds
    with pytest.raises(ValueError, match="total_batches"):
        ManifoldSampler(group, 4, ManifoldSettings(traversal="grow"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="space must be one of"):
        ManifoldSettings(space="hyperbolic")
    with pytest.raises(ValueError, match="several layers"):
        ManifoldSettings(layers=(1, 2), traversal="bandit")
    with pytest.raises(ValueError, match="one starting vector"):
        ManifoldSampler(np.zeros(8, dtype=np.int64), 4, ManifoldSettings(space="learned"))
    with pytest.raises(ValueError, match="probe blocks"):
        ManifoldSampler(np.zeros(8, dtype=np.int64), 4, ManifoldSettings(traversal="aligned"))
    with pytest.raises(RuntimeError, match="attach"):
        next(iter(ManifoldSampler(np.zeros(8, dtype=np.int64), 4, ManifoldSettings())))


def test_the_figure_draws_the_walks_roots_and_the_grow_windows_opening_order():
    import matplotlib

    matplotlib.use("Agg")
    from curriculum.manifold_plot import manifold_figure

    centres = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    shot = {"xy": [[0.1, 0.1], [0.9, 0.9]], "topics": [0, 1], "centroids_xy": centres, "step": 6,
            "topic_agreement": 0.5}
    walk = {"space": "activation", "traversal": "walk", "path": [0, 1, 0, 3, 3, 2], "rebuild_every": 4,
            "snapshots": {"start": shot, "end": shot}}
    fig = manifold_figure(walk)
    drawn = [fig.axes[i].lines[0].get_xydata().tolist() for i in (0, 1)]
    assert drawn == [[centres[r] for r in (0, 1, 0, 3)], [centres[r] for r in (0, 1, 0, 3, 3, 2)]]
    assert "roots' path" in fig._suptitle.get_text()
    grow = {**walk, "traversal": "grow", "path": [2, 2, 1, 1, 0, 3], "open_order": [2, 1, 0, 3]}
    fig = manifold_figure(grow, "nb")
    # every cluster in the order it opened, drawn from the last to the first, the star on the first
    assert fig.axes[0].lines[0].get_xydata().tolist() == [centres[c] for c in (3, 0, 1, 2)]
    assert fig.axes[1].collections[-1].get_offsets().tolist() == [centres[2]]
    assert fig._suptitle.get_text() == "nb (colour = topic, line = the order the clusters opened, star = the first)"
