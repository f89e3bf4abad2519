import json

import numpy as np
import pytest

from curriculum.samplers import (SAMPLERS, CommunitySampler, OdmSampler, SkillItSampler, StratifiedSampler,
                                 UniformSampler, make_sampler)
from pipeline.errors import UserError
from retrieval.graph import TopicGraph

# 300 blocks over 10 topics of uneven size (as k-means topics are), in corpus order shuffled.
SIZES = [60, 45, 40, 35, 30, 25, 25, 20, 12, 8]
BLOCK_TOPICS = np.random.default_rng(7).permutation(np.repeat(np.arange(10), SIZES))

# A small topic graph: a ring 0-1-...-7-0 with two chords; topic 8 is a dead end (3 -> 8 only,
# as a directed kNN list can give); topic 9 is isolated; topic 10 has an edge but no blocks.
ADJ = {0: [1, 7, 4], 1: [0, 2], 2: [1, 3, 6], 3: [2, 4, 8], 4: [3, 5, 0], 5: [4, 6, 10],
       6: [5, 7, 2], 7: [6, 0], 8: [], 9: [], 10: [5]}


def batches(sampler, n: int) -> list[np.ndarray]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def check_community_walk(sampler: CommunitySampler, block_topics: np.ndarray,
                         adj: dict[int, list[int]], n: int) -> int:
    """Draw n batches and check the research note's rules; returns the number of jumps seen."""
    has_blocks = set(np.unique(block_topics).tolist())
    nbrs = {t: set(adj.get(t, [])) & has_blocks - {t} for t in has_blocks}
    out = batches(sampler, n)
    history = list(sampler.history)
    assert len(history) == n
    jumps = 0
    for i, (batch, (root, community)) in enumerate(zip(out, history)):
        assert batch.dtype == np.int64 and batch.shape == (sampler.batch_size,)
        # every block of the batch belongs to a topic of the recorded community
        assert set(block_topics[batch].tolist()) <= set(community)
        # the community is ROOT plus min(k, degree) distinct neighbours of ROOT
        assert root in community and len(community) == len(set(community))
        assert set(community) - {root} <= nbrs[root]
        assert len(community) == 1 + min(sampler.k, len(nbrs[root]))
        # without replacement whenever the community holds enough blocks
        if np.isin(block_topics, community).sum() >= sampler.batch_size:
            assert len(set(batch.tolist())) == sampler.batch_size
        if i:
            prev = history[i - 1][0]
            if nbrs[prev]:
                assert root in nbrs[prev], (i, prev, root)  # moves only along edges
            else:
                jumps += 1  # isolated / dead-end ROOT: a counted random jump
    assert sampler.jumps == jumps
    return jumps


def test_community_batches_stay_in_their_community_and_root_walks_the_graph():
    sampler = CommunitySampler(BLOCK_TOPICS, batch_size=16, adjacency=ADJ, k=2, seed=3)
    jumps = check_community_walk(sampler, BLOCK_TOPICS, ADJ, 2000)
    roots = [r for r, _ in sampler.history]
    assert jumps > 0  # the walk reached dead end 8 (via 3) and jumped away
    assert set(roots) <= set(range(10))  # topic 10 has no blocks: never a ROOT
    assert all(10 not in c for _, c in sampler.history)
    assert sampler.batches_drawn == 2000


def test_edgeless_graph_jumps_every_batch_and_small_topics_draw_with_replacement():
    # No edges: each community is ROOT alone; topics 8 and 9 (12 and 8 blocks) are smaller
    # than the batch, so their batches repeat blocks; the rest never do.
    sampler = CommunitySampler(BLOCK_TOPICS, batch_size=16, adjacency={}, k=2, seed=0)
    for batch, (root, community) in zip(batches(sampler, 200), sampler.history):
        assert community == (root,)
        assert set(BLOCK_TOPICS[batch].tolist()) == {root}
        unique = len(set(batch.tolist()))
        assert unique == 16 if SIZES[root] >= 16 else unique <= SIZES[root]
    assert {8, 9} <= {r for r, _ in sampler.history}
    assert sampler.jumps == 199  # every move after the first batch is a jump


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_community_sampler_on_an_erdos_renyi_topic_graph(seed):
    n_topics = 30
    block_topics = np.random.default_rng(seed).integers(0, n_topics, 600)
    graph = TopicGraph.build("erdos_renyi", np.zeros((n_topics, 4)), p=0.08, seed=seed)
    adj = graph.adjacency()
    sampler = make_sampler("community", block_topics, 16, adj, k=3, seed=seed)
    check_community_walk(sampler, block_topics, adj, 1000)


