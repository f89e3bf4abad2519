"""Search a built run: query text -> ranked passages with their topics."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from pipeline.atomic import read_json
from pipeline.errors import reading
from retrieval import ann
from retrieval.embed import Embedder


class Retriever:
    """Embeds queries and searches the FAISS index of one run's `index/`, `topics/`, `corpus/`."""

    def __init__(self, index_dir: Path, topics_dir: Path, corpus_dir: Path, embedder: Embedder,
                 mmap: bool = True, nprobe: int | None = None, ef_search: int = 128):
        self.embedder = embedder
        with reading(index_dir / "faiss.index", "FAISS index"):
            self.index = ann.load_index(index_dir / "faiss.index", mmap=mmap)
        self.nprobe, self.ef_search = nprobe, ef_search
        with reading(corpus_dir, "datasets corpus"):
            self.corpus = datasets.load_from_disk(str(corpus_dir))
        with reading(topics_dir / "assignments.parquet", "Parquet table"):
            table = pq.read_table(topics_dir / "assignments.parquet")
        # passage_id == row number of corpus/ (checked when the index is built)
        self.topic_of = np.asarray(table.column("topic_id"), dtype=np.int64)
        topics = read_json(topics_dir / "topics.json")["topics"]
        self.labels = {t["id"]: t["label"] for t in topics}

    def topic_passages(self, topic: int) -> np.ndarray:
        return np.flatnonzero(self.topic_of == topic)

    def search_vectors(self, queries: np.ndarray, k: int,
                       topic: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        restrict = self.topic_passages(topic) if topic is not None else None
        return ann.search(self.index, queries, k, self.nprobe, self.ef_search, restrict)

    def search(self, query: str, k: int = 10, topic: int | None = None) -> list[dict]:
        """Top-k passages for one query, best first."""
        scores, ids = self.search_vectors(self.embedder.encode([query]), k, topic)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        rows = self.corpus.select([i for i, _ in hits]) if hits else []
        return [{"passage_id": pid, "doc_id": row["doc_id"], "title": row["title"],
                 "topic_id": int(self.topic_of[pid]), "topic_label": self.labels[int(self.topic_of[pid])],
                 "score": round(score, 6), "text": row["text"]}
                for (pid, score), row in zip(hits, rows)]
