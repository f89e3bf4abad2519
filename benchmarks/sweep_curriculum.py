"""Which curriculum design works best on WikiText-2, and can ACE predict the ones it has not tried?

A sweep of the curriculum design space, every trial a short real training of a fresh `small`
model from scratch (`benchmarks/curriculum.py`'s arm, the product's training loop and samplers),
scored by its loss on the **validation** split (never trained on, never reported); the
held-out split is read only by the final confirmation.

The space (`SPACE`): the sampler (`uniform`, `stratified`, `odm`, `skillit`, `community`, or the
`nucleus` curriculum), for the ones that read the topic graph which graph (`knn` with its k, or
the `erdos_renyi` control with its p), community traversal's k, and for the nucleus curriculum
its curiosity policy, window (`expanding`, or `phases` with a replay fraction), coverage,
neighbours joined per choice, and how every stretch weights its topics (`natural` or
`stratified`).

Protocol, in one Optuna study (journal file in `--work`, so a killed run resumes):

1. `--random` trials at random (seeded per trial number, never a design already tried). ACE (`curriculum/ace.py`) is fitted
   on the first `--fit` of them and predicts the rest: their Spearman rank correlation with the
   measured scores is the held-out rank correlation. (Random points, so the held-out ones are
   like any the model would be asked about.)
2. `--guided` trials chosen by ACE as `nucleus sweep` chooses them (`AceSampler`: lowest lower
   confidence bound, trials in flight counted as pending).
3. `confirm`: the best measured design, `uniform` and `stratified` at the full budget
   (`--full-steps`) on fresh seeds, scored on the held-out split: R against uniform, as in
   RESULTS.md section 8 (`benchmarks/curriculum_report.py`).

    python benchmarks/curriculum.py prepare --run-dir runs/bench-curriculum --bundle .device/curriculum
    python benchmarks/sweep_curriculum.py sweep --bundle .device/curriculum --work .device/sweep \\
        --json-out out/sweep.json
    python benchmarks/sweep_curriculum.py confirm --bundle .device/curriculum --work .device/sweep \\
        --json-out out/confirm.json
    python benchmarks/sweep_curriculum.py report out/sweep.json out/confirm.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import curriculum_report  # noqa: E402
from benchmarks.curriculum import Settings, check_fair  # noqa: E402
from curriculum.ace import Ace, Dim, Space, point_key  # noqa: E402
from curriculum.curiosity import spearman  # noqa: E402

GRAPH_USERS = (("arm", "nucleus"), ("arm", "community"), ("arm", "skillit"))
SPACE = Space([
    Dim("arm", choices=("uniform", "stratified", "odm", "skillit", "community", "nucleus")),
    Dim("graph", choices=("knn", "erdos_renyi"), when=GRAPH_USERS),
    Dim("graph_k", low=2, high=12, integer=True, when=(("graph", "knn"),)),
    Dim("graph_p", low=0.03, high=0.3, log=True, when=(("graph", "erdos_renyi"),)),
    Dim("community_k", low=1, high=6, integer=True, when=(("arm", "community"),)),
    Dim("policy", choices=("learned", "random", "nearest", "max_loss", "learning_progress"),
        when=(("arm", "nucleus"),)),
    Dim("window", choices=("expanding", "phases"), when=(("arm", "nucleus"),)),
    Dim("replay", low=0.0, high=0.9, when=(("window", "phases"),)),
    Dim("coverage", low=0.1, high=0.9, when=(("arm", "nucleus"),)),
    Dim("k", low=0, high=3, integer=True, when=(("arm", "nucleus"),)),
    Dim("weighting", choices=("natural", "stratified"), when=(("arm", "nucleus"),)),
])


def arm_spec(params: dict) -> str:
    """A point of SPACE as `benchmarks/curriculum.py`'s arm spec."""
    p = SPACE.active(params)
    name, out = p["arm"], []
    if "graph" in p:
        out += [f"graph={p['graph']}"] + [f"{k}={p[k]:.4g}" if isinstance(p[k], float) else f"{k}={p[k]}"
                                          for k in ("graph_k", "graph_p") if k in p]
    if name == "community":
        out.append(f"k={p['community_k']}")
    if name == "nucleus":
        out += [f"policy={p['policy']}", f"expanding={int(p['window'] == 'expanding')}",
                f"coverage={p['coverage']:.3f}", f"k={p['k']}", f"weighting={p['weighting']}"]
        if p["window"] == "phases":
            out.append(f"replay={p['replay']:.3f}")
    return name + (":" + ",".join(out) if out else "")


