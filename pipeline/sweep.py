"""`nucleus sweep`: an Optuna study over combinations of modules and their hyperparameters.

Each trial is a real training through the product's own loop: a fresh scratch model on the
run's train split for `sweep.steps` steps under the trial's modules (sampler, ReLoRA or not,
their keys from the module catalogue), scored by its loss on the **validation** split, so
choosing by it never fits the held-out split final results are scored on.

Trials after the first `sweep.startup_trials` are chosen by ACE (`curriculum/ace.py`, through
`curriculum/ace_sampler.py`) unless `sweep.sampler` names Optuna's `tpe` or `random`; `report`
adds ACE's view of the completed trials (`ace_report`).

Every `nucleus sweep` process is a worker: it claims trials from the shared study until
`sweep.trials` have completed. Storage:

- `auto`: an Optuna journal file in the run directory (`sweep/journal.log`), safe for several
  workers on one machine (file lock). Optuna's heartbeat does not cover it, so a trial whose
  worker was killed is failed, and its parameters queued again, by the next worker that starts
  on the same machine (its owner's host and pid are recorded on the trial).
- `postgresql://...`: Optuna's RDB storage, for workers on many machines. Each running trial
  beats every `sweep.heartbeat_s`; one silent for twice that is failed and retried
  (`RetryHeartbeatStaleTrialCallback`, up to `sweep.max_retry` times) by whichever worker looks next.

A finished trial is a committed row in the storage: a kill at any point loses at most the
trial in flight, which is retried.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from curriculum import ace, modules
from curriculum.curiosity import spearman
from curriculum.samplers import make_sampler
from pipeline import nucleate as nucleate_stage
from pipeline.config import NucleusConfig, build_config, deep_merge
from pipeline.errors import UserError
from pipeline.evaluate import passage_nll
from pipeline.lm_data import make_eval_set, pack_by_topic, passage_texts, tokenize
from pipeline.model import build_scratch_model, train_tokenizer
from pipeline.train import RunData, autocast_dtype, fit_settings, manifold_context, relora_model, relora_settings
from pipeline.trainer import fit
from pipeline.workspace import Workspace

log = logging.getLogger("nucleus.sweep")


@dataclass
class SweepResult:
    run_dir: str
    storage: str
    study: str
    trials_complete: int
    trials_failed: int
    ran_here: int
    best: dict | None = None
    trials: list[dict] = field(default_factory=list)
    ace: dict | None = None  # the combination engine's view (`ace_report`), from 3 completed trials

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- storage


def storage_label(cfg: NucleusConfig, ws: Workspace) -> str:
    s = cfg.sweep.storage
    return str(ws.root / "sweep" / "journal.log") if s == "auto" else s.split("@")[-1]  # no password echoed


def open_storage(cfg: NucleusConfig, ws: Workspace):
    import warnings

    import optuna

    # heartbeats and their retry callback are marked experimental by Optuna: say it once, here
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    s = cfg.sweep
    if s.storage == "auto":
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        path = ws.root / "sweep" / "journal.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    # the driver Nucleus installs (SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://)
    url = "postgresql+psycopg2://" + s.storage.removeprefix("postgresql://") if s.storage.startswith(
        "postgresql://") else s.storage
    last: Exception | None = None
    for attempt in range(3):  # workers starting together race to create the tables: the loser retries
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=s.heartbeat_s, grace_period=2 * s.heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=s.max_retry),
                engine_kwargs={"pool_pre_ping": True, "connect_args": {"connect_timeout": 5}})
        except Exception as e:  # sqlalchemy's OperationalError, a missing driver, a bad URL
            last = e
            time.sleep(0.5 * (attempt + 1))
    raise UserError(f"sweep.storage: cannot open '{storage_label(cfg, ws)}' "
                    f"({type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}).") from None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_here(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True


def recover_orphans(study, max_retry: int) -> int:
    """The journal storage's stand-in for the heartbeat: fail every running trial whose worker
    on this machine is gone, and queue its parameters again (once per original, up to
    `max_retry` times). Returns how many were failed."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if owner is None or _alive_here(owner):
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        n += 1
        retries = int(t.user_attrs.get("retries", 0))
        if retries < max_retry:
            study.enqueue_trial(t.params, user_attrs={"retries": retries + 1,
                                                      "retry_of": t.user_attrs.get("retry_of", t.number)},
                                skip_if_exists=False)
    if n:
        log.info("sweep: %d trial(s) of dead workers failed and queued again", n)
    return n


