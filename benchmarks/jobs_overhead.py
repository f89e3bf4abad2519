"""Jobs: what a round trip through Celery costs, and whether training waits for data.

`overhead`: an empty job (`ping`) sent and its result read back, one after another, through
  call        `jobs.tasks.run_job` in this process (the task body alone)
  inline      the in-process executor (submit + wait, with the ledger writes)
  filesystem  a real `nucleus worker` on the embedded filesystem:// transport
  redis       a real `nucleus worker` on Redis (127.0.0.1:6379)
For the two brokers it times both the bare Celery round trip (send_task, then read the result
backend every 5 ms) and the orchestrator's (CeleryExecutor submit + wait: ledger, polling every
`jobs.poll_s`), at the default `jobs.poll_s` (0.5 s; on the filesystem transport also the
worker's polling interval) and at 0.05 s.

`pipeline`: a round of 4 proposals (expand, then train, for each) on a tiny trained run of the
built-in corpus, with one worker on the `train` queue and one on the `expand` queue:
  synchronous  every expansion sent and waited for, then every training (explore before jobs)
  pipelined    each training queued behind its own expansion, all sent at once (explore now)
  inline       the same round in process (expansions, then trainings; `--inline-rounds`)
The waiting-for-data fraction is the share of the round (its start to its last training's end)
in which the training worker had no training to run: 1 - (sum of training job times) / span,
with job times from the worker's clock. Rounds alternate synchronous / pipelined.

    python benchmarks/jobs_overhead.py overhead --repeats 50 --json-out benchmarks/results/jobs_overhead_cpu.json
    python benchmarks/jobs_overhead.py pipeline --rounds 3 --lora-steps 200 --json-out benchmarks/results/jobs_pipeline_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread per trainer, in this process as in each worker (the benchmark starts its workers
# with OMP_NUM_THREADS=1): on a shared 2-core box more threads only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from jobs.app import make_app, queue_name, queue_prefix  # noqa: E402
from jobs.executor import CeleryExecutor, InlineExecutor  # noqa: E402
from jobs.tasks import make_args, run_job  # noqa: E402
from pipeline.config import resolve_config  # noqa: E402
from pipeline.workspace import Workspace  # noqa: E402

SMALL = ["corpus.max_documents=16", "topics.num_topics=6"]  # tests/conftest.py SMALL_SETS
TINY_TRAIN = ["train.block_size=64", "train.batch_size=8", "train.nucleus_steps=40", "lora.steps=40",
              "train.eval_every=20", "train.checkpoint_every=10", "train.warmup_steps=5"]  # TRAIN_SETS


def stats_ms(xs: list[float]) -> dict:
    xs = sorted(x * 1000 for x in xs)
    return {"n": len(xs), "median_ms": round(statistics.median(xs), 2), "p10_ms": round(xs[len(xs) // 10], 2),
            "p90_ms": round(xs[(len(xs) * 9) // 10], 2), "mean_ms": round(statistics.fmean(xs), 2)}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_worker(run_dir: Path, log: Path, *sets: str, queues: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--run-dir", str(run_dir)]
    cmd += ["--queues", queues] if queues else []
    for s in sets:
        cmd += ["--set", s]
    out = open(log, "ab")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while " ready." not in log.read_text(errors="replace"):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


# --------------------------------------------------------------------------- overhead


def overhead(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    ws = Workspace(tmp / "run")
    base = resolve_config(None, None, None)
    ws.begin_command(base, "bench", force=False)
    out: dict = {"repeats": args.repeats, "arms": {}, "load_before": load()}
    n = [0]

    def ping_args(cfg):
        n[0] += 1
        return make_args(cfg, ws, "ping", n=n[0])

    t = []
    for _ in range(args.repeats):
        a = ping_args(base)
        t0 = time.perf_counter()
        run_job("ping", a, base, ws)
        t.append(time.perf_counter() - t0)
    out["arms"]["call"] = stats_ms(t)

    def through_executor(ex) -> list[float]:
        """Seconds from submit to result of `repeats` empty jobs through the orchestrator's executor."""
        t = []
        for _ in range(args.repeats):
            n[0] += 1
            t0 = time.perf_counter()
            ex.wait([ex.submit("ping", n=n[0])])
            t.append(time.perf_counter() - t0)
        return t

    out["arms"]["inline"] = stats_ms(through_executor(InlineExecutor(base, ws)))

    brokers = {"filesystem": []}
    if not args.no_redis:
        brokers["redis"] = [f"jobs.broker_url=redis://127.0.0.1:6379/{args.redis_db}"]
    for name, broker in brokers.items():
        for poll in (0.5, 0.05):
            sets = [*broker, f"jobs.poll_s={poll}", "jobs.mode=celery"]
            cfg = resolve_config(ws.stored_config(), None, sets)
            ws.save_config(cfg)
            worker = start_worker(ws.root, tmp / f"{name}-{poll}.log", *sets)
            try:
                app = make_app(cfg, ws)
                queue = queue_name(cfg, ws, "expand")
                raw = []
                for i in range(args.repeats + 3):
                    cid = f"bench-{name}-{poll}-{i}"
                    t0 = time.perf_counter()
                    app.send_task("nucleus.ping", kwargs=ping_args(cfg), task_id=cid, queue=queue)
                    while app.backend.get_task_meta(cid)["status"] != "SUCCESS":
                        time.sleep(0.005)
                    if i >= 3:  # 3 warm-ups
                        raw.append(time.perf_counter() - t0)
                out["arms"][f"{name} celery poll_s={poll}"] = stats_ms(raw)
                out["arms"][f"{name} executor poll_s={poll}"] = stats_ms(through_executor(CeleryExecutor(cfg, ws)))
            finally:
                stop(worker)
                if name == "redis":
                    import redis

                    r = redis.Redis(host="127.0.0.1", port=6379, db=args.redis_db)
                    keys = list(r.scan_iter(match=f"{queue_prefix(cfg, ws)}*"))
                    if keys:
                        r.delete(*keys)
    out["load_after"] = load()
    return out


