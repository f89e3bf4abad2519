"""`nucleus train`: train the nucleus, or one neighbourhood as a LoRA adapter.

The nucleus (no `--neighborhood`) builds the base: with `model.base: scratch` a BPE tokenizer
and a Llama-style model are built and trained in full on the nucleus, then saved in
`model/base/`; with a Hugging Face base, the base is copied there and the nucleus trains as the
first LoRA adapter. A neighbourhood trains as its own LoRA adapter on that base and is saved
in stock peft format in `adapters/<nb-id>/`, with `neighborhood.json` beside the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch

from curriculum import plateau_tethers
from curriculum.neighborhood import NUCLEUS, TOPIC_ID, Neighborhood, check_nb_id
from curriculum.samplers import make_sampler
from pipeline import __version__, distributed, metrics_log, question_set, relora
from pipeline import nucleate as nucleate_stage
from pipeline.config import NucleusConfig, section_hash
from pipeline.errors import UserError, did_you_mean, reading
from pipeline.evaluate import QuestionBatch, evaluate, question_accuracy, tokenize_questions
from pipeline.lm_data import Blocks, make_eval_set, pack_by_topic, passage_texts, tokenize
from pipeline.micro_batch_rule import micro_batch_problem
from pipeline.model import (build_scratch_model, check_target_modules, context_length, count_parameters,
                            load_pretrained, model_skeleton, resolve_device, save_base, train_tokenizer)
from pipeline.trainer import FitSettings, checkpoint_step, fit
from pipeline.atomic import atomic_path, atomic_write_json, read_json
from pipeline.workspace import Workspace, now

log = logging.getLogger("nucleus.train")

SECTIONS = (*nucleate_stage.SECTIONS, "model", "train", "lora")


def stage_sections(cfg: NucleusConfig, nb_id: str) -> tuple[str, ...]:
    """Config sections a training depends on: a scratch nucleus does not read `lora`; only the
    manifold sampler reads `manifold`, and only a neighbourhood's adapter with tethers on reads
    `tethers`."""
    sections = SECTIONS[:-1] if nb_id == NUCLEUS and cfg.model.base == "scratch" else SECTIONS
    if cfg.train.sampler == "manifold":
        sections = (*sections, "manifold")
    return (*sections, "tethers") if cfg.tethers.during and nb_id != NUCLEUS else sections


@dataclass
class TrainResult:
    neighborhood: str
    kind: str  # "full" (scratch nucleus) or "lora"
    output: str
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    trainable_params: int = 0
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    skipped: bool = False
    tethers: dict = field(default_factory=dict)  # plateau-triggered tethers: checks, merges (tethers.during)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class RunData:
    """What every training needs from the run directory: passages, their topics and split.
    Trainings read the `train` split only; results are scored on `heldout`; the curiosity
    signals read `validation` (`signal_rows`)."""

    corpus: datasets.Dataset
    topic_of: np.ndarray
    heldout: np.ndarray
    validation: np.ndarray

    @classmethod
    def load(cls, ws: Workspace) -> "RunData":
        with reading(ws.topics_dir / "assignments.parquet", "Parquet table"):
            table = pq.read_table(ws.topics_dir / "assignments.parquet").to_pydict()
        with reading(ws.corpus_dir, "datasets corpus"):
            corpus = datasets.load_from_disk(str(ws.corpus_dir))
        split = np.asarray(table["split"])
        return cls(corpus, np.asarray(table["topic_id"]), split == "heldout", split == "validation")

    @property
    def trainable(self) -> np.ndarray:
        """The train split: neither held out nor validation."""
        return ~self.heldout & ~self.validation

    def train_rows(self, topics: list[int], passages: list[int] = ()) -> list[int]:
        """The given passages when there are any (an expanded neighbourhood), else the train-split
        passages of `topics`; held-out and validation passages never."""
        trainable = self.trainable
        if passages:
            return sorted({int(p) for p in passages if trainable[int(p)]})
        return np.flatnonzero(np.isin(self.topic_of, topics) & trainable).tolist()

    def heldout_rows(self) -> list[int]:
        return np.flatnonzero(self.heldout).tolist()

    def signal_rows(self, topics: list[int] | None = None) -> list[int]:
        """The passages curiosity signals are measured on: the validation split (of `topics`, or
        all), or the held-out split for a run indexed without one."""
        split = self.validation if self.validation.any() else self.heldout
        sel = split if topics is None else split & np.isin(self.topic_of, topics)
        return np.flatnonzero(sel).tolist()


def check(cfg: NucleusConfig, ws: Workspace, neighborhood: str | None = None, topics: list[int] | None = None,
          force: bool = False, resume: bool = True) -> None:
    """Everything `run` would reject, found before anything is written: the stages it needs, the
    neighbourhood (and the nucleus every training reads), the checkpoint it would resume, the
    device, and the model's limits (context length, LoRA target layers)."""
    ws.require("nucleate", "train")
    nb = resolve_neighborhood(ws, neighborhood or NUCLEUS, topics, force, save=False)
    if nucleate_stage.load_neighborhood(ws, NUCLEUS) is None:
        raise UserError(f"train: '{ws.root / 'neighborhoods' / 'nucleus.json'}' is missing. Rebuild it with "
                        f"`nucleus nucleate --run-dir {ws.root} --force`.")
    if resume and not force:
        checkpoint_step(ws.root / "checkpoints" / nb.id)  # a damaged one is named now, not after setup
    if cfg.train.relora_every is not None and nb.id == NUCLEUS:
        if cfg.model.base != "scratch":
            relora.check_mergeable(cfg.model.base)
        if cfg.train.relora_every >= cfg.train.nucleus_steps:
            raise UserError(f"train.relora_every: {cfg.train.relora_every} must be below train.nucleus_steps "
                            f"({cfg.train.nucleus_steps}), or no merge ever happens.")
        if cfg.train.relora_warm_start >= cfg.train.nucleus_steps:
            raise UserError(f"train.relora_warm_start: {cfg.train.relora_warm_start} must be below "
                            f"train.nucleus_steps ({cfg.train.nucleus_steps}), or ReLoRA never starts.")
    check_model(cfg, ws)
    replay_rows = int(round(cfg.lora.replay_fraction * cfg.train.batch_size)) if nb.id != NUCLEUS else 0
    problem = distributed.check_batch(cfg.train.batch_size, replay_rows)
    if problem:
        raise UserError(f"train: {problem} (under torchrun every process trains its share of each batch).")
    problem = micro_batch_problem(cfg.train.micro_batch_size, cfg.train.batch_size // distributed.world_size(),
                                  distributed.world_size())
    if problem:
        raise UserError(problem)


