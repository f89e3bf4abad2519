"""The curriculum ledger (`ledger.sqlite`): every proposal of every round and what it yielded,
and every rabbit hole (walk probe or generative excursion) that informed the round.

Written by the orchestrator only (one process), read by reports. A proposal is recorded before
its neighbourhood trains, so an interrupted round is resumed with the same proposals. The same
file holds two tables others write: `merges` (`nucleus adapters merge`, curriculum/tethers.py)
and `tether_checks` (each training with `tethers.during`, when it ends, replacing its own rows:
curriculum/plateau_tethers.py); SQLite's locking (with a 30 s timeout) orders the writers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from pipeline.errors import reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS proposals (
    round INTEGER NOT NULL,
    nb_id TEXT PRIMARY KEY,
    topic INTEGER NOT NULL,
    topics TEXT NOT NULL,            -- JSON list of topic ids
    passages INTEGER NOT NULL,
    score REAL,                      -- the policy's score when it chose this topic
    predicted REAL,                  -- predicted learning progress (learned policy), else NULL
    features TEXT NOT NULL,          -- JSON list, curiosity.FEATURES order
    status TEXT NOT NULL DEFAULT 'proposed',   -- proposed | done
    progress REAL,                   -- realised learning progress (loss drop per 1k tokens)
    forgetting REAL,                 -- change of the nucleus's held-out loss under the adapter
    tokens INTEGER,
    loss_before REAL,
    loss_after REAL
);
CREATE TABLE IF NOT EXISTS rabbit_holes (
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,              -- walk | generative
    idx INTEGER NOT NULL,            -- the rabbit hole's number within its round and kind
    topic INTEGER,                   -- walk: the probed topic; generative: the prompt's topic
    path TEXT NOT NULL,              -- JSON list: the walk's topics, or the topics the text landed in
    text TEXT,                       -- generative: the model's continuation
    features TEXT,                   -- walk: the probed topic's features (curiosity.FEATURES order)
    progress REAL,                   -- walk: realised learning progress of the probe training
    tokens INTEGER,
    loss_before REAL,
    loss_after REAL,
    PRIMARY KEY (round, kind, idx)
);
"""


class SQLiteFile:
    """A SQLite file whose tables `schema` creates on first open; rows come back as sqlite3.Row."""

    schema = ""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with reading(self.path, "SQLite ledger"), self._connect() as db:
            db.executescript(self.schema)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db


class Ledger(SQLiteFile):
    schema = SCHEMA

    def propose(self, round_: int, nb_id: str, topic: int, topics: list[int], passages: int, score: float,
                predicted: float | None, features: list[float]) -> None:
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO proposals (round, nb_id, topic, topics, passages, score, predicted,"
                       " features) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (round_, nb_id, topic, json.dumps(topics), passages, score, predicted, json.dumps(features)))

    def set_passages(self, nb_id: str, passages: int) -> None:
        """A proposal's passage count, once its expansion is done."""
        with self._connect() as db:
            db.execute("UPDATE proposals SET passages=? WHERE nb_id=?", (passages, nb_id))

    def finish(self, nb_id: str, progress: float, forgetting: float, tokens: int, loss_before: float,
               loss_after: float) -> None:
        with self._connect() as db:
            db.execute("UPDATE proposals SET status='done', progress=?, forgetting=?, tokens=?, loss_before=?,"
                       " loss_after=? WHERE nb_id=?", (progress, forgetting, tokens, loss_before, loss_after, nb_id))

    def proposals(self, round_: int | None = None) -> list[dict]:
        query, args = "SELECT * FROM proposals", ()
        if round_ is not None:
            query, args = query + " WHERE round=?", (round_,)
        with self._connect() as db:
            rows = [dict(r) for r in db.execute(query + " ORDER BY round, rowid", args)]
        for r in rows:
            r["topics"], r["features"] = json.loads(r["topics"]), json.loads(r["features"])
        return rows

    def record_rabbit_hole(self, round_: int, kind: str, idx: int, topic: int | None, path: list[int],
                           text: str | None = None, features: list[float] | None = None,
                           progress: float | None = None, tokens: int | None = None,
                           loss_before: float | None = None, loss_after: float | None = None) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO rabbit_holes (round, kind, idx, topic, path, text, features, progress,"
                       " tokens, loss_before, loss_after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (round_, kind, idx, topic, json.dumps(path), text,
                        None if features is None else json.dumps(features), progress, tokens, loss_before,
                        loss_after))

    def rabbit_holes(self, round_: int | None = None, kind: str | None = None) -> list[dict]:
        where = [(c, v) for c, v in (("round", round_), ("kind", kind)) if v is not None]
        query = "SELECT * FROM rabbit_holes" + (" WHERE " + " AND ".join(f"{c}=?" for c, _ in where) if where else "")
        with self._connect() as db:
            rows = [dict(r) for r in db.execute(query + " ORDER BY round, kind, idx", [v for _, v in where])]
        for r in rows:
            r["path"] = json.loads(r["path"])
            r["features"] = None if r["features"] is None else json.loads(r["features"])
        return rows
