"""Jobs with real `nucleus worker` processes on real brokers: the embedded filesystem transport,
Redis at 127.0.0.1:6379 and RabbitMQ at 127.0.0.1:5672. A worker killed with -9 mid-job, a broker stopped and started
again mid-round, a job sent twice, malformed messages: every neighbourhood still ends with
exactly one complete adapter, and the ledger agrees."""

import json
import os
import signal
import subprocess
import time

import pytest

from jobs.app import make_app, queue_name, queue_prefix
from jobs.executor import CeleryExecutor
from jobs.tasks import make_args
from pipeline.config import resolve_config
from pipeline.errors import JobFailed
from pipeline.workspace import Workspace
from tests.jobs.helpers import (assert_one_complete_adapter_each, redis_db, redis_forget, redis_start, redis_stop,
                                rows, sets, start_nucleus, start_worker, stop, tree, wait_for, wait_ready,
                                worker_pid)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# One round of 4 neighbourhoods (6 topics, 2 in the nucleus, k=0), no rabbit holes; trainings
# long enough (20 steps) to be killed mid-job; a short lease so a lost job is sent again soon.
ROUND = ["explore.rounds=1", "explore.per_round=4", "explore.k=0", "explore.walks=0", "explore.generative=0",
         "explore.max_passages=60", "lora.steps=20", "jobs.mode=celery", "jobs.lease_s=6", "jobs.poll_s=0.2"]


def _broker(transport: str, run_dir) -> tuple[list[str], int | None]:
    if transport == "filesystem":
        return [], None
    redis_start()
    db = redis_db()
    return [f"jobs.broker_url=redis://127.0.0.1:6379/{db}"], db


def _explore(run_dir, log, broker: list[str], *options: str):
    return start_nucleus(log, "explore", "--run-dir", str(run_dir), "--json", *options, *sets(*ROUND, *broker))


def _finish(proc, log, timeout=300):
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"explore did not finish: {log.read_text()[-4000:]}") from None
    assert proc.returncode == 0, log.read_text()[-4000:]


def _check_round(run_dir):
    proposals = rows(run_dir, "proposals")
    nb_ids = [p["nb_id"] for p in proposals]
    assert len(nb_ids) == 4 and all(p["status"] == "done" and p["passages"] > 0 for p in proposals)
    assert_one_complete_adapter_each(run_dir, nb_ids)
    jobs = {j["job_id"]: j for j in rows(run_dir, "jobs")}
    assert sorted(j["kind"] for j in jobs.values()) == ["expand"] * 4 + ["train"] * 4
    assert all(j["state"] == "done" for j in jobs.values()), jobs
    for nb in nb_ids:  # the ledger names the adapter that is on disk, with its config and its steps
        train = next(j for j in jobs.values() if j["kind"] == "train" and json.loads(j["args"])["nb_id"] == nb)
        result = json.loads(train["result"])
        info = json.loads((run_dir / "adapters" / nb / "neighborhood.json").read_text())
        assert result["output"] == str(run_dir / "adapters" / nb)
        assert train["job_id"].endswith(f":{info['config_hash']}") and result["steps"] == info["result"]["steps"] == 20
    return jobs


def _local_workers(run_dir) -> list[int]:
    """pids of the `nucleus worker` processes serving run_dir."""
    out = subprocess.run(["pgrep", "-f", f"pipeline.cli worker --run-dir {run_dir}( |$)"], capture_output=True,
                         text=True)
    return [int(x) for x in out.stdout.split()]