def check_model(cfg: NucleusConfig, ws: Workspace | None = None) -> None:
    """The device and the model's limits (context length, LoRA targets, the manifold's layers),
    checked on the base's architecture alone (meta device, no weights): what would otherwise fail
    only after minutes of training."""
    resolve_device(cfg.train.device)
    base_dir = ws.root / "model" / "base" if ws is not None else None
    if base_dir is not None and (base_dir / "config.json").is_file():
        model = model_skeleton(str(base_dir), cfg.model.size, cfg.model.vocab_size)
    else:
        model = model_skeleton(cfg.model.base, cfg.model.size, cfg.model.vocab_size, cfg.model.trust_remote_code)
    limit = context_length(model)
    if cfg.train.block_size > limit:
        raise UserError(f"train.block_size: {cfg.train.block_size} is above the model's context length "
                        f"({limit}). Set train.block_size <= {limit}.")
    check_target_modules(model, cfg.lora.target_modules)
    if cfg.train.sampler == "manifold":
        from curriculum.block_signals import check_layers

        check_layers(model, tuple(cfg.manifold.layers))
    if cfg.train.loss == "chunked" and (getattr(model, "get_decoder", None) is None or model.get_decoder() is None
                                        or model.get_output_embeddings() is None):
        raise UserError(f"train.loss: 'chunked' needs a decoder and an output embedding to apply to its hidden "
                        f"states; {type(model).__name__} has no such pair. Use train.loss: full.")
    if cfg.train.tensorboard:
        _tensorboard_writer()


