"""`nucleus report`: `reports/report.html` with the plots a researcher looks at first.

1. The topic graph in 2-D (PCA of the centroids): nucleus, explored neighbourhoods by round.
2. Held-out learning curves: natural-mixture perplexity against training tokens, per training.
3. Per-topic perplexity before (base) and after (the topic's own adapter).
4. Curiosity: predicted against realised learning progress, with Spearman rho.
5. A table of neighbourhoods: topics, passages, tokens, loss before/after, progress, forgetting.
6. A table of rabbit holes: each walk's path and its probe's progress, each generated text and
   the topics it landed in.
7. Adapter training dynamics: each neighbourhood's held-out perplexity under its adapter while
   it trains, with the merge points of `nucleus adapters merge` (tethers) marked.
8. The manifold sampler's space at the start and the end, with the roots' path.
9. Tethers during training: each tethered training's 3-D trajectory (two tracked parameters
   and the loss, coloured by epoch, merges marked) and its pairs' compatibility against steps.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from curriculum.curiosity import spearman
from curriculum.ledger import Ledger
from curriculum.neighborhood import NUCLEUS, check_nb_id
from pipeline import metrics_log
from pipeline import nucleate as nucleate_stage
from pipeline.atomic import atomic_path, atomic_write_text, read_json
from pipeline.config import NucleusConfig
from pipeline.workspace import Workspace


@dataclass
class ReportResult:
    path: str
    plots: list[str] = field(default_factory=list)
    spearman_rho: float = float("nan")

    def to_json(self) -> dict:
        return asdict(self)


def run(cfg: NucleusConfig, ws: Workspace) -> ReportResult:
    ws.require("index", "report")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out = ws.root / "reports"
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(ws.root / "ledger.sqlite") if (ws.root / "ledger.sqlite").is_file() else None
    proposals = ledger.proposals() if ledger else []
    holes = ledger.rabbit_holes() if ledger else []
    done = [p for p in proposals if p["status"] == "done"]
    plots = [_graph_plot(ws, out, done), _curves_plot(ws, out), _qa_plot(ws, out), _topic_plot(ws, out),
             _curiosity_plot(out, done), _adapters_plot(ws, out), *_manifold_plots(ws, out), *_tether_plots(ws, out)]
    plots = [p for p in plots if p]
    pairs = [(p["predicted"], p["progress"]) for p in done if p["predicted"] is not None]
    rho = spearman(*zip(*pairs)) if len(pairs) >= 3 else float("nan")
    path = out / "report.html"
    atomic_write_text(path, _html(ws, plots, done, rho, holes))
    return ReportResult(str(path), plots, rho)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path.name


def _graph_plot(ws: Workspace, out: Path, done: list[dict]) -> str:
    import matplotlib.pyplot as plt

    centroids = np.load(ws.topics_dir / "centroids.npy")
    centered = centroids - centroids.mean(0)
    xy = centered @ np.linalg.svd(centered, full_matrices=False)[2][:2].T  # PCA to 2-D
    graph = nucleate_stage.load_topic_graph(ws)
    fig, ax = plt.subplots(figsize=(7, 6))
    for e in graph.edges:
        a, b = e["source"], e["target"]
        style = {"color": "tab:red", "lw": 1.2, "ls": "--"} if e["kind"] == "knowledge" else {"color": "0.8", "lw": 0.7}
        ax.plot(xy[[a, b], 0], xy[[a, b], 1], zorder=1, **style)
    ax.scatter(xy[:, 0], xy[:, 1], s=60, c="0.85", edgecolors="0.5", zorder=2, label="unexplored")
    nucleus = nucleate_stage.load_neighborhood(ws, NUCLEUS)
    if nucleus:
        ax.scatter(xy[nucleus.topics, 0], xy[nucleus.topics, 1], s=140, c="gold", edgecolors="k", zorder=3,
                   label="nucleus")
    rounds = sorted({p["round"] for p in done})
    colors = plt.get_cmap("tab10").colors  # blue, orange, green, ...: none is the nucleus's gold
    for i, r in enumerate(rounds):
        topics = [t for p in done if p["round"] == r for t in p["topics"]]
        ax.scatter(xy[topics, 0], xy[topics, 1], s=90, color=colors[i % len(colors)], edgecolors="k", zorder=4, label=f"round {r}")
    for t in range(len(xy)):
        ax.annotate(str(t), xy[t], fontsize=7, ha="center", va="center", zorder=5)
    ax.set_title("Topic graph (PCA of centroids); dashed red = knowledge edges")
    ax.legend(fontsize=8, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, out / "topic_graph.png")


def _adapters_plot(ws: Workspace, out: Path) -> str | None:
    """Own-neighbourhood held-out perplexity of each adapter against its training tokens; the
    end of every merged member's curve is marked with its merge."""
    import matplotlib.pyplot as plt

    from curriculum.tethers import read_merges

    path = ws.logs_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    curves: dict[str, dict[int, float]] = {}
    for row in metrics_log.read(path):
        key = f"nb/{row.get('nb')}/ppl"
        if row.get("nb") not in (None, NUCLEUS) and key in row and (ws.root / "adapters" / row["nb"]).is_dir():
            curves.setdefault(row["nb"], {})[row["tokens"]] = row[key]  # the latest run wins per token count
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ends = {}
    for nb, pts in sorted(curves.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, lw=1.2, label=nb)
        ends[nb] = (xs[-1], pts[xs[-1]])
    merges = read_merges(ws.root / "ledger.sqlite")
    for i, m in enumerate(merges):
        pts = [ends[nb] for nb in m["members"] if nb in ends]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=":", color="tab:red", lw=1)  # one merge's members
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="X", s=90, color="tab:red", zorder=5,
                       label="merged (tethers)" if i == 0 else None)
            ax.annotate(m["merge_id"], pts[0], fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("training tokens of the adapter")
    ax.set_ylabel("held-out perplexity of its neighbourhood")
    ax.set_yscale("log")
    ax.set_title(f"Adapter training dynamics; {len(merges)} merge(s) marked" if merges
                 else "Adapter training dynamics (no merges yet: `nucleus adapters merge`)")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "adapters.png")


