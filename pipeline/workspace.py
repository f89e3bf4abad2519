"""The run directory: the only state Nucleus keeps.

Every artifact is written by rename (`pipeline.atomic`), so a crash or `kill -9` at any moment
leaves either the old artifact or the new one, never half of one. `meta.json`
records, per finished stage, the hash of each config section the stage depends on; a later
command whose config changes one of those sections is stopped (unless `--force`), naming the
stale stage.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.atomic import TMP_PREFIX, atomic_write_json, atomic_write_text, read_json, remove_path
from pipeline.config import NucleusConfig, section_hash, to_yaml
from pipeline.errors import UserError

# Stages in pipeline order; redoing one makes the records of those after it stale.
STAGE_ORDER = ("index", "nucleate", "train", "explore")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Workspace:
    """Paths and bookkeeping of one run directory (`runs/<name>/`)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()

    # ----------------------------------------------------------------- layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    @property
    def corpus_dir(self) -> Path:
        return self.root / "corpus"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def topics_dir(self) -> Path:
        return self.root / "topics"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--run-dir '{self.root}' exists and is not a directory.")
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_temporaries()

    def clean_temporaries(self) -> None:
        """Remove what a killed process left half-written (temp files never count as output)."""
        for p in self.root.rglob(f"{TMP_PREFIX}*"):
            remove_path(p)

    # ----------------------------------------------------------------- config
    def stored_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UserError(f"run config '{self.config_path}' is not valid YAML: {e}.") from None
        return data or {}

    def save_config(self, cfg: NucleusConfig) -> None:
        atomic_write_text(self.config_path, to_yaml(cfg))

    # ------------------------------------------------------------------- meta
    def meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            return {"package": "nucleus-curriculum", "version": __version__, "created": now(),
                    "stages": {}, "commands": []}
        return read_json(self.meta_path)

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.meta_path, meta)

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        return self.meta()["stages"].get(stage)

    def is_complete(self, stage: str) -> bool:
        rec = self.stage_record(stage)
        return bool(rec and rec.get("status") == "complete")

    def require(self, stage: str, command: str) -> None:
        """Stop with a clear message when `stage` has not finished in this run directory."""
        if not self.is_complete(stage):
            raise UserError(
                f"run directory '{self.root}' has no finished `{stage}` stage, which `{command}` needs. "
                f"Run `nucleus {stage} --run-dir {self.root}` first."
            )

    def mark_complete(self, stage: str, cfg: NucleusConfig, sections: tuple[str, ...],
                      extra: dict[str, Any] | None = None) -> None:
        meta = self.meta()
        if stage in STAGE_ORDER:  # later stages were built on the old outputs
            for later in STAGE_ORDER[STAGE_ORDER.index(stage) + 1:]:
                meta["stages"].pop(later, None)
        meta["stages"][stage] = {
            "status": "complete",
            "finished": now(),
            "version": __version__,
            "config_hash": section_hash(cfg, sections),
            "sections": {s: section_hash(cfg, (s,)) for s in sections},
            **(extra or {}),
        }
        self.write_meta(meta)

    def stale_stages(self, cfg: NucleusConfig) -> dict[str, list[str]]:
        """{stage: [changed sections]} for finished stages whose config sections changed."""
        stale: dict[str, list[str]] = {}
        for stage, rec in self.meta()["stages"].items():
            changed = [s for s, h in rec.get("sections", {}).items()
                       if s in NucleusConfig.model_fields and section_hash(cfg, (s,)) != h]
            if changed:
                stale[stage] = changed
        return stale

    def forget(self, stage: str) -> None:
        meta = self.meta()
        meta["stages"].pop(stage, None)
        self.write_meta(meta)

    # ---------------------------------------------------------------- command
    def begin_command(self, cfg: NucleusConfig, command: str, force: bool) -> None:
        """Check staleness, then store the resolved config and log the command in meta.json."""
        stale = self.stale_stages(cfg) if self.exists() else {}
        if stale and not force:
            parts = [f"`{st}` (changed: {', '.join(secs)})" for st, secs in stale.items()]
            raise UserError(
                f"the config differs from the one that finished stage {'; '.join(parts)} in "
                f"'{self.root}'. Revert the change, use another --run-dir, or add --force to "
                f"accept it: stale stages are then redone by their own commands."
            )
        self.create()
        meta = self.meta()
        for stage in stale:  # --force: drop the stale records so their commands redo them
            meta["stages"].pop(stage, None)
        meta.setdefault("versions", _versions())
        meta["seed"] = cfg.seed
        meta["commands"].append({"command": command, "argv": sys.argv[1:], "started": now()})
        self.write_meta(meta)
        self.save_config(cfg)

    def end_command(self, status: str) -> None:
        meta = self.meta()
        if meta["commands"]:
            meta["commands"][-1].update(ended=now(), status=status)
            self.write_meta(meta)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "nucleus-curriculum": __version__}
    for pkg in ("torch", "transformers", "sentence-transformers", "faiss-cpu", "datasets", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out
