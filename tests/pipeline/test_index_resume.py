"""A `kill -9` in the middle of `nucleus index`, then the same command again."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, nucleus

ARGS = ["--set", "corpus.max_documents=12", "--set", "embed.shard_size=64", "--set", "embed.batch_size=16"]


def test_kill_during_embedding_then_rerun_completes_and_answers(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "index", "--run-dir", str(run_dir), *ARGS],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = run_dir / "index" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not list(shards.glob("0000[0-9].npy")):
        time.sleep(0.05)
    assert proc.poll() is None, "index finished before it could be killed; use a larger corpus"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in shards.glob("*.npy"))
    assert kept, "the finished shard must survive the kill"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert "index" not in meta["stages"]

    r = nucleus("index", "--run-dir", str(run_dir), *ARGS)
    assert r.returncode == 0, r.stderr
    assert "including shards already there" in r.stderr
    assert not list(run_dir.rglob(".nucleus-tmp-*"))
    r = nucleus("retrieve", "--run-dir", str(run_dir), "-k", "2", "--json", "football")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 2
