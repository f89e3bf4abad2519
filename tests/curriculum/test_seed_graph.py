from pathlib import Path

import pytest
import yaml

from curriculum.seed_graph import SeedGraph, load_seed_graph, validate_seed_graph
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parents[2]
SEEDS = sorted((REPO / "configs" / "seeds").glob("*.yaml"))

VALID = """\
concepts:
  - id: tropical_cyclone
    description: A tropical storm or hurricane, its track, landfall and damage.
    aliases: [hurricane, tropical storm]
    queries: [storm made landfall]
  - id: state_highway
    description: A numbered state route, its course and junctions.
relations:
  - {source: tropical_cyclone, relation: damages, target: state_highway}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "seed.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads_and_round_trips(tmp_path):
    graph = load_seed_graph(write(tmp_path, VALID))
    assert graph.ids == ["tropical_cyclone", "state_highway"]
    assert [(r.source, r.relation, r.target) for r in graph.relations] == [
        ("tropical_cyclone", "damages", "state_highway")]
    assert graph.texts("tropical_cyclone") == [
        "A tropical storm or hurricane, its track, landfall and damage.",
        "hurricane", "tropical storm", "storm made landfall"]
    assert graph.texts("state_highway") == ["A numbered state route, its course and junctions."]
    assert load_seed_graph(write(tmp_path, graph.to_yaml())) == graph
    assert yaml.safe_load(graph.to_yaml())["concepts"][1] == {
        "id": "state_highway", "description": "A numbered state route, its course and junctions."}


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, """\
concepts:
  - id: storm
    description: Tropical storms and hurricanes.
    alias: [hurricane]
  - id: storm
    description: Storms again.
  - id: highway
    description: "   "
  - id: my road
    description: A road with a space in its id.
    queries: highway
relations:
  - {source: storm, relation: damages, target: highways}
  - {source: bridge, relation: crosses, target: highway}
relation: []
""")
    with pytest.raises(UserError) as e:
        load_seed_graph(path)
    assert str(e.value) == (
        f"invalid seed graph (file '{path}'):\n"
        "  - `concepts.0.alias`: unknown key. Did you mean 'aliases'?\n"
        "  - `concepts.1.id`: duplicate concept id 'storm' (first used by `concepts.0`).\n"
        "  - `concepts.2.description`: must not be blank; got '   '.\n"
        "  - `concepts.3.id`: must be a safe name: 1-64 letters, digits, '_', '.' or '-', starting "
        "with a letter or digit (it becomes a file name); got 'my road'.\n"
        "  - `concepts.3.queries`: Input should be a valid list; got 'highway'.\n"
        "  - `relation`: unknown key. Did you mean 'relations'?\n"
        "  - `relations.0.target`: relation 0 target 'highways' is not a concept id. "
        "Did you mean 'highway'?\n"
        "  - `relations.1.source`: relation 1 source 'bridge' is not a concept id.")


def test_link_problems_are_caught_when_every_field_is_valid():
    with pytest.raises(UserError) as e:
        validate_seed_graph({"concepts": [{"id": "a", "description": "A."}],
                             "relations": [{"source": "a", "relation": "r", "target": "b"}]}, "test")
    assert str(e.value) == ("invalid seed graph (test):\n"
                            "  - `relations.0.target`: relation 0 target 'b' is not a concept id.")


@pytest.mark.parametrize("text, expected", [
    ("concepts: []\n", "`concepts`: must list at least one concept; got []."),
    ("relations: []\n", "`concepts`: required key is missing."),
    ("", "`concepts`: required key is missing."),
    ("concepts:\n  - id: a\n", "`concepts.0.description`: required key is missing."),
])
def test_structural_problems(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_seed_graph(path)
    assert str(e.value) == f"invalid seed graph (file '{path}'):\n  - {expected}"


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match=r"seed graph file '.*nope.yaml' does not exist"):
        load_seed_graph(tmp_path / "nope.yaml")
    path = write(tmp_path, "concepts:\n  - id: a\n    description: [unclosed\n")
    with pytest.raises(UserError, match=r"seed graph file '.*seed.yaml' is not valid YAML at line 4"):
        load_seed_graph(path)
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(UserError) as e:
        load_seed_graph(path)
    assert str(e.value) == (f"seed graph (file '{path}') must be a mapping with `concepts` and "
                            f"`relations`, got list.")


def test_unknown_concept_suggests_the_closest_id(tmp_path):
    graph = load_seed_graph(write(tmp_path, VALID))
    with pytest.raises(UserError) as e:
        graph.texts("tropical_cyclones")
    assert str(e.value) == ("unknown concept 'tropical_cyclones'. Did you mean 'tropical_cyclone'? "
                            "Concepts: tropical_cyclone, state_highway.")


def test_fields_are_documented():
    from curriculum.seed_graph import Concept, Relation

    for model in (SeedGraph, Concept, Relation):
        assert all(f.description for f in model.model_fields.values()), model.__name__


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.name)
def test_shipped_seed_graphs_load_and_start_with_their_command(path):
    graph = load_seed_graph(path)
    assert path.read_text().startswith("# nucleus nucleate --run-dir runs/")
    assert f"--set nucleate.seed_graph=configs/seeds/{path.name}" in path.read_text().splitlines()[0]
    assert len(graph.relations) >= 3
    for cid in graph.ids:
        assert len(graph.texts(cid)) >= 3, cid


def test_both_seeds_are_shipped():
    assert [p.name for p in SEEDS] == ["builtin.yaml", "wikitext2.yaml"]
    assert len(load_seed_graph(SEEDS[0]).concepts) in range(4, 7)
    assert len(load_seed_graph(SEEDS[1]).concepts) in range(8, 13)


def test_builtin_seed_concepts_occur_in_the_builtin_corpus():
    # Each concept's aliases must be words the bundled sample really uses, often.
    text = (REPO / "retrieval" / "data" / "wikitext2-sample.txt").read_text().lower()
    graph = load_seed_graph(REPO / "configs" / "seeds" / "builtin.yaml")
    hits = {cid: sum(text.count(a.lower()) for a in graph.concept(cid).aliases) for cid in graph.ids}
    assert all(n >= 10 for n in hits.values()), hits
