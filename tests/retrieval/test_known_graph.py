"""The known-graph generator: deterministic, its seed graph and answers true to its text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curriculum.seed_graph import load_seed_graph
from pipeline.errors import UserError
from retrieval.corpus import BUILTIN_DIR, CorpusSpec, load_documents
from retrieval.known_graph import KnownGraphSpec, write_corpus
from tests.conftest import nucleus

SPEC = KnownGraphSpec(entities=120, communities=4, docs_per_entity=3, bridge_fraction=0.1, candidates=6, seed=1)
FILES = ("corpus.jsonl", "seed_graph.yaml", "questions.jsonl", "graph.json", "manifest.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kg") / "world"
    write_corpus(out, SPEC)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_spec_same_bytes_other_seed_other_world(world, tmp_path):
    write_corpus(tmp_path / "again", SPEC)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (world / name).read_bytes(), name
    write_corpus(tmp_path / "other", KnownGraphSpec(**{**SPEC.__dict__, "seed": 2}))
    assert (tmp_path / "other" / "corpus.jsonl").read_bytes() != (world / "corpus.jsonl").read_bytes()


def test_the_seed_graph_states_what_the_text_says(world):
    graph = json.loads((world / "graph.json").read_text())
    by_id = {e["id"]: e for e in graph["entities"]}
    seed = load_seed_graph(world / "seed_graph.yaml")
    nucleus_ids = {e["id"] for e in graph["entities"] if e["community"] in graph["nucleus_communities"]}
    assert {c.id for c in seed.concepts} == nucleus_ids
    docs = _jsonl(world / "corpus.jsonl")
    text_of: dict[str, list[str]] = {}
    for d in docs:
        if d["kind"] in ("bio", "place", "org"):
            text_of.setdefault(d["entity"], []).append(d["text"])
    rel_field = {"born_in": "birth_city", "works_at": "employer", "mentor": "mentor", "headquartered_in": "headquarters"}
    assert seed.relations
    for r in seed.relations:
        assert by_id[r.source]["relations"][rel_field[r.relation]] == r.target  # the fact in the world
        assert all(by_id[r.target]["name"] in t for t in text_of[r.source])  # and in every document about it
    # and no nucleus relation is missing from the seed graph
    expected = {(e["id"], t) for e in graph["entities"] if e["id"] in nucleus_ids
                for t in e["relations"].values() if t in nucleus_ids}
    assert {(r.source, r.target) for r in seed.relations} == expected


def test_every_answer_is_derivable_and_held_out_questions_never_appear(world):
    graph = json.loads((world / "graph.json").read_text())
    by_id = {e["id"]: e for e in graph["entities"]}
    docs = _jsonl(world / "corpus.jsonl")
    bios: dict[str, list[str]] = {}
    for d in docs:
        if d["kind"] == "bio":
            bios.setdefault(d["entity"], []).append(d["text"])
    corpus_text = "\n".join(d["text"] for d in docs)
    questions = _jsonl(world / "questions.jsonl")
    assert {q["split"] for q in questions} == {"train", "heldout"}
    for q in questions:
        assert q["candidates"].count(q["answer"]) == 1 and len(set(q["candidates"])) == SPEC.candidates
        person = by_id[q["entity"]]
        assert len(bios[person["id"]]) == SPEC.docs_per_entity
        if q["hops"] == 1:
            assert all(q["answer"] in b for b in bios[person["id"]])
        else:
            mentor = by_id[person["relations"]["mentor"]]
            assert all(mentor["name"] in b for b in bios[person["id"]])
            assert all(q["answer"] in b for b in bios[mentor["id"]])
        question = q["prompt"].removeprefix("Q: ").removesuffix("\nA:")
        assert (question in corpus_text) == (q["split"] == "train"), q["id"]


def test_communities_are_neighbourhoods_with_near_and_far(world):
    graph = json.loads((world / "graph.json").read_text())
    by_id = {e["id"]: e for e in graph["entities"]}
    persons = [e for e in graph["entities"] if e["type"] == "person"]
    links = [(p["community"], by_id[t]["community"]) for p in persons for t in p["relations"].values()]
    crossing = sum(a != b for a, b in links) / len(links)
    # each of ~290 links crosses with probability 0.1: a standard deviation is 0.018, so 0.05 is ~2.8 of them
    assert abs(crossing - SPEC.bridge_fraction) < 0.05
    # bridges join ring neighbours only, so distance grows around the ring
    assert graph["distance"] == {"0": 0, "1": 1, "2": 2, "3": 1}
    distances = {q["distance"] for q in _jsonl(world / "questions.jsonl")}
    assert distances == {"nucleus", "near", "far"}


@pytest.mark.parametrize("change, option", [
    ({"communities": 1}, "--communities"), ({"entities": 20}, "--entities"),
    ({"docs_per_entity": 0}, "--docs-per-entity"), ({"bridge_fraction": 1.5}, "--bridge-fraction"),
    ({"nucleus_communities": 4}, "--nucleus-communities"), ({"candidates": 1}, "--candidates"),
    ({"candidates": 13}, "--candidates"),
])
def test_sizes_that_cannot_be_generated_name_the_option(change, option, tmp_path):
    with pytest.raises(UserError, match=f"^{option}: must"):
        write_corpus(tmp_path / "w", KnownGraphSpec(**{**SPEC.__dict__, **change}))
    assert not (tmp_path / "w").exists()


def test_every_problem_is_named_at_once(tmp_path):
    with pytest.raises(UserError) as e:
        write_corpus(tmp_path / "w", KnownGraphSpec(entities=10, communities=4, docs_per_entity=0, bridge_fraction=2))
    assert all(o in str(e.value) for o in ("--entities", "--docs-per-entity", "--bridge-fraction"))


def test_knowing_the_community_alone_does_not_answer(world):
    """Distractors come from the answer's own community first: guessing any value of the
    person's community is right about 1 in `candidates` times, as chance says."""
    graph = json.loads((world / "graph.json").read_text())
    home = {e["name"]: e["community"] for e in graph["entities"] if e["type"] != "person"}
    for q in _jsonl(world / "questions.jsonl"):
        if q["attribute"] in ("birth_city", "employer", "mentor.birth_city"):
            same = [c for c in q["candidates"] if home[c] == home[q["answer"]]]
            places = sum(1 for e in graph["entities"] if e["type"] != "person" and home[e["name"]] == home[q["answer"]])
            assert len(same) == min(SPEC.candidates, places // 2), q  # as many as that community has


def test_synth_through_the_cli(tmp_path):
    r = nucleus("synth", "--out", str(tmp_path / "w"), "--entities", "60", "--communities", "3", "--candidates", "4",
                "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(FILES)
    assert json.loads(r.stdout)["counts"]["entities"] == 60
    for args, needle in ((["--communities", "0"], "--communities"), ([], "not an empty directory")):
        r = nucleus("synth", "--out", str(tmp_path / "w"), *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_builtin_is_what_its_documented_command_writes(tmp_path):
    write_corpus(tmp_path / "kg", KnownGraphSpec(entities=400, communities=6, docs_per_entity=3, seed=0))
    for name in FILES:
        assert (tmp_path / "kg" / name).read_bytes() == (BUILTIN_DIR / "known-graph" / name).read_bytes(), name
    docs = load_documents(CorpusSpec(paths=["builtin:known-graph"]))
    assert len(docs) == json.loads((BUILTIN_DIR / "known-graph" / "manifest.json").read_text())["counts"]["documents"]
