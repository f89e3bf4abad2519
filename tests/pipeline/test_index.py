import json

import datasets
import numpy as np
import pyarrow.parquet as pq

from pipeline import index, retrieve
from pipeline.config import resolve_config
from pipeline.workspace import Workspace
from tests.conftest import SMALL_SETS


def test_artifacts_follow_the_run_directory_contract(small_run):
    corpus = datasets.load_from_disk(str(small_run / "corpus"))
    for col in ("passage_id", "doc_id", "title", "text", "n_tokens", "split"):
        assert col in corpus.column_names
    assert corpus["passage_id"] == list(range(len(corpus)))
    assert set(corpus["split"]) == {"train", "heldout", "validation"}
    info = json.loads((small_run / "index" / "index.json").read_text())
    assert info["count"] == len(corpus) and info["dim"] == 384 and info["factory"] == "Flat"
    assert info["config_hash"] and info["version"]
    emb = np.load(small_run / "index" / "embeddings.npy")
    assert emb.shape == (len(corpus), 384) and emb.dtype == np.float32
    table = pq.read_table(small_run / "topics" / "assignments.parquet").to_pydict()
    assert table["passage_id"] == corpus["passage_id"] and table["split"] == corpus["split"]
    topics = json.loads((small_run / "topics" / "topics.json").read_text())["topics"]
    assert len(topics) == 6 and sum(t["size"] for t in topics) == len(corpus)
    assert all(len(t["keywords"]) == 6 and t["label"] for t in topics)
    # every topic keeps a held-out share, and held-out counts agree with corpus/
    assert all(t["heldout"] >= 1 for t in topics)
    assert sum(t["heldout"] for t in topics) == corpus["split"].count("heldout")
    # and a validation share carved from the rest (the curiosity signals read it)
    assert all(t["validation"] >= 1 for t in topics if t["size"] - t["heldout"] >= 3)
    assert sum(t["validation"] for t in topics) == corpus["split"].count("validation")
    graph = json.loads((small_run / "topics" / "graph.json").read_text())
    assert graph["kind"] == "knn" and graph["nodes"] == list(range(6)) and graph["edges"]
    assert np.load(small_run / "topics" / "centroids.npy").shape == (6, 384)
    meta = json.loads((small_run / "meta.json").read_text())
    assert meta["stages"]["index"]["status"] == "complete" and "torch" in meta["versions"]
    assert not list(small_run.rglob(".nucleus-tmp-*")) and not (small_run / "index" / "shards").exists()


def test_second_run_skips_everything(small_run_copy):
    ws = Workspace(small_run_copy)
    cfg = resolve_config(ws.stored_config())
    before = (small_run_copy / "index" / "faiss.index").stat().st_mtime_ns
    result = index.run(cfg, ws)
    assert result.steps_run == []
    assert (small_run_copy / "index" / "faiss.index").stat().st_mtime_ns == before


def test_changing_the_graph_redoes_only_the_graph_step(small_run_copy):
    ws = Workspace(small_run_copy)
    cfg = resolve_config(ws.stored_config(), None, ["graph.kind=erdos_renyi", "graph.p=0.5"])
    ws.forget("index")  # what --force does to a stale stage record
    result = index.run(cfg, ws)
    assert result.steps_run == ["graph"]
    assert json.loads((small_run_copy / "topics" / "graph.json").read_text())["kind"] == "erdos_renyi"


def test_retrieve_matches_brute_force_and_filters_by_topic(small_run):
    ws = Workspace(small_run)
    cfg = resolve_config(ws.stored_config())
    result = retrieve.run(cfg, ws, "tropical storm rainfall and hurricane damage", k=5)
    assert len(result.hits) == 5
    assert set(result.hits[0]) == {"passage_id", "doc_id", "title", "topic_id", "topic_label", "score", "text"}
    # oracle: brute-force cosine over the stored embeddings with the same query vector
    from retrieval.embed import get_embedder

    q = get_embedder().encode(["tropical storm rainfall and hurricane damage"])[0]
    emb = np.load(small_run / "index" / "embeddings.npy")
    assert [h["passage_id"] for h in result.hits] == list(np.argsort(-(emb @ q))[:5])
    topic = result.hits[-1]["topic_id"]
    only = retrieve.run(cfg, ws, "tropical storm", k=4, topic=topic)
    assert only.hits and all(h["topic_id"] == topic for h in only.hits)


def test_small_sets_are_what_the_fixture_used(small_run):
    cfg = resolve_config(Workspace(small_run).stored_config())
    assert cfg == resolve_config(None, None, SMALL_SETS)


def test_group_by_auto_is_title_only_for_a_synth_corpus():
    assert index._group_by(resolve_config(None, None, SMALL_SETS)) == "none"  # WikiText articles
    assert index._group_by(resolve_config(None, None, ["corpus.paths=[builtin:known-graph]"])) == "title"
    assert index._group_by(resolve_config(None, None, ["corpus.paths=[builtin:known-graph]",
                                                       "topics.group_by=none"])) == "none"
