"""Executors: how the orchestrator (`explore`, `index`) gets jobs done.

Both have the same two calls: `submit(kind, after=[...], **work) -> job id` and
`wait(job ids) -> {job id: result}`.

- `InlineExecutor` runs each job in this process when it is waited for: the default when no
  broker and no workers are configured, and exactly what the stages did before jobs existed.
- `CeleryExecutor` sends jobs to Celery workers and keeps the job ledger: a job whose
  dependencies are done is sent; a worker's heartbeat renews its lease; a job with no sign of
  life when its lease expires is sent again (a killed worker, a broker that lost the message);
  a worker error or a lost run counts as an attempt, and after `jobs.max_attempts` the job is
  failed with the worker's error. Jobs are sent as soon as they can run, so expansions of the
  next proposals run while the current ones train.

A running job's lease is renewed by each heartbeat. A pending job's lease runs from the later
of its send and the last sign of life of any job of this session (a start, a heartbeat): busy
workers are working through the backlog, and a lost message is noticed once they stop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from jobs.ledger import JobLedger
from jobs.tasks import KINDS as JOB_KINDS
from jobs.tasks import job_id, make_args
from pipeline.config import NucleusConfig
from pipeline.errors import JobFailed, UserError
from pipeline.workspace import Workspace

log = logging.getLogger("nucleus.jobs")


def check_options(cfg: NucleusConfig, workers: int = 0) -> None:
    """`--workers` against `jobs.mode`, before anything is written (the broker itself is reached
    when the executor opens)."""
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}.")
    if cfg.jobs.mode == "inline" and workers:
        raise UserError(f"--workers {workers} needs Celery, but jobs.mode is 'inline'. Drop --workers or set "
                        f"jobs.mode to auto.")


def open_executor(cfg: NucleusConfig, ws: Workspace, workers: int = 0):
    """The executor the config asks for (see `jobs.mode`); `workers` local workers are started
    for a Celery executor and stopped by its `close()`."""
    check_options(cfg, workers)
    mode = cfg.jobs.mode
    if mode == "celery" or (mode == "auto" and (workers or cfg.jobs.broker_url)):
        return CeleryExecutor(cfg, ws, workers)
    return InlineExecutor(cfg, ws)


class InlineExecutor:
    """Runs each job in this process, in the order it is waited for."""

    def __init__(self, cfg: NucleusConfig, ws: Workspace):
        self.cfg, self.ws = cfg, ws
        self.ledger = JobLedger(ws.root / "ledger.sqlite")
        self._jobs: dict[str, tuple[str, dict]] = {}

    def submit(self, kind: str, after: Iterable[str] = (), **work: Any) -> str:
        args = make_args(self.cfg, self.ws, kind, **work)
        jid = job_id(kind, args)
        self.ledger.add(jid, kind, args, list(after))
        self._jobs[jid] = (kind, args)
        return jid

    def wait(self, ids: Iterable[str]) -> dict[str, dict]:
        out = {}
        for jid in ids:
            row = self.ledger.get(jid)
            if row["state"] != "done":
                self.wait(row["after"])
                kind, args = self._jobs.get(jid, (row["kind"], row["args"]))
                self.ledger.update(jid, state="running", attempts=row["attempts"] + 1, worker="inline")
                try:
                    result = JOB_KINDS[kind].call(self.cfg, self.ws, args)  # exceptions keep their exit codes
                except BaseException as e:
                    self.ledger.update(jid, state="failed", error=f"{type(e).__name__}: {e}"[:2000],
                                       finished=time.time())
                    raise
                self.ledger.update(jid, state="done", result={"job": jid, **result}, finished=time.time(),
                                   error=None)
                row = self.ledger.get(jid)
            out[jid] = row["result"]
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CeleryExecutor:
    """Sends jobs to Celery workers and keeps their ledger (see the module docstring)."""

    def __init__(self, cfg: NucleusConfig, ws: Workspace, workers: int = 0):
        from jobs.app import KINDS as TASKS
        from jobs.app import check_services, make_app, queue_name

        check_services(cfg, ws)  # before any job is sent or local worker started
        self.cfg, self.ws = cfg, ws
        self.app = make_app(cfg, ws)
        self.tasks = {kind: (name, queue_name(cfg, ws, queue)) for kind, (name, queue) in TASKS.items()}
        self.ledger = JobLedger(ws.root / "ledger.sqlite")
        self.mine: set[str] = set()  # jobs of this session: the only ones it polls and sends
        self.last_activity = 0.0  # when a job of this session last started or sent a heartbeat
        self.beats: dict[str, float] = {}  # celery id -> last heartbeat value seen
        self.local = []
        if workers:
            from jobs.worker import start_local_workers

            self.local = start_local_workers(ws, workers)

    # ------------------------------------------------------------------ public
    def submit(self, kind: str, after: Iterable[str] = (), **work: Any) -> str:
        args = make_args(self.cfg, self.ws, kind, **work)
        jid = job_id(kind, args)
        row = self.ledger.add(jid, kind, args, list(after))
        if row["args"] != args and row["state"] != "done":
            self.ledger.update(jid, args=json.dumps(args))
        if row["state"] == "failed":  # a new command tries a failed job again: fresh messages, zero attempts
            self.ledger.update(jid, state="pending", attempts=0, tokens=[], celery_ids=[], error=None,
                               lease_expires=None)
        self.mine.add(jid)
        self._check(self.ledger.get(jid), time.time())
        return jid

    def wait(self, ids: Iterable[str]) -> dict[str, dict]:
        ids = list(ids)
        while True:
            self.poll()
            rows = [self.ledger.get(i) for i in ids]
            failed = [r for r in rows if r["state"] == "failed"]
            if failed:
                raise JobFailed(self._failure_message(failed))
            if all(r["state"] == "done" for r in rows):
                return {r["job_id"]: r["result"] for r in rows}
            self._check_local_workers()
            time.sleep(self.cfg.jobs.poll_s)

    def poll(self) -> None:
        """One look at every unfinished job of this session: send, renew, re-send, finish, fail."""
        now = time.time()
        for row in self.ledger.jobs(("pending", "running")):
            if row["job_id"] in self.mine:
                self._check(row, now)

    def close(self) -> None:
        from jobs.worker import stop_local_workers

        stop_local_workers(self.local)
        self.local = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- internals
    def _check(self, row: dict, now: float) -> None:
        jid, j = row["job_id"], self.cfg.jobs
        if row["state"] not in ("pending", "running"):
            return
        if not row["celery_ids"]:  # not sent yet: waiting for its dependencies, or the broker
            deps = [self.ledger.get(d) for d in row["after"]]
            bad = [d for d in deps if d is None or d["state"] == "failed"]
            if bad:
                self.ledger.update(jid, state="failed", finished=now,
                                   error=f"dependency {row['after'][deps.index(bad[0])]} failed")
            elif all(d["state"] == "done" for d in deps) and (row["lease_expires"] or 0) <= now:
                self._send(row, now)
            return
        metas = {cid: self._meta(cid) for cid in row["celery_ids"]}
        for cid, meta in metas.items():  # any message's success finishes the job
            if meta and meta.get("status") == "SUCCESS":
                # a run too short to be seen running still counts as one attempt
                attempts = row["attempts"] + (0 if any(t.startswith(f"{cid}|") for t in row["tokens"]) else 1)
                self.ledger.update(jid, state="done", result=meta.get("result"), finished=now, attempts=attempts)
                log.info("job %s done (attempts %d)", jid, attempts)  # `error` keeps a lost run's, if any
                return
        fields = self._observe_runs(row, metas, now)
        row = {**row, **fields}
        cid = row["celery_ids"][-1]
        meta = metas[cid]
        if meta is None:  # the result backend cannot be read now (an outage): look again next time
            return
        if meta.get("status") == "FAILURE":
            attempts = row["attempts"] + (0 if any(t.startswith(f"{cid}|") for t in row["tokens"]) else 1)
            error = _error(meta)
            info = meta.get("result")
            if isinstance(info, dict) and info.get("exc_type") == "JobRejected":  # permanent: not tried again
                self.ledger.update(jid, state="failed", attempts=attempts, error=error, finished=now)
                log.error("job %s rejected by the worker: %s", jid, error)
                return
            self._retry_or_fail(row, now, error, attempts)
            return
        if row["state"] == "running":  # alive while its heartbeats come
            if now > (row["lease_expires"] or 0):
                error = (f"lost: no heartbeat from worker {row['worker']} for {j.lease_s:g} s (jobs.lease_s); "
                         f"the worker or its machine died")
                self._retry_or_fail(row, now, error, row["attempts"])
            return
        # Pending: sent, no run seen. Its lease runs while nothing of this session moves (see the
        # module docstring): a busy worker is not a lost message.
        if now > max(row["sent_at"] or 0, self.last_activity) + j.lease_s:
            log.warning("job %s: no worker took it within %g s (jobs.lease_s); sending it again", jid, j.lease_s)
            self._send(row, now)

    def _observe_runs(self, row: dict, metas: dict[str, dict | None], now: float) -> dict:
        """Count every new run of any of the job's messages (one heartbeat token = one attempt)
        and renew the lease on every new heartbeat. Returns the ledger fields it wrote."""
        tokens, attempts, fields = list(row["tokens"]), row["attempts"], {}
        for cid, meta in metas.items():
            info = (meta or {}).get("result")
            if (meta or {}).get("status") != "STARTED" or not isinstance(info, dict) or "token" not in info:
                continue
            if f"{cid}|{info['token']}" not in tokens:
                tokens.append(f"{cid}|{info['token']}")
                attempts += 1
                fields.update(attempts=attempts, tokens=tokens, worker=str(info.get("worker")), state="running")
                log.info("job %s started on %s (attempt %d)", row["job_id"], info.get("worker"), attempts)
            if self.beats.get(cid) != info.get("beat"):
                self.beats[cid] = info.get("beat")
                self.last_activity = now
                fields.update(beat_at=now, lease_expires=now + self.cfg.jobs.lease_s)
        if fields:
            self.ledger.update(row["job_id"], **fields)
        return fields

    def _retry_or_fail(self, row: dict, now: float, error: str, attempts: int) -> None:
        jid = row["job_id"]
        if attempts >= self.cfg.jobs.max_attempts:
            self.ledger.update(jid, state="failed", attempts=attempts, error=error, finished=now)
            log.error("job %s failed after %d attempts: %s", jid, attempts, error)
            return
        log.warning("job %s: attempt %d of %d did not finish (%s); sending it again", jid, attempts,
                    self.cfg.jobs.max_attempts, error.splitlines()[0][:300])
        self.ledger.update(jid, attempts=attempts, error=error)
        self._send({**self.ledger.get(jid)}, now)

    def _send(self, row: dict, now: float) -> None:
        jid = row["job_id"]
        name, queue = self.tasks[row["kind"]]
        cid = f"{jid}~{row['sends'] + 1}"
        try:
            self.app.send_task(name, kwargs=row["args"], task_id=cid, queue=queue, retry=True,
                               retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                             "interval_max": 1.0})
        except Exception as e:  # the broker is down: keep the job and try again later
            log.warning("job %s could not be sent (%s: %s); trying again in %g s", jid, type(e).__name__, e,
                        min(5.0, self.cfg.jobs.lease_s))
            if not row["celery_ids"]:
                self.ledger.update(jid, lease_expires=now + min(5.0, self.cfg.jobs.lease_s))
            else:
                self.ledger.update(jid, sent_at=now - self.cfg.jobs.lease_s + min(5.0, self.cfg.jobs.lease_s))
            return
        self.ledger.update(jid, state="pending", sends=row["sends"] + 1, celery_ids=[*row["celery_ids"], cid],
                           sent_at=now, lease_expires=now + self.cfg.jobs.lease_s)

    def _meta(self, celery_id: str) -> dict | None:
        """The raw result-backend record of a message ({"status": "PENDING"} when there is none),
        or None when the backend cannot be read right now."""
        backend = self.app.backend
        try:
            raw = backend.get(backend.get_key_for_task(celery_id))
        except Exception as e:
            log.warning("result backend unreadable (%s: %s)", type(e).__name__, e)
            return None
        if not raw:
            return {"status": "PENDING"}
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _check_local_workers(self) -> None:
        if self.local and all(p.poll() is not None for p in self.local) and not self.cfg.jobs.broker_url:
            logs = ", ".join(str(p.log_path) for p in self.local)
            raise JobFailed(f"every local worker exited (codes {[p.returncode for p in self.local]}); see {logs}.")

    def _failure_message(self, failed: list[dict]) -> str:
        lines = [f"{len(failed)} job(s) failed:"]
        for r in failed:
            lines.append(f"  - {r['job_id']} after {r['attempts']} attempt(s) (jobs.max_attempts = "
                         f"{self.cfg.jobs.max_attempts}): {(r['error'] or '').strip()}")
        lines.append(f"`nucleus jobs --run-dir {self.ws.root}` lists every job; fix the cause and run the same "
                     f"command again: finished jobs are not redone.")
        return "\n".join(lines)


def _error(meta: dict) -> str:
    """`ExcType: message` and the last lines of the worker's traceback."""
    info = meta.get("result") or {}
    if isinstance(info, dict) and "exc_type" in info:
        msg = info.get("exc_message")
        msg = " ".join(map(str, msg)) if isinstance(msg, (list, tuple)) else str(msg)
        head = f"{info['exc_type']}: {msg}"
    else:
        head = str(info)
    tb = (meta.get("traceback") or "").strip().splitlines()
    rejected = isinstance(info, dict) and info.get("exc_type") == "JobRejected"
    return head + ("\n    " + "\n    ".join(tb[-4:]) if tb and not rejected else "")