# ------------------------------------------------------------------------------ trials


# Keys counting training steps that do nothing unless a trial reaches them (ReLoRA merges only
# below its steps, as the train stage requires): their range ends one below `sweep.steps`.
STEP_BOUNDED = frozenset({"train.relora_every"})


def _range(p, cfg: NucleusConfig) -> tuple[float, float] | None:
    """A numeric key's range in this sweep: the catalogue's, with a step-bounded key's end cut to
    the trial's steps; None when nothing in it would act (the module then leaves the space)."""
    high = min(p.high, cfg.sweep.steps - 1) if p.key in STEP_BOUNDED else p.high
    return (p.low, high) if high >= p.low else None


def search_space(cfg: NucleusConfig) -> ace.Space:
    """The sweep's space: for each kind of `sweep.space`, which module (among those whose needs
    this configuration meets, and whose step-counting keys fit in a trial), then each module's
    keys from their catalogue ranges, active only when that module is chosen (a key two modules
    share is one dimension)."""
    cat = modules.catalogue()
    tags = modules.provided(cfg)
    dims: list[ace.Dim] = []
    for kind in cfg.sweep.space:
        names = sorted(n for n, m in cat[kind].items() if not (m.needs - tags - m.provides)
                       and all(_range(p, cfg) for p in m.params if p.kind in ("int", "float")))
        dims.append(ace.Dim(kind, choices=tuple(names)))
        keys: dict[str, ace.Dim] = {}
        for name in names:
            for p in cat[kind][name].params:
                when = ((kind, name),)
                if p.key in keys:
                    keys[p.key] = replace(keys[p.key], when=keys[p.key].when + when)
                elif p.kind in ("int", "float"):
                    low, high = _range(p, cfg)
                    keys[p.key] = ace.Dim(p.key, low=low, high=high, log=p.log, integer=p.kind == "int", when=when)
                else:
                    keys[p.key] = ace.Dim(p.key, choices=(False, True) if p.kind == "bool" else tuple(p.choices),
                                          when=when)
        dims += keys.values()
    return ace.Space(dims)


def suggest(trial, space: ace.Space) -> dict:
    """The trial's config overrides: one module per kind of the space (`search_space`), then
    each chosen module's own hyperparameters."""
    from curriculum import ace_sampler

    sets: dict = {}
    for name, value in ace_sampler.suggest(trial, space).items():
        if name in modules.KINDS:
            section, _, key = modules.KINDS[name].partition(".")
            if name != "growth":  # a registry-valued key takes the name; growth is relora_every's (un)setting
                sets.setdefault(section, {})[key] = value
            elif value == "full_rank":
                sets.setdefault(section, {})[key] = None
        else:
            section, _, key = name.partition(".")
            sets.setdefault(section, {})[key] = value
    return sets


def make_sampler_for(cfg: NucleusConfig, space: ace.Space):
    """The Optuna sampler `sweep.sampler` names."""
    import optuna

    from curriculum import ace_sampler

    s = cfg.sweep
    if s.sampler == "ace":
        return ace_sampler.AceSampler(space, startup=s.startup_trials, kappa=s.ace_kappa, seed=cfg.seed)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=s.startup_trials)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