@pytest.mark.parametrize("transport", ["filesystem", "redis"])
def test_round_survives_a_worker_killed_mid_job(trained_run_copy, tmp_path, transport):
    """filesystem: `explore --workers 2` starts its own workers; redis: two `nucleus worker`
    processes started beforehand. Either way one is killed with -9 while it trains."""
    broker, db = _broker(transport, trained_run_copy)
    workers, explore = [], None
    try:
        if transport == "redis":
            workers = [start_worker(trained_run_copy, tmp_path / f"w{i}.log", *broker) for i in range(2)]
            for i in range(2):
                wait_ready(tmp_path / f"w{i}.log")
            explore = _explore(trained_run_copy, tmp_path / "explore.log", broker)
        else:
            explore = _explore(trained_run_copy, tmp_path / "explore.log", broker, "--workers", "2")
        running = wait_for(lambda: [j for j in rows(trained_run_copy, "jobs")
                                    if j["kind"] == "train" and j["state"] == "running"], 240, "a running training")
        victim = running[0]
        pid = worker_pid(victim["worker"])
        assert pid in ([w.pid for w in workers] or _local_workers(trained_run_copy))
        os.kill(pid, signal.SIGKILL)  # mid-job: its training had just started
        workers.append(start_worker(trained_run_copy, tmp_path / "w2.log", *broker))  # a fresh worker joins
        wait_ready(tmp_path / "w2.log")
        _finish(explore, tmp_path / "explore.log")
        if transport == "filesystem":  # explore stopped the workers it started
            assert _local_workers(trained_run_copy) == [workers[-1].pid]
        jobs = _check_round(trained_run_copy)
        killed = jobs[victim["job_id"]]
        assert killed["attempts"] == 2 and killed["sends"] == 2 and "no heartbeat" in killed["error"]
        assert sum(j["attempts"] for j in jobs.values()) == 9  # every other job ran exactly once
        assert json.loads(killed["result"])["skipped"] is False
        # The fresh worker took the run's queues: with every other worker gone, it answers a job.
        stop(workers[:-1])
        ws = Workspace(trained_run_copy)
        cfg = resolve_config(ws.stored_config(), None, broker)
        app = make_app(cfg, ws)
        app.send_task("nucleus.ping", kwargs=make_args(cfg, ws, "ping", n=1), task_id="after-kill",
                      queue=queue_name(cfg, ws, "expand"))
        meta = _results(app, ["after-kill"], timeout=60)["after-kill"]
        assert meta["status"] == "SUCCESS" and meta["result"]["pid"] == workers[-1].pid, meta
    finally:
        if explore is not None and explore.poll() is None:
            explore.kill()
        stop(workers)
        if db is not None:
            redis_forget(db, queue_prefix(resolve_config(None, None, None), Workspace(trained_run_copy)))


RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


def test_round_over_rabbitmq_survives_a_worker_killed_mid_job(trained_run_copy, tmp_path):
    """The same round through RabbitMQ (127.0.0.1:5672). RabbitMQ hands a dead consumer's
    unacknowledged message to another worker at once, so the killed job may run again before
    its lease expires; either way it ends done, with one complete adapter per neighbourhood."""
    broker = [f"jobs.broker_url={RABBITMQ}"]
    workers, explore = [], None
    cfg = resolve_config(None, None, broker)
    ws = Workspace(trained_run_copy)
    try:
        workers = [start_worker(trained_run_copy, tmp_path / f"w{i}.log", *broker) for i in range(2)]
        for i in range(2):
            wait_ready(tmp_path / f"w{i}.log")
        explore = _explore(trained_run_copy, tmp_path / "explore.log", broker)
        running = wait_for(lambda: [j for j in rows(trained_run_copy, "jobs")
                                    if j["kind"] == "train" and j["state"] == "running"], 240, "a running training")
        victim = running[0]
        pid = worker_pid(victim["worker"])
        assert pid in [w.pid for w in workers]
        os.kill(pid, signal.SIGKILL)
        workers.append(start_worker(trained_run_copy, tmp_path / "w2.log", *broker))
        wait_ready(tmp_path / "w2.log")
        _finish(explore, tmp_path / "explore.log")
        jobs = _check_round(trained_run_copy)
        assert jobs[victim["job_id"]]["attempts"] >= 2  # it did start again after the kill
        assert "amqp://" in (tmp_path / "w2.log").read_text()  # the workers really were on RabbitMQ
    finally:
        if explore is not None and explore.poll() is None:
            explore.kill()
        stop(workers)
        with make_app(cfg, ws).connection_for_write() as conn:  # leave no queues behind in the broker
            channel = conn.channel()
            for queue in ("expand", "train", "embed"):
                channel.queue_delete(queue_name(cfg, ws, queue))


