import numpy as np

from curriculum.rabbit_holes import landed_topics, random_walk, walk_target

GRAPH = {0: [1, 2], 1: [0, 3], 2: [0], 3: [1, 4], 4: [3], 5: []}


def test_random_walk_moves_only_along_edges():
    rng = np.random.default_rng(0)
    for start in range(5):
        path = random_walk(GRAPH, start, 6, rng)
        assert path[0] == start and len(path) == 7
        assert all(b in GRAPH[a] for a, b in zip(path, path[1:]))


def test_random_walk_stops_at_a_topic_with_no_neighbours():
    assert random_walk(GRAPH, 5, 4, np.random.default_rng(0)) == [5]


def test_walk_target_is_the_deepest_unexplored_topic():
    assert walk_target([0, 1, 3, 1], explored={0, 1}) == 3
    assert walk_target([0, 1, 3, 4, 3], explored={0, 1}) == 3
    assert walk_target([0, 1, 0], explored={0, 1}) is None


def test_landed_topics_counts_hits_and_skips_explored():
    hits = [4, 2, 4, 0, 2, 4, 7, 0, 0, 0]
    assert landed_topics(hits, explored={0}, limit=2) == [4, 2]
    assert landed_topics(hits, explored={0, 4, 2}, limit=2) == [7]
    assert landed_topics(hits, explored={0, 2, 4, 7}, limit=2) == []