class TrialWorld:
    """What every trial of a worker shares: the run's data, one tokenizer, the blocks, the
    validation set and the topic graph (a trial changes none of them)."""

    def __init__(self, cfg: NucleusConfig, ws: Workspace, device: torch.device):
        data = RunData.load(ws)
        rows = np.flatnonzero(data.trainable).tolist()
        self.tokenizer = train_tokenizer(passage_texts(data.corpus, rows), cfg.model.vocab_size)
        ids = tokenize(self.tokenizer, passage_texts(data.corpus, rows))
        self.blocks = pack_by_topic(ids, data.topic_of[rows].tolist(), cfg.train.block_size,
                                    self.tokenizer.pad_token_id)
        # a trial that picks the manifold sampler reads `manifold`; its learned space starts at the
        # blocks' embeddings, and its aligned traversal's probe is the validation split, which
        # also scores the trials (the one split a sweep may choose by)
        self.manifold = manifold_context(cfg, ws, "sweep trial", None, data, rows, self.tokenizer)
        val = data.signal_rows()  # the validation split (held-out only for a run indexed without one)
        self.val_set = make_eval_set(self.tokenizer, data.corpus, val, data.topic_of[val].tolist(),
                                     cfg.train.block_size)
        self.graph = nucleate_stage.load_topic_graph(ws).adjacency()
        self.device = device


def train_and_score(cfg: NucleusConfig, world: TrialWorld) -> float:
    """Validation loss (mean NLL per token) of a fresh scratch model after `sweep.steps` steps."""
    t, device = cfg.train, world.device
    model = build_scratch_model(world.tokenizer, cfg.model.size, cfg.seed)
    settings = fit_settings(cfg, cfg.sweep.steps, t.lr, device, replay=False)
    if t.relora_every is not None:
        model = relora_model(cfg, model)
        settings = relora_settings(cfg, settings)
    model.to(device)
    torch.manual_seed(cfg.seed)
    manifold = {**world.manifold,  # the trial's own manifold keys
                "settings": cfg.manifold.settings(total_batches=settings.steps * settings.grad_accum)}
    fit(model, world.blocks, lambda: iter(make_sampler(t.sampler, world.blocks.topics, t.batch_size, world.graph,
                                                       t.community_k, cfg.seed, manifold)),
        settings, device, desc="sweep trial")
    nll, count = passage_nll(model, world.val_set, t.eval_batch_size, device, world.tokenizer.pad_token_id,
                             autocast_dtype(cfg, device))
    return float(nll.sum() / max(count.sum(), 1.0))


def trial_config(cfg: NucleusConfig, sets: dict) -> NucleusConfig:
    return build_config(deep_merge(cfg.model_dump(mode="json"), sets), "sweep trial")


# --------------------------------------------------------------------------------- run


def check(cfg: NucleusConfig, ws: Workspace) -> None:
    """What `run` would reject, before anything is written: the stages it needs, the base."""
    ws.require("nucleate", "sweep")
    if cfg.model.base != "scratch":
        raise UserError(f"model.base: a sweep's trials train a scratch model, got '{cfg.model.base}'. "
                        "Use model.base: scratch.")


