import json
import os

import pytest

from pipeline.config import resolve_config
from pipeline.errors import UserError
from pipeline.atomic import HOST, TMP_PREFIX, atomic_path, atomic_write_json, tmp_name
from pipeline.workspace import Workspace


def test_atomic_path_keeps_old_directory_when_writing_fails(tmp_path):
    target = tmp_path / "artifact"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_write_replaces_file_and_leaves_no_temporaries(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this pid now (pids are not reused at once)


def test_only_temporaries_of_dead_nucleus_processes_are_removed_on_open(tmp_path):
    ws = Workspace(tmp_path / "run")
    ws.begin_command(resolve_config(), "index", force=False)
    (ws.root / "index").mkdir()
    dead = ws.root / "index" / f"{TMP_PREFIX}{_dead_pid()}@{HOST}.faiss.index"
    live = ws.root / "index" / tmp_name("embeddings.npy")  # this process: still writing
    other_host = ws.root / "index" / f"{TMP_PREFIX}{_dead_pid()}@elsewhere.topics.json"
    users = ws.root / "index" / ".tmp-notes.txt"  # not a Nucleus name
    for p in (dead, live, other_host, users):
        p.write_text("half")
    ws.create()
    assert sorted(p.name for p in (ws.root / "index").iterdir()) == sorted(
        p.name for p in (live, other_host, users))


def test_a_directory_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "proj"
    (foreign / "notes").mkdir(parents=True)
    (foreign / "notes" / ".tmp-notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and is not a Nucleus run.*notes"):
        Workspace(foreign).begin_command(resolve_config(), "index", force=False)
    assert [str(p.relative_to(foreign)) for p in foreign.rglob("*")] == ["notes", "notes/.tmp-notes.txt"]
    # a new, an empty, or a config-only directory becomes a run
    for name, files in (("new", None), ("empty", {}), ("configured", {"config.yaml": "seed: 3\n"})):
        root = tmp_path / name
        if files is not None:
            root.mkdir()
            for f, text in files.items():
                (root / f).write_text(text)
        assert Workspace(root).check_run_dir() is False


def test_rejected_command_restores_the_run_byte_for_byte(tmp_path):
    ws = Workspace(tmp_path / "run")
    cfg = resolve_config()
    ws.begin_command(cfg, "index", force=False)
    ws.mark_complete("index", cfg, ("corpus",))
    before = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    with pytest.raises(UserError):
        with ws.command(resolve_config(None, None, ["retrieve.k=3"]), "retrieve", force=False):
            (ws.root / "queue" / "messages").mkdir(parents=True)  # bookkeeping made before the error
            raise UserError("bad input found late")
    assert {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()} == before
    assert not (ws.root / "queue").exists()
    # a command that wrote an artifact before failing keeps it, and records the failure
    with pytest.raises(UserError):
        with ws.command(cfg, "nucleate", force=False):
            atomic_write_json(ws.root / "kg" / "nucleus.json", {"topics": [1]})
            raise UserError("late")
    assert (ws.root / "kg" / "nucleus.json").is_file()
    assert ws.meta()["commands"][-1]["status"] == "failed"
    # a new directory rejected is removed again
    fresh = Workspace(tmp_path / "fresh")
    with pytest.raises(UserError):
        with fresh.command(cfg, "index", force=False):
            raise UserError("corpus unreadable")
    assert not fresh.root.exists()


def test_damaged_meta_is_bad_input_and_force_starts_the_records_afresh(tmp_path):
    from pipeline.errors import DamagedFile
    from pipeline.workspace import rebuild_hint

    ws = Workspace(tmp_path / "run")
    ws.begin_command(resolve_config(), "index", force=False)
    ws.meta_path.write_text('{"stages": {"ind')
    with pytest.raises(DamagedFile, match="meta.json' is damaged: not valid JSON"):
        ws.begin_command(resolve_config(), "index", force=False)
    assert "--force" in rebuild_hint(ws.meta_path)
    ws.begin_command(resolve_config(), "index", force=True)
    assert ws.meta()["stages"] == {} and len(list(ws.root.glob("meta.json.damaged-*"))) == 1


def test_changed_dependency_section_names_the_stale_stage(tmp_path):
    ws = Workspace(tmp_path / "run")
    cfg = resolve_config()
    ws.begin_command(cfg, "index", force=False)
    ws.mark_complete("index", cfg, ("corpus", "graph"))
    changed = resolve_config(None, None, ["corpus.max_documents=3"])
    with pytest.raises(UserError, match=r"stage `index` \(changed: corpus\).*--force"):
        ws.begin_command(changed, "retrieve", force=False)
    # sections the stage does not read may change freely, and are recorded
    free = resolve_config(None, None, ["retrieve.k=3"])
    ws.begin_command(free, "retrieve", force=False)
    assert "k: 3" in ws.config_path.read_text()
    # --force accepts the change and drops the stale record so `index` redoes the stage
    ws.begin_command(changed, "index", force=True)
    assert not ws.is_complete("index")


def test_redoing_a_stage_drops_the_records_of_later_stages(tmp_path):
    ws = Workspace(tmp_path / "run")
    cfg = resolve_config()
    ws.begin_command(cfg, "index", force=False)
    ws.mark_complete("index", cfg, ("corpus",))
    ws.mark_complete("nucleate", cfg, ("corpus",))
    ws.mark_complete("index", cfg, ("corpus",))
    assert ws.is_complete("index") and not ws.is_complete("nucleate")


def test_require_names_the_missing_stage(tmp_path):
    ws = Workspace(tmp_path / "run")
    with pytest.raises(UserError, match="no finished `index` stage.*nucleus index --run-dir"):
        ws.require("index", "retrieve")


def test_a_directory_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    from pipeline.atomic import restore_aside

    ws = Workspace(tmp_path / "run")
    ws.begin_command(resolve_config(), "train", force=False)
    ckpt = ws.root / "checkpoints" / "topic-1"
    aside = ckpt / f"{TMP_PREFIX}{_dead_pid()}@{HOST}.old-latest"  # killed between the two renames
    aside.mkdir(parents=True)
    (aside / "state.json").write_text('{"step": 20}')
    ws.create()
    assert json.loads((ckpt / "latest" / "state.json").read_text()) == {"step": 20}
    assert list(ckpt.iterdir()) == [ckpt / "latest"] and not restore_aside(ckpt / "latest")
