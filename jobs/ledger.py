"""The job ledger: table `jobs` in the run's `ledger.sqlite`, written by the orchestrator only.

One row per job (its id is derived from the work, `train:<nb-id>:<config-hash>`): its state
(pending, running, done, failed), how often a worker started it, the Celery messages sent for
it, its lease, and the worker's result or error. Workers never touch it (they may sit on other
machines); the orchestrator learns what they do from the result backend and writes it here.
`nucleus jobs` reads it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from curriculum.ledger import SQLiteFile
from pipeline.errors import reading

STATES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,         -- <kind>:<work>:<config hash>
    kind TEXT NOT NULL,              -- expand | train | evaluate | embed | ping
    args TEXT NOT NULL,              -- JSON object sent to the task
    after TEXT NOT NULL DEFAULT '[]',  -- JSON list of job ids that must be done before it is sent
    state TEXT NOT NULL DEFAULT 'pending',  -- pending | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,    -- runs a worker started (each heartbeat token once)
    sends INTEGER NOT NULL DEFAULT 0,       -- messages sent (re-sends after a lease included)
    celery_ids TEXT NOT NULL DEFAULT '[]',  -- JSON list, one Celery task id per message
    tokens TEXT NOT NULL DEFAULT '[]',      -- JSON list of the worker runs seen (worker:pid:start)
    worker TEXT,                     -- the worker of the latest run
    created REAL NOT NULL,
    sent_at REAL,                    -- latest send (orchestrator clock, unix seconds)
    beat_at REAL,                    -- when the orchestrator last saw a new heartbeat
    lease_expires REAL,              -- no sign of life by then: the message is sent again
    finished REAL,
    result TEXT,                     -- JSON returned by the task
    error TEXT                       -- the worker's error (failed jobs), or the last lost run
);
"""


class JobLedger(SQLiteFile):
    schema = SCHEMA

    def add(self, job_id: str, kind: str, args: dict, after: list[str]) -> dict:
        """Record a job (a job already there is kept as it is) and return its row."""
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO jobs (job_id, kind, args, after, created) VALUES (?, ?, ?, ?, ?)",
                       (job_id, kind, json.dumps(args), json.dumps(after), time.time()))
        return self.get(job_id)

    def update(self, job_id: str, **fields) -> None:
        for key in ("after", "celery_ids", "tokens", "result"):
            if key in fields and not isinstance(fields[key], str) and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE job_id=?", (*fields.values(), job_id))

    def get(self, job_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return _decode(dict(row)) if row else None

    def jobs(self, states: tuple[str, ...] = STATES) -> list[dict]:
        with self._connect() as db:
            rows = db.execute(f"SELECT * FROM jobs WHERE state IN ({','.join('?' * len(states))}) "
                              "ORDER BY created, rowid", states).fetchall()
        return [_decode(dict(r)) for r in rows]


def _decode(row: dict) -> dict:
    for key in ("args", "after", "celery_ids", "tokens", "result"):
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


def summary(path: Path) -> dict:
    """What `nucleus jobs` shows: counts per state and every job with its attempts."""
    if not Path(path).is_file():
        return {"counts": {s: 0 for s in STATES}, "jobs": []}
    with reading(path, "SQLite ledger"), sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        db.row_factory = sqlite3.Row
        has = db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='jobs'").fetchone()
        rows = [_decode(dict(r)) for r in db.execute("SELECT * FROM jobs ORDER BY created, rowid")] if has else []
    keep = ("job_id", "kind", "state", "attempts", "sends", "worker", "created", "finished", "error", "result")
    return {"counts": {s: sum(r["state"] == s for r in rows) for s in STATES},
            "jobs": [{k: r[k] for k in keep} for r in rows]}
