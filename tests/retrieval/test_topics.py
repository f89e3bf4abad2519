import numpy as np

from retrieval.graph import GRAPH_BUILDERS, TopicGraph
from retrieval.topics import (auto_num_topics, ctfidf_keywords, group_assignments, heldout_mask, spherical_kmeans,
                              validation_mask)


def test_kmeans_assigns_each_passage_to_its_nearest_centroid(small_run):
    vectors = np.load(small_run / "index" / "embeddings.npy")
    centroids, assign = spherical_kmeans(vectors, 6, niter=20, seed=0)
    assert centroids.shape == (6, vectors.shape[1])
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    nearest = np.argmax(vectors @ centroids.T, axis=1)
    assert np.mean(nearest == assign) > 0.97  # recomputed centroids may flip a borderline few
    assert set(assign) == set(range(6))


def test_passages_that_share_a_title_go_together_to_the_topic_nearest_their_mean():
    centroids = np.eye(3, dtype=np.float32)
    vectors = np.array([[1, 0, 0], [0.2, 0.9, 0], [0, 0.7, 0.7], [0, 0.1, 1]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # "a": nearest 0 and 1 alone, mean nearest 0; "b": 1 and 2 alone, mean nearest 2 -> topic 1 empties
    new_centroids, assign = group_assignments(vectors, centroids, ["a", "a", "b", "b"])
    assert assign.tolist() == [0, 0, 1, 1]  # two topics left, relabelled 0..1
    expected = vectors[:2].sum(0) / np.linalg.norm(vectors[:2].sum(0))
    np.testing.assert_allclose(new_centroids[0], expected, rtol=1e-6)
    assert new_centroids.shape == (2, 3)


def test_auto_num_topics_grows_with_the_corpus():
    assert auto_num_topics(10) == 2
    assert auto_num_topics(1_100) == 17
    assert auto_num_topics(10**8) == 1024


def test_ctfidf_picks_words_distinctive_of_each_topic():
    texts = ["lobster claws lobster sea", "lobster shell sea", "guitar album sea", "album chart guitar sea"]
    words = ctfidf_keywords(texts, np.array([0, 0, 1, 1]), 2, top_n=2)
    assert set(words[0]) == {"lobster", "claws"} or words[0][0] == "lobster"
    assert words[1][0] in {"guitar", "album"}
    assert "sea" not in words[0][:1] and "sea" not in words[1][:1]


def test_heldout_is_a_fixed_fraction_of_every_topic():
    assign = np.repeat(np.arange(5), [1, 2, 10, 40, 100])
    mask = heldout_mask(assign, 0.1, seed=3)
    per_topic = [int(mask[assign == t].sum()) for t in range(5)]
    assert per_topic == [0, 1, 1, 4, 10]
    np.testing.assert_array_equal(mask, heldout_mask(assign, 0.1, seed=3))  # fixed by the seed


def test_validation_is_carved_from_what_is_not_held_out_and_leaves_training_passages():
    assign = np.repeat(np.arange(5), [1, 3, 10, 40, 100])
    held = heldout_mask(assign, 0.1, seed=3)
    val = validation_mask(assign, held, 0.05, seed=3)
    assert not (val & held).any()
    assert [int(val[assign == t].sum()) for t in range(5)] == [0, 0, 1, 2, 5]  # topics of < 3 left: none
    for t in range(5):  # every topic keeps a passage to train on
        assert ((assign == t) & ~held & ~val).sum() >= 1
    assert not validation_mask(assign, held, 0.0).any()
    np.testing.assert_array_equal(val, validation_mask(assign, held, 0.05, seed=3))


def test_knn_graph_links_each_topic_to_its_most_similar():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(8, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    g = TopicGraph.build("knn", c, k=2)
    sims = c @ c.T
    np.fill_diagonal(sims, -1)
    for i in range(8):
        assert set(np.argsort(-sims[i])[:2]) <= set(g.neighbors(i))
    assert all(e["source"] < e["target"] and e["kind"] == "similarity" for e in g.edges)
    assert TopicGraph.from_json(g.to_json()).adjacency() == g.adjacency()


def test_erdos_renyi_edge_density_follows_p():
    c = np.eye(60, dtype=np.float32)
    g = TopicGraph.build("erdos_renyi", c, p=0.2, seed=1)
    density = len(g.edges) / (60 * 59 / 2)
    assert 0.15 < density < 0.25
    assert set(GRAPH_BUILDERS) == {"knn", "erdos_renyi"}
