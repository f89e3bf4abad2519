"""The run directory: the only state Nucleus keeps.

Every artifact is written by rename (`pipeline.atomic`), so a crash or `kill -9` at any moment
leaves either the old artifact or the new one, never half of one. `meta.json`
records, per finished stage, the hash of each config section the stage depends on; a later
command whose config changes one of those sections is stopped (unless `--force`), naming the
stale stage.

A directory becomes a run only when it is new or empty: Nucleus never writes into (or cleans)
a directory that holds anything else. A command rejected as bad input before it wrote an
artifact leaves every file of the run as it was (`Workspace.command`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.atomic import (TMP_PREFIX, atomic_write_bytes, atomic_write_json, atomic_write_text, is_stale_temporary,
                             read_json,
                             remove_path, restore_aside, tmp_target)
from pipeline.config import NucleusConfig, section_hash, to_yaml
from pipeline.errors import DamagedFile, UserError

# Stages in pipeline order; redoing one makes the records of those after it stale.
STAGE_ORDER = ("index", "nucleate", "train", "explore")
# Everything Nucleus writes at the top of a run directory. Temporaries are looked for only in
# these, and a rejected command removes only these when it made them.
LAYOUT = ("config.yaml", "meta.json", "corpus", "index", "topics", "kg", "neighborhoods", "model", "adapters",
          "checkpoints", "logs", "ledger.sqlite", "ledger.sqlite-journal", "ledger.sqlite-wal",
          "ledger.sqlite-shm", "explore", "reports", "queue", ".cache", "evals", "locks", "adapters_eval.json", "qa",
          "sweep")
# What a command may create before its first artifact (and a rejected one then removes): the
# job ledger and the embedded broker's folders, opened before any work starts.
BOOKKEEPING = ("ledger.sqlite", "ledger.sqlite-journal", "ledger.sqlite-wal", "ledger.sqlite-shm", "queue",
               ".cache", "locks")
# The command that rebuilds each top-level artifact, for messages about damaged files.
REBUILD = {"corpus": "index", "index": "index", "topics": "index", "kg": "nucleate", "neighborhoods": "nucleate",
           "model": "train", "ledger.sqlite": "explore", "explore": "explore", "reports": "report", "qa": "index"}


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

    def check_run_dir(self) -> bool:
        """True for an existing run, False for a directory that would become one (absent, empty,
        or holding only a `config.yaml` put there for it); anything else is refused unchanged."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--run-dir '{self.root}' exists and is not a directory. Give a new or empty "
                            f"directory, or an existing run.")
        if self.meta_path.exists():
            return True
        if not self.root.exists():
            return False
        entries = sorted(p.name for p in self.root.iterdir())
        if entries in ([], ["config.yaml"]):
            return False
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UserError(f"--run-dir '{self.root}' is not empty and is not a Nucleus run (no meta.json; it holds "
                        f"{shown}). A run directory must be new, empty or an existing run, so that nothing "
                        f"else is ever changed: choose another --run-dir, e.g. '{self.root / 'run'}'.")

    def create(self) -> None:
        self.check_run_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_temporaries()

    def clean_temporaries(self) -> None:
        """Remove what a killed Nucleus process left half-written: only temporaries of this
        machine's processes that no longer run, and only where Nucleus writes."""
        found = list(self.root.glob(f"{TMP_PREFIX}*"))  # beside config.yaml, meta.json, corpus/, ...
        for name in LAYOUT:
            top = self.root / name
            if top.is_dir() and not top.is_symlink():
                found += top.rglob(f"{TMP_PREFIX}*")
        for p in found:
            if is_stale_temporary(p.name) and p.exists():
                target = tmp_target(p.name)  # a directory moved aside goes back, if nothing replaced it
                if not (target.startswith("old-") and restore_aside(p.with_name(target[4:]))):
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
        meta = read_json(self.meta_path)
        if not (isinstance(meta, dict) and isinstance(meta.get("stages"), dict)
                and isinstance(meta.get("commands"), list)):
            raise DamagedFile(self.meta_path, "not a Nucleus meta.json (no 'stages' and 'commands')")
        return meta

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
    def check_stale(self, cfg: NucleusConfig, force: bool) -> dict[str, list[str]]:
        """The stale stages ({stage: [changed sections]}); an error unless `force` accepts them.
        Writes nothing."""
        if not self.exists():
            return {}
        if force and self._damaged_meta():
            return {}  # begin_command starts the records afresh
        stale = self.stale_stages(cfg)
        if stale and not force:
            parts = [f"`{st}` (changed: {', '.join(secs)})" for st, secs in stale.items()]
            raise UserError(
                f"the config differs from the one that finished stage {'; '.join(parts)} in "
                f"'{self.root}'. Revert the change, use another --run-dir, or add --force to "
                f"accept it: stale stages are then redone by their own commands."
            )
        return stale

    def _damaged_meta(self) -> bool:
        try:
            self.meta()
        except DamagedFile:
            return True
        return False

    def begin_command(self, cfg: NucleusConfig, command: str, force: bool) -> None:
        """Check staleness, then store the resolved config and log the command in meta.json."""
        stale = self.check_stale(cfg, force)
        self.create()
        if force and self.exists() and self._damaged_meta():
            # --force on a damaged meta.json: keep it aside and start the stage records afresh
            # (every stage then redoes its work).
            os.replace(self.meta_path, self.root / f"meta.json.damaged-{dt.datetime.now():%Y%m%d-%H%M%S}")
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

    @contextlib.contextmanager
    def command(self, cfg: NucleusConfig, command: str, force: bool) -> Iterator[None]:
        """Run a command that writes to the run: `begin_command`, the body, `end_command`.

        When the body is rejected as bad input (UserError) before it changed any artifact,
        everything is put back as it was: config.yaml and meta.json byte for byte, and what the
        command created (the directory itself, an empty ledger, queue folders) removed."""
        existed = self.root.is_dir()
        before = _fingerprint(self.root) if existed else {}
        saved = {p: p.read_bytes() for p in (self.config_path, self.meta_path) if p.is_file()}
        self.begin_command(cfg, command, force)
        try:
            yield
        except UserError:
            if not self._roll_back(existed, before, saved):
                self.end_command("failed")
            raise
        except BaseException:
            self.end_command("failed")
            raise
        self.end_command("ok")

    def _roll_back(self, existed: bool, before: dict[str, tuple], saved: dict[Path, bytes]) -> bool:
        """Undo a command that changed no artifact; False (nothing undone) when it did."""
        after = _fingerprint(self.root)
        own = {"config.yaml", "meta.json"}
        changed = [p for p in set(before) | set(after) if before.get(p) != after.get(p) and p not in own]
        made = [p for p in changed if p not in before]
        if len(made) != len(changed) or not all(p.endswith("/") or p.split("/")[0] in BOOKKEEPING for p in made):
            return False  # an artifact was written: keep it, and the record of what happened
        if not existed:
            shutil.rmtree(self.root, ignore_errors=True)
            return True
        for rel in sorted(made, key=lambda r: r.count("/"), reverse=True):
            remove_path(self.root / rel)
        for path in (self.config_path, self.meta_path):
            if path in saved:
                atomic_write_bytes(path, saved[path])
            else:
                path.unlink(missing_ok=True)
        return True