def _run_arm(bundle: Path, spec: str, seed: int, settings: Settings, out: Path) -> dict:
    """One arm in its own process (a GPU context each; they share the GPU side by side)."""
    if not out.exists():
        log = out.with_suffix(".log")
        with open(log, "w") as f:
            r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "curriculum.py"), "arm", str(bundle), spec,
                                str(seed), str(out), "--settings", json.dumps(asdict(settings))],
                               stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"arm '{spec}' seed {seed} failed ({r.returncode}); see {log}:\n"
                               + "\n".join(log.read_text().splitlines()[-15:]))
    return json.loads(out.read_text())


def _settings(bundle: Path, steps: int, eval_every: int, eval_batch_size: int | None) -> Settings:
    info = json.loads((bundle / "bundle.json").read_text())
    return Settings(steps, info["batch_size"], info["lr"], info["warmup_steps"], eval_every, info["block_size"],
                    info["model_size"], eval_batch_size or info["eval_batch_size"])


# ------------------------------------------------------------------------------- sweep


def open_study(work: Path, startup: int, seed: int):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage
    from optuna.trial import TrialState

    from curriculum.ace_sampler import AceSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work.mkdir(parents=True, exist_ok=True)
    path = str(work / "journal.log")
    storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    study = optuna.create_study(study_name="curriculum", storage=storage, direction="minimize",
                                sampler=AceSampler(SPACE, startup=startup, seed=seed), load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed driver's: run again
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params)
    return study


def run_trials(study, until: int, bundle: Path, work: Path, settings: Settings, seed: int, jobs: int) -> None:
    """Ask, run and tell trials, `jobs` at a time, until the study holds `until` complete ones."""
    from optuna.trial import TrialState

    from curriculum.ace_sampler import suggest

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    inflight: dict = {}
    with ThreadPoolExecutor(jobs) as pool:
        while complete() + len(inflight) < until or inflight:
            while complete() + len(inflight) < until and len(inflight) < jobs:
                trial = study.ask()
                spec = arm_spec(suggest(trial, SPACE))
                trial.set_user_attr("spec", spec)
                out = work / f"trial{trial.number:04d}.json"
                inflight[pool.submit(_run_arm, bundle, spec, seed, settings, out)] = trial
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for fut in finished:
                trial = inflight.pop(fut)
                try:
                    row = fut.result()
                except RuntimeError as e:
                    print(e, file=sys.stderr)
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                trial.set_user_attr("heldout_ppl", row["curve"][-1]["ppl"])  # kept, never chosen by
                trial.set_user_attr("seconds", row["train_s"] + row["overhead_s"])
                study.tell(trial, row["val_loss"])
                print(f"trial {trial.number:3d}  val loss {row['val_loss']:.4f}  {trial.user_attrs['spec']}",
                      flush=True)


def sweep(a) -> None:
    t0 = time.perf_counter()
    settings = _settings(a.bundle, a.trial_steps, a.trial_steps, a.eval_batch_size)
    study = open_study(a.work, a.random, a.seed)
    run_trials(study, a.random, a.bundle, a.work, settings, a.seed, a.jobs)
    run_trials(study, a.random + a.guided, a.bundle, a.work, settings, a.seed, a.jobs)
    done = _complete(study)
    rand = [t for t in done if "ace_predicted" not in t.user_attrs]
    fit = rand[:a.fit]
    # held out: the later random trials of designs the fit never saw (the sampler never repeats
    # one, but a resumed or older study might)
    seen = {point_key(SPACE.active(t.params)) for t in fit}
    held = [t for t in rand[a.fit:] if point_key(SPACE.active(t.params)) not in seen]
    model = Ace.fit(SPACE, [t.params for t in fit], [t.value for t in fit])
    pred = model.predict([t.params for t in held])
    full = Ace.fit(SPACE, [t.params for t in done], [t.value for t in done])
    pool = full.candidates(np.random.default_rng(a.seed), draws=32)
    best = min(done, key=lambda t: t.value)
    result = {
        "command": " ".join(sys.argv), "settings": asdict(settings), "seed": a.seed, "space": [asdict(d) for d in SPACE.dims],
        "trials": [{"number": t.number, "spec": t.user_attrs["spec"], "params": t.params, "val_loss": t.value,
                    "heldout_ppl": t.user_attrs.get("heldout_ppl"), "seconds": t.user_attrs.get("seconds"),
                    "chosen_by": "ace" if "ace_predicted" in t.user_attrs else "random",
                    "ace_predicted": t.user_attrs.get("ace_predicted")} for t in done],
        "heldout": {"fit_on": len(fit), "held_out": len(held), "spearman": spearman(pred.mean, [t.value for t in held]),
                    "predicted": pred.mean.tolist(), "sd": pred.sd.tolist(), "measured": [t.value for t in held]},
        "loo_spearman_all": spearman(full.loo(), [t.value for t in done]),
        "importance": full.importance(pool),
        "predicted_best": full.best_per_combination(pool)[:10],
        "best": {"number": best.number, "spec": best.user_attrs["spec"], "val_loss": best.value},
        "best_random": min((t.value for t in rand), default=None),
        "best_guided": min((t.value for t in done if t not in rand), default=None),
        "total_s": round(time.perf_counter() - t0, 1),
    }
    _write(a.json_out, result)
    print(report_sweep(result))


