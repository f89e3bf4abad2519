"""Neighbourhoods: named sets of topics (and optionally their exact passages) that train as one adapter.

Definitions live in `neighborhoods/<nb-id>.json` of the run directory. Ids become directory
names (`adapters/<nb-id>/`), so they are checked to be safe file names.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from pipeline.errors import UserError

NUCLEUS = "nucleus"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOPIC_ID = re.compile(r"^topic-(\d+)$")


def check_nb_id(nb_id: str) -> str:
    """Return `nb_id` if it is a safe file name, else raise a UserError that says the rule."""
    if not SAFE_ID.match(nb_id) or nb_id in (".", ".."):
        raise UserError(f"neighbourhood id '{nb_id}' is not a safe name: use 1-64 letters, digits, "
                        f"'_', '.', '-', starting with a letter or digit (e.g. topic-7, storms).")
    return nb_id


@dataclass
class Neighborhood:
    """A set of topics trained together. `passage_ids`, when given, are exactly the passages it
    trains on (an expanded neighbourhood); otherwise it trains on its topics' passages."""

    id: str
    topics: list[int]
    passage_ids: list[int] = field(default_factory=list)
    parent: str | None = None
    source: str = "user"  # nucleate | user | topic | explore

    def __post_init__(self) -> None:
        check_nb_id(self.id)
        if not self.topics and not self.passage_ids:
            raise UserError(f"neighbourhood '{self.id}' has no topics and no passages.")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Neighborhood":
        return cls(**data)
