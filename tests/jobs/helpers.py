"""Real worker processes and real brokers for the job tests."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from jobs.worker import stop_local_workers
from tests.conftest import REPO

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
               "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log"]


def sets(*items: str) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def start_worker(run_dir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """A real `nucleus worker` process (solo pool, all queues); output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "worker", "--run-dir", str(run_dir),
                                 *sets(*overrides)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def start_nucleus(log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


stop = stop_local_workers  # SIGTERM, then SIGKILL: no worker outlives its test


def wait_ready(log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker did not start: {log.read_text(errors='replace')[-3000:]}")


def rows(run_dir: Path, table: str) -> list[dict]:
    path = run_dir / "ledger.sqlite"
    if not path.is_file():
        return []
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
        except sqlite3.OperationalError:  # the table is not there yet
            return []


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def worker_pid(name: str) -> int:
    """`nucleus<pid>@host` -> pid."""
    return int(name.split("@")[0].removeprefix("nucleus"))


def tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """{relative path: size} of every file under root, and {relative path/: -1} of every
    directory (an empty folder made outside the run counts as a write too), skipping `skip`."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_file():
            out[str(p.relative_to(root))] = p.stat().st_size
        elif p.is_dir():
            out[f"{p.relative_to(root)}/"] = -1
    return out


def assert_one_complete_adapter_each(run_dir: Path, nb_ids: list[str]) -> None:
    adapters = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert adapters == sorted(nb_ids), adapters  # nothing else: no partial or temporary directories
    for nb in nb_ids:
        files = {p.name for p in (run_dir / "adapters" / nb).iterdir()}
        required = {"adapter_config.json", "adapter_model.safetensors", "neighborhood.json"}
        assert required <= files <= required | {"README.md"}, (nb, files)  # peft may add its model card
        info = json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())
        assert info["neighborhood"]["id"] == nb and info["result"]["steps"] > 0
        _assert_weights_load(run_dir / "adapters" / nb / "adapter_model.safetensors")
        assert not (run_dir / "checkpoints" / nb).exists(), nb  # no half-trained checkpoint left behind
    assert not list(run_dir.rglob(".nucleus-tmp-*"))


def _assert_weights_load(path: Path) -> None:
    """The adapter's weights read back whole: every tensor there and finite (no torn file)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        assert names, path
        for name in names:
            assert torch.isfinite(f.get_tensor(name)).all(), (path, name)


# ------------------------------------------------------------------------------- redis


def redis_up() -> bool:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True, text=True).stdout.strip() == "PONG"


def redis_start() -> None:
    if not redis_up():
        subprocess.run(REDIS_START, check=True, capture_output=True)
        wait_for(redis_up, 30, "redis to start")


def redis_stop() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], capture_output=True)
    wait_for(lambda: not redis_up(), 30, "redis to stop")


def redis_db() -> int:
    """A database number for one test (1-15, by pid and time); keys are also prefixed per run."""
    return 1 + (os.getpid() + int(time.time() * 1000)) % 15


def redis_forget(db: int, prefix: str) -> None:
    """Delete the keys one test left (its queues' prefix), not the whole database."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379, db=db)
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)
