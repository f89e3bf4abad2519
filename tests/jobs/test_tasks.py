"""Jobs without worker processes: the Celery app's settings, argument checks, job ids, the
in-process executor, the job ledger and the commands' bad input (fast tier)."""

import json
import os
import re

import pytest

from jobs.app import AtomicFileBackend, make_app, queue_name
from jobs.executor import InlineExecutor, open_executor
from jobs.ledger import JobLedger, summary
from jobs.tasks import JobRejected, check_args, job_id, make_args, run_job
from pipeline.config import resolve_config
from pipeline.errors import UserError
from pipeline.workspace import Workspace
from tests.conftest import nucleus


def _cfg(ws, *sets):
    return resolve_config(ws.stored_config(), None, list(sets))


@pytest.fixture(scope="module")
def known_nb_run(trained_run, tmp_path_factory):
    """The trained run plus one defined neighbourhood, `known-nb` (read-only for the tests)."""
    import shutil

    from curriculum.neighborhood import Neighborhood
    from pipeline.nucleate import save_neighborhood

    run_dir = tmp_path_factory.mktemp("runs") / "known"
    shutil.copytree(trained_run, run_dir)
    save_neighborhood(Workspace(run_dir), Neighborhood("known-nb", [0], parent="nucleus", source="user"))
    return run_dir


def test_app_settings_json_only_late_ack_one_message_and_time_limits(tmp_path):
    ws = Workspace(tmp_path / "run")
    ws.create()
    cfg = resolve_config(None, None, ["jobs.time_limit_s=900"])
    conf = make_app(cfg, ws).conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_time_limit == 900 and conf.task_soft_time_limit == 870
    assert conf.worker_pool_start_method == "spawn"  # workers run the solo pool (checked in test_workers)
    assert conf.broker_url.startswith("nucleusfs://")  # the embedded filesystem transport
    opts = conf.broker_transport_options
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(ws.root / "queue" / "messages")
    assert opts["processed_folder"] == str(ws.root / "queue" / "processed") and opts["store_processed"]
    assert all((ws.root / "queue" / d).is_dir() for d in ("messages", "processed", "control", "results"))
    backend = make_app(cfg, ws).backend
    assert isinstance(backend, AtomicFileBackend) and backend.path.decode() == str(ws.root / "queue" / "results")
    redis = make_app(resolve_config(None, None, ["jobs.broker_url=redis://127.0.0.1:6379/3",
                                                 "jobs.time_limit_s=900"]), ws).conf
    assert redis.broker_transport_options["visibility_timeout"] > 900  # above the longest job
    assert redis.broker_transport_options["global_keyprefix"].startswith(queue_name(cfg, ws, "")[:-1])


def test_results_and_messages_appear_by_rename(tmp_path):
    ws = Workspace(tmp_path / "run")
    ws.create()
    cfg = resolve_config(None, None, None)
    app = make_app(cfg, ws)
    app.backend.store_result("t1", {"beat": 1}, "STARTED")
    path = ws.root / "queue" / "results" / "celery-task-meta-t1"
    inode = path.stat().st_ino
    app.backend.store_result("t1", {"done": True}, "SUCCESS")
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert json.loads(path.read_bytes())["status"] == "SUCCESS"
    app.send_task("nucleus.ping", kwargs={"n": 1}, task_id="t2", queue=queue_name(cfg, ws, "expand"))
    msgs = list((ws.root / "queue" / "messages").iterdir())
    assert len(msgs) == 1 and msgs[0].name.endswith(f".{queue_name(cfg, ws, 'expand')}.msg")
    body = json.loads(msgs[0].read_text())
    assert body["headers"]["id"] == "t2" and body["content-type"] == "application/json"
    assert not list(ws.root.rglob(".nucleus-tmp-*"))


def test_config_rules_for_jobs():
    with pytest.raises(UserError) as e:
        resolve_config(None, None, ["jobs.broker_url=http://x", "jobs.lease_s=10", "jobs.heartbeat_s=6",
                                    "jobs.max_attempts=0", "jobs.queue_prefix=a b"])
    msg = str(e.value)
    for needle in ("`jobs.broker_url`: must be empty", "'http://x'", "`jobs.heartbeat_s`: must be at most half",
                   "`jobs.max_attempts`", "`jobs.queue_prefix`"):
        assert needle in msg, (needle, msg)