def test_adjacency_loaded_from_json_has_string_keys():
    adj = {str(t): v for t, v in ADJ.items()}
    a = CommunitySampler(BLOCK_TOPICS, 16, adj, k=2, seed=5)
    b = CommunitySampler(BLOCK_TOPICS, 16, ADJ, k=2, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(batches(a, 100), batches(b, 100)))


def test_uniform_covers_every_block_exactly_once_per_epoch():
    sampler = UniformSampler(BLOCK_TOPICS, batch_size=16, seed=0)
    stream = np.concatenate(batches(sampler, 300 * 4 // 16))  # 4 whole epochs, 75 batches
    epochs = stream.reshape(4, 300)
    for epoch in epochs:
        assert np.array_equal(np.sort(epoch), np.arange(300))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert sampler.epoch == 4


def test_uniform_with_fewer_blocks_than_the_batch_draws_with_replacement():
    sampler = UniformSampler(np.array([0, 0, 1, 2, 2]), batch_size=16, seed=0)
    out = batches(sampler, 20)
    assert all(b.shape == (16,) and b.min() >= 0 and b.max() < 5 for b in out)
    assert set(np.concatenate(out).tolist()) == {0, 1, 2, 3, 4}


# the manifold's stream depends on the model it reads: its resume is tested through the training
# loop (tests/curriculum/test_manifold.py)
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"manifold"}))
@pytest.mark.parametrize("block_topics", [BLOCK_TOPICS, np.array([0, 0, 1, 2, 2])], ids=["300", "5"])
def test_deterministic_under_the_seed_and_skip(name, block_topics):
    def make(seed):
        return make_sampler(name, block_topics, 16, ADJ, k=2, seed=seed)

    full = batches(make(11), 60)
    assert all(np.array_equal(x, y) for x, y in zip(full, batches(make(11), 60)))
    assert not all(np.array_equal(x, y) for x, y in zip(full, batches(make(12), 60)))
    resumed = iter(make(11))  # a sampler is its own iterator: skip works on what iter() gives
    resumed.skip(37)  # 37 * 16 blocks: crosses an epoch boundary of the 300-block uniform stream
    assert resumed.batches_drawn == 37
    rest = batches(resumed, 23)
    assert all(np.array_equal(x, y) for x, y in zip(full[37:], rest))
    assert resumed.batches_drawn == 60


def test_community_skip_restores_walk_state():
    a, b = (CommunitySampler(BLOCK_TOPICS, 16, ADJ, k=2, seed=4) for _ in range(2))
    batches(a, 500)
    b.skip(500)
    assert (a.jumps, list(a.history)) == (b.jumps, list(b.history))


def test_unknown_sampler_name_suggests_the_closest():
    with pytest.raises(UserError) as e:
        make_sampler("comunity", BLOCK_TOPICS, 16, ADJ)
    assert str(e.value) == ("unknown sampler (train.sampler) 'comunity'. Did you mean 'community'? "
                            "Choose one of: community, manifold, odm, skillit, stratified, uniform.")


def test_registry_builds_each_kind():
    assert isinstance(make_sampler("uniform", BLOCK_TOPICS, 16), UniformSampler)
    assert isinstance(make_sampler("community", BLOCK_TOPICS, 16, ADJ, k=1), CommunitySampler)
    assert isinstance(make_sampler("stratified", BLOCK_TOPICS, 16), StratifiedSampler)
    assert isinstance(make_sampler("odm", BLOCK_TOPICS, 16), OdmSampler)
    assert isinstance(make_sampler("skillit", BLOCK_TOPICS, 16, ADJ), SkillItSampler)
    with pytest.raises(ValueError, match="needs the topic graph's adjacency"):
        make_sampler("skillit", BLOCK_TOPICS, 16)
    with pytest.raises(ValueError, match="needs the topic graph's adjacency"):
        make_sampler("community", BLOCK_TOPICS, 16)


