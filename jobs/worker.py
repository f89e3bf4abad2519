"""`nucleus worker`: Celery worker processes for one run directory.

Every worker process runs Celery's `solo` pool, one job at a time: one process per GPU
(`--gpus 0,1`, each with its own `CUDA_VISIBLE_DEVICES`), or `--concurrency N` processes on a
CPU machine. A process never forks after loading torch, so CUDA is always initialised fresh;
`kill -9` of one process loses only its own job, which the orchestrator sends again.

`explore --workers N` starts N such processes itself (`start_local_workers`) and stops them
at the end; a worker started that way also stops when its orchestrator dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import NucleusConfig
from pipeline.errors import UserError, did_you_mean
from pipeline.workspace import Workspace

log = logging.getLogger("nucleus.worker")

PARENT_ENV = "NUCLEUS_WORKER_PARENT"


@dataclass
class WorkerPlan:
    queues: list[str]
    processes: list[dict[str, str]]  # extra environment of each worker process


def plan(cfg: NucleusConfig, queues: str | None, concurrency: int | None, gpus: str | None) -> WorkerPlan:
    """Check the command's options; one entry per worker process."""
    from jobs.app import QUEUES

    names = [q.strip() for q in (queues or ",".join(QUEUES)).split(",") if q.strip()]
    for q in names:
        if q not in QUEUES:
            raise UserError(f"--queues: unknown queue '{q}'.{did_you_mean(q, QUEUES)} Choose from "
                            f"{', '.join(QUEUES)}.")
    if not names:
        raise UserError(f"--queues must name at least one of {', '.join(QUEUES)}.")
    if gpus:
        try:
            ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise UserError(f"--gpus must be comma-separated GPU numbers (e.g. 0,1), got '{gpus}'.") from None
        if not ids or any(g < 0 for g in ids) or len(set(ids)) != len(ids):
            raise UserError(f"--gpus must list distinct GPU numbers >= 0, got '{gpus}'.")
        if concurrency not in (None, 1):
            raise UserError("--concurrency and --gpus do not mix: a GPU worker runs one job per GPU.")
        return WorkerPlan(sorted(set(names), key=names.index), [{"CUDA_VISIBLE_DEVICES": str(g)} for g in ids])
    n = cfg.jobs.concurrency if concurrency is None else concurrency
    if n < 1:
        raise UserError(f"--concurrency must be >= 1, got {n}.")
    return WorkerPlan(sorted(set(names), key=names.index), [{} for _ in range(n)])


def run(cfg: NucleusConfig, ws: Workspace, queues: str | None = None, concurrency: int | None = None,
        gpus: str | None = None, config_file: Path | None = None, sets: list[str] | None = None) -> int:
    """Serve the run's job queues until stopped (SIGTERM / Ctrl-C: finish the job, then exit)."""
    if not ws.exists():
        raise UserError(f"--run-dir '{ws.root}' is not a Nucleus run directory (no meta.json). Workers serve an "
                        f"existing run: start with `nucleus index --run-dir {ws.root}`.")
    p = plan(cfg, queues, concurrency, gpus)
    from jobs.app import check_services

    check_services(cfg, ws)  # exit 2 naming the URL, not Celery retrying a dead broker for ever
    if len(p.processes) == 1:
        os.environ.update(p.processes[0])
        return _serve(cfg, ws, p.queues, config_file, tuple(sets or ()))
    return _supervise(ws, p, config_file, sets or [])


def _serve(cfg: NucleusConfig, ws: Workspace, queues: list[str], config_file: Path | None,
           sets: tuple[str, ...]) -> int:
    """One solo Celery worker in this process."""
    from jobs.app import make_app, queue_name
    from jobs.tasks import WorkerContext, register

    _watch_parent()
    for handler in logging.getLogger().handlers:  # a worker's log is read later: say when
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s: %(message)s"))
    app = make_app(cfg, ws)
    register(app, WorkerContext(ws, config_file, sets))
    name = f"nucleus{os.getpid()}@{socket.gethostname()}"
    log.info("worker %s serving %s (queues %s, broker %s)", name, ws.root, ",".join(queues),
             cfg.jobs.broker_url or "embedded filesystem://")
    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--loglevel=INFO", f"--hostname={name}",
                     f"--queues={','.join(queue_name(cfg, ws, q) for q in queues)}",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])
    return 0


def _child_command(ws: Workspace, queues: list[str], config_file: Path | None, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--run-dir", str(ws.root), "--queues", ",".join(queues),
           "--concurrency", "1"]
    if config_file:
        cmd += ["--config", str(config_file)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _threads_env(n_processes: int) -> dict[str, str]:
    """CPU threads per worker process: the machine's cores shared out (unless already set), so N
    trainings on one CPU machine do not oversubscribe it."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n_processes))}


def _supervise(ws: Workspace, p: WorkerPlan, config_file: Path | None, sets: list[str]) -> int:
    """Several worker processes: start them, pass SIGTERM/SIGINT on, wait for all."""
    cmd = _child_command(ws, p.queues, config_file, sets)
    threads = {} if "CUDA_VISIBLE_DEVICES" in p.processes[0] else _threads_env(len(p.processes))
    children = [subprocess.Popen(cmd, env={**os.environ, **threads, **extra, PARENT_ENV: str(os.getpid())})
                for extra in p.processes]
    log.info("started %d worker processes: %s", len(children), [c.pid for c in children])

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [c.wait() for c in children]
    return max(codes, key=abs)


def _watch_parent() -> None:
    """A worker started by an orchestrator (or a supervisor) stops when that process dies."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    parent_pid = int(parent)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                log.warning("parent process %d is gone: stopping this worker", parent_pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


# --------------------------------------------------------------------- local workers


class LocalWorker(subprocess.Popen):
    log_path: Path


def start_local_workers(ws: Workspace, n: int) -> list[LocalWorker]:
    """`n` worker processes on this machine for `explore --workers N`; output in logs/workers/."""
    logs = ws.logs_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    procs = []
    for i in range(n):
        path = logs / f"local-{stamp}-{i}.log"
        with open(path, "ab") as out:
            proc = LocalWorker(_child_command(ws, ["expand", "train", "embed"], None, []), stdout=out,
                               stderr=subprocess.STDOUT,
                               env={**os.environ, **_threads_env(n), PARENT_ENV: str(os.getpid())})
        proc.log_path = path
        procs.append(proc)
    log.info("started %d local workers (logs in %s)", n, logs)
    return procs


def stop_local_workers(procs: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL whatever is still running after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
