"""A run's question set: the known world of a `nucleus synth` corpus, kept in `<run>/qa/`.

When a corpus file comes from `nucleus synth` (a `manifest.json` from that generator beside it),
`index` copies its world into the run: `questions.jsonl` (held-out questions with candidate
answers), `seed_graph.yaml` (the true seed knowledge graph, which `nucleate` then uses when no
other is given), `graph.json` and `manifest.json`. Trainings then log question accuracy beside
perplexity (`pipeline.evaluate.question_accuracy`), and `index` reports how well its topics
recover the world's communities (NMI).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_json, atomic_write_text, read_json
from pipeline.errors import DamagedFile
from pipeline.workspace import Workspace

log = logging.getLogger("nucleus.qa")

GENERATOR = "nucleus synth"
WORLD_FILES = ("questions.jsonl", "seed_graph.yaml", "graph.json", "manifest.json")
# Questions scored per evaluation: a fixed, evenly spread subset keeps evaluation cheap enough
# to run every `train.eval_every` steps.
MAX_QUESTIONS = 512


def qa_dir(ws: Workspace) -> Path:
    return ws.root / "qa"


def world_dir(corpus_files: list[Path]) -> Path | None:
    """The folder of the first corpus file that `nucleus synth` wrote, if any."""
    for path in corpus_files:
        manifest = path.parent / "manifest.json"
        if path.is_file() and manifest.is_file():
            try:
                if read_json(manifest).get("generator") == GENERATOR:
                    return path.parent
            except DamagedFile:
                continue
    return None


def copy_world(ws: Workspace, src: Path) -> None:
    """Copy the world of a synth corpus (folder `src`) into `<run>/qa/`, each file by rename."""
    for name in WORLD_FILES:
        if (src / name).is_file():
            atomic_write_text(qa_dir(ws) / name, (src / name).read_text(encoding="utf-8"))


def has_questions(ws: Workspace) -> bool:
    return (qa_dir(ws) / "questions.jsonl").is_file()


def seed_graph_path(ws: Workspace) -> Path | None:
    path = qa_dir(ws) / "seed_graph.yaml"
    return path if path.is_file() else None


def load_questions(path: Path, split: str = "heldout", limit: int | None = MAX_QUESTIONS) -> list[dict]:
    """The questions of `split`, at most `limit`, spread evenly over the file (deterministic)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except ValueError as e:
            raise DamagedFile(path, f"line {n} is not JSON ({e})") from None
        if q.get("split") == split:
            rows.append(q)
    if limit is not None and len(rows) > limit:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    return rows


def nmi(a: list, b: list) -> float:
    """Normalised mutual information (arithmetic mean of the entropies) of two labelings."""
    n = len(a)
    if n == 0:
        return float("nan")
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b))
    mi = sum(c / n * math.log(c * n / (pa[x] * pb[y])) for (x, y), c in pab.items())
    ha = -sum(c / n * math.log(c / n) for c in pa.values())
    hb = -sum(c / n * math.log(c / n) for c in pb.values())
    return 1.0 if ha + hb == 0 else float(2 * mi / (ha + hb))


def topic_quality(ws: Workspace, corpus_file: Path, doc_ids: list[str], topic_of: np.ndarray) -> dict:
    """NMI of the passages' topics against the true communities of their documents; written to
    `qa/topics.json`. A passage's document is found by its `doc_id`, or by row for files read
    without `corpus.id_field` (doc ids `<stem>/<row>`)."""
    community: dict[str, int] = {}
    for i, line in enumerate(corpus_file.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        community[str(row.get("doc_id"))] = community[f"{corpus_file.stem}/{i:06d}"] = int(row["community"])
    known = [(community[d], int(t)) for d, t in zip(doc_ids, topic_of) if d in community]
    truth, topics = [c for c, _ in known], [t for _, t in known]
    # purity: the share of passages whose topic's most common community is their own
    by_topic: dict[int, Counter] = {}
    for c, t in known:
        by_topic.setdefault(t, Counter())[c] += 1
    purity = sum(max(cnt.values()) for cnt in by_topic.values()) / max(len(known), 1)
    out = {"nmi": round(nmi(truth, topics), 4), "purity": round(purity, 4), "passages": len(known),
           "communities": len(set(truth)), "topics": len(set(topics))}
    atomic_write_json(qa_dir(ws) / "topics.json", out)
    log.info("topics against the true communities: NMI %.3f, purity %.3f (%d topics, %d communities)",
             out["nmi"], out["purity"], out["topics"], out["communities"])
    return out