def run(cfg: NucleusConfig, ws: Workspace, neighborhood: str | None = None, topics: list[int] | None = None,
        resume: bool = True, force: bool = False) -> TrainResult:
    """Train (or skip, when done with this config) one neighbourhood. An interrupted training
    resumes from its checkpoint unless `resume` is False or `force` redoes it."""
    ws.require("nucleate", "train")
    nb = resolve_neighborhood(ws, neighborhood or NUCLEUS, topics, force, save=distributed.is_main())
    if nb.id != NUCLEUS and not ws.is_complete("train"):
        # Every adapter trains on top of the nucleus-trained base: make it first.
        log.info("train %s: the nucleus is not trained yet; training it first", nb.id)
        run(cfg, ws, NUCLEUS, resume=resume)
    done = _finished(cfg, ws, nb)
    if done is not None and not force:
        return done
    data = RunData.load(ws)
    device = distributed.init(resolve_device(cfg.train.device))  # this rank's, under torchrun
    model, tokenizer, kind = _setup_model(cfg, ws, nb, data, device)
    blocks, replay, eval_set, val_set, manifold = _setup_data(cfg, ws, nb, data, tokenizer)
    result = _fit(cfg, ws, nb, model, tokenizer, blocks, replay, (eval_set, val_set), device, kind,
                  resume and not force, manifold)
    if uses_relora(cfg, kind):
        model = relora.unwrap(model)  # the last adapter merged: a plain Hugging Face model again
    if distributed.is_main():  # one writer: the other ranks trained the same model
        _save(cfg, ws, nb, model, tokenizer, kind, result)
    return result


# ----------------------------------------------------------------------- neighbourhoods


def resolve_neighborhood(ws: Workspace, nb_id: str, topics: list[int] | None, force: bool,
                         save: bool = True) -> Neighborhood:
    """An existing neighbourhood, a new one from `--topics`, or the implicit `topic-N` (saved in
    `neighborhoods/` unless `save` is False: a check writes nothing)."""
    check_nb_id(nb_id)
    n_topics = len(read_json(ws.topics_dir / "topics.json")["topics"])
    for t in topics or []:
        if not 0 <= t < n_topics:
            raise UserError(f"train: --topics must be topic ids in [0, {n_topics - 1}], got {t}.")
    existing = nucleate_stage.load_neighborhood(ws, nb_id)
    if topics:
        if nb_id == NUCLEUS:
            raise UserError("train: the nucleus is chosen by `nucleus nucleate`, not by --topics.")
        if existing is not None and sorted(existing.topics) != sorted(topics) and not force:
            raise UserError(f"train: neighbourhood '{nb_id}' already exists with topics {existing.topics}; "
                            f"use another id, or --force to redefine it.")
        nb = Neighborhood(nb_id, sorted(set(topics)), parent=NUCLEUS, source="user")
        if save:
            nucleate_stage.save_neighborhood(ws, nb)
        return nb
    if existing is not None:
        return existing
    match = TOPIC_ID.match(nb_id)
    if match and int(match.group(1)) < n_topics:
        nb = Neighborhood(nb_id, [int(match.group(1))], parent=NUCLEUS, source="topic")
        if save:
            nucleate_stage.save_neighborhood(ws, nb)
        return nb
    known = sorted(p.stem for p in (ws.root / "neighborhoods").glob("*.json"))
    raise UserError(f"train: unknown neighbourhood '{nb_id}'.{did_you_mean(nb_id, known)} Known: "
                    f"{', '.join(known)}; `topic-N` (N in 0..{n_topics - 1}) names one topic, and "
                    f"--topics 3,4,7 defines a new neighbourhood.")


def adapter_dir(ws: Workspace, nb_id: str) -> Path:
    return ws.root / "adapters" / check_nb_id(nb_id)


def output_dir(ws: Workspace, nb_id: str, kind: str) -> Path:
    """Where a training's result lives: the base itself for a full training (the scratch nucleus,
    or one trained with ReLoRA), else the neighbourhood's adapter."""
    return ws.root / "model" / "base" if kind == "full" else adapter_dir(ws, nb_id)


def _finished(cfg: NucleusConfig, ws: Workspace, nb: Neighborhood) -> TrainResult | None:
    """The stored result when this neighbourhood already finished with the same config."""
    if nb.id == NUCLEUS:
        record = ws.root / "model" / "nucleus.json"
        if not (ws.is_complete("train") and record.is_file()):
            return None
    else:
        record = adapter_dir(ws, nb.id) / "neighborhood.json"
        if not record.is_file():
            return None
    info = read_json(record)
    if info.get("config_hash") != section_hash(cfg, stage_sections(cfg, nb.id)):
        return None
    result = info["result"]  # its output where it is now: the run directory may have moved since
    return TrainResult(**{**result, "skipped": True, "output": str(output_dir(ws, nb.id, result.get("kind")))})