def run(cfg: NucleusConfig, ws: Workspace) -> SweepResult:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from pipeline.model import resolve_device

    check(cfg, ws)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(cfg, ws)
    space = search_space(cfg)
    try:
        study = optuna.create_study(study_name=cfg.sweep.study, storage=storage, direction="minimize",
                                    sampler=make_sampler_for(cfg, space), load_if_exists=True)
    except Exception as e:  # an unreachable database shows up here with RDB storage
        raise UserError(f"sweep.storage: cannot use '{storage_label(cfg, ws)}' "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    if cfg.sweep.storage == "auto":
        recover_orphans(study, cfg.sweep.max_retry)
    device = resolve_device(cfg.train.device)
    world: TrialWorld | None = None
    ran = 0

    def objective(trial) -> float:
        nonlocal world, ran
        trial.set_user_attr("owner", _owner())
        sets = suggest(trial, space)
        tcfg = trial_config(cfg, sets)
        if world is None:
            world = TrialWorld(cfg, ws, device)
        score = train_and_score(tcfg, world)
        trial.set_user_attr("validation_ppl", float(np.exp(score)))
        ran += 1
        return score

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    if complete() < cfg.sweep.trials:
        study.optimize(objective, callbacks=[MaxTrialsCallback(cfg.sweep.trials, states=(TrialState.COMPLETE,))],
                       catch=())
    # Retries of killed trials still queued when the count was reached are run too: a trial a
    # kill interrupted ends completed, never left behind.
    if cfg.sweep.storage != "auto":
        optuna.storages.fail_stale_trials(study)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if waiting:
        study.optimize(objective, n_trials=waiting, catch=())
    return report(cfg, ws, study, ran)


def _existing_study(cfg: NucleusConfig, ws: Workspace):
    """The sweep's study, for a report: an error naming the study and storage when there is none
    yet, and nothing created in the run directory (the journal file is made by a sweep only)."""
    import optuna

    missing = UserError(f"sweep report: no study '{cfg.sweep.study}' in {storage_label(cfg, ws)} (sweep.study, "
                        f"sweep.storage); start one with `nucleus sweep --run-dir {ws.root}`.")
    if cfg.sweep.storage == "auto" and not (ws.root / "sweep" / "journal.log").is_file():
        raise missing
    try:
        return optuna.load_study(study_name=cfg.sweep.study, storage=open_storage(cfg, ws))
    except KeyError:  # Optuna's "Record does not exist." for an unknown study name
        raise missing from None


def report(cfg: NucleusConfig, ws: Workspace, study=None, ran: int = 0) -> SweepResult:
    import optuna
    from optuna.trial import TrialState

    if study is None:
        study = _existing_study(cfg, ws)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    rows = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "validation_ppl": t.user_attrs.get("validation_ppl"), "retry_of": t.user_attrs.get("retry_of"),
             "predicted": t.user_attrs.get(ace.PREDICTED)} for t in trials]
    best = min(done, key=lambda t: t.value) if done else None
    return SweepResult(run_dir=str(ws.root), storage=storage_label(cfg, ws), study=cfg.sweep.study,
                       trials_complete=len(done), trials_failed=sum(t.state == TrialState.FAIL for t in trials),
                       ran_here=ran, best=({"number": best.number, "params": best.params, "value": best.value}
                                           if best else None), trials=rows,
                       ace=ace_report(search_space(cfg), [t.params for t in done], [t.value for t in done], cfg.seed))


ACE_MIN_TRIALS = 3
ACE_TOP = 10


def ace_report(space: ace.Space, params: list[dict], scores: list[float], seed: int = 0) -> dict | None:
    """What ACE makes of the completed trials: its leave-one-out predictions of them (and their
    rank correlation with the measured scores), each parameter's importance, and every
    categorical combination at its best predicted point, measured or not, best first."""
    if len(params) < ACE_MIN_TRIALS:
        return None
    model = ace.Ace.fit(space, params, scores)
    loo = model.loo()
    pool = model.candidates(np.random.default_rng(seed), draws=32) + [space.active(p) for p in params]
    measured: dict[tuple, list[float]] = {}
    for p, v in zip(params, scores):
        measured.setdefault(space.key(p), []).append(v)
    combos = []
    for c in model.best_per_combination(pool):
        seen = measured.get(space.key(c["params"]), [])
        combos.append({**c, "measured_best": min(seen) if seen else None, "measured_trials": len(seen)})
    return {"fit_on": len(params), "prior": {"main": model.main_var, "pairwise": model.pair_var,
                                             "noise": model.noise_var},
            "loo_spearman": spearman(loo, scores), "loo": [float(x) for x in loo],
            "importance": dict(sorted(model.importance(pool).items(), key=lambda kv: -kv[1])),
            "combinations": len(combos), "untested_combinations": sum(c["measured_trials"] == 0 for c in combos),
            "best": combos[:ACE_TOP]}
