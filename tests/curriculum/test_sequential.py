import numpy as np
import pytest

from curriculum.curiosity import FEATURES, make_policy
from curriculum.sequential import CuriosityCurriculum, TopicInfo

# 8 topics on a path 0-1-2-...-7, uneven sizes; the nucleus is topic 0.
SIZES = [40, 10, 30, 20, 10, 50, 20, 20]
BLOCK_TOPICS = np.random.default_rng(3).permutation(np.repeat(np.arange(8), SIZES))
ADJ = {t: [n for n in (t - 1, t + 1) if 0 <= n < 8] for t in range(8)}
CENTROIDS = np.eye(8)[:, :8] + 0.1
CENTROIDS /= np.linalg.norm(CENTROIDS, axis=1, keepdims=True)
INFO = TopicInfo(ADJ, CENTROIDS, np.full(8, 1 / 8), {t: [f"w{t}"] for t in range(8)})


def losses(calls: list):
    """A stand-in for the model's probe loss: each topic's loss falls a little every call."""
    def fn(topics):
        calls.append(list(topics))
        return {t: 5.0 - 0.01 * len(calls) - 0.1 * t for t in topics}
    return fn


def test_nucleus_first_then_frontier_neighbourhoods_with_replay_then_uniform():
    calls: list = []
    policy = make_policy("learned", seed=0)
    cc = CuriosityCurriculum(BLOCK_TOPICS, 8, 200, [0], INFO, policy, losses(calls),
                             coverage=0.5, replay=0.25, k=1, block_size=4, expanding=False, seed=1)
    drawn = [cc.next_batch() for _ in range(200)]
    phases = cc.phases
    assert phases[0].kind == "nucleus" and phases[0].topics == [0]
    assert phases[-1].kind == "uniform" and phases[-1].topics == list(range(8))
    explored = {0}
    for p in phases[1:-1]:
        assert p.kind == "neighborhood" and p.chosen in p.topics
        assert any(n in explored for n in ADJ[p.chosen])  # the chosen topic was on the frontier
        assert not set(p.topics) & explored  # a neighbourhood adds only unexplored topics
        # its batches: 6 blocks of the new topics, then 2 replayed from the topics explored before
        for batch in drawn[p.start:p.start + p.batches]:
            assert set(BLOCK_TOPICS[batch[:6]]) <= set(p.topics) and set(BLOCK_TOPICS[batch[6:]]) <= explored
        # a phase lasts in proportion to the blocks it adds (curriculum = coverage * total batches)
        assert p.batches == max(1, round(100 * sum(SIZES[t] for t in p.topics) / sum(SIZES)))
        assert p.loss_after is not None and p.progress == pytest.approx(
            (p.loss_before - p.loss_after) / (p.batches * 6 * 4 / 1000))
        explored |= set(p.topics)
    assert all(set(BLOCK_TOPICS[b]) == {0} for b in drawn[:phases[0].batches])  # the nucleus phase: only nucleus
    # every finished neighbourhood taught the policy its realised progress, with its features
    finished = [p for p in phases if p.kind == "neighborhood"]
    assert policy.ys == pytest.approx([p.progress for p in finished])
    assert all(len(x) == len(FEATURES) for x in policy.xs)
    assert phases[-1].start == sum(p.batches for p in phases[:-1]) >= 100


def test_expanding_window_draws_over_everything_explored_in_proportion_to_size():
    policy = make_policy("learned", seed=0)
    cc = CuriosityCurriculum(BLOCK_TOPICS, 16, 300, [0], INFO, policy, losses([]), coverage=0.5, k=1,
                             block_size=4, seed=2)
    drawn = [cc.next_batch() for _ in range(300)]
    explored: set = set()
    for p in cc.phases[:-1]:
        explored |= set(p.topics)
        window = np.concatenate(drawn[p.start:p.start + p.batches])
        assert set(BLOCK_TOPICS[window]) <= explored  # never a topic not yet explored
        if p.kind == "neighborhood":
            assert p.progress is not None
    # a long phase draws its window's topics about in proportion to their sizes (natural mixture)
    longest = max(cc.phases[1:-1], key=lambda p: p.batches)
    window_topics = sorted({t for p in cc.phases[:cc.phases.index(longest) + 1] for t in p.topics})
    got = np.bincount(BLOCK_TOPICS[np.concatenate(drawn[longest.start:longest.start + longest.batches])],
                      minlength=8)[window_topics]
    expected = np.array(SIZES)[window_topics] / sum(SIZES[t] for t in window_topics)
    assert np.abs(got / got.sum() - expected).max() < 0.1
    assert len(policy.ys) == sum(p.kind == "neighborhood" for p in cc.phases)


