"""Curiosity policies side by side: same data, same nucleus, same budget; which one learns most?

For each seed the nucleus is trained once; then every policy explores from a copy of that
same nucleus-trained run with `nucleus explore` (the product's code, in-process) and the same
budget: `explore.rounds` x `explore.per_round` neighbourhood adapters of `lora.steps` steps
each, plus the same rabbit holes. Per policy and seed:

  explored_ppl   mean held-out perplexity of the explored topics, each under its own adapter
  explored_gain  mean relative perplexity drop on the explored topics against the nucleus base
  macro_ppl      mean per-topic held-out perplexity over *all* topics: an explored topic under
                 its adapter, the others under the base (what exploring bought, topic-weighted)
  rho            Spearman rank correlation of predicted and realised learning progress
                 (`learned` only; the others predict nothing)
  tokens         adapter training tokens (the budget check: equal across policies)

Different policies explore different topics, so `explored_ppl` compares unequal sets of topics;
`macro_ppl` is measured on the same topics for every policy.

    python benchmarks/curiosity_policies.py prepare --run-dir .device/bench-curiosity     # CPU
    python benchmarks/curiosity_policies.py run --run-dir .device/bench-curiosity \\
        --work /tmp/bench --seeds 0 1 2 --policies learned random nearest --json-out out.json  # GPU

`prepare` indexes and nucleates with `configs/bench-curiosity.yaml` (the run directory then
travels to the GPU machine); `run` starts one process per seed for the nuclei, then one per
(seed, policy) for exploring, `--jobs` at a time, all on the one GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._procs import run_all  # noqa: E402


def _cfg(run_dir: Path, sets: list[str]):
    from pipeline.config import resolve_config
    from pipeline.workspace import Workspace

    return resolve_config(Workspace(run_dir).stored_config(), None, sets)


# ------------------------------------------------------------------------ one process each


def train_nucleus(base: Path, out: Path, seed: int, sets: list[str]) -> None:
    """Copy the nucleated run and train its nucleus with this seed."""
    from pipeline import train
    from pipeline.workspace import Workspace

    if not (out / "model" / "nucleus.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        # The stages run as library calls (not through the CLI): the index and topics stay the
        # ones `prepare` built, while `seed` changes the model's initialisation and the policies.
        train.run(_cfg(out, [f"seed={seed}", *sets]), Workspace(out))


def explore_policy(nucleus_run: Path, out: Path, seed: int, policy: str, sets: list[str]) -> dict:
    """Copy the nucleus-trained run, explore with `policy`, measure."""
    from pipeline import explore
    from pipeline.workspace import Workspace

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(nucleus_run, out)
    t0 = time.perf_counter()
    result = explore.run(_cfg(out, [f"seed={seed}", f"explore.policy={policy}", *sets]), Workspace(out))
    seconds = time.perf_counter() - t0
    return {"seed": seed, "policy": policy, "seconds": round(seconds, 1), "rounds": result.rounds_done,
            "rho": result.spearman_rho, **measure(out)}


def measure(run_dir: Path) -> dict:
    """Per-topic held-out perplexities of the nucleus base and of each explored topic's adapter."""
    import sqlite3

    base_metrics = json.loads((run_dir / "model" / "nucleus.json").read_text())["result"]["metrics"]
    base = {int(k.split("/")[1]): v for k, v in base_metrics.items() if k.startswith("topic/")}
    own, tokens = {}, 0
    for info_file in sorted((run_dir / "adapters").glob("*/neighborhood.json")):
        info = json.loads(info_file.read_text())
        if info["neighborhood"]["source"] != "explore":
            continue
        tokens += info["tokens_seen"]
        for t in info["topics"]:
            if f"topic/{t}/ppl" in info["metrics"]:
                own[t] = info["metrics"][f"topic/{t}/ppl"]
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    progress = [r[0] for r in db.execute("SELECT progress FROM proposals WHERE status='done'")]
    probes = db.execute("SELECT COUNT(*) FROM rabbit_holes WHERE kind='walk' AND progress IS NOT NULL").fetchone()[0]
    explored = sorted(own)
    return {
        "explored_topics": explored, "tokens": tokens, "probes": probes,
        "explored_ppl": statistics.fmean(own[t] for t in explored) if explored else float("nan"),
        "explored_base_ppl": statistics.fmean(base[t] for t in explored) if explored else float("nan"),
        "explored_gain": statistics.fmean(1 - own[t] / base[t] for t in explored) if explored else float("nan"),
        "macro_ppl": statistics.fmean(own.get(t, base[t]) for t in base),
        "macro_base_ppl": statistics.fmean(base.values()),
        "mean_progress": statistics.fmean(progress) if progress else float("nan"),
    }