def _complete(study) -> list:
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


# ----------------------------------------------------------------------------- confirm


def confirm(a) -> None:
    t0 = time.perf_counter()
    swept = json.loads(a.sweep_json.read_text())
    specs = ["uniform", "stratified", swept["best"]["spec"], *a.extra_arms]
    specs = list(dict.fromkeys(specs))
    settings = _settings(a.bundle, a.full_steps, a.eval_every, a.eval_batch_size)
    jobs = [(spec, s) for s in a.seeds for spec in specs]
    a.work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        futs = [pool.submit(_run_arm, a.bundle, spec, s, settings,
                            a.work / f"full-s{s}-{spec.replace(':', '_').replace(',', '_').replace('=', '')}.json")
                for spec, s in jobs]
        rows = [f.result() for f in futs]
    check_fair(rows)
    summary = curriculum_report.summarise(rows)
    result = {"command": " ".join(sys.argv), "settings": asdict(settings), "seeds": a.seeds, "arms": specs,
              "best_from_sweep": swept["best"], "device": rows[0]["device"], "summary": summary,
              "total_s": round(time.perf_counter() - t0, 1), "rows": rows}
    _write(a.json_out, result)
    print(curriculum_report.table(summary))


def _write(path: Path | None, obj: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1))


# ------------------------------------------------------------------------------ report


def report_sweep(r: dict) -> str:
    h = r["heldout"]
    lines = [f"{len(r['trials'])} trials of {r['settings']['steps']} steps "
             f"({sum(t['chosen_by'] == 'random' for t in r['trials'])} random, "
             f"{sum(t['chosen_by'] == 'ace' for t in r['trials'])} chosen by ACE)",
             f"ACE held-out rank correlation: {h['spearman']:.2f} (fit on {h['fit_on']} random trials, "
             f"{h['held_out']} held out); leave-one-out over all trials {r['loo_spearman_all']:.2f}",
             f"best random trial {r['best_random']:.4f}, best ACE-chosen {r['best_guided']:.4f} (validation loss)",
             "importance: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["importance"].items(), key=lambda kv: -kv[1])),
             "", "| # | chosen by | validation loss | held-out ppl | design |", "| --- | --- | --- | --- | --- |"]
    for t in sorted(r["trials"], key=lambda t: t["val_loss"])[:15]:
        lines.append(f"| {t['number']} | {t['chosen_by']} | {t['val_loss']:.4f} | {t['heldout_ppl']:.1f} | `{t['spec']}` |")
    lines += ["", "ACE's best predicted designs:"]
    lines += [f"  {c['mean']:.4f} ± {c['sd']:.4f}  {arm_spec(c['params'])}" for c in r["predicted_best"][:5]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="random trials, ACE's held-out check, ACE-chosen trials")
    s.add_argument("--bundle", type=Path, required=True)
    s.add_argument("--work", type=Path, required=True, help="study journal and per-trial files (resumable)")
    s.add_argument("--random", type=int, default=48)
    s.add_argument("--fit", type=int, default=36, help="random trials ACE is fitted on; the rest are held out")
    s.add_argument("--guided", type=int, default=16)
    s.add_argument("--trial-steps", type=int, default=150)
    s.add_argument("--seed", type=int, default=0, help="every trial's model seed and batch order")
    s.add_argument("--jobs", type=int, default=12)
    s.add_argument("--eval-batch-size", type=int)
    s.add_argument("--json-out", type=Path)
    c = sub.add_parser("confirm", help="the best design, uniform and stratified at the full budget, fresh seeds")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--sweep-json", type=Path, required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    c.add_argument("--full-steps", type=int, default=600)
    c.add_argument("--eval-every", type=int, default=50)
    c.add_argument("--extra-arms", nargs="*", default=[], help="more arm specs to run beside them")
    c.add_argument("--jobs", type=int, default=12)
    c.add_argument("--eval-batch-size", type=int)
    c.add_argument("--json-out", type=Path)
    r = sub.add_parser("report", help="the tables, from the JSON files (no GPU)")
    r.add_argument("sweep_json", type=Path)
    r.add_argument("confirm_json", type=Path, nargs="?")
    a = ap.parse_args()
    if a.cmd == "sweep":
        if not 3 <= a.fit < a.random:
            sys.exit("--fit must be at least 3 and below --random (some random trials are held out)")
        sweep(a)
    elif a.cmd == "confirm":
        confirm(a)
    else:
        print(report_sweep(json.loads(a.sweep_json.read_text())))
        if a.confirm_json:
            conf = json.loads(a.confirm_json.read_text())
            print()
            print(curriculum_report.table(conf["summary"]))


if __name__ == "__main__":
    main()