def _curves_plot(ws: Workspace, out: Path) -> str | None:
    import matplotlib.pyplot as plt

    path = ws.logs_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in metrics_log.read(path):
        if "heldout/ppl" in row:
            curves.setdefault(row["nb"], []).append((row["tokens"], row["heldout/ppl"]))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for nb, pts in curves.items():
        pts = sorted(dict(pts).items())  # the latest run of a training wins per token count
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=nb, lw=2.5 if nb == NUCLEUS else 1.2)
    ax.set_xlabel("training tokens of that run")
    ax.set_ylabel("held-out perplexity (natural mixture)")
    ax.set_yscale("log")
    ax.set_title("Held-out learning curves")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "learning_curves.png")


def _qa_plot(ws: Workspace, out: Path) -> str | None:
    """Question accuracy against training tokens, per training (runs with a question set)."""
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, float]] = {}
    chance = None
    for row in metrics_log.read(ws.logs_dir / "metrics.jsonl"):
        if "qa/acc" in row:
            curves.setdefault(row["nb"], {})[row["tokens"]] = row["qa/acc"]  # the latest run wins per count
            chance = row.get("qa/chance", chance)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for nb, pts in curves.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, label=nb, lw=2.5 if nb == NUCLEUS else 1.2)
    if chance is not None:
        ax.axhline(chance, color="0.5", ls=":", label="chance")
    ax.set_xlabel("training tokens of that run")
    ax.set_ylabel("held-out question accuracy (qa/acc)")
    ax.set_title("Questions about the known graph, by training")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "question_accuracy.png")


def _qa_summary(ws: Workspace) -> str:
    """The report's lines on a known-graph run: final question accuracy and topic quality."""
    last: dict[str, dict] = {}
    for row in metrics_log.read(ws.logs_dir / "metrics.jsonl"):
        if "qa/acc" in row:
            last[row["nb"]] = row
    quality = ws.root / "qa" / "topics.json"
    parts = []
    if quality.is_file():
        q = read_json(quality)
        parts.append(f"<p>Topics against the corpus's true communities: NMI {q['nmi']:.3f}, purity {q['purity']:.3f} "
                     f"({q['topics']} topics, {q['communities']} communities).</p>")
    if last:
        keys = [k for k in ("qa/acc", "qa/em", "qa/acc_1hop", "qa/acc_2hop", "qa/acc_nucleus", "qa/acc_near",
                            "qa/acc_far", "qa/chance") if any(k in r for r in last.values())]
        head = "".join(f"<th>{k}</th>" for k in keys)
        rows = "".join(f"<tr><td>{html.escape(nb)}</td>" + "".join(
            f"<td>{r[k]:.3f}</td>" if k in r else "<td></td>" for k in keys) + "</tr>" for nb, r in last.items())
        parts.append(f"<table><tr><th>training</th>{head}</tr>{rows}</table>")
    return "<h2>Questions</h2>" + "".join(parts) if parts else ""


def _topic_plot(ws: Workspace, out: Path) -> str | None:
    import matplotlib.pyplot as plt

    before, after = {}, {}
    for info_path in sorted((ws.root / "adapters").glob("*/neighborhood.json")):
        info = read_json(info_path)
        res = info.get("result")
        if res is None:  # a merge (`nucleus adapters merge`): not trained, no before/after
            continue
        for t in info["topics"]:
            key = f"topic/{t}/ppl"
            if key in res["metrics"] and key in res.get("metrics_before", {}) and (
                    t not in after or res["metrics"][key] < after[t]):
                before[t], after[t] = res["metrics_before"][key], res["metrics"][key]
    if not after:
        return None
    topics = sorted(after)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(topics)), 4))
    pos = np.arange(len(topics))
    ax.bar(pos - 0.2, [before[t] for t in topics], 0.4, label="base (before)", color="0.6")
    ax.bar(pos + 0.2, [after[t] for t in topics], 0.4, label="its adapter (after)", color="tab:blue")
    ax.set_xticks(pos, [str(t) for t in topics])
    ax.set_xlabel("topic")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Per-topic perplexity before and after its neighbourhood's adapter")
    ax.legend()
    return _save(fig, out / "topic_perplexity.png")