# ------------------------------------------------------------------------------ driver


def summarise(rows: list[dict]) -> dict:
    out = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        out[policy] = {}
        for key in ("explored_ppl", "explored_gain", "macro_ppl", "macro_base_ppl", "rho", "tokens", "seconds"):
            vals = [r[key] for r in mine if r[key] == r[key]]  # drop NaN (rho of non-learned policies)
            out[policy][key] = {"mean": statistics.fmean(vals) if vals else float("nan"),
                                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "bench-curiosity.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[])
    r = sub.add_parser("run")
    r.add_argument("--run-dir", type=Path, required=True, help="an indexed, nucleated run (from `prepare`)")
    r.add_argument("--work", type=Path, default=Path("/tmp/bench-curiosity"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--policies", nargs="+", default=["learned", "random", "nearest"])
    r.add_argument("--jobs", type=int, default=9, help="processes at once (they share the GPU)")
    r.add_argument("--set", dest="sets", action="append", default=[], help="config overrides for every arm")
    r.add_argument("--json-out", type=Path)
    r.add_argument("--phase", choices=["all", "nuclei", "explore"], default="all",
                   help="`nuclei` stops after training the nuclei; `explore` reuses them from --work")
    n = sub.add_parser("nucleus")  # internal: one seed's nucleus
    n.add_argument("base", type=Path)
    n.add_argument("out", type=Path)
    n.add_argument("seed", type=int)
    n.add_argument("--set", dest="sets", action="append", default=[])
    e = sub.add_parser("explore")  # internal: one (seed, policy) arm
    e.add_argument("nucleus_run", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("seed", type=int)
    e.add_argument("policy")
    e.add_argument("--set", dest="sets", action="append", default=[])
    a = ap.parse_args()

    if a.cmd == "prepare":
        sets = [x for s in a.sets for x in ("--set", s)]
        for stage in ("index", "nucleate"):
            subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "--run-dir", str(a.run_dir),
                            "--config", str(a.config), *sets], check=True, cwd=REPO)
    elif a.cmd == "nucleus":
        train_nucleus(a.base, a.out, a.seed, a.sets)
    elif a.cmd == "explore":
        row = explore_policy(a.nucleus_run, a.out, a.seed, a.policy, a.sets)
        (a.out / "bench.json").write_text(json.dumps(row, indent=1))
    else:
        import torch

        sets = [x for s in a.sets for x in ("--set", s)]
        t0 = time.perf_counter()
        if a.phase != "explore":
            run_all(__file__, [(["nucleus", str(a.run_dir), str(a.work / f"s{s}" / "nucleus"), str(s), *sets],
                       a.work / "logs" / f"nucleus-s{s}.log") for s in a.seeds], a.jobs)
        t_nuclei = time.perf_counter() - t0
        if a.phase == "nuclei":
            print(f"nuclei trained in {t_nuclei:.1f}s")
            return
        arms = [(s, p) for s in a.seeds for p in a.policies]
        run_all(__file__, [(["explore", str(a.work / f"s{s}" / "nucleus"), str(a.work / f"s{s}" / p), str(s), p, *sets],
                   a.work / "logs" / f"explore-s{s}-{p}.log") for s, p in arms], a.jobs)
        rows = [json.loads((a.work / f"s{s}" / p / "bench.json").read_text()) for s, p in arms]
        budgets = {(r["seed"], r["policy"]): r["rounds"] for r in rows}
        if len(set(budgets.values())) != 1:
            print(f"warning: policies ran different numbers of rounds (empty frontier?): {budgets}")
        report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "run_dir": str(a.run_dir), "sets": a.sets, "seeds": a.seeds, "nuclei_s": round(t_nuclei, 1),
                  "total_s": round(time.perf_counter() - t0, 1), "rows": rows, "summary": summarise(rows)}
        print(json.dumps(report["summary"], indent=1))
        for r in rows:
            print(f"seed {r['seed']} {r['policy']:>9}: macro {r['macro_ppl']:.2f} (base {r['macro_base_ppl']:.2f}) "
                  f"explored {r['explored_ppl']:.2f} gain {r['explored_gain']:.3f} rho {r['rho']:.2f} "
                  f"tokens {r['tokens']} {r['seconds']}s")
        if a.json_out:
            a.json_out.parent.mkdir(parents=True, exist_ok=True)
            a.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
