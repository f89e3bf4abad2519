"""The manifold in a figure: the blocks in 2-D at the start and at the end, coloured by topic,
with the roots' path (for `grow`, the order the clusters opened in). Reads
`ManifoldSampler.summary()` (plain JSON), needs only matplotlib: `nucleus report` and
`benchmarks/curriculum_report.py` both draw it."""

from __future__ import annotations

import numpy as np


def manifold_figure(summary: dict, title: str = ""):
    """A matplotlib figure with one panel per snapshot (`start`, `end`); `title` is followed by
    what the colours and the line mean."""
    import matplotlib.pyplot as plt

    shots = [(name, summary["snapshots"][name]) for name in ("start", "end") if name in summary["snapshots"]]
    fig, axes = plt.subplots(1, len(shots), figsize=(6 * len(shots), 5), squeeze=False)
    path = np.asarray(summary["path"])
    grow = summary["traversal"] == "grow"  # no roots: the line is the order the clusters opened in
    for ax, (name, shot) in zip(axes[0], shots):
        xy, topics = np.asarray(shot["xy"]), np.asarray(shot["topics"])
        ax.scatter(xy[:, 0], xy[:, 1], c=topics, cmap="tab20", s=6, alpha=0.7, linewidths=0)
        centres = np.asarray(shot["centroids_xy"])
        if grow:  # every cluster in the order it opened, the star on the first
            roots = np.asarray(summary.get("open_order", []), dtype=int)[::-1]
        else:  # the roots of the batches drawn up to this snapshot (at most the last 200), on the
            # snapshot's cluster centres: where the traversal went in this space
            roots = path[:shot["step"]][-200:] if name == "end" else path[:summary.get("rebuild_every", 100)][:200]
        if len(roots) and len(centres):
            pts = centres[np.clip(roots, 0, len(centres) - 1)]
            ax.plot(pts[:, 0], pts[:, 1], "-", color="k", lw=0.6, alpha=0.5)
            ax.scatter(pts[-1:, 0], pts[-1:, 1], marker="*", s=120, color="k")
        ax.set_title(f"{name} (batch {shot['step']}): topic agreement {shot['topic_agreement']:.2f}")
        ax.set_xticks([])
        ax.set_yticks([])
    line = "line = the order the clusters opened, star = the first" if grow else "line = roots' path"
    title = title or f"manifold: {summary['space']} space, {summary['traversal']} traversal"
    fig.suptitle(f"{title} (colour = topic, {line})")
    return fig
