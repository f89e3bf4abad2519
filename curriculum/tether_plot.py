"""The tethers note's picture of a training: a 3-D trajectory (two tracked parameters and the
loss, coloured by epoch, merge points marked), beside each pair's compatibility against the
steps of its checks. Reads plain rows (the training's logged rows with `tether/...` keys, and its
`tether_checks` ledger rows); needs only matplotlib."""

from __future__ import annotations

import numpy as np


def tether_figure(rows: list[dict], checks: list[dict], title: str = ""):
    """`rows`: logged rows of one training, each with step, train/loss, tether/p1, tether/p2,
    tether/epoch; `checks`: its `tether_checks` rows (step, layer, a, b, compat, decision)."""
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if "tether/p1" in r), key=lambda r: r["step"])
    fig = plt.figure(figsize=(13, 5))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    p1, p2 = np.array([r["tether/p1"] for r in rows]), np.array([r["tether/p2"] for r in rows])
    loss, epoch = np.array([r["train/loss"] for r in rows]), np.array([r["tether/epoch"] for r in rows])
    points = ax.scatter(p1, loss, p2, c=epoch, cmap="viridis", s=14, alpha=0.8)
    ax.plot(p1, loss, p2, color="grey", lw=0.5, alpha=0.5)
    merge_steps = sorted({c["step"] for c in checks if c["decision"] == "merge"})
    at = [i for i, r in enumerate(rows) if r["step"] in merge_steps]
    if at:
        ax.scatter(p1[at], loss[at], p2[at], marker="x", s=90, color="tab:red", label="tether merge")
        ax.legend(fontsize=8)
    fig.colorbar(points, ax=ax, shrink=0.6, pad=0.15, label="epoch")  # clear of the z label
    ax.set_xlabel("parameter 1 (first layer)")
    ax.set_ylabel("training loss")
    ax.set_zlabel("parameter 2 (last layer)")
    ax.set_title("trajectory")

    ax2 = fig.add_subplot(1, 2, 2)
    by_pair: dict[str, dict[int, list[float]]] = {}
    for c in checks:
        if c["b"]:
            by_pair.setdefault(f"{c['a']} | {c['b']}", {}).setdefault(c["step"], []).append(c["compat"])
    for pair, steps in sorted(by_pair.items())[:12]:  # the legend stays readable
        xs = sorted(steps)
        ax2.plot(xs, [float(np.mean(steps[x])) for x in xs], marker="o", ms=3, lw=1, label=pair)
    for s in merge_steps:
        ax2.axvline(s, color="tab:red", lw=0.6, ls=":")
    ax2.set_xlabel("step of the check")
    ax2.set_ylabel("compatibility (mean over layers)")
    ax2.set_title(f"{len(merge_steps)} check(s) with merges (dotted)")
    if by_pair:
        ax2.legend(fontsize=6)
    fig.suptitle(title or "tethers during training")
    return fig