def _fingerprint(root: Path) -> dict[str, tuple]:
    """{relative path: (size, mtime) for a file, () for a folder} of a run directory, logs
    aside: what a rejected command compares to see whether it changed anything."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        base = "" if rel == "." else rel + "/"
        for d in dirnames:
            out[base + d + "/"] = ()
        for f in filenames:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(dirpath, f))
                out[base + f] = (st.st_size, st.st_mtime_ns)
    return {p: v for p, v in out.items() if not p.startswith("logs/")}


def rebuild_hint(path: Path) -> str:
    """The sentence that tells how to rebuild a damaged artifact `path` of a run ('' outside one)."""
    path = Path(path).resolve()
    root = next((d for d in path.parents if (d / "meta.json").exists()), None)
    if root is None:
        return ""
    parts = path.relative_to(root).parts
    if not parts:
        return ""
    if parts[0] == "meta.json":
        return (f" It holds the run's stage records: `nucleus run --run-dir {root} --force` keeps it aside as "
                f"meta.json.damaged-* and redoes every stage.")
    if parts[0] == "adapters" and len(parts) > 1:
        return f" Rebuild it with `nucleus train --run-dir {root} --neighborhood {parts[1]} --force`."
    if parts[0] == "checkpoints":
        return " It is a training checkpoint: run the same command with --restart to start that training over."
    if parts[0].startswith("ledger.sqlite"):
        return (f" It holds the run's job and curiosity records: move it aside and `nucleus explore --run-dir "
                f"{root}` starts a new one (adapters already trained are kept).")
    if parts[0] == "config.yaml":
        return " Fix the YAML by hand, or give the settings with --config/--set."
    command = REBUILD.get(parts[0])
    return f" Rebuild it with `nucleus {command} --run-dir {root} --force`." if command else ""


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "nucleus-curriculum": __version__}
    for pkg in ("torch", "transformers", "sentence-transformers", "faiss-cpu", "datasets", "peft"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out