# ------------------------------------------------------------------------------ setup


def _setup_model(cfg: NucleusConfig, ws: Workspace, nb: Neighborhood, data: RunData, device: torch.device):
    base_dir = ws.root / "model" / "base"
    if nb.id == NUCLEUS:
        if cfg.model.base == "scratch":
            texts = passage_texts(data.corpus, np.flatnonzero(data.trainable).tolist())
            tokenizer = train_tokenizer(texts, cfg.model.vocab_size)
            model, kind = build_scratch_model(tokenizer, cfg.model.size, cfg.seed), "full"
        else:  # a pretrained base: a LoRA adapter on it, or (ReLoRA) all of it trained, saved after
            model, tokenizer = load_pretrained(cfg.model.base, cfg.model.trust_remote_code)
            kind = "full" if cfg.train.relora_every is not None else "lora"
            if kind == "lora" and distributed.is_main():
                save_base(model, tokenizer, base_dir)
    else:
        model, tokenizer = load_pretrained(str(base_dir))
        kind = "lora"
    if cfg.train.block_size > context_length(model):
        raise UserError(f"train.block_size: {cfg.train.block_size} is above the model's context length "
                        f"({context_length(model)}). Set train.block_size <= {context_length(model)}.")
    if kind == "lora":
        model = add_lora(cfg, model)
    elif uses_relora(cfg, kind):
        model = relora_model(cfg, model)
    return model.to(device), tokenizer, kind


def uses_relora(cfg: NucleusConfig, kind: str) -> bool:
    return kind == "full" and cfg.train.relora_every is not None


def relora_model(cfg: NucleusConfig, model):
    """`model` wrapped for ReLoRA as `train.relora_*` say (its wrapped weights trainable too
    during a warm start)."""
    return relora.wrap(model, cfg.train.relora_rank, cfg.seed, warm_start=cfg.train.relora_warm_start > 0)


def relora_settings(cfg: NucleusConfig, settings: FitSettings) -> FitSettings:
    """`settings` with the ReLoRA cycle of `train.relora_*` (for a model `relora.wrap` wrapped)."""
    t = cfg.train
    return dataclasses.replace(settings, relora_every=t.relora_every, relora_warmup=t.relora_warmup,
                               relora_prune=t.relora_prune, relora_warm_start=t.relora_warm_start)