def test_stratified_weighting_draws_the_topics_of_a_stretch_equally_whatever_their_size():
    cc = CuriosityCurriculum(BLOCK_TOPICS, 16, 300, [0], INFO, make_policy("random", seed=0), losses([]),
                             coverage=0.3, k=1, block_size=4, weighting="stratified", seed=2)
    drawn = [cc.next_batch() for _ in range(300)]
    tail = cc.phases[-1]
    assert tail.kind == "uniform" and tail.batches >= 150
    got = np.bincount(BLOCK_TOPICS[np.concatenate(drawn[tail.start:tail.start + tail.batches])], minlength=8)
    assert got.max() - got.min() <= 1  # equal blocks per topic, though the sizes range 10-50
    natural = CuriosityCurriculum(BLOCK_TOPICS, 16, 300, [0], INFO, make_policy("random", seed=0), losses([]),
                                  coverage=0.3, k=1, block_size=4, seed=2)
    drawn = [natural.next_batch() for _ in range(300)]
    t = natural.phases[-1]
    got = np.bincount(BLOCK_TOPICS[np.concatenate(drawn[t.start:t.start + t.batches])], minlength=8)
    assert got[5] > 3 * got[1]  # the natural mixture: topic 5 (50 blocks) far more than topic 1 (10)


def test_manifold_weighting_orders_each_stretch_within_its_open_blocks_on_a_graph_of_all():
    """`weighting="manifold"`: every batch comes from the stretch's blocks (the nucleus first,
    then what is explored), ordered by the manifold sampler, which measures a real tiny model
    through the training loop's `bind` and builds its graph over every block."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from curriculum.manifold import ManifoldSampler, ManifoldSettings
    from pipeline.lm_data import Blocks
    from pipeline.trainer import FitSettings, fit

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    tokens = torch.stack([torch.randint(4 * (t % 8), 4 * (t % 8) + 4, (8,), generator=torch.Generator().manual_seed(i))
                          for i, t in enumerate(BLOCK_TOPICS.tolist())])
    blocks = Blocks(tokens, torch.ones_like(tokens, dtype=torch.bool), BLOCK_TOPICS)
    manifold = ManifoldSampler(BLOCK_TOPICS, 8, ManifoldSettings(clusters=6, k=2, community_k=1, rebuild_every=20,
                                                                 prefix_tokens=8), seed=0)
    cc = CuriosityCurriculum(BLOCK_TOPICS, 8, 120, [0], INFO, make_policy("learned", seed=0), losses([]),
                             coverage=0.5, k=1, block_size=8, weighting="manifold", manifold=manifold, seed=1)
    drawn = []
    fit(model, blocks, lambda: _recording(cc, drawn), FitSettings(steps=120, lr=1e-3, batch_size=8, log_every=50),
        torch.device("cpu"))
    assert manifold.builds == 6 and manifold.features is not None  # bound to the model, rebuilt every 20
    assert len(manifold.graphs[0].labels) == len(BLOCK_TOPICS)  # one graph over every block
    explored: set = set()
    for p in cc.phases:
        explored |= set(p.topics)
        for batch in drawn[p.start:p.start + p.batches]:
            assert set(BLOCK_TOPICS[batch]) <= explored  # only what the curriculum has opened
    assert cc.phases[0].kind == "nucleus" and all(set(BLOCK_TOPICS[b]) == {0} for b in drawn[:cc.phases[0].batches])
    assert cc.overhead_s >= manifold.overhead_s > 0  # the rebuilds count as the curriculum's overhead
    with pytest.raises(ValueError, match="takes a ManifoldSampler"):
        CuriosityCurriculum(BLOCK_TOPICS, 8, 10, [0], INFO, make_policy("random", seed=0), losses([]),
                            weighting="manifold")


def _recording(cc, drawn):
    """`cc` as the training loop sees it (its `bind` too), keeping every batch it hands out."""
    class Recording:
        bind = cc.bind

        def __iter__(self):
            return self

        def __next__(self):
            drawn.append(next(cc))
            return drawn[-1]
    return Recording()


def test_nearest_policy_takes_the_most_similar_frontier_topic_and_k_grows_the_neighbourhood():
    cc = CuriosityCurriculum(BLOCK_TOPICS, 8, 400, [3], INFO, make_policy("nearest"), losses([]),
                             coverage=1.0, replay=0.0, k=1, seed=0)
    for _ in range(400):
        cc.next_batch()
    first = cc.phases[1]
    sims = CENTROIDS[[2, 4]] @ CENTROIDS[3]
    assert first.chosen == [2, 4][int(np.argmax(sims))] and len(first.topics) == 2
    assert {t for p in cc.phases for t in p.topics} == set(range(8))


@pytest.mark.parametrize("kwargs, message", [({"coverage": 0.0}, "coverage"), ({"replay": 1.0}, "replay"),
                                                   ({"weighting": "equal"}, "weighting")])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CuriosityCurriculum(BLOCK_TOPICS, 8, 10, [0], INFO, make_policy("random"), losses([]), **kwargs)
    with pytest.raises(ValueError, match="nucleus"):
        CuriosityCurriculum(BLOCK_TOPICS, 8, 10, [99], INFO, make_policy("random"), losses([]))
