"""The MNIST suite's figures (and the curve helpers both suites' figures use), drawn from a
results JSON alone: loss curves with seed bands, test accuracy bars, flatness against test
accuracy, the long-horizon curves. PNGs are written without a timestamp, so the same JSON
gives the same bytes."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from flatl2o.evaluation.stats import (
    Stats,
    aggregate,
    flatness_points,
    horizons_of,
    optimizer_order,
)

__all__ = ["log_band", "longest_per_seed", "smooth", "write_plots"]


def _colors(data: dict[str, Any]) -> dict[str, Any]:
    import matplotlib

    names = optimizer_order(data)
    if len(names) <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {n: cmap(i) for i, n in enumerate(names)}
    cmap = matplotlib.colormaps["tab20"]  # dark shades first, then the light ones
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {n: cmap(order[i % 20]) for i, n in enumerate(names)}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` values (fewer at the start)."""
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def longest_per_seed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per seed among ``runs`` that recorded a curve: the one trained longest (a
    baseline may have one run per horizon), in the order the seeds first appear."""
    by_seed: dict[int, dict[str, Any]] = {}
    for r in runs:
        s = r["spec"]["seed"]
        if not r.get("curve"):
            continue
        if s not in by_seed or max(r["spec"]["horizons"]) > max(by_seed[s]["spec"]["horizons"]):
            by_seed[s] = r
    return list(by_seed.values())


def log_band(
    curves: list[list[float]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Point index, geometric mean and ± 1 std band across ``curves`` of their positive finite
    values (the band of log values, for a log-scale plot); indices without one are skipped."""
    n = max((len(c) for c in curves), default=0)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        vals = [math.log(c[i]) for c in curves if i < len(c) and math.isfinite(c[i]) and c[i] > 0]
        if not vals:
            continue
        st = Stats.of(vals)
        xs.append(i)
        mean.append(math.exp(st.mean))
        lo.append(math.exp(st.mean - st.std))
        hi.append(math.exp(st.mean + st.std))
    return xs, mean, lo, hi


def _curve_plot(ax: Any, data: dict[str, Any], runs: list[dict[str, Any]], colors: dict) -> None:
    for opt in optimizer_order(data):
        mine = longest_per_seed([r for r in runs if r["spec"]["optimizer"] == opt])
        if not mine:
            continue
        every = max(r["curve_every"] for r in mine)
        curves = []
        for r in mine:
            c = [math.nan if v is None else v for v in r["curve"]]
            curves.append(smooth(c, max(1, len(c) // 50)))
        idx, mean, lo, hi = log_band(curves)
        xs = [(i + 1) * every for i in idx]
        style = "-" if data["optimizers"][opt]["kind"] == "learned" else "--"
        ax.plot(xs, mean, style, color=colors[opt], lw=1.2, label=opt)
        ax.fill_between(xs, lo, hi, color=colors[opt], alpha=0.2, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("minibatch loss (geometric mean ± std)")
    ax.grid(True, alpha=0.3)


def write_plots(data: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the PNG figures into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = _colors(data)
    agg = aggregate(data)
    order = optimizer_order(data)
    tasks = data["config"]["tasks"]
    written: list[Path] = []
    meta = {"Software": None}

    def save(fig: Any, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110, metadata=meta)
        plt.close(fig)
        written.append(path)

    for task in tasks:
        runs = [r for r in data["runs"] if r["spec"]["task"] == task]
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        _curve_plot(ax, data, runs, colors)
        ax.set_title(f"{task}: minibatch loss over seeds")
        ax.legend(fontsize=7, ncol=2)
        save(fig, f"loss_curves_{task}.png")

    for h in horizons_of(data):
        fig, ax = plt.subplots(
            figsize=(max(7.0, 2.0 + 0.2 * len(tasks) * len(order)), 4.2), layout="constrained"
        )
        width = 0.8 / max(len(order), 1)
        for j, opt in enumerate(order):
            xs, ms, ss = [], [], []
            for i, task in enumerate(tasks):
                cell = agg.get((task, opt, h))
                if cell is None or cell["test_accuracy"].n == 0:
                    continue
                xs.append(i + (j - (len(order) - 1) / 2) * width)
                ms.append(cell["test_accuracy"].mean)
                ss.append(cell["test_accuracy"].std)
            ax.bar(xs, ms, width, yerr=ss, color=colors[opt], label=opt, capsize=2)
        vals = [
            c["test_accuracy"].mean
            for (t, o, hh), c in agg.items()
            if hh == h and c["test_accuracy"].n
        ]
        if vals:
            ax.set_ylim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.03))
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"test accuracy after {h} steps (mean ± std over seeds)")
        fig.legend(fontsize=7, loc="outside right upper")
        ax.grid(True, axis="y", alpha=0.3)
        save(fig, f"test_accuracy_{h}.png")

        fig, axes = plt.subplots(
            1,
            len(tasks),
            figsize=(max(6.0, 3.8 * len(tasks)), 4.0),
            layout="constrained",
            squeeze=False,
        )
        for ax, task in zip(axes[0], tasks, strict=True):
            omitted = 0  # measured runs a log axis cannot show (trace <= 0 or non-finite)
            for opt in order:
                pts, left_out = flatness_points(data, task, opt, h)
                omitted += left_out
                if pts:
                    kind = data["optimizers"][opt]["kind"]
                    ax.scatter(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        s=18,
                        color=colors[opt],
                        marker="o" if kind == "learned" else "^",
                        label=opt,
                    )
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("Hessian trace (full train split)")
            note = f"\n({omitted} runs not shown: trace ≤ 0 or non-finite)" if omitted else ""
            ax.set_title(task + note, fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("test accuracy")
        with_points = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
        if with_points:
            with_points[-1].legend(fontsize=6)
        for ax in axes[0]:
            if not ax.get_legend_handles_labels()[0]:
                ax.text(
                    0.5,
                    0.5,
                    "flatness not measured",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    fontsize=8,
                    color="gray",
                )
        fig.suptitle(f"flatness vs test accuracy after {h} steps (one point per run)", fontsize=10)
        save(fig, f"flatness_vs_accuracy_{h}.png")

    for task in data["config"].get("long_tasks", []) if data.get("long_runs") else []:
        runs = [r for r in data["long_runs"] if r["spec"]["task"] == task]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        _curve_plot(ax, data, runs, colors)
        ax.set_xscale("log")
        ax.set_title(f"{task}: long horizon, minibatch loss over seeds")
        ax.legend(fontsize=7, ncol=2)
        save(fig, f"long_{task}.png")
    return written