# --------------------------------------------------------------------------- pipeline


def tiny_trained_run(root: Path) -> Workspace:
    from pipeline import index, nucleate, train

    ws = Workspace(root)
    cfg = resolve_config(None, None, SMALL + TINY_TRAIN)
    ws.begin_command(cfg, "bench", force=False)
    index.run(cfg, ws)
    nucleate.run(cfg, ws)
    train.run(cfg, ws)
    return ws


def train_busy(results: dict, trains: list[str]) -> tuple[float, float, float]:
    """(sum of training job seconds, first start, last end) by the worker's clock."""
    rs = [results[t] for t in trains]
    return sum(r["job_finished"] - r["job_started"] for r in rs), min(r["job_started"] for r in rs), max(
        r["job_finished"] for r in rs)


def pipeline_bench(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="jobs-pipe-"))
    ws = tiny_trained_run(tmp / "run")
    sets = ["jobs.mode=celery", "explore.max_passages=60", f"lora.steps={args.lora_steps}", f"jobs.poll_s={args.poll_s}"]
    cfg = resolve_config(ws.stored_config(), None, sets)
    ws.save_config(cfg)
    nucleus_topics = json.loads((ws.root / "neighborhoods" / "nucleus.json").read_text())["topics"]
    topics = [t for t in range(6) if t not in nucleus_topics][:4]
    out: dict = {"topics": topics, "lora_steps": cfg.lora.steps, "poll_s": cfg.jobs.poll_s, "rounds": [],
                 "load_before": load()}
    trainer = start_worker(ws.root, tmp / "train.log", queues="train")
    expander = start_worker(ws.root, tmp / "expand.log", queues="expand")
    try:
        with CeleryExecutor(cfg, ws) as ex:
            e = ex.submit("expand", nb_id="warm", topics=[topics[0]])  # imports, retriever, model
            ex.wait([ex.submit("train", after=[e], nb_id="warm")])
            for r in range(args.rounds):
                for mode in ("synchronous", "pipelined"):
                    ids = [f"{mode[0]}{r}-t{t}" for t in topics]
                    t0 = time.time()
                    if mode == "synchronous":
                        ex.wait([ex.submit("expand", nb_id=nb, topics=[t]) for nb, t in zip(ids, topics)])
                        trains = [ex.submit("train", nb_id=nb) for nb in ids]
                    else:
                        trains = [ex.submit("train", after=[ex.submit("expand", nb_id=nb, topics=[t])], nb_id=nb)
                                  for nb, t in zip(ids, topics)]
                    results = ex.wait(trains)
                    busy, first, last = train_busy(results, trains)
                    span = last - t0
                    out["rounds"].append({
                        "mode": mode, "round": r, "span_s": round(span, 3), "train_busy_s": round(busy, 3),
                        "waiting_fraction": round(1 - busy / span, 4),
                        "waiting_before_first_training_s": round(first - t0, 3),
                        "idle_between_trainings_s": round((last - first) - busy, 3),
                        "load": load()})
                    print(json.dumps(out["rounds"][-1]), flush=True)
        inline = InlineExecutor(cfg, ws)
        for r in range(args.inline_rounds):
            ids = [f"i{r}-t{t}" for t in topics]
            t0 = time.perf_counter()
            inline.wait([inline.submit("expand", nb_id=nb, topics=[t]) for nb, t in zip(ids, topics)])
            t1 = time.perf_counter()
            inline.wait([inline.submit("train", nb_id=nb) for nb in ids])
            t2 = time.perf_counter()
            out["rounds"].append({"mode": "inline", "round": r, "span_s": round(t2 - t0, 3),
                                  "train_busy_s": round(t2 - t1, 3), "waiting_fraction": round((t1 - t0) / (t2 - t0), 4),
                                  "load": load()})
            print(json.dumps(out["rounds"][-1]), flush=True)
    finally:
        stop(trainer)
        stop(expander)
    out["load_after"] = load()
    out["summary"] = {m: {"waiting_fraction_median": statistics.median(
        x["waiting_fraction"] for x in out["rounds"] if x["mode"] == m)} for m in ("synchronous", "pipelined", "inline")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--repeats", type=int, default=50)
    o.add_argument("--no-redis", action="store_true")
    o.add_argument("--redis-db", type=int, default=13)
    o.add_argument("--json-out", type=Path)
    q = sub.add_parser("pipeline")
    q.add_argument("--rounds", type=int, default=3)
    q.add_argument("--lora-steps", type=int, default=40, help="optimizer steps per training (tests use 40)")
    q.add_argument("--inline-rounds", type=int, default=1, help="rounds of the in-process arm")
    q.add_argument("--poll-s", type=float, default=0.5, help="jobs.poll_s (the default is 0.5)")
    q.add_argument("--json-out", type=Path)
    args = p.parse_args()
    result = overhead(args) if args.what == "overhead" else pipeline_bench(args)
    import celery
    import torch

    result["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                         "cpus": os.cpu_count(), "torch": torch.__version__, "celery": celery.__version__}
    result["command"] = " ".join(sys.argv)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
