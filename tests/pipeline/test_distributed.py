"""`nucleus train` under torchrun: two CPU processes (gloo) train the very model one process
trains at the same global batch, only rank 0 writes, and a killed data-parallel training
resumes from its checkpoint. Real processes, a real launcher, a real kill."""

import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, TRAIN_SETS, kill_at_checkpoint, nucleus

SETS = [x for s in [*TRAIN_SETS, "train.device=cpu"] for x in ("--set", s)]


def torchrun(n: int) -> list[str]:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port)]


def losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.mark.slow
def test_two_processes_train_the_model_one_process_trains(small_run, tmp_path):
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(small_run, one)
    shutil.copytree(small_run, two)
    for run in (one, two):
        assert nucleus("nucleate", "--run-dir", str(run)).returncode == 0
    r1 = nucleus("train", "--run-dir", str(one), "--json", *SETS)
    assert r1.returncode == 0, r1.stderr
    # each process's share (4 blocks) in pieces of 2 (pipeline/micro_batch.py): still the same training
    r2 = subprocess.run([*torchrun(2), "-m", "pipeline.cli", "train", "--run-dir", str(two), "--json", *SETS,
                         "--set", "train.micro_batch_size=2"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)  # rank 0 alone prints
    assert a["steps"] == b["steps"] == 40 and a["tokens"] == b["tokens"]  # the same global batches
    la, lb = losses(one), losses(two)
    assert [s for s, _ in la] == [s for s, _ in lb] == [10, 20, 30, 40]  # each logged step once
    assert [x for _, x in lb] == pytest.approx([x for _, x in la], rel=1e-4)
    assert b["metrics"]["heldout/ppl"] == pytest.approx(a["metrics"]["heldout/ppl"], rel=1e-3)
    meta = json.loads((two / "meta.json").read_text())
    assert [c["command"] for c in meta["commands"]].count("train") == 1  # one record, by rank 0
    # a neighbourhood adapter (peft LoRA under DDP) the same way
    r1 = nucleus("train", "--run-dir", str(one), "-n", "topic-0", "--json", *SETS)
    r2 = subprocess.run([*torchrun(2), "-m", "pipeline.cli", "train", "--run-dir", str(two), "-n", "topic-0",
                         "--json", *SETS], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr[-3000:]
    a, b = json.loads(r1.stdout), json.loads(r2.stdout)
    assert b["metrics"]["nb/topic-0/ppl"] == pytest.approx(a["metrics"]["nb/topic-0/ppl"], rel=1e-3)
    assert (two / "adapters" / "topic-0" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_killed_data_parallel_training_resumes(small_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert nucleus("nucleate", "--run-dir", str(run)).returncode == 0
    args = ["train", "--run-dir", str(run), *SETS, "--set", "train.nucleus_steps=80"]
    state = run / "checkpoints" / "nucleus" / "latest" / "state.json"
    killed_at = kill_at_checkpoint(args, state, 20, timeout=300, launcher=torchrun(2))
    r = subprocess.run([*torchrun(2), "-m", "pipeline.cli", *args, "--json"], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["resumed_from"] == killed_at >= 20 and out["steps"] == 80
    steps = [s for s, _ in losses(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 80  # no step logged twice after the resume


def test_only_train_runs_under_torchrun_and_the_batch_must_split(small_run_copy, monkeypatch):
    from pipeline import distributed
    from pipeline.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert distributed.check_batch(8, 0).startswith("train.batch_size: 8 blocks")
    assert distributed.check_batch(9, 3) is None and "lora.replay_fraction" in distributed.check_batch(8, 2)
    r = nucleus("explore", "--run-dir", str(small_run_copy))  # WORLD_SIZE=3 in its environment too
    assert r.returncode == 2 and "only `nucleus train`" in r.stderr
    with pytest.raises(UserError):
        from pipeline.cli import _stage

        with _stage("index", small_run_copy, None, None, False):
            pass
