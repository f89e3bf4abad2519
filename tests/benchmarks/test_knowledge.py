"""The known-graph benchmark's script stays working: its topics and graph follow the world, each
control arm starts where it says, accuracy ratios count higher as better, and a tiny end-to-end
run (slow tier) of every arm and the adapters comparison through the real prepare and run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import curriculum_report as report
from benchmarks import knowledge as bench
from retrieval.known_graph import KnownGraphSpec, build_world
from tests.conftest import REPO

SPEC = KnownGraphSpec(entities=400, communities=5, seed=3)


def test_groups_deal_each_community_evenly_and_the_graph_is_the_worlds():
    world = build_world(SPEC)
    group = bench._groups(world, 3, seed=0)
    for e in world["entities"]:
        assert group[e["id"]] // 3 == e["community"]  # a group never mixes communities
    persons = np.bincount([group[e["id"]] for e in world["entities"] if e["type"] == "person"], minlength=15)
    for c in range(5):  # dealt in turn: a community's groups differ by at most one person
        own = persons[3 * c:3 * c + 3]
        assert own.max() - own.min() <= 1 and own.min() > 0
    w = bench._relation_counts(world, group, 15)
    assert (w == w.T).all() and w.trace() == 0
    for a, b in zip(*np.nonzero(w)):
        ring = abs(a // 3 - b // 3)
        assert min(ring, 5 - ring) <= 1  # relations join a community only to itself and its ring neighbours


def _info():
    return {"topics": 12, "nucleus": [0, 1, 2], "periphery": [6, 7, 8], "policy": "learned",
            "community_of": [t // 3 for t in range(12)],
            "adjacency": {str(t): [o for o in range(12) if o // 3 == t // 3 and o != t] for t in range(12)},
            "degree": [5, 1, 1, 1, 9, 1, 1, 1, 7, 1, 1, 8]}


def test_each_curriculum_arm_starts_where_it_says():
    info = _info()
    first, graph, policy, _ = bench.curriculum_plan("nucleus", {}, info, seed=0)
    assert first == [0, 1, 2] and graph[0] == [1, 2] and policy == "learned"
    first, graph, _, _ = bench.curriculum_plan("reverse", {"policy": "random"}, info, seed=0)
    assert first == [6, 7, 8] and graph[6] == [7, 8]
    first, graph, policy, centrality = bench.curriculum_plan("hubs", {}, info, seed=0)
    assert first == [4, 11, 8] and policy == "hubs" and len(graph[0]) == 11  # degree order, graph ignored
    assert centrality.argmax() == 4
    for seed in range(5):  # as many groups as the nucleus, each from a different community
        first, graph, policy, _ = bench.curriculum_plan("random_subset", {}, info, seed=seed)
        assert len(first) == 3 and len({t // 3 for t in first}) == 3 and policy == "random" and len(graph[5]) == 11


def test_hub_policy_scores_by_the_centrality_feature():
    from curriculum.curiosity import FEATURES

    x = np.zeros((3, len(FEATURES)))
    x[:, FEATURES.index("centrality")] = [0.1, 0.5, 0.2]
    assert bench.HubPolicy().score([7, 8, 9], x).argmax() == 1


def test_accuracy_ratios_count_higher_as_better():
    def curve(points):
        return [{"step": i, "tokens": t, "acc": a} for i, (t, a) in enumerate(points)]

    rows = [{"seed": 0, "arm": "uniform", "curve": curve([(0, 0.1), (1000, 0.3), (2000, 0.4)])},
            {"seed": 0, "arm": "fast", "curve": curve([(0, 0.1), (1000, 0.4), (2000, 0.5)])},
            {"seed": 0, "arm": "slow", "curve": curve([(0, 0.1), (1000, 0.2), (2000, 0.3)])}]
    assert report.tokens_to_target(rows[0]["curve"], "acc", 0.35, higher=True) == pytest.approx(1500)
    r = report.ratios(rows, "acc", higher=True)
    assert r[(0, "fast")] == (2.0, True)
    assert r[(0, "slow")] == (pytest.approx(1000 / 2000), False)  # uniform reaches slow's final 0.3 at 1000


def test_arm_specs_are_checked():
    assert bench.parse_arm("nucleus:policy=random,coverage=0.3") == ("nucleus", {"policy": "random", "coverage": 0.3})
    with pytest.raises(SystemExit, match="unknown parameters"):
        bench.parse_arm("skillit:coverage=0.3")
    with pytest.raises(SystemExit, match="unknown arm"):
        bench.parse_arm("nucleous")


@pytest.mark.slow
def test_tiny_benchmark_runs_every_arm_and_the_adapters(tmp_path):
    script = str(REPO / "benchmarks" / "knowledge.py")
    bundle = tmp_path / "bundle"
    subprocess.run([sys.executable, script, "prepare", "--bundle", str(bundle), "--entities", "240",
                    "--communities", "4", "--groups-per-community", "2", "--model-size", "tiny", "--vocab-size",
                    "1024", "--block-size", "64", "--batch-size", "8", "--questions", "80", "--seen-questions", "20",
                    "--eval-batch-size", "16"], check=True, cwd=REPO, timeout=300)
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["topics"] == 8 and info["nucleus"] == [0, 1] and info["periphery"] == [4, 5]
    assert info["questions"] == {"heldout": 80, "seen": 20}
    arms = [*bench.ARMS, "nucleus:policy=random", "nucleus:weighting=manifold,clusters=4,rebuild=10"]
    out = subprocess.run([sys.executable, script, "run", "--bundle", str(bundle), "--seeds", "0", "--steps", "20",
                          "--eval-every", "10", "--adapters", "--jobs", "2", "--work", str(tmp_path / "work"),
                          "--json-out", str(tmp_path / "out.json"), "--arms", *arms],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "knowledge tokens-to-target ratio (nucleus vs uniform): " in out.stdout
    result = json.loads((tmp_path / "out.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == set(arms)
    assert {r["tokens"] for r in rows.values()} == {20 * 8 * 64}
    assert all([p["step"] for p in r["curve"]] == [0, 10, 20] for r in rows.values())
    assert all(0.0 <= p["acc"] <= 1.0 and p["ppl"] > 1 for r in rows.values() for p in r["curve"])
    assert rows["nucleus"]["phases"][0]["topics"] == [0, 1] and rows["reverse"]["phases"][0]["topics"] == [4, 5]
    ordered = rows["nucleus:weighting=manifold,clusters=4,rebuild=10"]  # the same phases, ordered by the manifold
    assert ordered["phases"][0]["topics"] == [0, 1] and ordered["overhead_s"] > 0
    ad = result["adapters"]["rows"][0]
    assert ad["communities"] == [1, 2, 3] and ad["questions"] == sum(c != 0 for c in info["question_community"])
    assert 0.0 <= ad["routed_acc"] <= 1.0 and ad["union_answer_ppl"] > 1
    # the report reads the JSON again on its own and gives the same headline
    again = subprocess.run([sys.executable, script, "report", str(tmp_path / "out.json")], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
    assert again.returncode == 0 and out.stdout.split("knowledge tokens")[1][:60] in again.stdout
