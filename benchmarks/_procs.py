"""Run a benchmark script's sub-commands as separate processes, a few at a time (they share one
GPU); stop at the first failure with the tail of its log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def spawn(script: str, args: list[str], log: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, script, *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def run_all(script: str, commands: list[tuple[list[str], Path]], jobs: int) -> None:
    """Run `python script *args` for each (args, log), `jobs` at a time; exit on the first failure."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            cmd, log = pending.pop(0)
            running.append((spawn(script, cmd, log, threads), log))
        time.sleep(0.5)
        for proc, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, log))
                if proc.returncode != 0:
                    for other, _ in running:
                        other.kill()
                    sys.exit(f"failed ({proc.returncode}): {log}\n" + log.read_text()[-3000:])
