"""Turn a results JSON of ``flatl2o evaluate`` into tables, plots and a results page.

Everything here is a pure function of the JSON written by :func:`flatl2o.evaluation.evaluate`
(no clock, no randomness), so regenerating from the same JSON gives the same bytes. The page
(:func:`render_markdown`) is the generic report: the setup, the figures, the baselines' tuned
hyper-parameters, mean ± sample std of every metric per (task, optimizer, horizon) with the
diverged runs counted, and the long-horizon runs. A study adds its own sections after the setup
(``questions=``; the repository's ``research/results_page.py`` renders docs/results.md that
way). Statistics are :mod:`flatl2o.evaluation.stats`'s. The top eigenvalue is reported as
``|λ_max|`` (docs/method.md §4), and only where power iteration converged: a value whose
relative residual exceeds :data:`EIG_RESIDUAL_TOL` is left out and counted as "unconverged".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# the statistics, re-exported for the callers that import them from here (the demo's
# verdict, benchmarks/meta_seeds.py); their home is flatl2o.evaluation.stats
from flatl2o.evaluation.stats import Stats, diverged_runs, paired, paired_metric, per_seed

__all__ = [
    "Stats",
    "aggregate",
    "paired",
    "paired_metric",
    "per_seed",
    "render_markdown",
    "write_plots",
    "write_report",
]

#: The generic page's title.
TITLE = "Evaluation results"
#: Baselines in the order the tables list them.
BASELINE_ORDER = ("adam", "sgd", "sam-sgd", "sam-adam", "entropy-sgd")
METRICS = (
    ("train_loss", "train loss"),
    ("test_loss", "test loss"),
    ("test_accuracy", "test acc"),
    ("gap", "gap"),
    ("hessian_trace", "tr H"),
    ("hessian_top_eig", "\\|λ_max\\|"),  # escaped: a bare | splits a markdown table cell
)
#: A top eigenvalue whose recorded relative power-iteration residual ‖Hv − λv‖/|λ|
#: (``hessian_top_eig_residual``) exceeds this did not converge: it is left out of the |λ_max|
#: statistics and counted as "unconverged".
EIG_RESIDUAL_TOL = 0.1

# ------------------------------------------------------------------------ aggregation


def horizons_of(data: dict[str, Any]) -> list[int]:
    """The evaluation horizons of a results file."""
    return sorted(int(h) for h in data["config"]["horizons"])


def optimizer_order(data: dict[str, Any]) -> list[str]:
    """Learned rules (sorted: plain before regularized siblings), then baselines."""
    opts = data["optimizers"]
    learned = sorted(
        (n for n, o in opts.items() if o["kind"] == "learned"),
        key=lambda n: (opts[n].get("sibling") or n, opts[n].get("sibling") is not None, n),
    )
    base = [n for n in BASELINE_ORDER if n in opts]
    return learned + base + sorted(n for n in opts if n not in learned and n not in base)


def top_eig_stats(
    data: dict[str, Any], task: str, opt: str, horizon: int, kind: str = "runs"
) -> Stats:
    """Statistics of ``|λ_max|`` over the runs whose power iteration converged.

    A value whose recorded relative residual ``hessian_top_eig_residual`` (‖Hv − λv‖/|λ|)
    exceeds :data:`EIG_RESIDUAL_TOL` is left out and counted in ``n_unconverged`` (a run
    without a finite residual is kept).
    """
    eig = per_seed(data, task, opt, horizon, "hessian_top_eig", kind)
    res = per_seed(data, task, opt, horizon, "hessian_top_eig_residual", kind)
    kept, unconverged = [], 0
    for s in sorted(eig):
        lam = abs(eig[s])
        r = res.get(s, math.nan)
        if math.isfinite(lam) and math.isfinite(r) and r > EIG_RESIDUAL_TOL:
            unconverged += 1
        else:
            kept.append(lam)  # non-finite |λ| are counted as n/a by Stats.of
    st = Stats.of(kept)
    return Stats(st.mean, st.std, st.n, st.n_nan, unconverged)


def aggregate(data: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Stats]]:
    """``{(task, optimizer, horizon): {metric: Stats}}`` over the evaluation seeds
    (``hessian_top_eig`` is ``|λ_max|`` of the converged runs, see :func:`top_eig_stats`)."""
    out: dict[tuple[str, str, int], dict[str, Stats]] = {}
    names = [m for m, _ in METRICS] + ["train_accuracy"]
    for task in data["config"]["tasks"]:
        for opt in optimizer_order(data):
            for h in horizons_of(data):
                cell = {m: Stats.of(list(per_seed(data, task, opt, h, m).values())) for m in names}
                cell["hessian_top_eig"] = top_eig_stats(data, task, opt, h)
                if cell["test_accuracy"].n or cell["test_accuracy"].n_nan:
                    out[(task, opt, h)] = cell
    return out


# ------------------------------------------------------------------------ markdown


def pct(x: float) -> str:
    """A difference of fractions in percentage points (``+1.2 pp``; ``n/a`` if not finite)."""
    return f"{100 * x:+.1f} pp" if math.isfinite(x) else "n/a"


def task_label(data: dict[str, Any], task: str) -> str:
    """```task` (seen)`` or ``(unseen)``: whether the learned rules were meta-trained on it."""
    return f"`{task}` ({'seen' if data['tasks'].get(task, {}).get('seen') else 'unseen'})"


def _role(info: dict[str, Any]) -> str:
    if not info.get("seen"):
        return "unseen"
    by = info.get("seen_by")
    return f"seen (meta-training task{' of ' + ', '.join(f'`{n}`' for n in by) if by else ''})"


def _setup(data: dict[str, Any]) -> list[str]:
    cfg = data["config"]
    env = data.get("environment", {})
    timing = data.get("timing", {})
    lines = ["## Setup", ""]
    lines.append(
        f"- Seeds: {cfg['seeds']} evaluation seeds (0..{cfg['seeds'] - 1}), the same for every "
        "optimizer: each seed fixes the optimizee's initialization and its minibatch stream "
        f"(batch {cfg['batch_size']}, drawn with replacement from the train split)."
    )
    lines.append(
        f"- Horizons: {', '.join(str(h) for h in horizons_of(data))} optimizer steps"
        + (
            f"; long-horizon runs of {cfg['long_horizon']} steps on "
            f"{', '.join(f'`{t}`' for t in cfg['long_tasks'])} ({cfg['long_seeds']} seeds)."
            if cfg.get("long_horizon")
            else "; no long-horizon runs in this file."
        )
    )
    lines.append(
        "- Metrics at each horizon, on the final iterate: loss on the FULL train split, test "
        "loss and accuracy, generalization gap = test loss − train loss, Hutchinson trace of "
        "the full-train-split Hessian (Rademacher probes) and |λ_max|, the absolute value of its "
        "top eigenvalue by power iteration (Rayleigh quotient); a |λ_max| whose relative "
        f"residual ‖Hv − λv‖/|λ| exceeds {EIG_RESIDUAL_TOL:g} did not converge and is left out "
        'of the means (counted as "unconverged"). A mean that leaves out non-finite values '
        '(diverged runs) says how many ("n/a").'
    )
    flat = ", ".join(
        (f"`{t}`: {p} probes / {i} iterations" if p and i else f"`{t}`: not measured")
        for t, (p, i) in sorted(
            {
                t: tuple(cfg["flatness"].get(t, (cfg["trace_probes"], cfg["eig_iters"])))
                for t in cfg["tasks"]
            }.items()
        )
    )
    lines.append(f"- Flatness budget: {flat}.")
    lines.append(
        f"- Baselines: hyper-parameters chosen on the validation split ({cfg['tune_seeds']} "
        "tuning seeds disjoint from the evaluation seeds, best mean validation accuracy, per "
        "task and horizon), never on the test split. Learned rules run with lr = 1.0 as shipped."
    )
    if env:
        lines.append(
            f"- Software: flatl2o {env.get('flatl2o')}, torch {env.get('torch')}, git commit "
            f"`{(env.get('git_commit') or 'unknown')[:12]}`; {env.get('jobs')} worker "
            f"process(es) × {env.get('threads_per_job')} thread(s) on a {env.get('cpu_count')}"
            "-CPU machine."
        )
    if timing:
        cpu = timing.get("run_cpu_seconds", {})
        lines.append(
            f"- Runtime: {timing['wall_seconds'] / 60:.1f} min wall; CPU time of the runs: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in sorted(cpu.items()))
            + (
                f" ({timing['runs_reused']} runs reused from an earlier invocation, so the wall "
                "time covers only the rest)."
                if timing.get("runs_reused")
                else "."
            )
        )
    if not data.get("complete", True):
        lines.append("- **This file is incomplete (a partial snapshot of a running evaluation).**")
    lines += ["", "Optimizees:", "", "| task | parameters | role |", "|---|---|---|"]
    for t in cfg["tasks"]:
        info = data["tasks"].get(t, {})
        lines.append(
            f"| `{t}` | {info.get('num_params', '?')} | "
            f"{_role(info)}: "
            f"{info.get('description', '')} |"
        )
    lines += ["", "Optimizers:", "", "| optimizer | kind | what |", "|---|---|---|"]
    for n in optimizer_order(data):
        o = data["optimizers"][n]
        what = o["description"]
        if o["kind"] == "learned":
            reg = "none" if o["regularizer"] == "none" else f"{o['regularizer']} (α {o['alpha']:g})"
            what = f"{o['architecture']}, regularizer {reg}" + (
                f"; sibling `{o['sibling']}` (by {o['sibling_basis']})" if o.get("sibling") else ""
            )
        lines.append(f"| `{n}` | {o['kind']} | {what} |")
    lines.append("")
    return lines


def _tuned_table(data: dict[str, Any]) -> list[str]:
    hp = data.get("hparams", {})
    rows = []
    edges = grown = 0
    for task in data["config"]["tasks"]:
        for opt in BASELINE_ORDER:
            chosen = hp.get(task, {}).get(opt)
            if not chosen:
                continue
            entry = data.get("tuning", {}).get(task, {}).get(opt, {})
            at_edge = entry.get("at_edge", {})
            cells = []
            for h in horizons_of(data):
                edge = at_edge.get(str(h), [])
                edges += len(edge)
                cells.append(
                    ", ".join(
                        f"{k} {v:g}" + (" (edge)" if k in edge else "")
                        for k, v in sorted(chosen[str(h)].items())
                    )
                )
            tried = entry.get("tried", {})
            extra = {
                k: [v for v in values if v not in entry.get("grid", {}).get(k, values)]
                for k, values in tried.items()
            }
            extra = {k: v for k, v in extra.items() if v}
            grown += bool(extra)
            note = "; ".join(
                f"{k} also {', '.join(f'{v:g}' for v in vs)}" for k, vs in extra.items()
            )
            rows.append(f"| `{task}` | `{opt}` | " + " | ".join(cells) + f" | {note or '–'} |")
    if not rows:
        return []
    hs = horizons_of(data)
    return [
        "Selected hyper-parameters (validation split). Where a selection sat at an end of its "
        "grid, the grid grew one step past that end (last column: the values added); "
        '"(edge)" marks a selection still at an end of what was tried, where the optimum may '
        f"lie beyond the search ({edges} such selection(s); {grown} grid(s) grew).",
        "",
        "| task | baseline | " + " | ".join(f"@{h}" for h in hs) + " | grid grown |",
        "|---|---|" + "---|" * len(hs) + "---|",
        *rows,
        "",
    ]


def measured(data: dict[str, Any], task: str, opt: str, horizon: int) -> bool:
    """Whether any run of (task, optimizer) recorded a flatness readout at ``horizon`` (a
    non-finite one included; an absent key means the suite's budget did not measure it)."""
    for r in data.get("runs", []):
        s = r["spec"]
        if s["task"] == task and s["optimizer"] == opt and horizon in s["horizons"]:
            if "hessian_trace" in r["metrics"].get(str(horizon), {}):
                return True
    return False


def flatness_points(
    data: dict[str, Any], task: str, opt: str, horizon: int
) -> tuple[list[tuple[float, float]], int]:
    """The (Hessian trace, test accuracy) points a log-scale scatter can show, and how many
    measured runs it cannot (trace <= 0 or a non-finite value), so the figure can say so."""
    tr = per_seed(data, task, opt, horizon, "hessian_trace")
    acc = per_seed(data, task, opt, horizon, "test_accuracy")
    pts = [
        (tr[s], acc[s])
        for s in sorted(tr)
        if s in acc and math.isfinite(tr[s]) and tr[s] > 0 and math.isfinite(acc[s])
    ]
    return pts, (len(tr) - len(pts) if measured(data, task, opt, horizon) else 0)


def _full_tables(data: dict[str, Any], agg: dict) -> list[str]:
    lines = ["## Full results", "", "Mean ± sample std over seeds at each horizon.", ""]
    for h in horizons_of(data):
        for task in data["config"]["tasks"]:
            rows = [o for o in optimizer_order(data) if (task, o, h) in agg]
            if not rows:
                continue
            lines += [
                f"### {task_label(data, task)}, {h} steps",
                "",
                "| optimizer | " + " | ".join(label for _, label in METRICS) + " | diverged |",
                "|---|" + "---|" * (len(METRICS) + 1),
            ]
            for o in rows:
                cell = agg[(task, o, h)]
                vals = [cell[m].fmt(3, sig=m.startswith("hessian")) for m, _ in METRICS]
                div = diverged_runs(data, task, o, h)
                lines.append(f"| `{o}` | " + " | ".join(vals) + f" | {div} |")
            lines.append("")
    return lines


def _long(data: dict[str, Any], fig: str) -> list[str]:
    runs = data.get("long_runs", [])
    if not runs:
        return []
    cfg = data["config"]
    lines = [
        f"## Long horizon ({cfg['long_horizon']} steps)",
        "",
        "Baselines keep the hyper-parameters tuned for the largest evaluation horizon. Test "
        "accuracy (mean over seeds) at each checkpoint; the verdict compares the end of the run "
        f"with step {max(horizons_of(data))}.",
        "",
    ]
    for task in cfg["long_tasks"]:
        marks = sorted(
            {h for r in runs if r["spec"]["task"] == task for h in r["spec"]["horizons"]}
        )
        opts = [
            o
            for o in optimizer_order(data)
            if any(r["spec"]["task"] == task and r["spec"]["optimizer"] == o for r in runs)
        ]
        if not opts:
            continue
        lines += [
            f"### `{task}`",
            "",
            "| optimizer | "
            + " | ".join(f"acc@{m}" for m in marks)
            + " | train loss: ref → end | verdict |",
            "|---|" + "---|" * (len(marks) + 2),
        ]
        ref = max(h for h in horizons_of(data) if h <= marks[-1])
        for o in opts:
            acc = [
                Stats.of(list(per_seed(data, task, o, m, "test_accuracy", "long_runs").values()))
                for m in marks
            ]
            tr0 = Stats.of(list(per_seed(data, task, o, ref, "train_loss", "long_runs").values()))
            tr1 = Stats.of(
                list(per_seed(data, task, o, marks[-1], "train_loss", "long_runs").values())
            )
            te0 = Stats.of(list(per_seed(data, task, o, ref, "test_loss", "long_runs").values()))
            te1 = Stats.of(
                list(per_seed(data, task, o, marks[-1], "test_loss", "long_runs").values())
            )
            div = diverged_runs(data, task, o, marks[-1], "long_runs")
            verdict = _long_verdict(
                acc[marks.index(ref)].mean,
                acc[-1].mean,
                tr0.mean,
                tr1.mean,
                te0.mean,
                te1.mean,
                div,
            )
            lines.append(
                f"| `{o}` | "
                + " | ".join(a.fmt_mean() for a in acc)
                + f" | {tr0.fmt_mean('.3g')} → {tr1.fmt_mean('.3g')} | {verdict} |"
            )
        lines.append("")
        lines.append(f"![long-horizon loss curves]({fig}/long_{task}.png)")
        lines.append("")
    return lines


def _long_verdict(
    acc0: float, acc1: float, tr0: float, tr1: float, te0: float, te1: float, diverged: int
) -> str:
    if diverged:
        return f"diverged ({diverged} seed(s))"
    if not all(math.isfinite(v) for v in (acc0, acc1, tr0, tr1)):
        return "n/a"
    parts = []
    parts.append(
        "train loss keeps falling"
        if tr1 < 0.95 * tr0
        else "train loss rises"
        if tr1 > 1.05 * tr0
        else "train loss flat"
    )
    if acc1 > acc0 + 0.005:
        parts.append(f"test acc improves ({pct(acc1 - acc0)})")
    elif acc1 < acc0 - 0.005:
        parts.append(f"test acc degrades ({pct(acc1 - acc0)})")
    else:
        parts.append("test acc flat")
    if math.isfinite(te0) and math.isfinite(te1) and te1 > 1.1 * te0:
        parts.append("test loss grows (overfitting)")
    return "; ".join(parts)


def render_markdown(
    data: dict[str, Any],
    fig: str = ".",
    command: str | None = None,
    *,
    title: str = TITLE,
    generator: str = __name__,
    questions: Callable[[dict[str, Any], dict], list[str]] | None = None,
) -> str:
    """The results page: setup, figures, tuned hyper-parameters, full tables, long horizon.

    ``fig`` is the path from the page to the folder holding the PNGs; ``command`` the command
    that regenerates the page (shown at the top); ``generator`` names what wrote it.
    ``questions(data, aggregate(data))``, when given, returns a study's own sections (markdown
    lines), placed after the setup.
    """
    agg = aggregate(data)
    hs = horizons_of(data)
    lines = [
        f"# {title}",
        "",
        f"<!-- generated by {generator} from the results JSON; do not edit -->",
        "",
    ]
    if command:
        lines += [f"Regenerate this page from the results JSON with `{command}`."]
    if data.get("command"):
        lines += [f"The results were produced by `{data['command']}`."]
    lines.append("")
    warnings = []
    if data["config"]["seeds"] < 5:
        warnings.append(f"only {data['config']['seeds']} seeds (the protocol asks for at least 5)")
    if not data.get("complete", True):
        warnings.append("the results file is a partial snapshot")
    if warnings:
        lines += [f"> **Preliminary:** {'; '.join(warnings)}.", ""]
    lines += _setup(data)
    lines += questions(data, agg) if questions is not None else []
    lines += ["## Figures", ""]
    for h in hs:
        lines.append(f"![test accuracy at {h} steps]({fig}/test_accuracy_{h}.png)")
        lines.append("")
        lines.append(
            f"![flatness vs test accuracy at {h} steps]({fig}/flatness_vs_accuracy_{h}.png)"
        )
        lines.append("")
    for task in data["config"]["tasks"]:
        lines.append(f"![loss curves on {task}]({fig}/loss_curves_{task}.png)")
        lines.append("")
    lines += _tuned_table(data)
    lines += _full_tables(data, agg)
    lines += _long(data, fig)
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------ plots


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


def write_report(
    data: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    docs: str | os.PathLike[str] | None = None,
    command: str | None = None,
    render: Callable[..., str] = render_markdown,
) -> list[Path]:
    """Write the PNGs and ``report.md`` into ``out_dir`` and, with ``docs``, the docs page.

    ``render(data, fig, command)`` draws the page (a study passes its own). The docs page links
    the PNGs in ``out_dir`` by relative path. Returns the written paths.
    """
    written = write_plots(data, out_dir)
    return written + write_pages(lambda fig: render(data, fig, command), out_dir, docs)


def write_pages(
    render: Callable[[str], str],
    out_dir: str | os.PathLike[str],
    docs: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write ``render(".")`` to ``out_dir/report.md`` and, with ``docs``, ``render(rel)`` to
    that page, ``rel`` being the path from it to ``out_dir`` (where the figures are)."""
    out = Path(out_dir)
    page = out / "report.md"
    page.write_text(render("."))
    written = [page]
    if docs is not None:
        docs_path = Path(docs)
        docs_path.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(out.resolve(), docs_path.parent.resolve()).replace(os.sep, "/")
        docs_path.write_text(render(rel))
        written.append(docs_path)
    return written
