import json
import os

import pytest

from pipeline.config import resolve_config
from pipeline.errors import UserError
from pipeline.atomic import TMP_PREFIX, atomic_path, atomic_write_json
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


def test_leftover_temporaries_are_removed_on_open(tmp_path):
    ws = Workspace(tmp_path / "run")
    (ws.root / "index").mkdir(parents=True)
    (ws.root / "index" / f"{TMP_PREFIX}faiss.index.123").write_text("half")
    ws.create()
    assert list((ws.root / "index").iterdir()) == []


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
