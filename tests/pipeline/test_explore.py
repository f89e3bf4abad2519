import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from pipeline import explore
from pipeline.config import resolve_config
from pipeline.errors import UserError
from pipeline.workspace import Workspace
from tests.conftest import REPO, nucleus
from tests.jobs.helpers import rows as table_rows

# 6 topics, 2 in the nucleus: k=0 keeps one topic per proposal, so 4 proposals fit.
FAST = ["explore.rounds=2", "explore.per_round=2", "explore.k=0", "lora.steps=6", "explore.max_passages=60"]


def _cfg(ws, *sets):
    return resolve_config(ws.stored_config(), None, list(sets))


def _ledger(run_dir):
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM proposals ORDER BY round, rowid")]


def test_rounds_train_one_adapter_per_proposal_and_fill_the_ledger(trained_run_copy):
    ws = Workspace(trained_run_copy)
    result = explore.run(_cfg(ws, *FAST), ws)
    rows = _ledger(trained_run_copy)
    assert result.rounds_done == 2 and len(rows) == 4 and all(r["status"] == "done" for r in rows)
    nucleus_topics = json.loads((trained_run_copy / "neighborhoods" / "nucleus.json").read_text())["topics"]
    seen = set(nucleus_topics)
    for r in rows:
        nb = json.loads((trained_run_copy / "neighborhoods" / f"{r['nb_id']}.json").read_text())
        assert r["topic"] not in seen or r["round"] == 0 and r["topic"] not in nucleus_topics
        assert 0 < len(nb["passage_ids"]) <= 60 and nb["source"] == "explore"
        assert (trained_run_copy / "adapters" / r["nb_id"] / "adapter_model.safetensors").is_file()
        assert r["progress"] == pytest.approx((r["loss_before"] - r["loss_after"]) / (r["tokens"] / 1000))
        # learning progress is measured on the validation split, never on the held-out one
        trained = json.loads((trained_run_copy / "adapters" / r["nb_id"] / "neighborhood.json").read_text())["result"]
        assert r["loss_before"] == pytest.approx(trained["metrics_before"][f"val/nb/{r['nb_id']}/loss"])
        assert r["loss_after"] == pytest.approx(trained["metrics"][f"val/nb/{r['nb_id']}/loss"])
        assert r["loss_after"] != pytest.approx(trained["metrics"][f"nb/{r['nb_id']}/loss"])
    assert [r["predicted"] is not None for r in rows] == [True] * 4  # the learned policy predicts
    logged = [json.loads(x) for x in (trained_run_copy / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["nb"] == "explore" and logged[-1]["curiosity/pairs"] == 4
    assert logged[-1]["curiosity/spearman_rho"] == pytest.approx(result.spearman_rho, nan_ok=True)
    _check_rabbit_holes(trained_run_copy, nucleus_topics, rows)
    # a later run with more rounds finds the frontier exhausted and trains nothing again
    again = explore.run(_cfg(ws, *FAST, "explore.rounds=3"), ws)
    assert "nothing left on the frontier" in again.message and len(_ledger(trained_run_copy)) == 4


def _check_rabbit_holes(run_dir, nucleus_topics, proposals):
    """One generative hole per round and at most one walk probe (a walk that meets only explored
    topics probes nothing), each recorded once and learned from once."""
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    db.row_factory = sqlite3.Row
    holes = [dict(r) for r in db.execute("SELECT * FROM rabbit_holes ORDER BY round, kind, idx")]
    walks = [h for h in holes if h["kind"] == "walk"]
    generative = [h for h in holes if h["kind"] == "generative"]
    rounds = [h["round"] for h in walks]
    assert [h["round"] for h in generative] == [0, 1] and rounds[:1] == [0] and rounds == sorted(set(rounds))
    for w in walks:
        path = json.loads(w["path"])
        assert w["topic"] in path and path[0] in nucleus_topics + [t for p in proposals for t in p["topics"]]
        assert len(json.loads(w["features"])) == 7 and w["tokens"] > 0
        assert w["progress"] == pytest.approx((w["loss_before"] - w["loss_after"]) / (w["tokens"] / 1000))
    assert generative[0]["text"].strip() and not set(json.loads(generative[0]["path"])) & set(nucleus_topics)
    policy = json.loads((run_dir / "explore" / "state.json").read_text())["policy"]
    assert policy["probes"].count(True) == len(walks) and policy["probes"].count(False) == len(proposals)
    # probe adapters stay in memory: adapters/ holds the nucleus-trained base's neighbourhoods only
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == sorted(p["nb_id"] for p in proposals)


def test_kill_mid_round_then_resume_trains_nothing_twice(trained_run_copy):
    sets = [x for s in FAST[:3] + ["lora.steps=40", "explore.max_passages=60"] for x in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "explore", "--run-dir", str(trained_run_copy), *sets],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    first = None
    while time.time() < deadline:
        done = [r for r in table_rows(trained_run_copy, "proposals") if r["status"] == "done"]  # the table may not be there yet
        if done:
            first = done[0]["nb_id"]
            break
        time.sleep(0.1)
    assert first and proc.poll() is None, "explore finished before it could be killed mid-round"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = (trained_run_copy / "adapters" / first / "adapter_model.safetensors").stat().st_mtime_ns

    r = nucleus("explore", "--run-dir", str(trained_run_copy), *sets, "--json")
    assert r.returncode == 0, r.stderr
    rows = _ledger(trained_run_copy)
    assert len(rows) == 4 and len({r["nb_id"] for r in rows}) == 4 and all(r["status"] == "done" for r in rows)
    assert (trained_run_copy / "adapters" / first / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    adapters = sorted(p.name for p in (trained_run_copy / "adapters").iterdir())
    assert adapters == sorted(r["nb_id"] for r in rows)  # one complete adapter each, no partial dirs
    assert not list(trained_run_copy.rglob(".nucleus-tmp-*"))
    nucleus_topics = json.loads((trained_run_copy / "neighborhoods" / "nucleus.json").read_text())["topics"]
    _check_rabbit_holes(trained_run_copy, nucleus_topics, rows)  # no probe replayed twice after the kill


def test_empty_frontier_is_a_clear_message_and_exit_0(trained_run_copy):
    ws = Workspace(trained_run_copy)
    result = explore.run(_cfg(ws, *FAST, "explore.rounds=20", "explore.per_round=3", "explore.k=2"), ws)
    assert set().union(*[r["topics"] for r in result.neighborhoods]) | set(
        json.loads((trained_run_copy / "neighborhoods" / "nucleus.json").read_text())["topics"]) == set(range(6))
    assert "nothing left on the frontier" in result.message and result.rounds_done < 20
    sets = [x for s in FAST + ["explore.rounds=21", "explore.per_round=3", "explore.k=2"] for x in ("--set", s)]
    r = nucleus("explore", "--run-dir", str(trained_run_copy), *sets)
    assert r.returncode == 0 and "nothing left on the frontier" in r.stdout


def test_bad_explore_input(small_run_copy):
    for bad, needle in (("explore.rounds=-1", "`explore.rounds`"), ("explore.per_round=0", "`explore.per_round`"),
                        ("explore.policy=curius", "`explore.policy`")):
        r = nucleus("explore", "--run-dir", str(small_run_copy), "--set", bad)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(UserError, match="no finished `nucleate` stage"):
        explore.run(_cfg(Workspace(small_run_copy)), Workspace(small_run_copy))
