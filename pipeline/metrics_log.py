"""`logs/metrics.jsonl`: one JSON object per line, appended by every training of a run.

Several processes append at once (local workers, `nucleus worker` on shared storage), and a
resumed training first drops the rows its killed predecessor logged after the checkpoint it
resumes from, so the log holds each step once. Both go through one lock file beside the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.atomic import atomic_write_text


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read(path: Path) -> list[dict]:
    """Every row of the log; a line cut short by a kill (not JSON) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append(path: Path, row: dict) -> None:
    with _locked(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def drop_after(path: Path, nb: str, step: int) -> int:
    """Remove the training rows of neighbourhood `nb` logged beyond `step` (what a killed run
    logged after its last checkpoint; `step=-1`: all of them, for a training started over).
    Lines that are not JSON (a write cut by a kill) go too. Returns the rows removed."""
    if not path.is_file():
        return 0
    with _locked(path):
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(row, dict) and row.get("nb") == nb and isinstance(row.get("step"), int) and row["step"] > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        return dropped
