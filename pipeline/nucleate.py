"""`nucleus nucleate`: choose the nucleus neighbourhood, the foundational topics trained first.

With a seed knowledge graph, each concept maps to the topics its description, aliases and
queries retrieve, and the seed relations become `knowledge` edges of the topic graph. Without
one, the nucleus is the most central topics by PageRank.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from curriculum.neighborhood import NUCLEUS, Neighborhood
from curriculum.nucleation import central_topics, knowledge_edges, map_concepts
from pipeline import index as index_stage
from pipeline import question_set
from pipeline.config import NucleusConfig
from pipeline.errors import UserError
from pipeline.retrieve import open_retriever
from pipeline.atomic import atomic_write_json, atomic_write_text, read_json
from pipeline.workspace import Workspace
from retrieval.graph import TopicGraph

log = logging.getLogger("nucleus.nucleate")

SECTIONS = (*index_stage.SECTIONS, "nucleate")


@dataclass
class NucleateResult:
    method: str
    nucleus_topics: list[int]
    concepts: dict[str, list[int]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    knowledge_edges: int = 0
    skipped: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def check(cfg: NucleusConfig, ws: Workspace | None = None) -> None:
    """The seed graph parses and is valid (and, given a run, its index is built). Writes nothing."""
    from curriculum.seed_graph import load_seed_graph

    if ws is not None:
        ws.require("index", "nucleate")
    path = seed_graph_of(cfg, ws)
    if path is not None:
        load_seed_graph(path)


def seed_graph_of(cfg: NucleusConfig, ws: Workspace | None) -> Path | None:
    """`nucleate.seed_graph`, else the true seed graph of a `nucleus synth` corpus (a run's
    `qa/`), else None."""
    if cfg.nucleate.seed_graph:
        return Path(cfg.nucleate.seed_graph)
    return question_set.seed_graph_path(ws) if ws is not None else None


def run(cfg: NucleusConfig, ws: Workspace, force: bool = False) -> NucleateResult:
    ws.require("index", "nucleate")
    if ws.is_complete("nucleate") and not force:
        return _result_from_disk(ws)
    graph = load_topic_graph(ws, with_knowledge=False)
    seed_path = seed_graph_of(cfg, ws)
    if seed_path is not None:
        result, edges = _from_seed_graph(cfg, ws, seed_path)
    else:
        result, edges = NucleateResult("pagerank", central_topics(graph, cfg.nucleate.pagerank_topics)), []
    atomic_write_json(ws.root / "kg" / "knowledge_edges.json", {"edges": edges})
    atomic_write_json(ws.root / "kg" / "nucleus.json", result.to_json())
    save_neighborhood(ws, Neighborhood(NUCLEUS, result.nucleus_topics, source="nucleate"))
    ws.mark_complete("nucleate", cfg, SECTIONS, {"nucleus_topics": result.nucleus_topics})
    log.info("nucleus (%s): topics %s", result.method, result.nucleus_topics)
    return result


def _from_seed_graph(cfg: NucleusConfig, ws: Workspace, path: Path) -> tuple[NucleateResult, list[dict]]:
    from curriculum.seed_graph import load_seed_graph

    seed = load_seed_graph(path)
    retriever = open_retriever(cfg, ws)

    def search_topics(texts: list[str], k: int) -> list[list[int]]:
        _, ids = retriever.search_vectors(retriever.embedder.encode(texts), k)
        return [[int(retriever.topic_of[i]) for i in row if i >= 0] for row in ids]

    texts = {c.id: seed.texts(c.id) for c in seed.concepts}
    mapping, votes = map_concepts(texts, search_topics, cfg.nucleate.hits_per_text, cfg.nucleate.threshold)
    unmapped = [c for c, topics in mapping.items() if not topics]
    for concept in unmapped:
        best = max(votes[concept].values(), default=0.0)
        log.warning("seed concept '%s' maps to no topic (its best topic has %.0f%% of the votes, "
                    "below nucleate.threshold=%.2f)", concept, 100 * best, cfg.nucleate.threshold)
    nucleus = sorted({t for topics in mapping.values() for t in topics})
    if not nucleus:
        raise UserError(f"nucleate: no concept of '{path}' maps to any topic (nucleate.threshold="
                        f"{cfg.nucleate.threshold}). Lower the threshold, or add descriptions and "
                        f"queries that use the corpus's words.")
    edges = knowledge_edges([(r.source, r.relation, r.target) for r in seed.relations], mapping)
    kg = ws.root / "kg"
    atomic_write_text(kg / "seed_graph.yaml", path.read_text(encoding="utf-8"))
    atomic_write_json(kg / "mapping.json", {"threshold": cfg.nucleate.threshold, "concepts": {
        c: {"topics": mapping[c], "votes": {str(t): round(v, 4) for t, v in votes[c].items()}}
        for c in mapping}})
    return NucleateResult("seed_graph", nucleus, mapping, unmapped, len(edges)), edges


def _result_from_disk(ws: Workspace) -> NucleateResult:
    return NucleateResult(**{**read_json(ws.root / "kg" / "nucleus.json"), "skipped": True})


# ------------------------------------------------------------------ shared run-dir helpers


def load_topic_graph(ws: Workspace, with_knowledge: bool = True) -> TopicGraph:
    """The topic graph of the run, with the seed graph's knowledge edges once nucleated."""
    graph = TopicGraph.from_json(read_json(ws.topics_dir / "graph.json"))
    kfile = ws.root / "kg" / "knowledge_edges.json"
    if with_knowledge and kfile.is_file():
        graph.edges = graph.edges + read_json(kfile)["edges"]
    return graph


def save_neighborhood(ws: Workspace, nb: Neighborhood) -> None:
    atomic_write_json(ws.root / "neighborhoods" / f"{nb.id}.json", nb.to_json())


def load_neighborhood(ws: Workspace, nb_id: str) -> Neighborhood | None:
    path = ws.root / "neighborhoods" / f"{nb_id}.json"
    return Neighborhood.from_json(read_json(path)) if path.is_file() else None
