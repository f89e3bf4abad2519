"""The seed knowledge graph: a few foundational concepts and the relations between them.

A user writes it as YAML; `nucleate` embeds each concept's texts (description, aliases,
queries) to map the concept onto corpus topics, and the relations become `knowledge` edges of
the topic graph. Concept ids become file names later, so they must be safe names.

```yaml
concepts:
  - id: tropical_cyclone
    description: A tropical storm or hurricane, its track, landfall and damage.
    aliases: [hurricane]
    queries: [tropical storm landfall]
relations:
  - {source: tropical_cyclone, relation: damages, target: state_highway}
```
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.errors import UserError, did_you_mean
from pipeline.yamlfile import read_yaml

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Loc = tuple[str | int, ...]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be blank")
    return v


class Concept(_Model):
    id: str
    """Unique name; letters, digits, `_`, `.`, `-` (it becomes a file name)."""
    description: str
    """One sentence saying what the concept covers; embedded to find its topics."""
    aliases: list[str] = []
    """Other names for the concept, embedded too."""
    queries: list[str] = []
    """Short search phrases for passages about the concept, embedded too."""

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if not SAFE_ID.match(v):
            raise ValueError(
                "must be a safe name: 1-64 letters, digits, '_', '.' or '-', starting with a "
                "letter or digit (it becomes a file name)")
        return v

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        return _not_blank(v)

    @field_validator("aliases", "queries")
    @classmethod
    def _no_blank_items(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("must not contain blank strings")
        return v


class Relation(_Model):
    source: str
    """Id of the concept the relation starts from."""
    relation: str
    """What links the two, e.g. `damages`, `part_of`."""
    target: str
    """Id of the concept the relation points to."""

    @field_validator("relation")
    @classmethod
    def _relation(cls, v: str) -> str:
        return _not_blank(v)


class SeedGraph(_Model):
    """Concepts (at least one) and directed relations between them."""

    concepts: list[Concept]
    """The foundational concepts the nucleus starts from."""
    relations: list[Relation] = []
    """Directed, named edges between concept ids."""

    @field_validator("concepts")
    @classmethod
    def _some_concepts(cls, v: list[Concept]) -> list[Concept]:
        if not v:
            raise ValueError("must list at least one concept")
        return v

    @model_validator(mode="after")
    def _links(self) -> SeedGraph:
        # Also checked on the raw dict by `validate_seed_graph`, so that link problems are
        # reported together with field problems (this validator only runs when fields are valid).
        problems = _link_problems(self.model_dump())
        if problems:
            raise PydanticCustomError("seed_graph_links", "; ".join(m for _, m in problems))
        return self

    @property
    def ids(self) -> list[str]:
        """Concept ids in file order."""
        return [c.id for c in self.concepts]

    def concept(self, concept_id: str) -> Concept:
        """The concept with this id; `UserError` with a suggestion if there is none."""
        for c in self.concepts:
            if c.id == concept_id:
                return c
        raise UserError(f"unknown concept '{concept_id}'.{did_you_mean(concept_id, self.ids)} "
                        f"Concepts: {', '.join(self.ids)}.")

    def texts(self, concept_id: str) -> list[str]:
        """The texts embedded to map a concept to topics: description, aliases, then queries."""
        c = self.concept(concept_id)
        return [c.description, *c.aliases, *c.queries]

    def to_yaml(self) -> str:
        """YAML that `load_seed_graph` reads back to an equal graph (empty lists left out)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True),
                              sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- validation

# Which model owns the keys at a location (list indices dropped): for "did you mean" on unknown keys.
_MODEL_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): SeedGraph, ("concepts",): Concept, ("relations",): Relation}


def _link_problems(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Duplicate concept ids and relation ends that are not concept ids, on raw or dumped data."""
    problems: list[tuple[Loc, str]] = []
    first_at: dict[str, int] = {}
    concepts = data.get("concepts")
    for i, c in enumerate(concepts if isinstance(concepts, list) else []):
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, str):
            continue  # a missing or mistyped id is already a field error
        if cid in first_at:
            problems.append((("concepts", i, "id"),
                             f"duplicate concept id {cid!r} (first used by `concepts.{first_at[cid]}`)."))
        else:
            first_at[cid] = i
    relations = data.get("relations")
    for j, r in enumerate(relations if isinstance(relations, list) else []):
        if not isinstance(r, dict):
            continue
        for end in ("source", "target"):
            name = r.get(end)
            if isinstance(name, str) and name not in first_at:
                problems.append((("relations", j, end),
                                 f"relation {j} {end} {name!r} is not a concept id."
                                 f"{did_you_mean(name, first_at)}"))
    return problems


def _field_problems(err: ValidationError) -> list[tuple[Loc, str]]:
    # Same line format as pipeline.config._format_errors; that one resolves unknown-key
    # suggestions against NucleusConfig only, so seed-graph keys need their own lookup.
    problems: list[tuple[Loc, str]] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "seed_graph_links":
            continue  # reported from the raw data by _link_problems
        if e["type"] == "extra_forbidden":
            model = _MODEL_AT.get(tuple(str(p) for p in loc[:-1] if not isinstance(p, int)))
            hint = did_you_mean(str(loc[-1]), model.model_fields) if model else ""
            problems.append((loc, f"unknown key.{hint}"))
        elif e["type"] == "missing":
            problems.append((loc, "required key is missing."))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append((loc, f"{msg}; got {e.get('input')!r}."))
    return problems


def _loc_key(loc: Loc) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, p) for p in loc)


def validate_seed_graph(data: dict[str, Any], source: str) -> SeedGraph:
    """Validate a plain dict; every problem is reported at once in one `UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"seed graph ({source}) must be a mapping with `concepts` and `relations`, "
                        f"got {type(data).__name__}.")
    try:
        return SeedGraph.model_validate(data)
    except ValidationError as e:
        problems = _field_problems(e)
    problems += _link_problems(data)
    lines = [f"  - `{'.'.join(map(str, loc)) or '(top level)'}`: {msg}"
             for loc, msg in sorted(problems, key=lambda p: _loc_key(p[0]))]
    raise UserError(f"invalid seed graph ({source}):\n" + "\n".join(lines))


def load_seed_graph(path: Path) -> SeedGraph:
    """Read and validate a seed-graph YAML file; `UserError` naming the file lists every problem."""
    path = Path(path)
    data = read_yaml(path, what="seed graph file")
    return validate_seed_graph({} if data is None else data, f"file '{path}'")
