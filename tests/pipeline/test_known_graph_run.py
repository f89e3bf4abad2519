"""`nucleus run` on the built-in known-graph corpus: the true seed graph, question accuracy."""

import json

import pytest

from tests.conftest import nucleus


@pytest.mark.slow
def test_run_on_the_known_graph_uses_its_seed_graph_and_reports_question_accuracy(tmp_path):
    run = tmp_path / "kg"
    r = nucleus("run", "--run-dir", str(run), "--json", "--set", "corpus.paths=[builtin:known-graph]",
                "--set", "train.nucleus_steps=40", "--set", "lora.steps=20", "--set", "train.eval_every=20",
                "--set", "explore.rounds=1", "--set", "explore.per_round=1", "--set", "explore.walks=0",
                "--set", "explore.generative=0", timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["nucleate"]["method"] == "seed_graph"  # the corpus's own graph, with no --set for it
    assert 0.0 < out["index"]["topics_nmi"] <= 1.0
    # topics.group_by=auto groups by title on a synth corpus: every entity's documents in one topic
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    topic_of = pq.read_table(run / "topics" / "assignments.parquet").column("topic_id").to_pylist()
    by_title: dict[str, set[int]] = {}
    for title, topic in zip(load_from_disk(str(run / "corpus"))["title"], topic_of):
        by_title.setdefault(title, set()).add(topic)
    assert all(len(t) == 1 for t in by_title.values()) and len(by_title) == 400
    assert sorted(p.name for p in (run / "qa").iterdir()) == sorted(
        ["questions.jsonl", "seed_graph.yaml", "graph.json", "manifest.json", "topics.json"])
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    qa = [row for row in rows if "qa/acc" in row]
    assert {row["nb"] for row in qa} >= {"nucleus"} and len({row["nb"] for row in qa}) == 2  # + the adapter
    assert all(0.0 <= row["qa/acc"] <= 1.0 and row["qa/chance"] == pytest.approx(1 / 8) for row in qa)
    html = (run / "reports" / "report.html").read_text()
    assert "<h2>Questions</h2>" in html and "qa/acc_2hop" in html and "NMI" in html
    assert (run / "reports" / "question_accuracy.png").stat().st_size > 0
