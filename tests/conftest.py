"""Shared fixtures: real WikiText-2 data, the real bundled embedder, a small real index."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _wikitext_dir() -> Path:
    env = os.environ.get("NUCLEUS_WIKITEXT_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    path = _wikitext_dir()
    if not (path / "valid.txt").is_file():
        pytest.fail(f"WikiText-2 not found at {path}; set NUCLEUS_WIKITEXT_DIR to the folder "
                    f"holding train.txt, valid.txt and test.txt.")
    return path


@pytest.fixture(scope="session")
def embedder():
    from retrieval.embed import get_embedder

    return get_embedder()


# A small real index shared by the read-only tests: 16 articles of the built-in corpus
# (~250 passages), built once per session through the real stage function.
SMALL_SETS = ["corpus.max_documents=16", "topics.num_topics=6"]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    from pipeline import index
    from pipeline.config import resolve_config
    from pipeline.workspace import Workspace

    run_dir = tmp_path_factory.mktemp("runs") / "small"
    cfg = resolve_config(None, None, SMALL_SETS)
    ws = Workspace(run_dir)
    ws.begin_command(cfg, "index", force=False)
    index.run(cfg, ws)
    return run_dir


@pytest.fixture
def small_run_copy(small_run, tmp_path) -> Path:
    """A private copy of the small run, for tests that change it."""
    dst = tmp_path / "run"
    shutil.copytree(small_run, dst)
    return dst


def nucleus(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `nucleus` CLI in a subprocess (exit codes and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def kill_at_checkpoint(args: list[str], state: Path, min_step: int, timeout: float = 120,
                       launcher: list[str] | None = None) -> int:
    """Start `nucleus *args` (after `launcher`, e.g. torchrun's), SIGKILL it and every process it
    started once its checkpoint `state` (a state.json) records at least `min_step` steps, and
    return that step (a real kill, not an exception)."""
    import json
    import signal
    import time

    proc = subprocess.Popen([*(launcher or [sys.executable]), "-m", "pipeline.cli", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def step() -> int:  # the checkpoint directory is swapped by two renames: look again if caught between
        for _ in range(100):
            try:
                return json.loads(state.read_text())["step"]
            except (FileNotFoundError, ValueError):
                if not state.parent.parent.is_dir():
                    return -1
                time.sleep(0.01)
        return -1

    deadline = time.time() + timeout
    while time.time() < deadline and step() < min_step:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    import psutil

    # the process and everything it started (torchrun's workers run in sessions of their own)
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in family[1:]:  # gone before the next command starts
        try:
            psutil.Process(pid).wait(timeout=30)
        except psutil.NoSuchProcess:
            pass
    from pipeline.atomic import restore_aside

    restore_aside(state.parent)  # what the next command does first, if the kill fell between the renames
    return step()


# Tiny training settings: a 2-layer model, short blocks, a few dozen steps (seconds on CPU).
TRAIN_SETS = ["train.block_size=64", "train.batch_size=8", "train.nucleus_steps=40",
              "lora.steps=40", "train.eval_every=20", "train.checkpoint_every=10",
              "train.warmup_steps=5"]


@pytest.fixture(scope="session")
def trained_run(small_run, tmp_path_factory) -> Path:
    """The small run, nucleated (PageRank) and with its tiny scratch nucleus trained."""
    from pipeline import nucleate, train
    from pipeline.config import resolve_config
    from pipeline.workspace import Workspace

    run_dir = tmp_path_factory.mktemp("runs") / "trained"
    shutil.copytree(small_run, run_dir)
    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, TRAIN_SETS)
    ws.begin_command(cfg, "train", force=False)
    nucleate.run(cfg, ws)
    train.run(cfg, ws)
    return run_dir


@pytest.fixture
def trained_run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "trained"
    shutil.copytree(trained_run, dst)
    return dst


@pytest.fixture(scope="session")
def adapters_run(trained_run, tmp_path_factory) -> tuple[Path, list[str]]:
    """The trained run with two neighbourhood adapters (two topics outside the nucleus, 40 steps
    each): the real inputs of `nucleus adapters`. Returns (run dir, adapter ids)."""
    import json

    from pipeline import train
    from pipeline.config import resolve_config
    from pipeline.workspace import Workspace

    run_dir = tmp_path_factory.mktemp("runs") / "adapters"
    shutil.copytree(trained_run, run_dir)
    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, None)
    nucleus_topics = json.loads((run_dir / "neighborhoods" / "nucleus.json").read_text())["topics"]
    ids = [f"topic-{t}" for t in range(6) if t not in nucleus_topics][:2]
    for nb in ids:
        train.run(cfg, ws, nb)
    return run_dir, ids


@pytest.fixture
def adapters_run_copy(adapters_run, tmp_path) -> tuple[Path, list[str]]:
    dst = tmp_path / "adapters"
    shutil.copytree(adapters_run[0], dst)
    return dst, adapters_run[1]