def _manifold_plots(ws: Workspace, out: Path) -> list[str]:
    """One figure per training that used the manifold sampler (`logs/manifold-<nb>.json`)."""
    from curriculum.manifold_plot import manifold_figure

    plots = []
    for path in sorted(ws.logs_dir.glob("manifold-*.json")):
        summary = read_json(path)
        nb_id = check_nb_id(path.stem.removeprefix("manifold-"))
        fig = manifold_figure(summary, f"{nb_id}: the manifold sampler's {summary['space']} space "
                                       f"({summary['traversal']})")
        plots.append(_save(fig, out / f"manifold-{nb_id}.png"))
    return plots


def _tether_plots(ws: Workspace, out: Path) -> list[str]:
    """One figure per training with tethers during training (`tethers.during`): its trajectory
    and its pairs' compatibility (the ledger's `tether_checks`)."""
    from curriculum.plateau_tethers import read_checks
    from curriculum.tether_plot import tether_figure

    path = ws.logs_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows: dict[str, list[dict]] = {}
    for row in metrics_log.read(path):
        if "tether/p1" in row:
            rows.setdefault(row["nb"], []).append(row)
    checks: dict[str, list[dict]] = {}
    for c in read_checks(ws.root / "ledger.sqlite"):
        checks.setdefault(c["training"], []).append(c)
    plots = []
    for training in sorted(rows):
        name = training if training == "_joint" else check_nb_id(training)  # `_joint`: train --joint
        fig = tether_figure(rows[training], checks.get(training, []),
                            f"{name}: tethers during training (merges marked)")
        plots.append(_save(fig, out / f"tethers-{name}.png"))
    return plots


def _curiosity_plot(out: Path, done: list[dict]) -> str | None:
    import matplotlib.pyplot as plt

    pts = [(p["predicted"], p["progress"], p["round"]) for p in done if p["predicted"] is not None]
    if not pts:
        return None
    pred, real, rounds = map(np.asarray, zip(*pts))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sc = ax.scatter(pred, real, c=rounds, cmap="viridis", s=50, edgecolors="k")
    fig.colorbar(sc, ax=ax, label="round")
    rho = spearman(pred, real)
    ax.set_xlabel("predicted learning progress (curiosity model)")
    ax.set_ylabel("realised learning progress (nats / 1k tokens)")
    ax.set_title(f"Curiosity vs realised progress (Spearman rho = {rho:.2f})")
    return _save(fig, out / "curiosity.png")


def _holes_table(holes: list[dict]) -> str:
    def row(h: dict) -> str:
        if h["kind"] == "walk":
            what = f"walk {' → '.join(map(str, h['path']))}; probe of topic {h['topic']}"
            result = "" if h["progress"] is None else f"{h['progress']:+.4f} / 1k tok"
        else:
            what = f"from topic {h['topic']}: “{html.escape((h['text'] or '')[:160])}”"
            result = f"landed in {h['path']}" if h["path"] else "landed in explored topics only"
        return f"<tr><td>{h['round']}</td><td>{h['kind']}</td><td style='text-align:left'>{what}</td><td>{result}</td></tr>"

    if not holes:
        return "<p>None.</p>"
    return ("<table><tr><th>round</th><th>kind</th><th>rabbit hole</th><th>result</th></tr>"
            + "".join(row(h) for h in holes) + "</table>")


def _html(ws: Workspace, plots: list[str], done: list[dict], rho: float, holes: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{p['round']}</td><td>{html.escape(p['nb_id'])}</td><td>{p['topics']}</td><td>{p['passages']}</td>"
        f"<td>{p['tokens']:,}</td><td>{p['loss_before']:.3f}</td><td>{p['loss_after']:.3f}</td>"
        f"<td>{p['progress']:+.4f}</td><td>{p['forgetting']:+.4f}</td></tr>" for p in done)
    images = "".join(f'<figure><img src="{name}" alt="{name}"></figure>' for name in plots)
    rho_text = "n/a (fewer than 3 predictions)" if rho != rho else f"{rho:.3f}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Nucleus report: {html.escape(ws.root.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>Nucleus report: {html.escape(ws.root.name)}</h1>
<p>Curiosity model: Spearman rho between predicted and realised learning progress = {rho_text}.</p>
<h2>Neighbourhoods</h2>
<table><tr><th>round</th><th>neighbourhood</th><th>topics</th><th>passages</th><th>tokens</th><th>loss before</th>
<th>loss after</th><th>progress / 1k tok</th><th>nucleus forgetting</th></tr>{rows}</table>
{_qa_summary(ws)}
<h2>Rabbit holes</h2>{_holes_table(holes)}
<h2>Plots</h2>{images}</body></html>
"""