def add_lora(cfg: NucleusConfig, model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _setup_data(cfg: NucleusConfig, ws: Workspace, nb: Neighborhood, data: RunData, tokenizer):
    def blocks_for(rows: list[int]) -> Blocks:
        ids = tokenize(tokenizer, passage_texts(data.corpus, rows))
        return pack_by_topic(ids, data.topic_of[rows].tolist(), cfg.train.block_size, tokenizer.pad_token_id)

    rows = data.train_rows(nb.topics, nb.passage_ids)
    if not rows:
        raise UserError(f"train: neighbourhood '{nb.id}' has no training passages (topics {nb.topics}).")
    blocks = blocks_for(rows)
    replay = None
    if nb.id != NUCLEUS and cfg.lora.replay_fraction > 0:
        nucleus = nucleate_stage.load_neighborhood(ws, NUCLEUS)
        replay = blocks_for(data.train_rows(nucleus.topics))
    held = data.heldout_rows()
    eval_set = make_eval_set(tokenizer, data.corpus, held, data.topic_of[held].tolist(), cfg.train.block_size)
    val = np.flatnonzero(data.validation).tolist()
    val_set = make_eval_set(tokenizer, data.corpus, val, data.topic_of[val].tolist(), cfg.train.block_size) if val else None
    log.info("train %s: %d passages -> %d blocks of %d tokens", nb.id, len(rows), len(blocks),
             cfg.train.block_size)
    manifold = (manifold_context(cfg, ws, nb.id, nb.topics, data, rows, tokenizer)
                if cfg.train.sampler == "manifold" else None)
    return blocks, replay, eval_set, val_set, manifold


def manifold_context(cfg: NucleusConfig, ws: Workspace, who: str, topics: list[int] | None, data: RunData,
                     rows: list[int], tokenizer) -> dict:
    """What the manifold sampler needs beside the blocks `rows` are packed into: its settings,
    the blocks' embeddings (the learned space's start: the index's passage vectors, packed as
    the blocks are) and the probe (the validation split of `topics`, or of every topic when
    None, packed; never the held-out one). `who` names the training in errors."""
    m, bs = cfg.manifold, cfg.train.block_size
    out: dict = {"settings": m.settings()}
    if m.space == "learned":
        from curriculum.manifold import block_vectors

        with reading(ws.index_dir / "embeddings.npy", "embeddings"):
            vectors = np.load(ws.index_dir / "embeddings.npy", mmap_mode="r")
        lengths = [len(x) for x in tokenize(tokenizer, passage_texts(data.corpus, rows))]
        out["block_vectors"] = block_vectors(lengths, data.topic_of[rows].tolist(), bs,
                                             np.asarray(vectors[rows], dtype=np.float32))
    if m.traversal == "aligned":
        mine = np.isin(data.topic_of, topics) if topics is not None else np.ones(len(data.topic_of), bool)
        probe_rows = np.flatnonzero(data.validation & mine).tolist()
        if not probe_rows:
            raise UserError(f"manifold.traversal: 'aligned' needs validation passages of '{who}' as its probe; "
                            f"this run has none (split.validation_fraction = {cfg.split.validation_fraction}). "
                            f"Re-index with split.validation_fraction > 0.")
        probe = pack_by_topic(tokenize(tokenizer, passage_texts(data.corpus, probe_rows)),
                              data.topic_of[probe_rows].tolist(), bs, tokenizer.pad_token_id)
        out["probe"] = (probe.tokens, probe.mask)
    return out


# -------------------------------------------------------------------------------- fit


def _fit(cfg: NucleusConfig, ws: Workspace, nb: Neighborhood, model, tokenizer, blocks: Blocks,
         replay: Blocks | None, eval_sets: tuple, device: torch.device, kind: str, resume: bool,
         manifold: dict | None = None) -> TrainResult:
    """Train with held-out metrics (what results are scored on) and, when the run has a
    validation split, the same on it as `val/...` (what the curiosity signals read)."""
    eval_set, val_set = eval_sets
    t = cfg.train
    autocast = autocast_dtype(cfg, device)
    graph = nucleate_stage.load_topic_graph(ws).adjacency()
    nucleus_topics = nucleate_stage.load_neighborhood(ws, NUCLEUS).topics

    questions = question_batch(ws, tokenizer)

    def evaluate_fn(m) -> dict[str, float]:
        out = evaluate(m, eval_set, t.eval_batch_size, device, tokenizer.pad_token_id,
                       {nb.id: nb.topics}, nucleus_topics, autocast)
        if val_set is not None:  # the curiosity signals' split (`val/nb/...`, `val/nucleus/...`)
            out.update({f"val/{k}": v for k, v in evaluate(
                m, val_set, t.eval_batch_size, device, tokenizer.pad_token_id, {nb.id: nb.topics},
                nucleus_topics, autocast).items() if k.startswith(("nb/", "nucleus/", "heldout/"))})
        if questions is not None:
            out.update(question_accuracy(m, questions, t.eval_batch_size, device, tokenizer.pad_token_id, autocast))
        return out

    made = []

    def sampler_for(b: Blocks, seed_offset: int):
        # The manifold reads the training blocks it was built for; replay rows are drawn uniformly.
        name = "uniform" if seed_offset and t.sampler == "manifold" else t.sampler

        def make():
            made.append(make_sampler(name, b.topics, t.batch_size, graph, t.community_k, cfg.seed + seed_offset,
                                     manifold))
            return iter(made[-1])
        return make

    metrics_file = ws.logs_dir / "metrics.jsonl"
    board = _tensorboard(ws, nb.id) if t.tensorboard else None

    def log_metrics(row: dict) -> None:
        metrics_log.append(metrics_file, {"nb": nb.id, "time": now(), **row})
        if board is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, row["step"])
            board.flush()

    steps = t.nucleus_steps if kind == "full" else cfg.lora.steps
    settings = fit_settings(cfg, steps, t.lr if kind == "full" else cfg.lora.lr, device, replay is not None)
    if uses_relora(cfg, kind):
        settings = relora_settings(cfg, settings)
    if manifold is not None:  # `grow` spreads its growth over the training's batches
        manifold = {**manifold, "settings": dataclasses.replace(manifold["settings"],
                                                                total_batches=settings.steps * settings.grad_accum)}
    checkpoints = ws.root / "checkpoints" / nb.id
    tag = section_hash(cfg, stage_sections(cfg, nb.id))  # a checkpoint resumes only the same training
    start = checkpoint_step(checkpoints, tag) if resume else None
    if start is not None:
        log.info("train %s: resuming from the checkpoint at step %d of %d (--restart starts over)", nb.id, start, steps)
    elif (checkpoints / "latest").is_dir():
        log.info("train %s: starting over; the checkpoint in %s is %s", nb.id, checkpoints,
                 "discarded (--restart or --force)" if not resume else "of another config, discarded")
    main = distributed.is_main()  # rank 0 alone evaluates and logs (fit does the same)
    if main:
        metrics_log.drop_after(metrics_file, nb.id, start if start is not None else -1)  # no row twice
    before = evaluate_fn(model) if main else {}
    if start is None and main:
        log_metrics({"step": 0, "tokens": 0, **before})
    tethers = (apart_tethers(cfg, ws, nb.id, model, len(blocks), checkpoints if start is not None else None)
               if cfg.tethers.during and nb.id != NUCLEUS else None)
    torch.manual_seed(cfg.seed)
    fitted = fit(model, blocks, sampler_for(blocks, 0), settings, device, evaluate=evaluate_fn,
                 replay=replay, make_replay_sampler=sampler_for(replay, 1) if replay is not None else None,
                 checkpoint_dir=checkpoints, resume=start is not None, checkpoint_tag=tag, log=log_metrics,
                 tethers=tethers, desc=f"train {nb.id}")
    if main and hasattr(made[0], "summary"):  # the manifold's path and 2-D snapshots, for `nucleus report`
        atomic_write_json(manifold_summary_path(ws, nb.id), {"config_hash": tag, **made[0].summary()})
    if main and tethers is not None:
        plateau_tethers.record_checks(ws.root / "ledger.sqlite", nb.id, tethers.events, now())
    return TrainResult(neighborhood=nb.id, kind=kind, output="", steps=fitted.steps, tokens=fitted.tokens,
                       seconds=fitted.seconds, tokens_per_s=round(fitted.tokens_per_s, 1),
                       trainable_params=count_parameters(model, trainable_only=True),
                       metrics_before=before, metrics=fitted.metrics, resumed_from=fitted.resumed_from,
                       tethers=plateau_tethers.summary(tethers) if tethers is not None else {})


