"""`nucleus train --joint`: retrain the run's neighbourhood adapters together, as a shared adapter
plus one expert per neighbourhood (curriculum/joint.py). A mode of the `train` stage, so its
entry point is `train_jointly`, not a stage's `run`.

Trained apart, neighbourhood adapters lose to one adapter on their union; trained jointly they
beat it (benchmarks/RESULTS.md §6). The members are every neighbourhood adapter in `adapters/`
(explored, or trained with `-n`; not the nucleus's, not merges), each on the passages its own
training used. The joint training takes `lora.steps` steps per member (the tokens of training
them apart), every step a batch from one member, in proportion to their blocks.

Each member's `adapters/<id>/` is then replaced by its export: one stock peft adapter of rank
`lora.shared_rank + lora.rank` (the shared adapter and its expert, exact), with
`neighborhood.json` recording the joint training. Everything else (`adapters list|route|score|
eval|compat|merge`, plain peft) uses them as before. A kill during training leaves
`checkpoints/_joint/`, which the same command resumes (`--restart` starts over); the adapters are
replaced only after training, each atomically, and a re-run with the same members and config
does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from curriculum.joint import GroupBatches, activate, add_joint_lora, export_expert, trainable_parameters
from curriculum.plateau_tethers import JointTethers, record_checks, summary
from curriculum.neighborhood import NUCLEUS, Neighborhood
from pipeline import __version__, metrics_log
from pipeline import adapters as adapters_stage
from pipeline import nucleate as nucleate_stage
from pipeline.atomic import atomic_path, atomic_write_json, read_json
from pipeline.config import NucleusConfig, section_hash
from pipeline.errors import UserError
from pipeline.evaluate import evaluate
from pipeline.lm_data import make_eval_set, pack_by_topic, passage_texts, tokenize
from pipeline.model import load_pretrained, resolve_device
from pipeline.train import (SECTIONS, RunData, TrainResult, adapter_dir, autocast_dtype, check_model, fit_settings,
                            steps_per_epoch)
from pipeline.trainer import checkpoint_step, fit
from pipeline.workspace import Workspace, now

log = logging.getLogger("nucleus.train")

CHECKPOINT = "_joint"  # not a valid neighbourhood id, so it never clashes with one


@dataclass
class JointResult:
    members: list[str]
    shared_rank: int
    expert_rank: int
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    trainable_params: int = 0
    adapters: list[dict] = field(default_factory=list)  # each member's TrainResult
    resumed_from: int = 0
    skipped: bool = False
    tethers: dict = field(default_factory=dict)  # tethers.during: checks, merges, which experts serve whom

    def to_json(self) -> dict:
        return asdict(self)


def check(cfg: NucleusConfig, ws: Workspace) -> None:
    """What `train_jointly` would reject, before anything is written."""
    ws.require("train", "train --joint")
    _members(ws)
    check_model(cfg, ws)


def train_jointly(cfg: NucleusConfig, ws: Workspace, resume: bool = True, force: bool = False) -> JointResult:
    ws.require("train", "train --joint")
    members = _members(ws)
    config_hash = section_hash(cfg, joint_sections(cfg))
    done = _finished(ws, members, config_hash)
    if done is not None and not force:
        return done
    # the base's metrics on each member, from its training apart: the base has not changed since
    before = {nb.id: read_json(adapter_dir(ws, nb.id) / "neighborhood.json").get("result", {}).get("metrics_before", {})
              for nb in members}
    data = RunData.load(ws)
    device = resolve_device(cfg.train.device)
    model, tokenizer = load_pretrained(str(ws.root / "model" / "base"))
    experts = [f"e{i}" for i in range(len(members))]  # peft names; ids may hold '.', which peft rejects
    model = add_joint_lora(model, experts, cfg.lora.shared_rank, cfg.lora.rank, cfg.lora.alpha / cfg.lora.rank,
                           dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules, seed=cfg.seed).to(device)

    rows = [data.train_rows(nb.topics, nb.passage_ids) for nb in members]
    ids = tokenize(tokenizer, passage_texts(data.corpus, [r for rs in rows for r in rs]))
    groups = [g for g, rs in enumerate(rows) for _ in rs]
    blocks = pack_by_topic(ids, groups, cfg.train.block_size, tokenizer.pad_token_id)
    log.info("train --joint: %d neighbourhoods, %d blocks of %d tokens, shared rank %d + expert rank %d",
             len(members), len(blocks), cfg.train.block_size, cfg.lora.shared_rank, cfg.lora.rank)

    settings = fit_settings(cfg, cfg.lora.steps * len(members), cfg.lora.lr, device, replay=False)
    # switching the active expert between batches changes the graph: compiled, it would recompile
    settings = dataclasses.replace(settings, compile=False)
    share = np.bincount(blocks.topics, minlength=len(members)) / len(blocks)  # of the batches, so of the tokens
    tethers = None
    if cfg.tethers.during:  # experts tie layer by layer when they plateau compatible
        tethers = JointTethers(model, [nb.id for nb in members], experts, share.tolist(), cfg.tethers.settings(),
                               steps_per_epoch(cfg, len(blocks)))
    # member g's adapter made active: shared + its expert (at each layer the one it is tied to)
    use = tethers.activate if tethers is not None else lambda g: activate(model, experts[g])
    checkpoints = ws.root / "checkpoints" / CHECKPOINT
    tag = f"{config_hash}:{','.join(nb.id for nb in members)}"
    start = checkpoint_step(checkpoints, tag) if resume and not force else None
    metrics_file = ws.logs_dir / "metrics.jsonl"
    metrics_log.drop_after(metrics_file, CHECKPOINT, start if start is not None else -1)
    torch.manual_seed(cfg.seed)
    fitted = fit(model, blocks, lambda: GroupBatches(blocks.topics, cfg.train.batch_size, seed=cfg.seed), settings,
                 device, checkpoint_dir=checkpoints, resume=start is not None, checkpoint_tag=tag,
                 on_batch=lambda idx: use(int(blocks.topics[idx[0]])),
                 log=lambda row: metrics_log.append(metrics_file, {"nb": CHECKPOINT, "time": now(), **row}),
                 tethers=tethers, desc="train --joint")

    result = JointResult([nb.id for nb in members], cfg.lora.shared_rank, cfg.lora.rank, fitted.steps,
                         fitted.tokens, fitted.seconds, trainable_parameters(model), resumed_from=fitted.resumed_from)
    metrics = _evaluate(cfg, ws, data, model, tokenizer, members, use, device)
    if tethers is not None:
        record_checks(ws.root / "ledger.sqlite", CHECKPOINT, tethers.events, now())
        result.tethers = summary(tethers)
    for g, (nb, expert) in enumerate(zip(members, experts)):
        member = TrainResult(neighborhood=nb.id, kind="joint", output=str(adapter_dir(ws, nb.id)),
                             steps=cfg.lora.steps, tokens=int(round(share[g] * fitted.tokens)),
                             seconds=fitted.seconds, tokens_per_s=round(fitted.tokens_per_s, 1),
                             trainable_params=result.trainable_params, metrics_before=before[nb.id],
                             metrics=metrics[nb.id], resumed_from=fitted.resumed_from)
        expert_at = {layer: experts[owners[g]] for layer, owners in tethers.owner.items()} if tethers else None
        _save(cfg, ws, nb, model, expert, member, result, config_hash, expert_at)
        result.adapters.append(member.to_json())
    shutil.rmtree(ws.root / "checkpoints" / CHECKPOINT, ignore_errors=True)
    log.info("train --joint: %d steps, %d tokens -> %s", fitted.steps, fitted.tokens,
             ", ".join(m.id for m in members))
    return result


def joint_sections(cfg: NucleusConfig) -> tuple[str, ...]:
    return (*SECTIONS, "tethers") if cfg.tethers.during else SECTIONS


def _members(ws: Workspace) -> list[Neighborhood]:
    """Every neighbourhood with an adapter as trained (not the nucleus, not a merge)."""
    members = [nucleate_stage.load_neighborhood(ws, e.id) for e in adapters_stage.scan(ws) if e.explored]
    members = [nb for nb in members if nb is not None]
    if len(members) < 2:
        raise UserError(f"train --joint: '{ws.root / 'adapters'}' holds {len(members)} neighbourhood adapter(s); "
                        f"joint training needs at least 2. Train some with `nucleus explore --run-dir {ws.root}` "
                        f"or `nucleus train --run-dir {ws.root} -n topic-N`.")
    return members


def _finished(ws: Workspace, members: list[Neighborhood], config_hash: str) -> JointResult | None:
    """The stored result when these members were already trained jointly with this config."""
    infos = [read_json(adapter_dir(ws, nb.id) / "neighborhood.json") for nb in members]
    joint = [info.get("joint") for info in infos]
    ids = [nb.id for nb in members]
    if not all(j and j["members"] == ids for j in joint) or any(i.get("config_hash") != config_hash for i in infos):
        return None
    return JointResult(**{**joint[0], "adapters": [i["result"] for i in infos], "skipped": True})


def _evaluate(cfg: NucleusConfig, ws: Workspace, data: RunData, model, tokenizer, members: list[Neighborhood],
              use, device: torch.device) -> dict[str, dict[str, float]]:
    """Held-out metrics of each member's adapter (shared + its expert; `use(g)` makes member g's
    active), as a training records them."""
    held = data.heldout_rows()
    eval_set = make_eval_set(tokenizer, data.corpus, held, data.topic_of[held].tolist(), cfg.train.block_size)
    nucleus_topics = nucleate_stage.load_neighborhood(ws, NUCLEUS).topics
    out = {}
    for g, nb in enumerate(members):
        use(g)
        out[nb.id] = evaluate(model, eval_set, cfg.train.eval_batch_size, device, tokenizer.pad_token_id,
                              {nb.id: nb.topics}, nucleus_topics, autocast_dtype(cfg, device))
    return out


def _save(cfg: NucleusConfig, ws: Workspace, nb: Neighborhood, model, expert: str, member: TrainResult,
          result: JointResult, config_hash: str, expert_at: dict[str, str] | None) -> None:
    out = adapter_dir(ws, nb.id)
    joint = {k: v for k, v in result.to_json().items() if k not in ("adapters", "skipped")}
    with atomic_path(out) as tmp:
        export_expert(model, expert, tmp, expert_at)
        atomic_write_json(tmp / "neighborhood.json", {
            "neighborhood": nb.to_json(), "config_hash": config_hash, "version": __version__, "finished": now(),
            "topics": nb.topics, "parent": nb.parent, "passages": len(nb.passage_ids),
            "tokens_seen": member.tokens, "metrics": member.metrics, "result": member.to_json(),
            "joint": joint})
