"""The meta-training plot: a run's ``log.jsonl`` drawn as ``meta_training.png``.

Written by :meth:`flatl2o.meta.trainer.MetaTrainer.finish` and redrawn from any log with
:func:`plot_log`; matplotlib is optional (no plot without it).
"""

from __future__ import annotations

import json
from pathlib import Path


def plot_log(log: Path, out: Path) -> Path | None:
    """Plot meta-loss, regularizer and validation loss from a run's JSONL log (if matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    keys = [
        k
        for k in ("meta_loss", "regularizer", "imitation", "val_loss")
        if any(r.get(k) is not None for r in records)
    ]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["iteration"], r[key]) for r in records if r.get(key) is not None]
        # a line needs two points: a series of one or two is drawn with visible markers
        marker = "o" if len(pts) < 3 else "." if key == "val_loss" else None
        ax.plot(*zip(*pts, strict=True), marker=marker)
        ax.set_title(key)
        ax.set_xlabel("trajectory")
        if key != "regularizer" and all(v > 0 for _, v in pts):
            ax.set_yscale("log")  # only when every value can be drawn on a log axis
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
