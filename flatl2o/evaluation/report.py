"""Turn a results JSON of ``flatl2o evaluate`` into a results page (and its figures).

Everything here is a pure function of the JSON written by :func:`flatl2o.evaluation.evaluate`
(no clock, no randomness), so regenerating from the same JSON gives the same bytes. The page
(:func:`render_markdown`) is the generic report: the setup, the figures, the baselines' tuned
hyper-parameters, mean ± sample std of every metric per (task, optimizer, horizon) with the
diverged runs counted, and the long-horizon runs. A study adds its own sections after the setup
(``questions=``; the repository's ``research/results_page.py`` renders docs/results.md that
way). The statistics come from :mod:`flatl2o.evaluation.stats`, the figures from
:mod:`flatl2o.evaluation.plots`. The top eigenvalue is reported as ``|λ_max|`` (docs/method.md
§4), and only where power iteration converged: a value whose relative residual exceeds
:data:`~flatl2o.evaluation.stats.EIG_RESIDUAL_TOL` is left out and counted as "unconverged".
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flatl2o.evaluation.plots import write_plots
from flatl2o.evaluation.stats import (
    BASELINE_ORDER,
    EIG_RESIDUAL_TOL,
    METRICS,
    Stats,
    aggregate,
    diverged_runs,
    horizons_of,
    optimizer_order,
    per_seed,
)

__all__ = [
    "render_markdown",
    "rerender_target",
    "write_pages",
    "write_report",
]

#: The generic page's title.
TITLE = "Evaluation results"

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
        "task and horizon), never on the test split. Learned rules run untuned, at their lr as "
        "shipped."
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


def rerender_target(
    prefix: str, results: str, out: str | None, docs: str | None
) -> tuple[Path, str]:
    """Where a re-render from the results JSON ``results`` writes (``out``, else the folder of
    the JSON) and the command that does it: ``prefix`` and the arguments, quoted."""
    src = Path(results)
    folder = Path(out) if out else (src if src.is_dir() else src.parent)
    command = f"{prefix} {shlex.quote(results)}"
    if out:
        command += f" --out {shlex.quote(out)}"
    if docs:
        command += f" --docs {shlex.quote(docs)}"
    return folder, command
