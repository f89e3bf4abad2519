"""Read the curriculum benchmark's JSON without Nucleus: the table, the ratios, the plot.

Needs only the standard library (and matplotlib for `--plot`), so the numbers in RESULTS.md can
be checked from the raw output on any machine:

    python benchmarks/curriculum_report.py benchmarks/results/curriculum_h100.json --plot curves.png

Several JSON files (one per seed, say) are read as one: their rows together; `--json-out` writes
the merged rows with their summary.

The JSON (written by `benchmarks/curriculum.py run`) holds one row per (seed, arm), each with its
evaluation curve: `curve` = [{"step", "tokens", "ppl", "macro_ppl", "worst_ppl"}, ...].

Tokens-to-target ratio, per seed: R = T_uniform(target) / T_arm(target), where T(target) is the
first point where a curve reaches the target perplexity (linear interpolation in tokens between
evaluation points). The target is the perplexity the `uniform` arm ends with. R > 1: the arm gets
there with fewer tokens. An arm that never gets down to it within the budget is measured at its
own final perplexity instead, which both curves reach: then R = (tokens uniform needs to match
the arm's final perplexity) / (tokens the arm needed), below 1; the table marks those seeds
("at own final"). `R_macro` does the same on macro per-topic perplexity.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BASELINE = "uniform"


def tokens_to_target(curve: list[dict], key: str, target: float, higher: bool = False) -> float | None:
    """Tokens at which `curve[key]` first falls to `target` or below (rises to it or above, with
    `higher`: an accuracy), interpolated; None if never."""
    prev = None
    for point in curve:
        if (point[key] >= target) if higher else (point[key] <= target):
            if prev is None or prev[key] == point[key]:
                return float(point["tokens"])
            frac = (prev[key] - target) / (prev[key] - point[key])
            return prev["tokens"] + frac * (point["tokens"] - prev["tokens"])
        prev = point
    return None


def ratios(rows: list[dict], key: str, higher: bool = False) -> dict[tuple[int, str], tuple[float, bool]]:
    """(R, reached) per (seed, arm) against the uniform arm of the same seed, on curve metric
    `key` (lower is better, or higher with `higher`); `reached` is False where R was measured at
    the arm's own final value."""
    out = {}
    for seed in sorted({r["seed"] for r in rows}):
        mine = {r["arm"]: r for r in rows if r["seed"] == seed}
        if BASELINE not in mine:
            raise SystemExit(f"seed {seed} has no '{BASELINE}' arm to compare with")
        base = mine[BASELINE]["curve"]
        for arm, row in mine.items():
            target, reached = base[-1][key], True
            t = tokens_to_target(row["curve"], key, target, higher)
            if t is None:  # never that far: compare where both curves get, the arm's final value
                target, reached = row["curve"][-1][key], False
                t = tokens_to_target(row["curve"], key, target, higher)
            # uniform gets to either target by its last point at the latest; an arm already there
            # at token 0 (a target at chance level) needs no tokens at all
            t_base = tokens_to_target(base, key, target, higher)
            out[(seed, arm)] = (t_base / t if t else float("inf"), reached)
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per arm: mean and spread over seeds of every reported figure."""
    r_ppl, r_macro = ratios(rows, "ppl"), ratios(rows, "macro_ppl")
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        entry = {"seeds": len(mine)}
        for name, get in (("final_ppl", lambda r: r["curve"][-1]["ppl"]),
                          ("macro_ppl", lambda r: r["curve"][-1]["macro_ppl"]),
                          ("worst_ppl", lambda r: r["curve"][-1]["worst_ppl"]),
                          ("train_s", lambda r: r["train_s"]),
                          ("overhead_s", lambda r: r["overhead_s"]),
                          ("prep_s", lambda r: r["prep_s"]),
                          ("wall_s", lambda r: r["train_s"] + r["overhead_s"] + r["prep_s"]),
                          # how the model grew (`growth=`): speed, memory, optimizer state
                          ("tokens_per_s", lambda r: r.get("tokens_per_s", float("nan"))),
                          ("peak_mem_mb", lambda r: r.get("peak_mem_mb", float("nan"))),
                          ("optimizer_state_mb", lambda r: r.get("optimizer_state_mb", float("nan")))):
            entry[name] = _stats([get(r) for r in mine])
        for name, table in (("R", r_ppl), ("R_macro", r_macro)):
            values = [table[(r["seed"], arm)] for r in mine]
            entry[name] = _stats([v for v, _ in values])
            entry[name + "_reached"] = f"{sum(ok for _, ok in values)}/{len(values)}"
        out[arm] = entry
    return out


def _fmt(stat: tuple[float, float], digits: int = 2) -> str:
    return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def _fmt_ratio(entry: dict, name: str) -> str:
    reached, n = entry[name + "_reached"].split("/")
    note = "" if reached == n else f" (at own final in {int(n) - int(reached)}/{n})"
    return _fmt(entry[name]) + note


def table(summary: dict[str, dict]) -> str:
    """Markdown table, one row per arm (mean ± std over seeds). Wall-clock = training (evaluation
    excluded) + the curriculum's own choices + the preparation the arm needs (`prep`)."""
    lines = ["| arm | R (held-out ppl) | R (macro per-topic ppl) | final ppl | macro ppl | worst-topic ppl "
             "| train s | curriculum s | prep s | wall-clock s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, e in summary.items():
        lines.append(f"| `{arm}` | {_fmt_ratio(e, 'R')} | {_fmt_ratio(e, 'R_macro')} | {_fmt(e['final_ppl'], 1)} | {_fmt(e['macro_ppl'], 1)} "
                     f"| {_fmt(e['worst_ppl'], 1)} | {_fmt(e['train_s'], 1)} | {_fmt(e['overhead_s'], 1)} "
                     f"| {e['prep_s'][0]:.0f} | {_fmt(e['wall_s'], 1)} |")
    return "\n".join(lines)


def headline(summary: dict[str, dict], arm: str = "nucleus") -> str:
    """The line RESULTS.md quotes: `tokens-to-target ratio (nucleus vs uniform): X.XX`."""
    e = summary.get(arm)
    if e is None:
        return f"tokens-to-target ratio ({arm} vs uniform): no such arm"
    reached, n = e["R_reached"].split("/")
    note = "" if reached == n else (f" (it never gets down to uniform's final perplexity in {int(n) - int(reached)} "
                                    f"of {n} seeds; there R is taken at its own final perplexity)")
    return f"tokens-to-target ratio ({arm} vs uniform): {e['R'][0]:.2f}{note}"


def plot(rows: list[dict], path: Path) -> None:
    """Held-out and macro per-topic perplexity against tokens, mean over seeds per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r["curve"] for r in rows if r["arm"] == arm]
        n = min(len(c) for c in mine)
        tokens = [statistics.fmean(c[i]["tokens"] for c in mine) / 1e6 for i in range(n)]
        for ax, key in zip(axes, ("ppl", "macro_ppl")):
            ax.plot(tokens, [statistics.fmean(c[i][key] for c in mine) for i in range(n)], label=arm)
    for ax, title in zip(axes, ("held-out perplexity (natural mixture)", "macro per-topic perplexity")):
        ax.set_xlabel("training tokens (M)")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+", help="JSON written by `benchmarks/curriculum.py run`")
    ap.add_argument("--plot", type=Path, help="write the perplexity-against-tokens plot here (PNG)")
    ap.add_argument("--json-out", type=Path, help="write the merged rows and their summary here")
    a = ap.parse_args()
    runs = [json.loads(path.read_text()) for path in a.results]
    rows = [row for run in runs for row in run["rows"]]
    seen = [(r["seed"], r["arm"]) for r in rows]
    if len(seen) != len(set(seen)):
        raise SystemExit(f"the same (seed, arm) appears twice in {[str(p) for p in a.results]}")
    summary = summarise(rows)
    print(table(summary))
    print()
    print(headline(summary))
    if a.plot:
        plot(rows, a.plot)
        print(f"plot: {a.plot}")
    if a.json_out:
        keep = {k: v for k, v in runs[0].items() if k not in ("rows", "summary", "seeds", "total_s", "command")}
        merged = {**keep, "commands": [r.get("command") for r in runs], "total_s": [r.get("total_s") for r in runs],
                  "seeds": sorted({r["seed"] for r in rows}), "summary": summary, "rows": rows}
        a.json_out.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