def test_round_completes_when_redis_stops_and_starts_again(trained_run_copy, tmp_path):
    broker, db = _broker("redis", trained_run_copy)
    workers = [start_worker(trained_run_copy, tmp_path / f"w{i}.log", *broker) for i in range(2)]
    explore = None
    try:
        for i in range(2):
            wait_ready(tmp_path / f"w{i}.log")
        explore = _explore(trained_run_copy, tmp_path / "explore.log", broker)
        wait_for(lambda: [j for j in rows(trained_run_copy, "jobs") if j["kind"] == "train" and j["state"] == "running"],
                 240, "a running training")
        redis_stop()  # mid-round: queued messages are lost (no persistence), workers lose the broker
        time.sleep(3)
        assert explore.poll() is None  # the round is still going while Redis is down
        redis_start()
        _finish(explore, tmp_path / "explore.log")
        _check_round(trained_run_copy)
        logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
        assert any(text.count("Connected to nucleusredis") >= 2 for text in logs)  # a worker reconnected
    finally:
        redis_start()  # whatever happened, leave Redis running for everyone else
        if explore is not None and explore.poll() is None:
            explore.kill()
        stop(workers)
        redis_forget(db, queue_prefix(resolve_config(None, None, None), Workspace(trained_run_copy)))


# ------------------------------------------------------- duplicates, bad messages, failures


@pytest.fixture(scope="module")
def fs_workers(trained_run, tmp_path_factory):
    """Two embedded-transport workers on a copy of the trained run, with one expanded proposal."""
    import shutil

    from jobs.tasks import run_job

    base = tmp_path_factory.mktemp("fsw")
    run_dir = base / "sandbox" / "run"  # the test watches sandbox/ for writes outside the run
    shutil.copytree(trained_run, run_dir)
    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, ["explore.max_passages=60"])
    ws.save_config(cfg)
    run_job("expand", make_args(cfg, ws, "expand", nb_id="dup-t0", topics=[0]), cfg, ws)
    logs = [base / f"w{i}.log" for i in range(2)]
    procs = [start_worker(run_dir, log) for log in logs]
    try:
        for log in logs:
            wait_ready(log)
        yield run_dir, logs
    finally:
        stop(procs)


def _results(app, ids, timeout=180):
    def ready():
        metas = {i: app.backend.get_task_meta(i) for i in ids}
        return metas if all(m["status"] in ("SUCCESS", "FAILURE") for m in metas.values()) else None
    return wait_for(ready, timeout, f"results of {ids}", every=0.3)


def test_the_same_job_sent_twice_trains_one_adapter(fs_workers):
    run_dir, logs = fs_workers
    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, None)
    app = make_app(cfg, ws)
    args = make_args(cfg, ws, "train", nb_id="dup-t0")
    ids = ["dup~1", "dup~1", "dup~2"]  # a duplicated message, and a second message for the same job
    for cid in ids:
        app.send_task("nucleus.train_neighborhood", kwargs=args, task_id=cid, queue=queue_name(cfg, ws, "train"))
    metas = _results(app, set(ids))
    assert all(m["status"] == "SUCCESS" for m in metas.values())
    text = "".join(log.read_text() for log in logs)
    assert text.count("train dup-t0: 40 steps") == 1  # one training; the others found it done
    assert text.count("start train:dup-t0:") == 3
    assert sorted(m["result"]["skipped"] for m in metas.values()) in ([False, True], [True, True])
    assert_one_complete_adapter_each(run_dir, ["dup-t0"])


