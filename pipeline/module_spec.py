"""What a swappable part declares about itself: its hyperparameters and its tags.

The types only, so that every package can declare its modules beside its registry (retrieval
included, which must not import training code); `curriculum/modules.py` gathers and checks them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Param:
    """A config key a module reads, with the range a sweep may draw it from."""

    key: str  # dotted config path, e.g. "graph.k"
    kind: Literal["int", "float", "bool", "choice"]
    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def __post_init__(self):
        if self.kind in ("int", "float") and not (self.low is not None and self.high is not None
                                                   and self.low <= self.default <= self.high):
            raise ValueError(f"{self.key}: default {self.default} outside [{self.low}, {self.high}]")
        if self.kind == "choice" and self.default not in self.choices:
            raise ValueError(f"{self.key}: default {self.default!r} not among {self.choices}")


@dataclass(frozen=True)
class Module:
    kind: str  # one of KINDS
    name: str  # the registry name the config key takes
    summary: str
    params: tuple[Param, ...] = ()
    provides: frozenset[str] = field(default_factory=frozenset)
    needs: frozenset[str] = field(default_factory=frozenset)

    def to_json(self) -> dict:
        d = asdict(self)
        d["provides"], d["needs"] = sorted(self.provides), sorted(self.needs)
        d["params"] = [{k: v for k, v in asdict(p).items()
                        if k == "default" or (v is not None and v != () and not (k == "log" and not v))}
                       for p in self.params]
        return d


def module(kind: str, name: str, summary: str, params: tuple[Param, ...] = (), provides: tuple[str, ...] = (),
           needs: tuple[str, ...] = ()) -> Module:
    """A `Module` with tag tuples (the declarations beside each registry read better so)."""
    return Module(kind, name, summary, params, frozenset(provides), frozenset(needs))
