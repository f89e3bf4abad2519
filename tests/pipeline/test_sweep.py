"""`nucleus sweep`: real trials (tiny scratch models on the small run) shared by real worker
processes, on the embedded journal and on the real PostgreSQL at 127.0.0.1:5432; a worker
killed with SIGKILL mid-trial loses nothing and its trial is run again."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pipeline.config import resolve_config
from pipeline.workspace import Workspace
from tests.conftest import SMALL_SETS, nucleus

SETS = [*SMALL_SETS, "train.block_size=64", "train.batch_size=8"]
PG = "postgresql://postgres@127.0.0.1:5432/{db}"


def _sets(*extra: str) -> list[str]:
    return [a for s in (*SETS, *extra) for a in ("--set", s)]


@pytest.fixture
def nucleated_run(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    r = nucleus("nucleate", "--run-dir", str(run), *_sets())
    assert r.returncode == 0, r.stderr
    return run


def _study(run, *sets):
    import optuna

    from pipeline import sweep

    cfg = resolve_config(Workspace(run).stored_config(), None, [*SETS, *sets])
    return optuna.load_study(study_name=cfg.sweep.study, storage=sweep.open_storage(cfg, Workspace(run)))


def _worker(run, *sets) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", "--run-dir", str(run), "--json",
                             *_sets(*sets)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_trial(run, proc, sets, timeout=120.0) -> int:
    """SIGKILL `proc` while one of its trials runs; that trial's number."""
    from optuna.trial import TrialState

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            mine = [t for t in _study(run, *sets).get_trials(states=(TrialState.RUNNING,))
                    if t.user_attrs.get("owner", "").endswith(f":{proc.pid}")]
        except Exception:  # the study is not created yet
            mine = []
        if mine:
            time.sleep(0.5)  # inside the training, past the trial's start
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return mine[0].number
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("no trial started")


def _assert_consistent(study, killed: int, n_complete_at_least: int) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials()
    states = {t.number: t.state for t in trials}
    assert TrialState.RUNNING not in states.values() and TrialState.WAITING not in states.values()
    assert states[killed] == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= n_complete_at_least
    retried = [t for t in complete if _retry_of(t) == killed]
    assert len(retried) == 1  # run again exactly once, to completion
    assert retried[0].params == next(t for t in trials if t.number == killed).params
    assert len({t.number for t in complete}) == len(complete)  # no trial completed twice


def _retry_of(t):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    return t.user_attrs.get("retry_of", RetryHeartbeatStaleTrialCallback.retried_trial_number(t))


