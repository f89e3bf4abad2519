"""`nucleus index`: corpus -> passages -> embeddings -> FAISS index -> topics -> topic graph.

Each step writes its artifacts by rename and records the hash of the config sections it
depends on, so a killed run resumes at the first step (or embedding shard) not yet written.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline import __version__, question_set
from pipeline.config import NucleusConfig, section_hash
from pipeline.errors import DamagedFile, UserError, reading
from pipeline.atomic import atomic_path, atomic_write_json, read_json
from pipeline.workspace import Workspace
from retrieval import ann
from retrieval.chunking import chunk_documents, embedding_text
from retrieval.corpus import CorpusSpec, load_documents
from retrieval.embed import Embedder, embed_in_shards, get_embedder, resolve_model_path
from retrieval.embed import embed_shard as embed_one_shard
from retrieval.graph import TopicGraph
from retrieval.topics import (auto_num_topics, ctfidf_keywords, group_assignments, heldout_mask, spherical_kmeans,
                              validation_mask)

log = logging.getLogger("nucleus.index")

SECTIONS = ("seed", "corpus", "chunk", "embed", "index", "split", "topics", "graph")
# The sections each step depends on (a prefix of SECTIONS, in pipeline order).
STEP_SECTIONS = {
    "corpus": ("corpus", "chunk", "embed"),
    "embed": ("corpus", "chunk", "embed"),
    "ann": ("corpus", "chunk", "embed", "index"),
    "topics": ("seed", "corpus", "chunk", "embed", "split", "topics"),
    "graph": ("seed", "corpus", "chunk", "embed", "split", "topics", "graph"),
}


@dataclass
class IndexResult:
    run_dir: str
    documents: int
    passages: int
    heldout: int
    topics: int
    graph_edges: int
    dim: int
    factory: str
    steps_run: list[str] = field(default_factory=list)
    seconds: float = 0.0
    topics_nmi: float | None = None  # against the true communities of a `nucleus synth` corpus

    def to_json(self) -> dict:
        return asdict(self)


def check(cfg: NucleusConfig, ws: Workspace | None = None) -> None:
    """What `run` would reject that can be seen before reading the corpus: its paths and formats,
    the embedding model and device, the index kind. Writes nothing."""
    from retrieval.corpus import detect_format, resolve_paths
    from retrieval.embed import resolve_device

    for path in resolve_paths(cfg.corpus.paths):
        detect_format(path, cfg.corpus.format)
    resolve_device(cfg.embed.device)
    model_dir = Path(resolve_model_path(cfg.embed.model))
    if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
        raise UserError(f"embed.model: '{cfg.embed.model}' is not a local sentence-transformers model "
                        f"directory (no modules.json or config.json in '{model_dir}'). Nothing is "
                        f"downloaded at run time: give a local model directory, or 'default'.")
    ann.choose_factory(1, cfg.index.factory, cfg.index.flat_max)


def run(cfg: NucleusConfig, ws: Workspace, force: bool = False, executor=None) -> IndexResult:
    """Build (or resume, or skip) every artifact of the index stage. With a `jobs` executor the
    embedding shards are fanned out over its workers (`embed_shard` jobs)."""
    t0 = time.perf_counter()
    steps_run: list[str] = []

    def embedder() -> Embedder:  # loaded only when a step needs it (a full skip loads nothing)
        return get_embedder(cfg.embed.model, cfg.embed.device, cfg.embed.dtype, cfg.embed.batch_size)

    if force or not _step_done(ws.corpus_dir / "provenance.json", cfg, "corpus"):
        # Read and check the corpus before touching anything: bad input must lose nothing.
        docs, passages = _read_passages(cfg, ws, embedder())
        ws.forget("index")
        _write_corpus(cfg, ws, docs, passages)
        steps_run.append("corpus")
    corpus = _load_corpus(ws)
    if force or not _step_done(ws.index_dir / "embeddings.json", cfg, "embed"):
        _embed(cfg, ws, corpus, embedder(), force, executor)
        steps_run.append("embed")
    vectors = None  # (passages, dim) float32, read once and only if a step below needs it
    if force or not _step_done(ws.index_dir / "index.json", cfg, "ann"):
        vectors = np.load(ws.index_dir / "embeddings.npy")
        _build_ann(cfg, ws, vectors)
        steps_run.append("ann")
    if force or not _step_done(ws.topics_dir / "topics.json", cfg, "topics"):
        vectors = np.load(ws.index_dir / "embeddings.npy") if vectors is None else vectors
        _cluster(cfg, ws, corpus, vectors)
        steps_run.append("topics")
    if force or not _step_done(ws.topics_dir / "graph.json", cfg, "graph"):
        _build_graph(cfg, ws)
        steps_run.append("graph")

    result = _summary(ws, steps_run, time.perf_counter() - t0)
    result.topics_nmi = _known_world(cfg, ws, corpus, steps_run)
    if steps_run or not ws.is_complete("index"):  # a full skip must not invalidate later stages
        ws.mark_complete("index", cfg, SECTIONS, {"passages": result.passages, "topics": result.topics})
    return result


# ------------------------------------------------------------------------------ steps


def _step_done(marker: Path, cfg: NucleusConfig, step: str) -> bool:
    if not marker.is_file():
        return False
    try:
        return read_json(marker).get("config_hash") == section_hash(cfg, STEP_SECTIONS[step])
    except DamagedFile:  # unreadable marker: redo the step
        return False


def _provenance(cfg: NucleusConfig, step: str, **extra) -> dict:
    return {"config_hash": section_hash(cfg, STEP_SECTIONS[step]), "version": __version__, **extra}


def _read_passages(cfg: NucleusConfig, ws: Workspace, embedder: Embedder) -> tuple[int, list[dict]]:
    spec = CorpusSpec(**cfg.corpus.model_dump())
    docs = load_documents(spec, cache_dir=ws.cache_dir / "datasets")
    passages = list(chunk_documents(tqdm(docs, desc="chunk", unit="doc", disable=None),
                                    embedder.tokenizer, cfg.chunk.max_tokens, cfg.chunk.min_tokens))
    log.info("corpus: %d documents -> %d passages", len(docs), len(passages))
    return len(docs), passages


def _write_corpus(cfg: NucleusConfig, ws: Workspace, n_docs: int, passages: list[dict]) -> None:
    import datasets

    ds = datasets.Dataset.from_list(passages).add_column("split", ["unassigned"] * len(passages))
    with atomic_path(ws.corpus_dir) as tmp:
        ds.save_to_disk(str(tmp))
        atomic_write_json(tmp / "provenance.json",
                          _provenance(cfg, "corpus", documents=n_docs, passages=len(passages)))


def _load_corpus(ws: Workspace):
    import datasets

    with reading(ws.corpus_dir, "datasets corpus"):
        return datasets.load_from_disk(str(ws.corpus_dir))


def _embed(cfg: NucleusConfig, ws: Workspace, corpus, embedder: Embedder, force: bool, executor=None) -> None:
    """Embed every passage in shards of `embed.shard_size`; finished shards survive a kill."""
    shard_dir = ws.index_dir / "shards"
    state = _shard_state(cfg, len(corpus))
    state_file = shard_dir / "shards.json"
    if force or not state_file.is_file() or read_json(state_file) != state:
        with atomic_path(shard_dir) as tmp:
            tmp.mkdir()
            atomic_write_json(tmp / "shards.json", state)
    texts = [embedding_text(t, x) for t, x in zip(corpus["title"], corpus["text"])]
    t0 = time.perf_counter()
    if executor is not None:  # workers write the missing shards; embed_in_shards then finds them all
        n_shards = -(-len(texts) // cfg.embed.shard_size)
        executor.wait([executor.submit("embed", shard=i) for i in range(n_shards)
                       if not (shard_dir / f"{i:05d}.npy").is_file()])
    vectors = embed_in_shards(embedder, texts, shard_dir, cfg.embed.shard_size)
    log.info("embed: %d passages in %.1f s (%.1f passages/s, including shards already there)",
             len(vectors), time.perf_counter() - t0, len(vectors) / (time.perf_counter() - t0))
    with atomic_path(ws.index_dir / "embeddings.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    atomic_write_json(ws.index_dir / "embeddings.json",
                      _provenance(cfg, "embed", count=len(vectors), dim=int(vectors.shape[1]),
                                  dtype=str(vectors.dtype), model=cfg.embed.model))
    shutil.rmtree(shard_dir, ignore_errors=True)  # only needed to resume; embeddings.npy has it all


def _shard_state(cfg: NucleusConfig, passages: int) -> dict:
    return _provenance(cfg, "embed", shard_size=cfg.embed.shard_size, passages=passages)


def embed_shard(cfg: NucleusConfig, ws: Workspace, shard: int) -> dict:
    """One worker's share of the `embed` step: shard `shard` of the passages into
    `index/shards/NNNNN.npy` (by rename), exactly the file the step itself would write."""
    shard_dir = ws.index_dir / "shards"
    corpus = _load_corpus(ws)
    state_file = shard_dir / "shards.json"
    if not state_file.is_file() or read_json(state_file) != _shard_state(cfg, len(corpus)):
        raise UserError(f"embed_shard: '{state_file}' does not describe an embedding with this config; "
                        f"`nucleus index` writes it before it sends shards.")
    n_shards = -(-len(corpus) // cfg.embed.shard_size)
    if not 0 <= shard < n_shards:
        raise UserError(f"embed_shard: shard must be in [0, {n_shards - 1}], got {shard}.")
    if (shard_dir / f"{shard:05d}.npy").is_file():
        return {"shard": shard, "skipped": True}
    texts = [embedding_text(t, x) for t, x in zip(corpus["title"], corpus["text"])]
    embedder = get_embedder(cfg.embed.model, cfg.embed.device, cfg.embed.dtype, cfg.embed.batch_size)
    vectors = embed_one_shard(embedder, texts, shard_dir, cfg.embed.shard_size, shard)
    return {"shard": shard, "passages": len(vectors), "skipped": False}


def _build_ann(cfg: NucleusConfig, ws: Workspace, vectors: np.ndarray) -> None:
    factory = ann.choose_factory(len(vectors), cfg.index.factory, cfg.index.flat_max)
    t0 = time.perf_counter()
    index = ann.build_index(vectors, factory, cfg.seed)
    with atomic_path(ws.index_dir / "faiss.index") as tmp:
        ann.save_index(index, tmp)
    atomic_write_json(ws.index_dir / "index.json", _provenance(
        cfg, "ann", model=cfg.embed.model, model_path=resolve_model_path(cfg.embed.model), dim=int(vectors.shape[1]),
        factory=factory, count=int(index.ntotal), metric="inner_product",
        build_seconds=round(time.perf_counter() - t0, 3)))
    log.info("index: %s over %d vectors", factory, index.ntotal)


def _cluster(cfg: NucleusConfig, ws: Workspace, corpus, vectors: np.ndarray) -> None:
    k = cfg.topics.num_topics or auto_num_topics(len(vectors))
    if k > len(vectors):
        raise UserError(f"topics.num_topics: {k} topics need at least {k} passages; the corpus "
                        f"has {len(vectors)}. Lower topics.num_topics or unset it (auto).")
    centroids, assign = spherical_kmeans(vectors, k, cfg.topics.niter, cfg.seed)
    if _group_by(cfg) == "title":
        centroids, assign = group_assignments(vectors, centroids, list(corpus["title"]))
    n_topics = len(centroids)
    texts = [f"{t} {x}" for t, x in zip(corpus["title"], corpus["text"])]
    keywords = ctfidf_keywords(texts, assign, n_topics, cfg.topics.keywords)
    heldout = heldout_mask(assign, cfg.split.heldout_fraction, cfg.seed)
    validation = validation_mask(assign, heldout, cfg.split.validation_fraction, cfg.seed)
    split = np.where(heldout, "heldout", np.where(validation, "validation", "train"))

    # The held-out split lives in corpus/ (the `split` column); rewrite it with the real split.
    ds = corpus.remove_columns("split").add_column("split", split.tolist())
    provenance = read_json(ws.corpus_dir / "provenance.json")
    with atomic_path(ws.corpus_dir) as tmp:
        ds.save_to_disk(str(tmp))
        atomic_write_json(tmp / "provenance.json", {**provenance, "split_hash": section_hash(
            cfg, STEP_SECTIONS["topics"]), "heldout": int(heldout.sum()), "validation": int(validation.sum())})

    ws.topics_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(ws.topics_dir / "centroids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, centroids)
    table = pa.table({"passage_id": pa.array(np.asarray(corpus["passage_id"]), pa.int64()),
                      "topic_id": pa.array(assign, pa.int64()),
                      "split": pa.array(split.tolist(), pa.string())})
    with atomic_path(ws.topics_dir / "assignments.parquet") as tmp:
        pq.write_table(table, tmp)
    sizes = np.bincount(assign, minlength=n_topics)
    held = np.bincount(assign[heldout], minlength=n_topics)
    val = np.bincount(assign[validation], minlength=n_topics)
    topics = [{"id": t, "label": ", ".join(keywords[t][:3]), "keywords": keywords[t],
               "size": int(sizes[t]), "heldout": int(held[t]), "validation": int(val[t])} for t in range(n_topics)]
    atomic_write_json(ws.topics_dir / "topics.json", {**_provenance(cfg, "topics"), "topics": topics})
    log.info("topics: %d topics (sizes %d-%d), %d held-out passages", n_topics, sizes.min(),
             sizes.max(), heldout.sum())


def _build_graph(cfg: NucleusConfig, ws: Workspace) -> None:
    centroids = np.load(ws.topics_dir / "centroids.npy")
    graph = TopicGraph.build(cfg.graph.kind, centroids, cfg.graph.k, cfg.graph.p, cfg.seed)
    isolated = [n for n, nb in graph.adjacency().items() if not nb]
    atomic_write_json(ws.topics_dir / "graph.json", {
        **_provenance(cfg, "graph"), "kind": cfg.graph.kind, "isolated": isolated, **graph.to_json()})
    if isolated:
        log.warning("graph: %d topics have no edge (%s); raise graph.p or use graph.kind: knn",
                    len(isolated), isolated[:10])


def _group_by(cfg: NucleusConfig) -> str:
    """`topics.group_by` resolved: `auto` is `title` for a `nucleus synth` corpus, else `none`."""
    if cfg.topics.group_by != "auto":
        return cfg.topics.group_by
    from retrieval.corpus import resolve_paths

    return "title" if question_set.world_dir(resolve_paths(cfg.corpus.paths)) is not None else "none"


def _known_world(cfg: NucleusConfig, ws: Workspace, corpus, steps_run: list[str]) -> float | None:
    """For a `nucleus synth` corpus: its world (questions, true seed graph) copied into `qa/` when
    the corpus was (re)read, and the NMI of the topics against its communities when they changed."""
    from retrieval.corpus import resolve_paths

    src = question_set.world_dir(resolve_paths(cfg.corpus.paths))
    if src is None:
        return None
    if "corpus" in steps_run or not question_set.has_questions(ws):
        question_set.copy_world(ws, src)
    quality = question_set.qa_dir(ws) / "topics.json"
    if "topics" in steps_run or not quality.is_file():
        table = pq.read_table(ws.topics_dir / "assignments.parquet", columns=["topic_id"])
        question_set.topic_quality(ws, src / "corpus.jsonl", corpus["doc_id"], np.asarray(table.column("topic_id")))
    return read_json(quality)["nmi"]


def _summary(ws: Workspace, steps_run: list[str], seconds: float) -> IndexResult:
    prov = read_json(ws.corpus_dir / "provenance.json")
    info = read_json(ws.index_dir / "index.json")
    graph = read_json(ws.topics_dir / "graph.json")
    return IndexResult(run_dir=str(ws.root), documents=prov["documents"], passages=prov["passages"],
                       heldout=prov["heldout"], topics=len(graph["nodes"]), graph_edges=len(graph["edges"]),
                       dim=info["dim"], factory=info["factory"], steps_run=steps_run,
                       seconds=round(seconds, 2))


# ------------------------------------------------------------------------ topic list


def list_topics(ws: Workspace) -> list[dict]:
    """Topics with label, keywords, size, held-out count and graph neighbours."""
    ws.require("index", "index --topics")
    topics = read_json(ws.topics_dir / "topics.json")["topics"]
    adj = TopicGraph.from_json(read_json(ws.topics_dir / "graph.json")).adjacency()
    return [{**t, "neighbors": adj.get(t["id"], [])} for t in topics]
