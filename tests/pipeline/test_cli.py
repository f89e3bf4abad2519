"""The CLI as a user meets it: real subprocesses, exit codes, messages without tracebacks."""

import json
import pkgutil


import pipeline
from pipeline.cli import SERVICES, STAGES, TOOLS, app
from tests.conftest import nucleus


def test_command_table_matches_typer_commands_and_stage_modules():
    commands = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert commands == set(STAGES) | set(SERVICES) | set(TOOLS) | {"config", "modules"}
    assert set(SERVICES).isdisjoint(STAGES) and set(TOOLS).isdisjoint(set(STAGES) | set(SERVICES))
    stage_modules = {m.name for m in pkgutil.iter_modules(pipeline.__path__)
                     if hasattr(__import__(f"pipeline.{m.name}", fromlist=["run"]), "run")}
    assert stage_modules == set(STAGES)
    for name, fn in STAGES.items():
        assert fn.__module__ == f"pipeline.{name}"


def _bad(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def test_unreadable_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("corpus: [unclosed\n")
    _bad(nucleus("index", "--run-dir", str(tmp_path / "r"), "--config", str(cfg)),
         "bad.yaml' is not valid YAML at line")


def test_unknown_key_and_wrong_type_are_reported_together(tmp_path):
    _bad(nucleus("index", "--run-dir", str(tmp_path / "r"), "--set", "embed.modle=x",
                 "--set", "graph.k=many"),
         "`embed.modle`: unknown key. Did you mean 'model'?", "`graph.k`", "'many'")


def test_missing_corpus_file(tmp_path):
    _bad(nucleus("index", "--run-dir", str(tmp_path / "r"), "--set", "corpus.paths=[nope/missing.txt]"),
         "corpus.paths", "missing.txt")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    _bad(nucleus("index", "--run-dir", str(tmp_path / "r"), "--set", f"corpus.paths=[{tmp_path}/empty.txt]"),
         "no document with text", "empty.txt")


def test_file_not_in_the_encoding_names_file_and_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"A fine start, then \xff\xfe garbage")
    _bad(nucleus("index", "--run-dir", str(tmp_path / "r"), "--set", f"corpus.paths=[{tmp_path}/bad.txt]"),
         "bad.txt", "byte offset 19", "corpus.errors: replace")


def test_query_on_a_run_without_index(tmp_path):
    _bad(nucleus("retrieve", "--run-dir", str(tmp_path / "nothing"), "lobsters"), "not a Nucleus run directory")
    (tmp_path / "empty.txt").write_text("")
    _bad(nucleus("index", "--run-dir", str(tmp_path / "r"), "--set", f"corpus.paths=[{tmp_path}/empty.txt]"),
         "no document with text")
    assert not (tmp_path / "r").exists()  # a rejected first command leaves no run behind
    from pipeline.config import resolve_config
    from pipeline.workspace import Workspace

    Workspace(tmp_path / "r").begin_command(resolve_config(), "index", False)  # an index killed early
    _bad(nucleus("retrieve", "--run-dir", str(tmp_path / "r"), "lobsters"),
         "no finished `index` stage", "nucleus index --run-dir")


def test_changed_corpus_after_index_names_the_stale_stage_and_loses_nothing(small_run_copy):
    before = (small_run_copy / "config.yaml").read_text()
    r = nucleus("index", "--run-dir", str(small_run_copy), "--set", "corpus.max_documents=3")
    _bad(r, "`index` (changed: corpus)", "--force")
    assert (small_run_copy / "config.yaml").read_text() == before
    r = nucleus("retrieve", "--run-dir", str(small_run_copy), "--set", "chunk.max_tokens=64", "x")
    _bad(r, "`index` (changed: chunk)")


def test_retrieve_json_and_topics_listing(small_run):
    r = nucleus("retrieve", "--run-dir", str(small_run), "-k", "3", "--json", "football team")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert {"passage_id", "doc_id", "title", "topic_id", "topic_label", "score", "text"} == set(hits[0])
    r = nucleus("index", "--run-dir", str(small_run), "--topics", "--json")
    topics = json.loads(r.stdout)
    assert len(topics) == 6 and all({"id", "label", "size", "neighbors"} <= set(t) for t in topics)
    r = nucleus("retrieve", "--run-dir", str(small_run), "--topic", "99", "x")
    _bad(r, "--topic must be a topic id in [0, 5], got 99")


def test_config_show_validate_schema(tmp_path):
    r = nucleus("config", "show", "--set", "graph.k=9")
    assert r.returncode == 0 and "k: 9" in r.stdout
    good = tmp_path / "good.yaml"
    good.write_text("graph:\n  kind: erdos_renyi\n  p: 0.2\n")
    assert nucleus("config", "validate", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("graph:\n  kind: hnsw\n  p: 2\n")
    _bad(nucleus("config", "validate", str(bad)), "`graph.kind`", "`graph.p`")
    schema = json.loads(nucleus("config", "schema").stdout)
    assert "corpus" in schema["properties"]
