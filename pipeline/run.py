"""`nucleus run`: the whole job — index, nucleate, train the nucleus, explore, report.

Each stage skips what is already done, so `run` also resumes an interrupted run.
`--set explore.rounds=0` stops after the nucleus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pipeline import explore, index, nucleate, report, train
from pipeline.config import NucleusConfig
from pipeline.workspace import Workspace


@dataclass
class RunResult:
    index: dict
    nucleate: dict
    nucleus: dict
    explore: dict | None
    report: dict

    def to_json(self) -> dict:
        return asdict(self)


def check(cfg: NucleusConfig, ws: Workspace) -> None:
    """Every stage's checks that need no earlier stage's output, before anything is written."""
    index.check(cfg, ws)
    nucleate.check(cfg)
    train.check_model(cfg, ws)


def run(cfg: NucleusConfig, ws: Workspace, force: bool = False) -> RunResult:
    indexed = index.run(cfg, ws, force=force)
    nucleated = nucleate.run(cfg, ws)
    nucleus = train.run(cfg, ws)
    explored = explore.run(cfg, ws) if cfg.explore.rounds > 0 else None
    reported = report.run(cfg, ws)
    return RunResult(indexed.to_json(), nucleated.to_json(), nucleus.to_json(),
                     explored.to_json() if explored else None, reported.to_json())
