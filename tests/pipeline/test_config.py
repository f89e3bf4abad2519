from pathlib import Path

import pytest
import yaml

from pipeline.config import (UNHASHED, NucleusConfig, config_fields, load_config_file, parse_set,
                             resolve_config, section_hash, to_yaml)
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip_through_yaml():
    cfg = NucleusConfig()
    assert cfg.corpus.paths == ["builtin:wikitext2-sample"]
    again = NucleusConfig.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_starts_with_its_command(path):
    load_config_file(path)
    assert path.read_text().startswith(("# nucleus ", "# python benchmarks/")), \
        f"{path} must start with the command that uses it"


def test_every_field_has_a_docstring():
    missing = [name for name, field in config_fields() if not field.description]
    assert missing == []


def test_set_values_are_parsed_as_yaml_and_nested():
    assert parse_set(["corpus.paths=[a.txt,b.txt]", "graph.k=8", "corpus.id_field=null"]) == {
        "corpus": {"paths": ["a.txt", "b.txt"], "id_field": None}, "graph": {"k": 8}}
    cfg = resolve_config(None, None, ["graph.k=8", "corpus.paths=[a.txt,b.txt]"])
    assert cfg.graph.k == 8 and cfg.corpus.paths == ["a.txt", "b.txt"]


def test_precedence_stored_then_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("graph:\n  k: 5\n  kind: erdos_renyi\n")
    cfg = resolve_config({"graph": {"k": 3, "p": 0.3}}, f, ["graph.k=7"])
    assert (cfg.graph.k, cfg.graph.kind, cfg.graph.p) == (7, "erdos_renyi", 0.3)


def test_all_problems_are_reported_at_once_with_field_rule_and_value():
    with pytest.raises(UserError) as e:
        resolve_config(None, None, ["graph.k=0", "embed.batch_size=many", "topics.num_topic=3"])
    msg = str(e.value)
    assert "`graph.k`" in msg and "greater than or equal to 1" in msg and "got 0" in msg
    assert "`embed.batch_size`" in msg and "'many'" in msg
    assert "`topics.num_topic`: unknown key. Did you mean 'num_topics'?" in msg


def test_unknown_graph_kind_suggests_the_right_one():
    with pytest.raises(UserError, match="Did you mean 'erdos_renyi'"):
        resolve_config(None, None, ["graph.kind=erdos_reny"])


def test_unknown_section_and_bad_encoding():
    with pytest.raises(UserError) as e:
        resolve_config(None, None, ["corpsu.paths=[x]", "corpus.encoding=utf-99"])
    assert "`corpsu`: unknown key. Did you mean 'corpus'?" in str(e.value)
    assert "`corpus.encoding`" in str(e.value) and "utf-99" in str(e.value)


def test_unreadable_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("graph:\n  k: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml' is not valid YAML at line \d+"):
        load_config_file(f)
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    f.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config_file(f)


def test_bad_set_syntax():
    with pytest.raises(UserError, match="must look like key.path=value"):
        parse_set(["graph.k"])


def test_section_hash_changes_only_with_its_section():
    a, b = NucleusConfig(), resolve_config(None, None, ["graph.k=9"])
    assert section_hash(a, ("corpus",)) == section_hash(b, ("corpus",))
    assert section_hash(a, ("graph",)) != section_hash(b, ("graph",))


def test_a_field_added_later_leaves_the_hashes_of_older_runs_alone():
    """A run made before `train.micro_batch_size` existed hashed its `train` section without it,
    and so does this version, whatever its value (pieces of a batch compute the same): an
    upgrade, or a smaller piece after running out of memory, leaves the run's stages and
    checkpoints valid. Other fields still count."""
    import hashlib
    import json

    cfg = NucleusConfig()
    old = cfg.model_dump(mode="json")
    for name in ("micro_batch_size", "residual_bf16"):  # every train field added since, at its default
        del old["train"][name]
    before = hashlib.sha256(json.dumps({"train": old["train"], "lora": old["lora"]}, sort_keys=True).encode())
    assert section_hash(cfg, ("train", "lora")) == before.hexdigest()[:16]
    assert section_hash(resolve_config(None, None, ["train.micro_batch_size=4"]), ("train",)) == section_hash(cfg, ("train",))
    assert section_hash(resolve_config(None, None, ["train.batch_size=8"]), ("train",)) != section_hash(cfg, ("train",))
    # set away from its default, a field added later counts: the run computes something else
    assert section_hash(resolve_config(None, None, ["train.residual_bf16=true"]), ("train",)) != section_hash(cfg, ("train",))


def test_every_new_config_field_is_registered_as_unhashed():
    listed = {line for line in (REPO / "tests" / "pipeline" / "hashed_config_keys.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    new = sorted(k for k, _ in config_fields() if k not in listed)
    assert new == sorted(UNHASHED), (
        f"config fields {sorted(set(new) - set(UNHASHED))} are new: add them to UNHASHED in "
        "pipeline/config.py (\"at_default\" keeps every existing run's hashes), or every existing run turns stale")
    assert all(k.count(".") == 1 and v in ("always", "at_default") for k, v in UNHASHED.items())


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [k for k, _ in config_fields() if f"`{k}`" not in readme]
    assert missing == [], "README's configuration reference is out of date"