def test_malformed_messages_are_rejected_logged_and_write_nothing(fs_workers):
    run_dir, logs = fs_workers
    outside = run_dir.parent
    ws = Workspace(run_dir)
    cfg = resolve_config(ws.stored_config(), None, None)
    app = make_app(cfg, ws)
    good = make_args(cfg, ws, "train", nb_id="dup-t0")
    before_out = tree(outside, skip=run_dir)
    before_in = tree(run_dir, skip=run_dir / "queue")
    bad = {
        "bad-type": {**good, "nb_id": 123},
        "bad-outside": {**good, "run_dir": str(outside / "elsewhere")},
        "bad-dotdot": {**good, "run_dir": str(run_dir / ".." / "elsewhere")},
        "bad-escape": {**good, "nb_id": "../../escaped"},
        "bad-unknown": {**good, "nb_id": "no-such-nb"},
        "bad-extra": {**good, "cmd": "touch /tmp/pwned"},
        "bad-hash": {**good, "config_hash": "f" * 16},
    }
    for cid, kwargs in bad.items():
        app.send_task("nucleus.train_neighborhood", kwargs=kwargs, task_id=cid, queue=queue_name(cfg, ws, "train"))
    app.send_task("nucleus.expand_neighborhood", args=[str(run_dir), "x"], task_id="bad-positional",
                  queue=queue_name(cfg, ws, "expand"))
    app.send_task("nucleus.ping", kwargs={"n": 1}, task_id="bad-pickle", queue=queue_name(cfg, ws, "expand"),
                  serializer="pickle")  # never unpickled by a worker
    app.send_task("nucleus.ping", kwargs=make_args(cfg, ws, "ping", n=2), task_id="after", queue=queue_name(cfg, ws, "expand"))
    metas = _results(app, [*bad, "bad-positional", "after"])
    for cid in [*bad, "bad-positional"]:
        assert metas[cid]["status"] == "FAILURE" and type(metas[cid]["result"]).__name__ == "JobRejected", cid
    assert metas["after"]["status"] == "SUCCESS"  # the workers are alive and serving
    text = "".join(log.read_text() for log in logs)
    for cid in [*bad, "bad-positional"]:
        assert f"rejected train job {cid}" in text or f"rejected expand job {cid}" in text, cid
    lines = text.splitlines()
    for cid, why in (("bad-type", "bad value for nb_id"), ("bad-outside", "is not the run directory this worker"),
                     ("bad-dotdot", "is not the run directory this worker"),
                     ("bad-unknown", "unknown neighbourhood 'no-such-nb'")):  # logged with the reason
        assert any(f"rejected train job {cid}: " in line and why in line for line in lines), (cid, why)
    assert "untrusted content of type pickle" in text
    assert app.backend.get_task_meta("bad-pickle")["status"] == "PENDING"  # never ran
    assert tree(outside, skip=run_dir) == before_out  # nothing written outside the run directory
    assert tree(run_dir, skip=run_dir / "queue") == before_in  # and no artifact inside it
    assert not (outside / "escaped").exists() and not os.path.exists("/tmp/pwned")


def test_a_job_failing_on_every_attempt_is_failed_with_the_workers_error(fs_workers):
    run_dir, _ = fs_workers
    ws = Workspace(run_dir)
    # a neighbourhood whose passages do not exist: training raises on every attempt
    (run_dir / "neighborhoods" / "broken.json").write_text(json.dumps(
        {"id": "broken", "topics": [0], "passage_ids": [10**9], "parent": "nucleus", "source": "explore"}))
    cfg = resolve_config(ws.stored_config(), None, ["jobs.mode=celery", "jobs.max_attempts=2", "jobs.poll_s=0.2"])
    with CeleryExecutor(cfg, ws) as ex:
        job = ex.submit("train", nb_id="broken")
        with pytest.raises(JobFailed) as e:
            ex.wait([job])
    msg = str(e.value)
    assert f"{job} after 2 attempt(s) (jobs.max_attempts = 2): IndexError" in msg and "nucleus jobs --run-dir" in msg
    row = next(r for r in rows(run_dir, "jobs") if r["job_id"] == job)
    assert row["state"] == "failed" and row["attempts"] == 2 and row["sends"] == 2 and "IndexError" in row["error"]
    assert not (run_dir / "adapters" / "broken").exists()


