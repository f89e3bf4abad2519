import numpy as np

from curriculum.nucleation import central_topics, knowledge_edges, map_concepts, pagerank
from retrieval.graph import TopicGraph


def test_pagerank_ranks_the_hub_of_a_star_first():
    g = TopicGraph(nodes=list(range(5)), edges=[{"source": 0, "target": i, "weight": 1.0} for i in range(1, 5)])
    rank = pagerank(g)
    assert np.argmax(rank) == 0 and abs(rank.sum() - 1) < 1e-9
    assert central_topics(g, 0.2) == [0]
    assert central_topics(g, 0.01) == [0]  # at least one topic


def test_votes_map_concepts_above_the_threshold():
    fake_hits = {"storm": [1, 1, 1, 2], "song": [3, 3, 4, 5]}

    def search_topics(texts, k):
        return [fake_hits[t] for t in texts]

    mapping, votes = map_concepts({"weather": ["storm"], "music": ["song"]}, search_topics, 4, 0.3)
    assert mapping == {"weather": [1], "music": [3]}
    assert votes["weather"] == {1: 0.75, 2: 0.25}


def test_relations_become_knowledge_edges_between_mapped_topics():
    edges = knowledge_edges([("a", "affects", "b"), ("b", "part_of", "a"), ("a", "x", "nowhere")],
                            {"a": [1, 2], "b": [2, 5]})
    assert [(e["source"], e["target"]) for e in edges] == [(1, 2), (1, 5), (2, 5)]
    assert all(e["kind"] == "knowledge" for e in edges)
    assert edges[2]["relations"] == ["a affects b", "b part_of a"]