def steps_per_epoch(cfg: NucleusConfig, n_blocks: int) -> int:
    return max(1, math.ceil(n_blocks / (cfg.train.batch_size * cfg.train.grad_accum)))


def apart_tethers(cfg: NucleusConfig, ws: Workspace, nb_id: str, model, n_blocks: int,
                  resuming: Path | None) -> plateau_tethers.ApartTethers:
    """Tethers of a neighbourhood's adapter against the finished adapters of the run: those there
    when it started (a resumed training, from `resuming`'s checkpoint, keeps the same ones)."""
    from curriculum.tethers import read_lora
    from pipeline import adapters as adapters_stage

    names = None
    if resuming is not None:
        names = (read_json(resuming / "latest" / "state.json").get("tethers") or {}).get("others")
    entries = [e for e in adapters_stage.scan(ws) if e.id != nb_id and (names is None or e.id in names)]
    if names is not None and len(entries) != len(names):
        missing = sorted(set(names) - {e.id for e in entries})
        raise UserError(f"train {nb_id}: its checkpoint was tethered to adapters that are gone ({missing}); "
                        f"start it over with --restart.")
    modules = plateau_tethers.lora_modules(model)
    others, skipped = plateau_tethers.compatible_others([read_lora(e.path, e.id) for e in entries], modules,
                                                        cfg.lora.rank, cfg.lora.alpha / cfg.lora.rank)
    if skipped:
        log.info("train %s: tethers leave out %s (another rank, scale or target modules)", nb_id, ", ".join(skipped))
    log.info("train %s: tethered to %d finished adapter(s)", nb_id, len(others))
    return plateau_tethers.ApartTethers(model, others, cfg.tethers.settings(), steps_per_epoch(cfg, n_blocks))


