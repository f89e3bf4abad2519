"""Thin, idempotent job tasks: JSON ids and paths in, small JSON out, outputs written by rename.

A task checks its arguments strictly (exact keys and types, the run directory the worker
serves, a safe and known neighbourhood id, the config hash the job was sent for) and calls
the stage function; it holds no logic of its own. A bad message is rejected and logged and
writes nothing. The same job run twice does one job's work: a per-job file lock serialises
duplicates, and the stage functions skip work whose output is complete.

`run_job` is the one entry point: the Celery tasks call it in a worker (with heartbeats, the
lock and a time limit), and the in-process executor calls it directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curriculum.neighborhood import NUCLEUS, check_nb_id
from pipeline.config import NucleusConfig, resolve_config, section_hash
from pipeline.errors import UserError
from pipeline.workspace import Workspace

log = logging.getLogger("nucleus.jobs")

HASH = re.compile(r"^[0-9a-f]{16}$")


class JobRejected(Exception):
    """A message that must not run: wrong arguments, a path outside the run directory, an
    unknown neighbourhood, another config. Permanent: the job is not tried again."""


class JobTimeLimit(Exception):
    """The job ran longer than `jobs.time_limit_s`."""


# ---------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """A job kind: its argument types (besides run_dir and config_hash), the config sections
    its hash covers, and the stage call."""

    fields: dict[str, Callable[[Any], bool]]
    sections: Callable[[], tuple[str, ...]]
    call: Callable[[NucleusConfig, Workspace, dict], dict]
    work: Callable[[dict], str]  # what the job does, for its id: "r00-t3", "shard-4"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expand_sections() -> tuple[str, ...]:
    from pipeline.neighborhoods import EXPAND_SECTIONS

    return EXPAND_SECTIONS


def _train_sections() -> tuple[str, ...]:
    from pipeline.train import SECTIONS

    return SECTIONS


def _embed_sections() -> tuple[str, ...]:
    from pipeline.index import STEP_SECTIONS

    return STEP_SECTIONS["embed"]


_inputs_cache: dict[tuple[str, str], Any] = {}


def _expand(cfg: NucleusConfig, ws: Workspace, a: dict) -> dict:
    from pipeline import neighborhoods

    neighborhoods.check_expansion(ws, a["nb_id"], a["topics"])  # before loading anything
    key = (str(ws.root), section_hash(cfg, neighborhoods.EXPAND_SECTIONS))
    if key not in _inputs_cache:  # the retriever and vectors load once per worker and config
        _inputs_cache.clear()
        _inputs_cache[key] = neighborhoods.ExpansionInputs.load(cfg, ws)
    nb = neighborhoods.expand(cfg, ws, a["nb_id"], a["topics"], _inputs_cache[key])
    return {"nb_id": nb.id, "topics": nb.topics, "passages": len(nb.passage_ids)}


def _train(cfg: NucleusConfig, ws: Workspace, a: dict) -> dict:
    from pipeline import train

    # resume=True: a job sent again after its worker died continues from the last checkpoint.
    r = train.run(cfg, ws, a["nb_id"], resume=True)
    return {"nb_id": r.neighborhood, "output": r.output, "steps": r.steps, "tokens": r.tokens,
            "seconds": r.seconds, "resumed_from": r.resumed_from, "skipped": r.skipped}


def _evaluate(cfg: NucleusConfig, ws: Workspace, a: dict) -> dict:
    from pipeline import neighborhoods

    record = neighborhoods.evaluate_adapter(cfg, ws, a["nb_id"])
    keep = ("heldout/loss", "heldout/ppl", f"nb/{a['nb_id']}/loss", f"nb/{a['nb_id']}/ppl", "nucleus/loss",
            "nucleus/ppl")
    return {"nb_id": a["nb_id"], "path": str(neighborhoods.evaluation_path(ws, a["nb_id"])),
            "metrics": {k: record["metrics"][k] for k in keep if k in record["metrics"]}}


def _embed(cfg: NucleusConfig, ws: Workspace, a: dict) -> dict:
    from pipeline import index

    return index.embed_shard(cfg, ws, a["shard"])


def _ping(cfg: NucleusConfig, ws: Workspace, a: dict) -> dict:
    return {"pong": a["n"], "worker": socket.gethostname(), "pid": os.getpid()}


def _is_topics(v: Any) -> bool:
    return isinstance(v, list) and 0 < len(v) <= 1024 and all(_is_int(t) for t in v)


KINDS: dict[str, Kind] = {
    "expand": Kind({"nb_id": lambda v: isinstance(v, str), "topics": _is_topics}, _expand_sections, _expand,
                   lambda a: a["nb_id"]),
    "train": Kind({"nb_id": lambda v: isinstance(v, str)}, _train_sections, _train, lambda a: a["nb_id"]),
    "evaluate": Kind({"nb_id": lambda v: isinstance(v, str)}, _train_sections, _evaluate, lambda a: a["nb_id"]),
    "embed": Kind({"shard": lambda v: _is_int(v) and v >= 0}, _embed_sections, _embed,
                  lambda a: f"shard-{a['shard']}"),
    "ping": Kind({"n": _is_int}, lambda: (), _ping, lambda a: f"n-{a['n']}"),
}


def config_hash(cfg: NucleusConfig, kind: str) -> str:
    return section_hash(cfg, KINDS[kind].sections())


def job_id(kind: str, args: dict) -> str:
    """`<kind>:<work>:<config hash>`, e.g. `train:r00-t3:1f0c...`: derived from the work, so a
    job sent twice is recognised as one."""
    return f"{kind}:{KINDS[kind].work(args)}:{args['config_hash']}"


def make_args(cfg: NucleusConfig, ws: Workspace, kind: str, **work: Any) -> dict:
    """The JSON arguments of a job: the run directory, the work, and the config hash."""
    return {"run_dir": str(ws.root), **work, "config_hash": config_hash(cfg, kind)}


# ----------------------------------------------------------------------- validation


def check_args(kind: str, args: Any, ws: Workspace, cfg: NucleusConfig) -> dict:
    """The arguments if they are a well-formed job for this run and config, else JobRejected."""
    spec = KINDS.get(kind)
    if spec is None:
        raise JobRejected(f"unknown job kind {kind!r}")
    if not isinstance(args, dict):
        raise JobRejected(f"arguments must be a JSON object, got {type(args).__name__}")
    expected = {"run_dir", "config_hash", *spec.fields}
    if set(args) != expected:
        raise JobRejected(f"arguments must be exactly {sorted(expected)}, got {sorted(args)}")
    bad = [k for k, ok in spec.fields.items() if not ok(args[k])]
    if not isinstance(args["run_dir"], str) or "\x00" in args["run_dir"]:
        bad.append("run_dir")
    if not isinstance(args["config_hash"], str) or not HASH.match(args["config_hash"]):
        bad.append("config_hash")
    if bad:
        raise JobRejected(f"bad value for {', '.join(bad)}: " + ", ".join(f"{k}={args[k]!r}"[:120] for k in bad))
    if Path(args["run_dir"]).resolve() != ws.root:
        raise JobRejected(f"run_dir {args['run_dir']!r} is not the run directory this worker serves ({ws.root})")
    if "nb_id" in args:
        try:
            check_nb_id(args["nb_id"])
        except UserError as e:
            raise JobRejected(str(e)) from None
        if args["nb_id"] == NUCLEUS:
            raise JobRejected("the nucleus trains in the orchestrator (`nucleus train`), not as a job")
        if kind != "expand" and not (ws.root / "neighborhoods" / f"{args['nb_id']}.json").is_file():
            raise JobRejected(f"unknown neighbourhood {args['nb_id']!r}: no neighborhoods/{args['nb_id']}.json")
    if kind in ("expand", "train", "evaluate") and not ws.is_complete("train"):
        raise JobRejected(f"the nucleus of {ws.root} is not trained: run `nucleus train` first")
    have = config_hash(cfg, kind)
    if args["config_hash"] != have:
        raise JobRejected(f"the job was sent for config {args['config_hash']}, but this worker resolves the run's "
                          f"config to {have}: the run config changed, or the worker's --set/--config differs")
    return args


def run_job(kind: str, args: Any, cfg: NucleusConfig, ws: Workspace) -> dict:
    """Check the arguments, then call the stage function. UserError -> JobRejected."""
    args = check_args(kind, args, ws, cfg)
    try:
        return KINDS[kind].call(cfg, ws, args)
    except UserError as e:
        raise JobRejected(str(e)) from None


# ------------------------------------------------------------------------ in a worker


@dataclass
class WorkerContext:
    """What a worker knows: the run directory it serves and its own config overrides."""

    ws: Workspace
    config_file: Path | None = None
    sets: tuple[str, ...] = ()

    def config(self) -> NucleusConfig:
        """The run's stored config plus this worker's overrides, read again for every job."""
        return resolve_config(self.ws.stored_config(), self.config_file, list(self.sets))


def lock_path(ws: Workspace, job: str) -> Path:
    return ws.root / "queue" / "locks" / (re.sub(r"[^A-Za-z0-9._-]", "_", job) + ".lock")


@contextlib.contextmanager
def job_lock(ws: Workspace, job: str) -> Iterator[None]:
    """One run of a job at a time across workers (flock; released by the kernel if the holder dies)."""
    path = lock_path(ws, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Heartbeat(threading.Thread):
    """Writes the job's STARTED state with a fresh `beat` every `every` seconds, so the
    orchestrator can tell a running job from one whose worker died."""

    def __init__(self, backend, celery_id: str, meta: dict, every: float, stop_after: float):
        super().__init__(daemon=True, name=f"heartbeat-{celery_id}")
        self.backend, self.celery_id, self.meta = backend, celery_id, meta
        self.every, self.stop_after = every, stop_after
        self.done = threading.Event()

    def beat(self) -> None:
        try:
            self.backend.store_result(self.celery_id, {**self.meta, "beat": time.time()}, "STARTED")
        except Exception as e:  # a broker/backend outage must not kill the job; the lease covers it
            log.warning("heartbeat of %s not stored: %s", self.celery_id, e)

    def run(self) -> None:
        while not self.done.wait(self.every):
            if time.time() - self.meta["started"] > self.stop_after:
                return  # past the time limit: let the lease expire
            self.beat()


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise JobTimeLimit in the main thread after `seconds` (the solo pool has no time limits)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise JobTimeLimit(f"the job ran longer than jobs.time_limit_s = {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def execute(task, kind: str, args: Any, kwargs: dict, ctx: WorkerContext) -> dict:
    """The body of every Celery task: reject, or run the job under its lock with heartbeats."""
    celery_id = task.request.id
    try:
        if args:
            raise JobRejected(f"arguments must be keyword arguments (a JSON object), got positional {args!r}"[:300])
        try:
            cfg = ctx.config()
        except UserError as e:
            raise JobRejected(f"the worker cannot resolve the run's config: {e}") from None
        checked = check_args(kind, kwargs, ctx.ws, cfg)
    except JobRejected as e:
        log.error("rejected %s job %s: %s", kind, celery_id, e)
        raise
    job = job_id(kind, checked)
    meta = {"job": job, "worker": task.request.hostname or socket.gethostname(), "pid": os.getpid(),
            "started": time.time()}
    meta["token"] = f"{meta['worker']}:{meta['pid']}:{meta['started']:.6f}"
    heart = Heartbeat(task.backend, celery_id, meta, cfg.jobs.heartbeat_s or cfg.jobs.lease_s / 6,
                      cfg.jobs.time_limit_s)
    heart.beat()
    heart.start()
    log.info("start %s (%s)", job, celery_id)
    try:
        with job_lock(ctx.ws, job), _time_limit(cfg.jobs.time_limit_s):
            result = run_job(kind, checked, cfg, ctx.ws)
    except JobRejected as e:
        log.error("rejected %s job %s: %s", kind, celery_id, e)
        raise
    finally:
        heart.done.set()
        heart.join()
    log.info("done %s (%s): %s", job, celery_id, json.dumps(result)[:200])
    # when it ran, by the worker's clock: what the pipelining benchmark adds up
    return {"job": job, **result, "job_started": meta["started"], "job_finished": time.time()}


def register(app, ctx: WorkerContext) -> None:
    """Register every job kind on `app` as a task that runs in `ctx`'s run directory."""
    from jobs.app import KINDS as TASK_NAMES

    def make(kind: str, name: str):
        def task(self, *args, **kwargs):  # every argument is checked in `execute`
            return execute(self, kind, args, kwargs, ctx)

        task.__name__ = name.rpartition(".")[2]
        return task

    for kind, (name, _) in TASK_NAMES.items():
        app.task(name=name, bind=True, typing=False, acks_late=True, reject_on_worker_lost=True)(make(kind, name))
