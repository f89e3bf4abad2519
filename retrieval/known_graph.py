"""A corpus whose knowledge graph is known: synthetic biographies of a generated world.

Persons, cities and organisations live in communities set on a ring; a person's birth city,
employer and mentor are mostly of their own community, a `bridge_fraction` of them of a ring
neighbour's, so the graph has neighbourhoods a curriculum can expand along, near the nucleus and
far from it. Each person is described by several
biographies, every sentence from one of several templates and the sentences in a shuffled order
(without that variety a model memorises text but cannot answer questions: Allen-Zhu & Li,
Physics of LMs 3.1). Half of the persons also have their questions and answers in the corpus (so
the model learns the question form); the questions of the other half are held out.

`write_corpus` writes, deterministically from the spec (same spec, same bytes):
  corpus.jsonl     documents: doc_id, title, text, community, entity, kind (bio | place | org | qa)
  seed_graph.yaml  the true seed knowledge graph of the nucleus communities (product format)
  questions.jsonl  every question: prompt ("Q: ...\\nA:"), answer, candidates, attribute, hops,
                   entity, community, distance (nucleus | near | far), split (train | heldout)
  graph.json       every entity with its community, attributes and relations; community edges
  manifest.json    generator, version, spec, counts (documents, questions, words, tokens)
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pipeline.atomic import atomic_write_text
from pipeline.errors import UserError

GENERATOR = "nucleus synth"
# Each community has its own fields of study (most of its persons and organisations work in them):
# the words a semantic embedder can see, so that topics can recover communities as they recover
# the subjects of real text.
FIELDS = ("astronomy", "botany", "cartography", "chemistry", "geology", "linguistics", "mathematics", "medicine",
          "music", "philosophy", "sculpture", "zoology", "architecture", "meteorology", "oceanography", "painting",
          "poetry", "economics", "archaeology", "entomology", "metallurgy", "optics", "acoustics", "genetics",
          "theology", "navigation", "agriculture", "horology", "ceramics", "weaving", "falconry", "beekeeping",
          "glassmaking", "brewing", "shipbuilding", "clockmaking", "typography", "cryptography", "ornithology",
          "mycology", "volcanology", "seismology", "hydrology", "forestry", "viticulture", "perfumery", "tanning",
          "cooperage")
FIELDS_PER_COMMUNITY = 2
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "nd", "rk")
_CITY_ENDS = ("holm", "ford", "mere", "stad", "wick", "by", "port", "dale")
_ORG_KINDS = ("Institute", "Works", "Society", "Foundry", "Academy", "Company", "Observatory", "Guild")

# Templates per fact: {n} the person's name, {x} the value (a mentor's full name for `mentor`).
TEMPLATES = {
    "birth_city": ("{n} was born in {x}.", "{n} came into the world in {x}.", "The birthplace of {n} is {x}.",
                   "{n}'s life began in {x}."),
    "birth_year": ("{n} was born in the year {x}.", "{n}'s year of birth is {x}.", "{n} arrived in {x}.",
                   "The records give {x} as the year {n} was born."),
    "employer": ("{n} works for the {x}.", "{n} is employed by the {x}.", "The {x} employs {n}.",
                 "{n} has a post at the {x}."),
    "field": ("{n} studies {x}.", "{n} is known for work in {x}.", "The field of {n} is {x}.",
              "{n} devoted a career to {x}."),
    "mentor": ("{n} was mentored by {x}.", "{n} trained under {x}.", "The mentor of {n} was {x}.",
               "{x} guided {n} as a mentor."),
}
QUESTIONS = {
    "birth_city": "Where was {n} born?",
    "birth_year": "In which year was {n} born?",
    "employer": "Which organisation does {n} work for?",
    "field": "Which field does {n} study?",
    "mentor.birth_city": "Where was the mentor of {n} born?",
}


@dataclass(frozen=True)
class KnownGraphSpec:
    """Sizes and seed of a generated world (the options of `nucleus synth`)."""

    entities: int = 2000
    communities: int = 8
    docs_per_entity: int = 3
    bridge_fraction: float = 0.1
    nucleus_communities: int = 1
    candidates: int = 8
    seed: int = 0

    def sizes(self) -> list[int]:
        """Entities per community."""
        return [self.entities // self.communities + (c < self.entities % self.communities)
                for c in range(self.communities)]

    def places(self) -> list[int]:
        """Cities (and as many organisations) per community: about a tenth of its entities each."""
        return [max(1, round(0.1 * n)) for n in self.sizes()]

    def check(self) -> None:
        """A UserError listing every option that cannot be generated (option, rule, value)."""
        problems = []

        def need(ok: bool, option: str, rule: str, value) -> None:
            if not ok:
                problems.append(f"--{option}: {rule}, got {value}.")

        need(self.communities >= 2, "communities", "must be >= 2 (a nucleus and something to expand to)",
             self.communities)
        need(self.entities >= 6 * max(1, self.communities), "entities",
             f"must be at least 6 per community ({6 * max(1, self.communities)} for {self.communities} communities: "
             f"4 persons, a city and an organisation each)", self.entities)
        need(self.docs_per_entity >= 1, "docs-per-entity", "must be >= 1 (every person needs a biography)",
             self.docs_per_entity)
        need(0.0 <= self.bridge_fraction <= 1.0, "bridge-fraction", "must be in [0, 1]", self.bridge_fraction)
        need(self.communities < 2 or 1 <= self.nucleus_communities <= self.communities - 1, "nucleus-communities",
             f"must be in [1, {self.communities - 1}] (some communities must lie outside the nucleus)",
             self.nucleus_communities)
        if not problems:
            smallest = min(len(FIELDS), sum(self.places()))  # fields, cities and organisations
            need(2 <= self.candidates <= smallest, "candidates",
                 f"must be in [2, {smallest}] (the smallest attribute domain of this world)", self.candidates)
        if problems:
            raise UserError(" ".join(problems) if len(problems) == 1 else
                            "cannot generate this world:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------ world


def _names(rng: random.Random, n: int, make) -> list[str]:
    seen: set[str] = set()
    out = []
    while len(out) < n:
        name = make(rng)
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).title()


def build_world(spec: KnownGraphSpec) -> dict:
    """Entities, their facts and the community graph (graph.json)."""
    spec.check()
    rng = random.Random(spec.seed)
    per, n_places = spec.sizes(), spec.places()
    cities = _names(rng, sum(n_places), lambda r: _word(r, 1) + r.choice(_CITY_ENDS))
    fields = _community_fields(spec)
    org_fields = [fields[c][i % FIELDS_PER_COMMUNITY] for c, k in enumerate(n_places) for i in range(k)]
    orgs = _names(rng, sum(n_places), lambda r: f"{_word(r, 2)} {r.choice(_ORG_KINDS)}")
    orgs = [f"{name} of {field.title()}" for name, field in zip(orgs, org_fields)]
    people = _names(rng, sum(n - 2 * k for n, k in zip(per, n_places)),
                    lambda r: f"{_word(r, r.choice((1, 2)))} {_word(r, 2)}")
    regions = _names(rng, spec.communities, lambda r: f"the {_word(r, 2)} region")
    entities, members = [], {c: {"city": [], "org": [], "person": []} for c in range(spec.communities)}
    ci = oi = pi = 0
    for c, (n, k) in enumerate(zip(per, n_places)):
        for _ in range(k):
            entities.append({"id": f"c{ci:05d}", "name": cities[ci], "type": "city", "community": c,
                             "attributes": {"region": regions[c]}, "relations": {}})
            members[c]["city"].append(entities[-1])
            ci += 1
        for _ in range(k):
            entities.append({"id": f"o{oi:05d}", "name": orgs[oi], "type": "org", "community": c,
                             "attributes": {}, "relations": {}})
            members[c]["org"].append(entities[-1])
            oi += 1
        for _ in range(n - 2 * k):
            entities.append({"id": f"p{pi:05d}", "name": people[pi], "type": "person", "community": c,
                             "attributes": {"birth_year": str(rng.randint(1900, 1999)),
                                            "field": (rng.choice(FIELDS) if rng.random() < spec.bridge_fraction
                                                      else rng.choice(fields[c]))},
                             "relations": {}})
            members[c]["person"].append(entities[-1])
            pi += 1

    # Communities sit on a ring: a bridge joins a community to one of its two ring neighbours, so
    # the community graph has near and far communities, not one clique.
    ring = {c: sorted({(c - 1) % spec.communities, (c + 1) % spec.communities} - {c}) for c in range(spec.communities)}

    def pick(c: int, kind: str, avoid: dict | None = None) -> dict:
        """An entity of `kind` of community c, or (with prob. bridge_fraction) of a ring neighbour's."""
        if spec.communities > 1 and rng.random() < spec.bridge_fraction:
            c = rng.choice(ring[c])
        choices = [e for e in members[c][kind] if e is not avoid]
        return rng.choice(choices)

    edges: set[tuple[int, int]] = set()
    for c in range(spec.communities):
        for org in members[c]["org"]:
            org["relations"]["headquarters"] = rng.choice(members[c]["city"])["id"]
        for p in members[c]["person"]:
            for attr, kind, rel in (("birth_city", "city", "born_in"), ("employer", "org", "works_at"),
                                    ("mentor", "person", "mentor")):
                target = pick(c, kind, avoid=p)
                p["relations"][attr] = target["id"]
                if target["community"] != c:
                    edges.add(tuple(sorted((c, target["community"]))))
    distance = _distances(spec, edges)
    return {"entities": entities, "community_edges": sorted(list(e) for e in edges),
            "nucleus_communities": list(range(spec.nucleus_communities)), "distance": distance}


