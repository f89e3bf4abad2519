import numpy as np
import pyarrow.parquet as pq

from curriculum.expansion import expand_passages, propose_topics
from retrieval import ann


def test_proposals_are_a_topic_and_sampled_graph_neighbours():
    adj = {0: [1, 2, 3], 1: [0], 2: [0], 3: [0]}
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = propose_topics(0, adj, 2, rng)
        assert 0 in p and len(p) == 3 and set(p) <= {0, 1, 2, 3}
    assert propose_topics(1, adj, 5, rng) == [0, 1]


def test_expansion_adds_retrieved_passages_never_heldout_and_respects_the_cap(small_run, embedder):
    vectors = np.load(small_run / "index" / "embeddings.npy")
    centroids = np.load(small_run / "topics" / "centroids.npy")
    table = pq.read_table(small_run / "topics" / "assignments.parquet").to_pydict()
    topic_of, heldout = np.asarray(table["topic_id"]), np.asarray(table["split"]) == "heldout"
    index = ann.build_index(vectors, "Flat")

    def search(q, k):
        return ann.search(index, q, k)[1]

    rows = expand_passages([2], topic_of, heldout, vectors, centroids, {2: ["album", "remix"]},
                           search, embedder.encode, hits_per_query=40, max_passages=10_000)
    own_train = set(np.flatnonzero((topic_of == 2) & ~heldout).tolist())
    assert own_train <= set(rows)                      # every training passage of the topic
    assert len(set(rows) - own_train) > 0              # plus retrieved passages of other topics
    assert not heldout[rows].any()                     # never a held-out passage
    args = ([2], topic_of, heldout, vectors, centroids, {}, search, embedder.encode)
    uncapped = expand_passages(*args, hits_per_query=40, max_passages=10_000)
    capped = expand_passages(*args, hits_per_query=40, max_passages=15)
    assert len(capped) == 15 and set(capped) <= set(uncapped)
    closeness = vectors[capped] @ centroids[2]
    others = np.setdiff1d(uncapped, capped)
    assert closeness.min() >= (vectors[others] @ centroids[2]).max() - 1e-6  # the closest are kept