def manifold_summary_path(ws: Workspace, nb_id: str) -> Path:
    """Where a manifold-sampled training leaves its summary (`nb_id` is checked by check_nb_id)."""
    return ws.logs_dir / f"manifold-{nb_id}.json"


def question_batch(ws: Workspace, tokenizer) -> QuestionBatch | None:
    """The run's held-out questions, tokenised, when its corpus has a question set."""
    if not question_set.has_questions(ws):
        return None
    return tokenize_questions(tokenizer, question_set.load_questions(question_set.qa_dir(ws) / "questions.jsonl"))


def autocast_dtype(cfg: NucleusConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU unless `train.precision` says fp32."""
    return torch.bfloat16 if device.type == "cuda" and cfg.train.precision in ("auto", "bf16") else None


def fit_settings(cfg: NucleusConfig, steps: int, lr: float, device: torch.device, replay: bool) -> FitSettings:
    """The optimiser settings of every training in a run (nucleus, adapter, probe) but its length."""
    t = cfg.train
    return FitSettings(
        steps=steps, lr=lr, batch_size=t.batch_size, grad_accum=t.grad_accum, micro_batch_size=t.micro_batch_size,
        warmup_steps=min(t.warmup_steps, steps // 2), min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay,
        grad_clip=t.grad_clip, grad_topk=t.grad_topk, replay_fraction=cfg.lora.replay_fraction if replay else 0.0,
        eval_every=t.eval_every, checkpoint_every=t.checkpoint_every, autocast_dtype=autocast_dtype(cfg, device),
        compile=use_compile(cfg, device, steps), loss=t.loss, attention=t.attention, residual_bf16=t.residual_bf16)


COMPILE_MIN_STEPS = 200  # below this the one-off compilation (tens of seconds) does not pay for itself


def use_compile(cfg: NucleusConfig, device: torch.device, steps: int) -> bool:
    """`train.compile` resolved: `auto` compiles on a GPU for trainings of at least 200 steps."""
    if cfg.train.compile == "auto":
        return device.type == "cuda" and steps >= COMPILE_MIN_STEPS
    return bool(cfg.train.compile)


def _tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard: true needs the tensorboard package (pip install tensorboard); "
                        "metrics are always in logs/metrics.jsonl.") from None
    return SummaryWriter


def _tensorboard(ws: Workspace, nb_id: str):
    return _tensorboard_writer()(str(ws.logs_dir / "tb" / nb_id))


# ------------------------------------------------------------------------------- save


def _save(cfg: NucleusConfig, ws: Workspace, nb: Neighborhood, model, tokenizer, kind: str,
          result: TrainResult) -> None:
    sections = stage_sections(cfg, nb.id)
    record = {"neighborhood": nb.to_json(), "config_hash": section_hash(cfg, sections),
              "version": __version__, "finished": now()}
    out = output_dir(ws, nb.id, kind)
    result.output = str(out)
    if kind == "full":  # the trained model is the base
        save_base(model.cpu(), tokenizer, out)
        atomic_write_json(ws.root / "model" / "nucleus.json", {**record, "result": result.to_json()})
    else:
        with atomic_path(out) as tmp:
            model.save_pretrained(str(tmp))  # adapter_config.json + adapter_model.safetensors
            atomic_write_json(tmp / "neighborhood.json", {
                **record, "topics": nb.topics, "parent": nb.parent, "passages": len(nb.passage_ids),
                "tokens_seen": result.tokens, "metrics": result.metrics, "result": result.to_json()})
        if nb.id == NUCLEUS:
            atomic_write_json(ws.root / "model" / "nucleus.json", {**record, "result": result.to_json()})
    if nb.id == NUCLEUS:
        ws.mark_complete("train", cfg, sections, {"kind": kind})
    shutil.rmtree(ws.root / "checkpoints" / nb.id, ignore_errors=True)
    log.info("train %s: %d steps, %d tokens, %.0f tokens/s -> %s", nb.id, result.steps, result.tokens,
             result.tokens_per_s, result.output)