def test_a_sweep_runs_real_trials_and_a_second_worker_adds_to_them(nucleated_run):
    r = nucleus("sweep", "--run-dir", str(nucleated_run), "--json",
                *_sets("sweep.trials=2", "sweep.steps=4", "sweep.space=[sampler]"))
    assert r.returncode == 0, r.stderr
    import json

    first = json.loads(r.stdout)
    assert first["trials_complete"] == 2 and first["ran_here"] == 2
    assert all(t["value"] > 0 and t["params"]["sampler"] for t in first["trials"])
    r = nucleus("sweep", "--run-dir", str(nucleated_run), "--json", *_sets("sweep.trials=3", "sweep.steps=4"))
    second = json.loads(r.stdout)
    assert second["trials_complete"] == 3 and second["ran_here"] == 1  # the first two kept, one added
    r = nucleus("sweep", "report", "--run-dir", str(nucleated_run), "--json", *_sets("sweep.trials=3", "sweep.steps=4"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["trials_complete"] == 3 and report["best"]["value"] == min(t["value"] for t in report["trials"])


def test_ace_chooses_after_its_random_start_and_the_report_predicts_every_combination(nucleated_run):
    import json

    from pipeline import sweep

    # 12 steps: ReLoRA (a merge every 10-11 steps) stays in the space
    sets = ["sweep.trials=4", "sweep.steps=12", "sweep.space=[sampler,growth]", "sweep.startup_trials=2"]
    r = nucleus("sweep", "--run-dir", str(nucleated_run), "--json", *_sets(*sets))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    trials = sorted(out["trials"], key=lambda t: t["number"])
    assert [t["predicted"] is None for t in trials] == [True, True, False, False]
    assert [t["predicted"]["fit_on"] for t in trials[2:]] == [2, 3]  # ACE fit on what had completed
    space = sweep.search_space(resolve_config(Workspace(nucleated_run).stored_config(), None, [*SETS, *sets]))
    ace = out["ace"]
    tested = {space.key(t["params"]) for t in trials}
    assert ace["fit_on"] == 4 and len(ace["loo"]) == 4
    assert ace["combinations"] == len(space.combinations()) >= 8  # every sampler x growth, measured or not
    assert ace["untested_combinations"] == ace["combinations"] - len(tested)
    assert set(ace["importance"]) == {d.name for d in space.dims}
    measured = [c for c in ace["best"] if c["measured_trials"]]
    assert all(c["measured_best"] == min(t["value"] for t in trials if space.key(t["params"]) == space.key(c["params"]))
               for c in measured)
    r = nucleus("sweep", "report", "--run-dir", str(nucleated_run), *_sets(*sets))
    assert r.returncode == 0 and "ACE (fit on 4 trials" in r.stdout and "importance:" in r.stdout
    r = nucleus("sweep", "report", "--run-dir", str(nucleated_run), *_sets(*sets, "sweep.study=another"))
    assert r.returncode == 2 and "no study 'another'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_killed_worker_on_the_embedded_storage_loses_nothing(nucleated_run):
    sets = ["sweep.trials=3", "sweep.steps=150"]
    a = _worker(nucleated_run, *sets)
    killed = _kill_mid_trial(nucleated_run, a, sets)
    b = _worker(nucleated_run, *sets)  # starts on the same machine: fails the orphan, queues it again
    out, err = b.communicate(timeout=600)
    assert b.returncode == 0, err
    _assert_consistent(_study(nucleated_run, *sets), killed, 3)


@pytest.fixture
def pg_database():
    import psycopg2
    from psycopg2 import sql

    name = f"nucleus_sweep_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


def test_two_workers_on_postgresql_one_killed_mid_trial(nucleated_run, pg_database):
    sets = [f"sweep.storage={PG.format(db=pg_database)}", "sweep.trials=4", "sweep.steps=150",
            "sweep.heartbeat_s=1"]
    a = _worker(nucleated_run, *sets)
    time.sleep(2)  # (they may start together too: open_storage retries the table-creation race)
    b = _worker(nucleated_run, *sets)
    killed = _kill_mid_trial(nucleated_run, a, sets)
    out, err = b.communicate(timeout=600)
    assert b.returncode == 0, err
    _assert_consistent(_study(nucleated_run, *sets), killed, 4)


def test_an_unreachable_database_is_a_clear_error(nucleated_run):
    r = nucleus("sweep", "--run-dir", str(nucleated_run),
                *_sets("sweep.storage=postgresql://postgres@127.0.0.1:1/none"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sweep.storage" in r.stderr and "127.0.0.1:1/none" in r.stderr


def test_relora_trials_merge_within_their_steps_or_leave_the_space():
    """A ReLoRA trial whose `relora_every` is not below its steps never merges: it would be plain
    LoRA under ReLoRA's name. The range ends below `sweep.steps`; with too few steps for the
    catalogue's smallest period, ReLoRA is not offered at all."""
    from pipeline import sweep
    from pipeline.config import NucleusConfig

    def space(steps: int):
        return sweep.search_space(NucleusConfig.model_validate({"sweep": {"steps": steps, "space": ["growth"]}}))

    dims = {d.name: d for d in space(40).dims}
    assert dims["growth"].choices == ("full_rank", "relora") and dims["train.relora_every"].high == 39
    assert dims["train.relora_rank"].high == 256  # a key that counts no steps keeps its catalogue range
    dims = {d.name: d for d in space(10).dims}
    assert dims["growth"].choices == ("full_rank",) and "train.relora_every" not in dims
