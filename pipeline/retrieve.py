"""`nucleus retrieve`: ranked passages for a query, optionally within one topic."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import NucleusConfig
from pipeline.errors import UserError
from pipeline.atomic import read_json
from pipeline.workspace import Workspace
from retrieval.embed import get_embedder
from retrieval.search import Retriever


@dataclass
class RetrieveResult:
    query: str
    hits: list[dict] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return self.hits


def open_retriever(cfg: NucleusConfig, ws: Workspace) -> Retriever:
    """A Retriever over the run's index, with the embedder the index was built with."""
    ws.require("index", "retrieve")
    embedder = get_embedder(cfg.embed.model, cfg.embed.device, cfg.embed.dtype, cfg.embed.batch_size)
    return Retriever(ws.index_dir, ws.topics_dir, ws.corpus_dir, embedder, mmap=cfg.index.mmap,
                     nprobe=cfg.index.nprobe, ef_search=cfg.index.ef_search)


def run(cfg: NucleusConfig, ws: Workspace, query: str, k: int | None = None,
        topic: int | None = None) -> RetrieveResult:
    if not query.strip():
        raise UserError("retrieve: the query is empty; give the text to search for.")
    k = cfg.retrieve.k if k is None else k
    if k < 1:
        raise UserError(f"retrieve: -k must be >= 1, got {k}.")
    ws.require("index", "retrieve")
    if topic is not None:
        n_topics = len(read_json(ws.topics_dir / "topics.json")["topics"])
        if not 0 <= topic < n_topics:
            raise UserError(f"retrieve: --topic must be a topic id in [0, {n_topics - 1}], got {topic}. "
                            f"`nucleus index --run-dir {ws.root} --topics` lists them.")
    retriever = open_retriever(cfg, ws)
    return RetrieveResult(query=query, hits=retriever.search(query, k, topic))