def test_stratified_gives_every_topic_the_same_blocks_whatever_its_size():
    sampler = StratifiedSampler(BLOCK_TOPICS, 16, seed=3)
    drawn = np.concatenate(batches(sampler, 50))  # 800 slots = 80 whole cycles over 10 topics
    assert np.bincount(BLOCK_TOPICS[drawn], minlength=10).tolist() == [80] * 10
    # within a topic, every block comes once before any comes again: topic 0 (60 blocks) 80 times
    first = drawn[BLOCK_TOPICS[drawn] == 0][:60]
    assert sorted(first.tolist()) == np.flatnonzero(BLOCK_TOPICS == 0).tolist()


def test_odm_starts_uniform_then_leans_towards_the_topic_with_the_highest_loss():
    sampler = OdmSampler(BLOCK_TOPICS, 16, seed=0)
    np.testing.assert_allclose(sampler.mixture(), np.full(10, 0.1))
    hard = 9  # the smallest topic: a size-proportional sampler would hardly ever draw it
    for _ in range(400):
        batch = sampler.next_batch()
        sampler.observe(batch, np.where(BLOCK_TOPICS[batch] == hard, 6.0, 2.0))
    p = sampler.mixture()
    assert p.argmax() == hard and p[hard] > 1.3 * np.delete(p, hard).max()
    k, t = 10, sampler.batches_drawn + 1
    assert p.min() >= min(1 / k, np.sqrt(np.log(k) / (k * t))) - 1e-12  # exploration keeps every topic in play
    assert abs(p.sum() - 1) < 1e-9


def test_odm_state_dict_resumes_the_stream_exactly():
    def feedback(batch):
        return (BLOCK_TOPICS[batch] % 3).astype(float) + 1.0

    a = OdmSampler(BLOCK_TOPICS, 16, seed=5)
    for _ in range(30):
        a.observe(batch := a.next_batch(), feedback(batch))
    b = OdmSampler(BLOCK_TOPICS, 16, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(30):
        x, y = a.next_batch(), b.next_batch()
        assert np.array_equal(x, y)
        a.observe(x, feedback(x))
        b.observe(y, feedback(y))
    np.testing.assert_allclose(a.rewards, b.rewards)


def test_skillit_draws_more_from_topics_whose_neighbourhood_has_the_highest_loss():
    sampler = SkillItSampler(BLOCK_TOPICS, 16, ADJ, seed=0, eta=2.0, window=3, round_batches=10)
    np.testing.assert_allclose(sampler.mixture(), np.full(10, 0.1))  # no loss seen yet: uniform
    hard = 9  # isolated: only its own loss counts for it
    for _ in range(200):
        batch = sampler.next_batch()
        sampler.observe(batch, np.where(BLOCK_TOPICS[batch] == hard, 6.0, np.where(BLOCK_TOPICS[batch] == 1, 4.0, 2.0)))
    p = sampler.mixture()
    # the rule, computed by hand: L = (2, 4, 2, ..., 6), A = adjacency + self-loops, rows normalised
    loss = np.where(np.arange(10) == hard, 6.0, np.where(np.arange(10) == 1, 4.0, 2.0))
    a = np.eye(10)
    for t, ns in ADJ.items():
        for n in ns:
            if t < 10 and n < 10:
                a[t, n] = a[n, t] = 1.0
    z = 2.0 * 3 * (a / a.sum(1, keepdims=True)) @ loss
    np.testing.assert_allclose(p, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-9)
    assert p.argmax() == hard
    # topic 1's neighbours (0 and 2) share its high loss; a topic far from it (5) does not
    assert p[0] > p[5] and p[2] > p[5]
    drawn = np.concatenate(batches(sampler, 100))
    assert np.mean(BLOCK_TOPICS[drawn] == hard) > 0.5


def test_skillit_state_dict_resumes_the_stream_exactly():
    def feedback(batch):
        return (BLOCK_TOPICS[batch] % 3).astype(float) + 1.0

    a = SkillItSampler(BLOCK_TOPICS, 16, ADJ, seed=5, round_batches=7)
    for _ in range(30):
        a.observe(batch := a.next_batch(), feedback(batch))
    b = SkillItSampler(BLOCK_TOPICS, 16, ADJ, seed=5, round_batches=7)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as a checkpoint stores it
    for _ in range(30):
        x, y = a.next_batch(), b.next_batch()
        assert np.array_equal(x, y)
        a.observe(x, feedback(x))
        b.observe(y, feedback(y))
    np.testing.assert_allclose(a.mixture(), b.mixture())
