"""Tethers during training on a real tiny run with two finished neighbourhood adapters:
`train --joint` ties experts at plateaus (tied neighbourhoods export the same stock peft
adapter), a neighbourhood trained alone merges layers with a finished one, every check is in
the ledger, and `nucleus report` draws the trajectory."""

import json
import sqlite3

import torch
from safetensors.torch import load_file

from tests.conftest import nucleus

# a plateau at every second logged loss, and every pair compatible enough: merges happen
TETHERS = ["tethers.during=true", "tethers.window=2", "tethers.loss_delta=0.9", "tethers.threshold=-1",
           "tethers.max_merges_per_epoch=100"]


def _sets(*extra):
    return [x for s in [*TETHERS, *extra] for x in ("--set", s)]


def _checks(run_dir, training):
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return db.execute("SELECT step, layer, a, b, compat, decision FROM tether_checks WHERE training = ?",
                          (training,)).fetchall()


def test_joint_training_with_tethers_ties_experts_and_serves_tied_ones_as_one(adapters_run_copy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, ids = adapters_run_copy
    r = nucleus("train", "--run-dir", str(run_dir), "--joint", "--json",
                *_sets("lora.shared_rank=4", "lora.rank=2", "lora.steps=30"))
    assert r.returncode == 0, r.stderr
    tethers = json.loads(r.stdout)["tethers"]
    assert tethers["checks"] >= 1 and tethers["merges"] >= 1
    # threshold -1 and no cap: the first check ties the two neighbourhoods at every layer
    assert tethers["served"] == [sorted(ids)]
    assert all(owners == [sorted(ids)[0]] * 2 for owners in tethers["owner"].values())
    a, b = (load_file(str(run_dir / "adapters" / nb / "adapter_model.safetensors")) for nb in sorted(ids))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # one adapter serves both

    rows = _checks(run_dir, "_joint")
    assert rows and {r[5] for r in rows} == {"merge"}  # each layer's one pair merged at the first check
    assert {r[1] for r in rows} == set(tethers["owner"])
    record = json.loads((run_dir / "adapters" / ids[0] / "neighborhood.json").read_text())
    assert record["joint"]["tethers"]["served"] == [sorted(ids)]

    base = AutoModelForCausalLM.from_pretrained(run_dir / "model" / "base").eval()
    x = torch.tensor([[5, 17, 33, 2, 9, 41]])
    with torch.no_grad():
        plain = base(input_ids=x).logits
        tuned = PeftModel.from_pretrained(base, run_dir / "adapters" / ids[0]).eval()(input_ids=x).logits
    assert (tuned - plain).abs().max().item() > 1e-3  # a stock peft adapter that does something

    report = nucleus("report", "--run-dir", str(run_dir), "--json")
    assert report.returncode == 0, report.stderr
    assert "tethers-_joint.png" in json.loads(report.stdout)["plots"]
    assert (run_dir / "reports" / "tethers-_joint.png").stat().st_size > 10_000


def test_a_neighbourhood_trained_alone_merges_layers_with_a_finished_adapter(adapters_run_copy):
    run_dir, ids = adapters_run_copy
    finished = load_file(str(run_dir / "adapters" / ids[1] / "adapter_model.safetensors"))
    r = nucleus("train", "--run-dir", str(run_dir), "-n", ids[0], "--force", "--json", *_sets("lora.steps=40"))
    assert r.returncode == 0, r.stderr
    tethers = json.loads(r.stdout)["tethers"]
    assert tethers["merges"] >= 1 and set(tethers["merged_with"]) == {"0", "1"}
    assert all(set(v) == {ids[1]} for v in tethers["merged_with"].values())
    rows = _checks(run_dir, ids[0])
    assert rows and all(row[2] == "default" and row[3] == ids[1] for row in rows)
    assert sum(row[5] == "merge" for row in rows) == tethers["merges"]
    after = load_file(str(run_dir / "adapters" / ids[1] / "adapter_model.safetensors"))
    assert all(torch.equal(finished[k], after[k]) for k in finished)  # the finished one is left as it was
    metrics = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    tracked = [m for m in metrics if m.get("nb") == ids[0] and "tether/p1" in m]
    assert len(tracked) == 40 // 10 and tracked[-1]["tether/merges"] == tethers["merges"]