BAD = [
    ({"nb_id": 7}, "bad value for nb_id"),
    ({"extra": "rm -rf /"}, "arguments must be exactly"),
    ({"nb_id": "../../../tmp/evil"}, "not a safe name"),
    ({"nb_id": "no-such-nb"}, "unknown neighbourhood 'no-such-nb'"),
    ({"nb_id": "nucleus"}, "the nucleus trains in the orchestrator"),
    ({"config_hash": "0" * 16}, "the job was sent for config 0000000000000000"),
    ({"config_hash": "$(reboot)"}, "bad value for config_hash"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[b[1][:24] for b in BAD])
def test_malformed_arguments_are_rejected_with_the_rule(known_nb_run, change, needle):
    ws = Workspace(known_nb_run)
    cfg = _cfg(ws)
    args = make_args(cfg, ws, "train", nb_id="known-nb")
    good = {**args}
    if "extra" in change:
        args = {**args, **change}
    else:
        args.update(change)
    with pytest.raises(JobRejected, match=needle.replace("(", r"\(").replace("$", r"\$")):
        check_args("train", args, ws, cfg)
    assert check_args("train", good, ws, cfg) == good


def test_paths_outside_the_run_and_wrong_shapes_are_rejected(trained_run, tmp_path):
    ws = Workspace(trained_run)
    cfg = _cfg(ws)
    args = make_args(cfg, ws, "expand", nb_id="r00-t0", topics=[0])
    for run_dir in (str(tmp_path), str(trained_run / ".." / "elsewhere"), str(trained_run) + "/../" + trained_run.name + "x"):
        with pytest.raises(JobRejected, match="is not the run directory this worker serves"):
            check_args("expand", {**args, "run_dir": run_dir}, ws, cfg)
    for bad in ([], ["0"], [True], "0", [0.5]):
        with pytest.raises(JobRejected, match="bad value for topics"):
            check_args("expand", {**args, "topics": bad}, ws, cfg)
    for bad in ([args], "x", None):
        with pytest.raises(JobRejected, match="must be a JSON object"):
            check_args("expand", bad, ws, cfg)
    with pytest.raises(JobRejected, match="unknown job kind"):
        check_args("rm", args, ws, cfg)


def test_an_expansion_never_overwrites_a_neighbourhood_it_did_not_define(known_nb_run):
    ws = Workspace(known_nb_run)
    cfg = _cfg(ws)
    before = (known_nb_run / "neighborhoods" / "known-nb.json").read_bytes()
    for nb_id, topics, needle in (("known-nb", [0], "defined by 'user', not by explore"),
                                  ("r00-t9", [99], "topic ids in [0, 5], got [99]")):
        with pytest.raises(JobRejected, match=re.escape(needle)):
            run_job("expand", make_args(cfg, ws, "expand", nb_id=nb_id, topics=topics), cfg, ws)
    assert (known_nb_run / "neighborhoods" / "known-nb.json").read_bytes() == before
    assert not (known_nb_run / "neighborhoods" / "r00-t9.json").exists()


def test_job_id_is_the_work_and_the_config_hash(trained_run):
    ws = Workspace(trained_run)
    a = make_args(_cfg(ws), ws, "train", nb_id="r00-t3")
    assert job_id("train", a) == f"train:r00-t3:{a['config_hash']}"
    assert job_id("train", make_args(_cfg(ws), ws, "train", nb_id="r00-t3")) == job_id("train", a)
    other = make_args(_cfg(ws, "lora.steps=7"), ws, "train", nb_id="r00-t3")
    assert job_id("train", other) != job_id("train", a)
    # the jobs section is not part of any job's hash: broker settings never invalidate work
    assert make_args(_cfg(ws, "jobs.lease_s=9"), ws, "train", nb_id="r00-t3") == a


def test_inline_executor_expands_then_trains_once(trained_run_copy):
    ws = Workspace(trained_run_copy)
    cfg = _cfg(ws, "lora.steps=4", "explore.max_passages=40")
    with open_executor(cfg, ws) as ex:
        assert isinstance(ex, InlineExecutor)
        expand = ex.submit("expand", nb_id="r00-t0", topics=[0])
        train = ex.submit("train", after=[expand], nb_id="r00-t0")
        result = ex.wait([train])[train]
    nb = json.loads((trained_run_copy / "neighborhoods" / "r00-t0.json").read_text())
    assert nb["topics"] == [0] and 0 < len(nb["passage_ids"]) <= 40 and nb["source"] == "explore"
    assert result["steps"] == 4 and not result["skipped"]
    stamp = (trained_run_copy / "adapters" / "r00-t0" / "adapter_model.safetensors").stat().st_mtime_ns
    ledger = JobLedger(trained_run_copy / "ledger.sqlite")
    assert [(r["kind"], r["state"], r["attempts"]) for r in ledger.jobs()] == [("expand", "done", 1),
                                                                           ("train", "done", 1)]
    with open_executor(cfg, ws) as ex:  # the same jobs again: recognised, nothing redone
        assert ex.submit("train", nb_id="r00-t0") == train
        assert ex.wait([train])[train]["steps"] == 4
    assert (trained_run_copy / "adapters" / "r00-t0" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    with open_executor(cfg, ws) as ex:  # the adapter's held-out evaluation, as a job
        evaluation = ex.wait([ex.submit("evaluate", nb_id="r00-t0")]).popitem()[1]
    saved = json.loads((trained_run_copy / "evals" / "r00-t0.json").read_text())
    assert evaluation["metrics"]["nb/r00-t0/loss"] == saved["metrics"]["nb/r00-t0/loss"]
    trained = json.loads((trained_run_copy / "adapters" / "r00-t0" / "neighborhood.json").read_text())
    assert saved["metrics"]["nb/r00-t0/loss"] == pytest.approx(trained["metrics"]["nb/r00-t0/loss"], abs=1e-4)
    assert summary(trained_run_copy / "ledger.sqlite")["counts"] == {"pending": 0, "running": 0, "done": 3,
                                                                    "failed": 0}
    r = nucleus("jobs", "--run-dir", str(trained_run_copy), "--json")
    assert r.returncode == 0 and [j["state"] for j in json.loads(r.stdout)["jobs"]] == ["done"] * 3
    r = nucleus("jobs", "--run-dir", str(trained_run_copy))
    assert "jobs: 0 pending, 0 running, 3 done, 0 failed" in r.stdout and "train:r00-t0:" in r.stdout


def test_commands_bad_input(tmp_path, small_run, small_run_copy):
    for args, needle in (
        (("worker", "--run-dir", str(tmp_path / "none")), "is not a Nucleus run directory"),
        (("worker", "--run-dir", str(small_run), "--queues", "trian"), "unknown queue 'trian'. Did you mean 'train'?"),
        (("worker", "--run-dir", str(small_run), "--gpus", "0,x"), "--gpus must be comma-separated"),
        (("worker", "--run-dir", str(small_run), "--gpus", "0", "--concurrency", "2"), "do not mix"),
        (("worker", "--run-dir", str(small_run), "--set", "jobs.broker_url=ftp://x"), "`jobs.broker_url`"),
        (("jobs", "--run-dir", str(tmp_path / "none")), "is not a Nucleus run directory"),
        (("explore", "--run-dir", str(small_run_copy), "--workers", "2", "--set", "jobs.mode=inline"), "needs Celery"),
    ):
        r = nucleus(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = nucleus("jobs", "--run-dir", str(small_run))
    assert r.returncode == 0 and "no jobs recorded" in r.stdout
    assert os.listdir(small_run).count("queue") == 0  # a refused worker wrote nothing


def test_a_failed_job_stops_the_command_with_exit_1_and_its_message(capsys):
    import typer

    from pipeline.cli import _guard
    from pipeline.errors import JobFailed

    with pytest.raises(typer.Exit) as e, _guard():
        raise JobFailed("1 job(s) failed:\n  - train:r00-t3:abc after 3 attempt(s): IndexError: boom")
    assert e.value.exit_code == 1
    err = capsys.readouterr().err
    assert "error: 1 job(s) failed:" in err and "IndexError: boom" in err and "Traceback" not in err