def test_a_job_over_the_time_limit_is_stopped_in_the_solo_worker(fs_workers):
    """Celery's own time limits do nothing in the solo pool the workers run: the job's limit
    (`jobs.time_limit_s`, read by the worker from the run's config) stops it."""
    run_dir, logs = fs_workers
    assert all("concurrency: 1 (solo)" in log.read_text() for log in logs)
    ws = Workspace(run_dir)
    dup = json.loads((run_dir / "neighborhoods" / "dup-t0.json").read_text())
    (run_dir / "neighborhoods" / "slow.json").write_text(json.dumps({**dup, "id": "slow"}))
    stored = resolve_config(ws.stored_config(), None, None)
    cfg = resolve_config(ws.stored_config(), None, ["jobs.mode=celery", "jobs.max_attempts=1", "jobs.poll_s=0.2",
                                                    "jobs.time_limit_s=2", "lora.steps=20000"])
    ws.save_config(cfg)  # the workers read the run's config for every job
    try:
        start = time.time()
        with CeleryExecutor(cfg, ws) as ex:
            job = ex.submit("train", nb_id="slow")
            with pytest.raises(JobFailed, match="JobTimeLimit: the job ran longer than jobs.time_limit_s = 2 s"):
                ex.wait([job])
        assert time.time() - start < 60  # 20000 steps would take many minutes
    finally:
        ws.save_config(stored)
    row = next(r for r in rows(run_dir, "jobs") if r["job_id"] == job)
    assert row["state"] == "failed" and row["attempts"] == 1
    assert not (run_dir / "adapters" / "slow").exists() and not list(run_dir.rglob(".nucleus-tmp-*"))
    app = make_app(stored, ws)  # the worker that hit the limit still serves
    app.send_task("nucleus.ping", kwargs=make_args(stored, ws, "ping", n=3), task_id="after-limit",
                  queue=queue_name(stored, ws, "expand"))
    assert _results(app, ["after-limit"], timeout=60)["after-limit"]["status"] == "SUCCESS"


def test_an_embedding_shard_from_a_worker_is_the_shard_index_writes(fs_workers):
    import numpy as np

    from pipeline import index
    from pipeline.atomic import atomic_write_json

    run_dir, _ = fs_workers
    ws = Workspace(run_dir)
    stored = resolve_config(ws.stored_config(), None, None)
    cfg = resolve_config(ws.stored_config(), None, ["jobs.mode=celery", "jobs.poll_s=0.2", "embed.shard_size=100"])
    ws.save_config(cfg)  # the workers read the run's config: shards of 100 passages
    try:
        n = len(index._load_corpus(ws))
        atomic_write_json(run_dir / "index" / "shards" / "shards.json", index._shard_state(cfg, n))  # as `index` does
        with CeleryExecutor(cfg, ws) as ex:
            results = ex.wait([ex.submit("embed", shard=i) for i in (2, 0)])
        assert sorted(r["shard"] for r in results.values()) == [0, 2]
        full = np.load(run_dir / "index" / "embeddings.npy")
        for i in (0, 2):
            shard = np.load(run_dir / "index" / "shards" / f"{i:05d}.npy")
            assert shard.shape == (min(100, n - 100 * i), full.shape[1])
            np.testing.assert_allclose(shard, full[100 * i:100 * i + len(shard)], atol=1e-5)
        with pytest.raises(JobFailed, match="shard must be in"):  # a shard that does not exist is rejected
            with CeleryExecutor(cfg, ws) as ex:
                ex.wait([ex.submit("embed", shard=99)])
    finally:
        ws.save_config(stored)
