import json
import logging

import pytest

from pipeline import nucleate
from pipeline.config import resolve_config
from pipeline.errors import UserError
from pipeline.workspace import Workspace
from tests.conftest import REPO, nucleus


def _cfg(ws, *sets):
    return resolve_config(ws.stored_config(), None, list(sets))


def test_seed_graph_maps_concepts_and_adds_knowledge_edges(small_run_copy, caplog):
    ws = Workspace(small_run_copy)
    cfg = _cfg(ws, f"nucleate.seed_graph={REPO / 'configs/seeds/builtin.yaml'}")
    with caplog.at_level(logging.WARNING):
        result = nucleate.run(cfg, ws)
    assert result.method == "seed_graph" and result.nucleus_topics
    assert result.nucleus_topics == sorted({t for ts in result.concepts.values() for t in ts})
    # concepts the 16-article sample does not cover are warnings that name them
    for concept in result.unmapped:
        assert f"seed concept '{concept}' maps to no topic" in caplog.text
    mapping = json.loads((small_run_copy / "kg" / "mapping.json").read_text())["concepts"]
    assert set(mapping) == set(result.concepts)
    assert (small_run_copy / "kg" / "seed_graph.yaml").read_text() == (REPO / "configs/seeds/builtin.yaml").read_text()
    nb = json.loads((small_run_copy / "neighborhoods" / "nucleus.json").read_text())
    assert nb["topics"] == result.nucleus_topics
    graph = nucleate.load_topic_graph(ws)
    assert sum(e["kind"] == "knowledge" for e in graph.edges) == result.knowledge_edges


def test_a_concept_maps_to_the_topic_a_human_would_pick(small_run_copy, tmp_path):
    ws = Workspace(small_run_copy)
    seed = tmp_path / "seed.yaml"
    seed.write_text("concepts:\n  - id: pop_album\n    description: A pop album, its remixes and the "
                    "singer's concert tour.\n    queries: [album chart, remix]\n")
    result = nucleate.run(_cfg(ws, f"nucleate.seed_graph={seed}", "nucleate.threshold=0.5"), ws)
    topics = json.loads((small_run_copy / "topics" / "topics.json").read_text())["topics"]
    album_topic = [t["id"] for t in topics if "album" in t["keywords"]]
    assert len(album_topic) == 1 and result.concepts["pop_album"] == album_topic


def test_no_seed_graph_takes_central_topics(small_run_copy):
    ws = Workspace(small_run_copy)
    result = nucleate.run(_cfg(ws, "nucleate.pagerank_topics=0.34"), ws)
    assert result.method == "pagerank" and len(result.nucleus_topics) == 3  # ceil(0.34 * 6)
    again = nucleate.run(_cfg(ws, "nucleate.pagerank_topics=0.34"), ws)
    assert again.skipped and again.nucleus_topics == result.nucleus_topics


def test_nothing_maps_is_an_error_not_an_empty_nucleus(small_run_copy, tmp_path):
    ws = Workspace(small_run_copy)
    seed = tmp_path / "seed.yaml"
    seed.write_text("concepts:\n  - id: storm\n    description: A tropical storm.\n")
    with pytest.raises(UserError, match="no concept of .* maps to any topic"):
        nucleate.run(_cfg(ws, f"nucleate.seed_graph={seed}", "nucleate.threshold=1.0"), ws)
    assert not ws.is_complete("nucleate")


def test_relation_to_unknown_concept_exits_2(small_run_copy, tmp_path):
    seed = tmp_path / "seed.yaml"
    seed.write_text("concepts:\n  - id: storm\n    description: A tropical storm.\n"
                    "relations:\n  - {source: storm, relation: hits, target: stormz}\n")
    r = nucleus("nucleate", "--run-dir", str(small_run_copy), "--set", f"nucleate.seed_graph={seed}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stormz" in r.stderr and "seed.yaml" in r.stderr
