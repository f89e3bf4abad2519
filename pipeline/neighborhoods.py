"""Work on one neighbourhood that `explore` does in process and Celery workers do as jobs:
expand a proposal into the passages it trains on, and evaluate a trained adapter.

Both write their one artifact by rename and can be repeated: the same inputs give the same file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from curriculum.expansion import expand_passages
from curriculum.neighborhood import NUCLEUS, Neighborhood, check_nb_id
from pipeline import __version__
from pipeline import nucleate as nucleate_stage
from pipeline import train as train_stage
from pipeline.atomic import atomic_write_json, read_json
from pipeline.config import NucleusConfig, section_hash
from pipeline.errors import UserError, reading
from pipeline.workspace import Workspace

# Config sections an expansion depends on (retrieval settings live in `explore`).
EXPAND_SECTIONS = (*nucleate_stage.SECTIONS, "explore")
# An adapter's evaluation depends on what the adapter depends on.
EVALUATE_SECTIONS = train_stage.SECTIONS


@dataclass
class ExpansionInputs:
    """What expansions read from the run directory; load once, expand many proposals."""

    topic_of: np.ndarray  # (passages,) topic id of each passage
    heldout: np.ndarray  # (passages,) bool
    vectors: np.ndarray  # (passages, dim) float32, memory-mapped
    centroids: np.ndarray  # (topics, dim)
    keywords: dict[int, list[str]]
    retriever: object

    @classmethod
    def load(cls, cfg: NucleusConfig, ws: Workspace) -> "ExpansionInputs":
        from pipeline.retrieve import open_retriever

        with reading(ws.topics_dir / "assignments.parquet", "Parquet table"):
            table = pq.read_table(ws.topics_dir / "assignments.parquet", columns=["topic_id", "split"]).to_pydict()
        topics = read_json(ws.topics_dir / "topics.json")["topics"]
        with reading(ws.index_dir / "embeddings.npy", "numpy array"):
            vectors = np.load(ws.index_dir / "embeddings.npy", mmap_mode="r")
        with reading(ws.topics_dir / "centroids.npy", "numpy array"):
            centroids = np.load(ws.topics_dir / "centroids.npy")
        # `heldout` here is "never trained on": the held-out and the validation splits
        return cls(np.asarray(table["topic_id"]), np.asarray(table["split"]) != "train", vectors, centroids,
                   {t["id"]: t["keywords"] for t in topics}, open_retriever(cfg, ws))


def check_expansion(ws: Workspace, nb_id: str, topics: list[int]) -> None:
    """UserError unless `nb_id` may be (re)defined as an expansion of these topics."""
    check_nb_id(nb_id)
    if nb_id == NUCLEUS:
        raise UserError("expand: the nucleus is chosen by `nucleus nucleate`, not expanded.")
    existing = nucleate_stage.load_neighborhood(ws, nb_id)
    if existing is not None and existing.source != "explore":
        raise UserError(f"expand: neighbourhood '{nb_id}' is defined by {existing.source!r}, not by explore; "
                        f"an expansion never overwrites it.")
    n_topics = len(read_json(ws.topics_dir / "topics.json")["topics"])
    if not topics or any(not 0 <= t < n_topics for t in topics):
        raise UserError(f"expand: topics must be a non-empty list of topic ids in [0, {n_topics - 1}], got {topics}.")


def expand(cfg: NucleusConfig, ws: Workspace, nb_id: str, topics: list[int],
           inputs: ExpansionInputs | None = None) -> Neighborhood:
    """The proposal `nb_id` (these topics) with its passages expanded by retrieval, saved as
    `neighborhoods/<nb_id>.json`: the explore stage's expansion, as one job."""
    check_expansion(ws, nb_id, topics)
    x = inputs or ExpansionInputs.load(cfg, ws)
    retriever = x.retriever
    passages = expand_passages(
        sorted(topics), x.topic_of, x.heldout, x.vectors, x.centroids, x.keywords,
        lambda q, k: retriever.search_vectors(q, k)[1], retriever.embedder.encode,
        cfg.explore.hits_per_query, cfg.explore.max_passages)
    nb = Neighborhood(nb_id, sorted(topics), passages, parent=NUCLEUS, source="explore")
    nucleate_stage.save_neighborhood(ws, nb)
    return nb


def evaluation_path(ws: Workspace, nb_id: str):
    return ws.root / "evals" / f"{check_nb_id(nb_id)}.json"


def evaluate_adapter(cfg: NucleusConfig, ws: Workspace, nb_id: str) -> dict:
    """Held-out metrics of the trained adapter `nb_id` (flat dict, `evaluate` names), saved as
    `evals/<nb_id>.json`; an evaluation already there for this config is returned as it is."""
    import torch
    from peft import PeftModel

    from pipeline.evaluate import evaluate
    from pipeline.lm_data import make_eval_set
    from pipeline.model import load_pretrained, resolve_device

    out = evaluation_path(ws, nb_id)
    config_hash = section_hash(cfg, EVALUATE_SECTIONS)
    if out.is_file() and read_json(out).get("config_hash") == config_hash:
        return read_json(out)
    nb = nucleate_stage.load_neighborhood(ws, nb_id)
    adapter = train_stage.adapter_dir(ws, nb_id)
    if nb is None or not (adapter / "neighborhood.json").is_file():
        raise UserError(f"evaluate: neighbourhood '{nb_id}' has no trained adapter in '{adapter}'.")
    if read_json(adapter / "neighborhood.json").get("config_hash") != config_hash:
        raise UserError(f"evaluate: the adapter '{adapter}' was trained with another config; train it again.")
    device = resolve_device(cfg.train.device)
    base, tok = load_pretrained(str(ws.root / "model" / "base"))
    with reading(adapter, "peft adapter"):
        model = PeftModel.from_pretrained(base, str(adapter)).to(device)
    data = train_stage.RunData.load(ws)
    held = data.heldout_rows()
    eval_set = make_eval_set(tok, data.corpus, held, data.topic_of[held].tolist(), cfg.train.block_size)
    autocast = torch.bfloat16 if device.type == "cuda" and cfg.train.precision in ("auto", "bf16") else None
    nucleus = nucleate_stage.load_neighborhood(ws, NUCLEUS)
    metrics = evaluate(model, eval_set, cfg.train.eval_batch_size, device, tok.pad_token_id, {nb.id: nb.topics},
                       nucleus.topics, autocast)
    record = {"neighborhood": nb_id, "config_hash": config_hash, "version": __version__, "metrics": metrics}
    atomic_write_json(out, record)
    return record