def _community_fields(spec: KnownGraphSpec) -> list[tuple[str, ...]]:
    """The fields of each community: distinct while FIELDS lasts, then reused (shuffled by seed)."""
    order = list(FIELDS)
    random.Random(spec.seed + 104_729).shuffle(order)
    k = FIELDS_PER_COMMUNITY
    return [tuple(order[(c * k + i) % len(order)] for i in range(k)) for c in range(spec.communities)]


def _distances(spec: KnownGraphSpec, edges: set[tuple[int, int]]) -> dict[str, int]:
    adj: dict[int, set[int]] = {c: set() for c in range(spec.communities)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    dist = {c: 0 for c in range(spec.nucleus_communities)}
    queue = deque(dist)
    while queue:
        c = queue.popleft()
        for o in sorted(adj[c]):
            if o not in dist:
                dist[o] = dist[c] + 1
                queue.append(o)
    return {str(c): dist.get(c, -1) for c in range(spec.communities)}  # -1: unreachable (far)


def distance_name(d: int) -> str:
    return "nucleus" if d == 0 else "near" if d == 1 else "far"


# -------------------------------------------------------------------------- documents


def _facts(p: dict, by_id: dict) -> dict[str, str]:
    rel = p["relations"]
    return {"birth_city": by_id[rel["birth_city"]]["name"], "birth_year": p["attributes"]["birth_year"],
            "employer": by_id[rel["employer"]]["name"], "field": p["attributes"]["field"],
            "mentor": by_id[rel["mentor"]]["name"]}


def _bio(rng: random.Random, p: dict, facts: dict[str, str]) -> str:
    sentences = [rng.choice(TEMPLATES[k]).format(n=p["name"], x=v) for k, v in facts.items()]
    rng.shuffle(sentences)  # every template names the person, so any passage says whom it is about
    return " ".join(sentences)


def _questions(world: dict, spec: KnownGraphSpec, rng: random.Random) -> list[dict]:
    by_id = {e["id"]: e for e in world["entities"]}
    persons = [e for e in world["entities"] if e["type"] == "person"]
    domains = {"birth_city": sorted(e["name"] for e in world["entities"] if e["type"] == "city"),
               "employer": sorted(e["name"] for e in world["entities"] if e["type"] == "org"),
               "birth_year": [str(y) for y in range(1900, 2000)], "field": list(FIELDS)}
    domains["mentor.birth_city"] = domains["birth_city"]
    # A value's home community (a city's or organisation's own; a field's community): distractors
    # come from the answer's home first, then from the next communities around the ring, so that
    # knowing a person's community alone does not pick the answer out of its candidates.
    home = {e["name"]: e["community"] for e in world["entities"] if e["type"] != "person"}
    for c, fs in enumerate(_community_fields(spec)):
        for f in fs:
            home.setdefault(f, c)

    def ring(a: int, b: int) -> int:
        return min(abs(a - b), spec.communities - abs(a - b))

    def distractors(attr: str, answer: str) -> list[str]:
        others = [v for v in domains[attr] if v != answer]
        rng.shuffle(others)
        if answer in home:
            others.sort(key=lambda v: ring(home[answer], home.get(v, home[answer] + spec.communities)))
        return others[: spec.candidates - 1]

    heldout = set()
    for c in range(spec.communities):  # half of each community's persons, deterministically
        ids = [p["id"] for p in persons if p["community"] == c]
        heldout |= set(random.Random(spec.seed * 1_000_003 + c).sample(ids, len(ids) // 2))
    out = []
    for p in persons:
        facts = _facts(p, by_id)
        answers = {"birth_city": facts["birth_city"], "birth_year": facts["birth_year"],
                   "employer": facts["employer"], "field": facts["field"],
                   "mentor.birth_city": _facts(by_id[p["relations"]["mentor"]], by_id)["birth_city"]}
        for attr, answer in answers.items():
            candidates = [answer, *distractors(attr, answer)]
            rng.shuffle(candidates)
            d = world["distance"][str(p["community"])]
            out.append({"id": f"{p['id']}:{attr}", "prompt": f"Q: {QUESTIONS[attr].format(n=p['name'])}\nA:",
                        "answer": answer, "candidates": candidates, "attribute": attr,
                        "hops": 2 if "." in attr else 1, "entity": p["id"], "community": p["community"],
                        "distance": distance_name(d), "split": "heldout" if p["id"] in heldout else "train"})
    return out


def _documents(world: dict, spec: KnownGraphSpec, questions: list[dict], rng: random.Random) -> list[dict]:
    by_id = {e["id"]: e for e in world["entities"]}
    docs, per_entity = [], {}

    def doc(entity: dict, kind: str, title: str, text: str) -> None:
        n = per_entity[entity["id"]] = per_entity.get(entity["id"], -1) + 1
        docs.append({"doc_id": f"{entity['id']}-{kind}-{n}",
                     "title": title, "text": text, "community": entity["community"], "entity": entity["id"],
                     "kind": kind})

    qa_by_person: dict[str, list[dict]] = {}
    for q in questions:
        if q["split"] == "train":
            qa_by_person.setdefault(q["entity"], []).append(q)
    for e in world["entities"]:
        if e["type"] == "city":
            doc(e, "place", e["name"], f"{e['name']} is a city in {e['attributes']['region']}.")
        elif e["type"] == "org":
            hq = by_id[e["relations"]["headquarters"]]["name"]
            doc(e, "org", e["name"], f"The {e['name']} has its headquarters in {hq}.")
        else:
            facts = _facts(e, by_id)
            for _ in range(spec.docs_per_entity):
                doc(e, "bio", e["name"], _bio(rng, e, facts))
            if e["id"] in qa_by_person:
                doc(e, "qa", e["name"],  # titled like its biographies: one entity, one title
                    "\n".join(f"{q['prompt']} {q['answer']}" for q in qa_by_person[e["id"]]))
    return docs


def _seed_graph(world: dict) -> dict:
    """The nucleus communities' entities as concepts, their relations among them as relations."""
    nucleus = set(world["nucleus_communities"])
    by_id = {e["id"]: e for e in world["entities"]}
    inside = [e for e in world["entities"] if e["community"] in nucleus]
    ids = {e["id"] for e in inside}
    names = {"birth_city": "born_in", "employer": "works_at", "mentor": "mentor", "headquarters": "headquartered_in"}
    concepts, relations = [], []
    for e in inside:
        if e["type"] == "person":
            f = _facts(e, by_id)
            text = f"{e['name']}, born in {f['birth_city']}, works for the {f['employer']} in {f['field']}."
        elif e["type"] == "city":
            text = f"{e['name']} is a city in {e['attributes']['region']}."
        else:
            text = f"The {e['name']} has its headquarters in {by_id[e['relations']['headquarters']]['name']}."
        concepts.append({"id": e["id"], "description": text, "aliases": [e["name"]]})
        for rel, target in e["relations"].items():
            if target in ids:
                relations.append({"source": e["id"], "relation": names[rel], "target": target})
    return {"concepts": concepts, "relations": relations}


# ------------------------------------------------------------------------------ write


def write_corpus(out_dir: Path, spec: KnownGraphSpec) -> dict:
    """Write the five files of a generated world into `out_dir` (new or empty); the manifest."""
    from pipeline import __version__

    spec.check()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out: '{out_dir}' exists and is not an empty directory; give a new one, so that "
                        f"nothing there is overwritten.")
    world = build_world(spec)
    rng = random.Random(spec.seed + 7919)
    questions = _questions(world, spec, rng)
    docs = _documents(world, spec, questions, rng)
    words = sum(len(d["text"].split()) for d in docs)
    chars = sum(len(d["text"]) + len(d["title"]) for d in docs)
    kinds = [e["type"] for e in world["entities"]]
    manifest = {"generator": GENERATOR, "version": __version__, "seed": spec.seed, "spec": asdict(spec),
                "counts": {"entities": len(kinds), "persons": kinds.count("person"), "cities": kinds.count("city"),
                           "organisations": kinds.count("org"), "documents": len(docs), "questions": len(questions),
                           "questions_heldout": sum(q["split"] == "heldout" for q in questions), "words": words,
                           "approx_tokens": chars // 4}}
    lines = lambda rows: "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)  # noqa: E731
    atomic_write_text(out_dir / "corpus.jsonl", lines(docs))
    atomic_write_text(out_dir / "questions.jsonl", lines(questions))
    atomic_write_text(out_dir / "seed_graph.yaml", yaml.safe_dump(_seed_graph(world), sort_keys=False, allow_unicode=True))
    atomic_write_text(out_dir / "graph.json", json.dumps(world, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {"out": str(out_dir), **manifest}
