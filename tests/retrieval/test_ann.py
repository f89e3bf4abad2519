import numpy as np
import pytest

from pipeline.errors import UserError
from retrieval import ann


@pytest.fixture(scope="module")
def vectors(small_run):
    return np.load(small_run / "index" / "embeddings.npy")


def _brute_force(vectors, queries, k):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_auto_is_exact_below_the_threshold_and_ivf_above():
    assert ann.choose_factory(199_999) == "Flat"
    assert ann.choose_factory(1_000_000).startswith("IVF") and ann.choose_factory(1_000_000).endswith(",SQ8")
    assert ann.choose_factory(500, "hnsw") == "HNSW32,Flat"
    assert ann.choose_factory(500, "IVF8,Flat") == "IVF8,Flat"  # raw FAISS syntax passes through


def test_unknown_kind_suggests_the_right_one():
    with pytest.raises(UserError, match="unknown index kind .*'hnws'. Did you mean 'hnsw'"):
        ann.choose_factory(10, "hnws")


def test_bad_raw_factory_is_a_user_error(vectors):
    with pytest.raises(UserError, match="index.factory: FAISS cannot build 'PQ7'"):
        ann.build_index(vectors, "PQ7")  # 384 is not divisible by 7


def test_flat_matches_brute_force(vectors):
    index = ann.build_index(vectors, "Flat")
    q = vectors[:20]
    _, ids = ann.search(index, q, 10)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))  # each passage finds itself first
    truth = _brute_force(vectors, q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]) == 1.0


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_have_high_recall_on_real_vectors(vectors, kind):
    index = ann.build_index(vectors, ann.choose_factory(len(vectors), kind))
    q = vectors[::7] + 0.01  # near-duplicates of real passages, not the passages themselves
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, ids = ann.search(index, q, 10)
    truth = _brute_force(vectors, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
    assert recall >= 0.9, recall


def test_restrict_to_only_returns_allowed_ids(vectors, tmp_path):
    index = ann.build_index(vectors, "Flat")
    ann.save_index(index, tmp_path / "f.index")
    loaded = ann.load_index(tmp_path / "f.index", mmap=True)
    allowed = np.arange(0, len(vectors), 3)
    scores, ids = ann.search(loaded, vectors[:5], 10, restrict_to=allowed)
    assert set(ids.ravel()) <= set(allowed)
    sims = vectors[:5] @ vectors[allowed].T
    np.testing.assert_allclose(scores[:, 0], sims.max(axis=1), rtol=1e-5)
