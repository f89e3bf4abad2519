"""`nucleus train --joint` on a real tiny run with two neighbourhood adapters: the adapters it
writes are stock peft adapters that share their first `shared_rank` ranks exactly, a re-run is a
no-op, a kill mid-training resumes, and bad requests exit 2."""

import json
import shutil

import torch
from safetensors.torch import load_file

from tests.conftest import kill_at_checkpoint, nucleus

SETS = ["--set", "lora.shared_rank=4", "--set", "lora.rank=2", "--set", "lora.steps=30"]


def _tensors(run_dir, nb):
    return load_file(str(run_dir / "adapters" / nb / "adapter_model.safetensors"))


def test_joint_adapters_share_their_shared_part_and_load_with_plain_peft(adapters_run_copy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, ids = adapters_run_copy
    before = {nb: _tensors(run_dir, nb) for nb in ids}
    r = nucleus("train", "--run-dir", str(run_dir), "--joint", "--json", *SETS)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["members"] == sorted(ids) and out["steps"] == 60 and not out["skipped"]
    a, b = (_tensors(run_dir, nb) for nb in sorted(ids))
    assert a.keys() == before[ids[0]].keys()
    for key in a:
        if key.endswith("lora_A.weight"):  # rank rows: the shared 4, then the expert's 2
            assert a[key].shape[0] == 6 and torch.equal(a[key][:4], b[key][:4])
            assert not torch.equal(a[key][4:], b[key][4:])
        else:
            assert a[key].shape[1] == 6 and torch.equal(a[key][:, :4], b[key][:, :4])
    record = json.loads((run_dir / "adapters" / ids[0] / "neighborhood.json").read_text())
    assert record["joint"]["members"] == sorted(ids) and record["result"]["kind"] == "joint"
    assert record["metrics"][f"nb/{ids[0]}/ppl"] > 0

    base = AutoModelForCausalLM.from_pretrained(run_dir / "model" / "base").eval()
    x = torch.tensor([[5, 17, 33, 2, 9, 41]])
    with torch.no_grad():
        plain = base(input_ids=x).logits
        tuned = PeftModel.from_pretrained(base, run_dir / "adapters" / ids[0]).eval()(input_ids=x).logits
    assert (tuned - plain).abs().max().item() > 1e-3

    again = nucleus("train", "--run-dir", str(run_dir), "--joint", "--json", *SETS)
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"]
    listed = nucleus("adapters", "list", "--run-dir", str(run_dir), "--json", *SETS)
    assert listed.returncode == 0, listed.stderr
    assert {e["id"]: e["rank"] for e in json.loads(listed.stdout)} == {nb: 6 for nb in ids}


def test_kill_mid_joint_training_then_resume_finishes(adapters_run_copy):
    run_dir, ids = adapters_run_copy
    args = ["train", "--run-dir", str(run_dir), "--joint", *SETS, "--set", "train.checkpoint_every=10"]
    state = run_dir / "checkpoints" / "_joint" / "latest" / "state.json"
    killed_at = kill_at_checkpoint(args, state, 20)
    for nb in ids:  # the adapters trained apart are untouched until the joint training ends
        assert "joint" not in json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())

    r = nucleus(*args, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["resumed_from"] == killed_at and out["steps"] == 60
    assert not state.parent.parent.exists()
    for nb in ids:
        assert json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())["joint"]["steps"] == 60


def test_joint_with_a_neighbourhood_or_too_few_adapters_exits_2(adapters_run_copy):
    run_dir, ids = adapters_run_copy
    r = nucleus("train", "--run-dir", str(run_dir), "--joint", "-n", ids[0])
    assert r.returncode == 2 and "--joint" in r.stderr and "Traceback" not in r.stderr
    shutil.rmtree(run_dir / "adapters" / ids[1])
    r = nucleus("train", "--run-dir", str(run_dir), "--joint")
    assert r.returncode == 2 and "at least 2" in r.stderr and "Traceback" not in r.stderr
