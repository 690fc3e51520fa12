"""The paper-suite results page, ``docs/results.md``: the study's three questions answered from
the results JSON of ``flatl2o evaluate`` (a script of this repository, not of the package).

    python research/results_page.py docs/results/eval.json --out docs/results --docs docs/results.md

re-renders the page, its copy ``docs/results/report.md`` and the PNGs from the JSON alone (no
training, no clock, no randomness: the same JSON gives the same bytes). The page is the
package's generic report (:func:`flatl2o.evaluation.report.render_markdown`: setup, figures,
tuned hyper-parameters, full tables, long horizon) with the study's answers after the setup:

1. does each regularized checkpoint beat its unregularized sibling (paired by seed)?
2. where do the learned rules stand against the best tuned baseline, chosen on the VALIDATION
   split (per task and horizon, the tuned baseline whose selected hyper-parameters have the
   highest mean validation accuracy over the tuning seeds; only its test accuracy is
   reported)?
3. are the regularized rules' solutions flatter (paired t-test on the log ratio of Hessian
   traces), and does flatness track test accuracy (Spearman rank correlation)?

A rule whose mean test accuracy is below :data:`STALL_FACTOR` × chance "does not train" there:
its comparisons are shown but not counted as evidence. Statistics are those of
:mod:`flatl2o.evaluation.stats` (docs/evaluation.md, "How the answers are computed").
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from flatl2o.evaluation.report import (
    pct,
    render_markdown,
    rerender_target,
    task_label,
    write_report,
)
from flatl2o.evaluation.stats import (
    float_or_nan,
    horizons_of,
    measured,
    optimizer_order,
    paired,
    paired_metric,
    per_seed,
)

__all__ = ["TITLE", "main", "render_results_page", "spearman", "write_results_page"]

TITLE = "Results: does flatness-aware L2O generalize better?"
#: The page's regeneration command (run from the repository root).
SCRIPT = "research/results_page.py"
#: Baselines that question 2 compares against ("tuned Adam, SGD and SAM").
TUNED_REFERENCE = ("adam", "sgd", "sam-sgd", "sam-adam")


def _pairs(data: dict[str, Any]) -> list[tuple[str, str]]:
    opts = data["optimizers"]
    return [
        (n, o["sibling"])
        for n, o in sorted(opts.items())
        if o["kind"] == "learned" and o.get("sibling") and o["sibling"] in opts
    ]


#: A rule whose mean test accuracy is below this multiple of chance "does not train" there.
STALL_FACTOR = 1.5


def _stalled(data: dict[str, Any], agg: dict, task: str, opt: str, h: int) -> bool:
    """Whether ``opt`` fails to train ``task`` by ``h`` steps (mean test acc near chance)."""
    cell = agg.get((task, opt, h))
    if cell is None or cell["test_accuracy"].n == 0:
        return cell is not None  # every run non-finite: it does not train either
    classes = data["tasks"].get(task, {}).get("num_classes") or 10
    return cell["test_accuracy"].mean < STALL_FACTOR / classes


def _stall_lines(data: dict[str, Any], agg: dict) -> list[str]:
    bad = []
    for opt in optimizer_order(data):
        cells = [
            f"`{task}`@{h}"
            for task in data["config"]["tasks"]
            for h in horizons_of(data)
            if _stalled(data, agg, task, opt, h)
        ]
        if cells:
            bad.append(f"`{opt}` ({', '.join(cells)})")
    if not bad:
        return []
    return [
        f"**Does not train** (mean test accuracy below {STALL_FACTOR}× chance): "
        + "; ".join(bad)
        + ". A comparison with a rule that does not train says nothing about flatness.",
        "",
    ]


def _q1(data: dict[str, Any], agg: dict) -> list[str]:
    lines = ["## 1. Does each regularized checkpoint beat its unregularized sibling?", ""]
    pairs = _pairs(data)
    if not pairs:
        lines += [
            "Not answerable from this file: it holds no regularized checkpoint together with its "
            "unregularized sibling.",
            "",
        ]
        return lines
    lines += [
        "Test accuracy, paired by seed (Δ = regularized − sibling, mean ± sd of the per-seed "
        "differences; t = paired t statistic). Seed noise here is the optimizees' (their "
        "initialization and minibatches): each checkpoint is one meta-training run, so a "
        "verdict says nothing about how a rule meta-trained with another seed would compare "
        "(benchmarks/meta_seeds.py measures that).",
        "",
        "| regularized | sibling | task | steps | regularized acc | sibling acc | Δ acc | t | "
        "verdict | Δ train loss | Δ gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    lines[2:2] = _stall_lines(data, agg)
    for reg, sib in pairs:
        wins = losses = ties = hollow = fits_less = gap_larger = fits_more = gap_smaller = 0
        incomplete = 0  # cells whose paired differences leave out a seed
        for task in data["config"]["tasks"]:
            for h in horizons_of(data):
                if (task, reg, h) not in agg or (task, sib, h) not in agg:
                    continue
                acc = paired_metric(data, task, reg, sib, h, "test_accuracy")
                dtr = paired_metric(data, task, reg, sib, h, "train_loss")
                dgap = paired_metric(data, task, reg, sib, h, "gap")
                verdict = acc.verdict()
                if _stalled(data, agg, task, sib, h):
                    verdict += f" (`{sib}` does not train)"
                    hollow += verdict.startswith("higher")
                if _stalled(data, agg, task, reg, h):
                    verdict += f" (`{reg}` does not train)"
                wins += verdict.startswith("higher")
                if verdict.startswith("higher"):
                    fits_more += dtr.significant and dtr.mean < 0
                    gap_smaller += dgap.significant and dgap.mean < 0
                if verdict.startswith("lower"):
                    losses += 1
                    fits_less += dtr.significant and dtr.mean > 0
                    gap_larger += dgap.significant and dgap.mean > 0
                ties += verdict == "within seed noise"
                incomplete += bool(acc.missing or dtr.missing or dgap.missing)
                lines.append(
                    f"| `{reg}` | `{sib}` | {task_label(data, task)} | {h} | "
                    f"{agg[(task, reg, h)]['test_accuracy'].fmt()} | "
                    f"{agg[(task, sib, h)]['test_accuracy'].fmt()} | "
                    f"{pct(acc.mean)} ± {100 * acc.std:.1f}{acc.note()} | {acc.t:+.2f} | "
                    f"{verdict} | {dtr.fmt_mean()} | {dgap.fmt_mean()} |"
                )
        total = wins + losses + ties
        if total == 0:
            continue
        text = (
            f"- `{reg}` vs `{sib}`: higher test accuracy beyond seed noise in {wins} of {total} "
            f"(task, horizon) cells, lower beyond seed noise in {losses}, within seed noise in "
            f"{ties}. "
        )
        if hollow:
            text += (
                f"{hollow} of the wins are cells where `{sib}` does not train, which is no "
                "evidence for the regularizer. "
            )
            wins -= hollow
        if wins == total:
            text += "The claim (regularized beats unregularized) is supported for this pair."
        elif wins == 1 and losses == 0 and total >= 4:
            text += (
                f"**The claim is not supported overall:** one cell of {total}, each a test at 95%, "
                f"is about what chance alone gives ({0.05 * total:.1f} expected)."
            )
        elif wins > 0 and losses == 0:
            text += (
                "The claim is only partly supported: where it is not, the difference is within "
                "seed noise."
            )
        else:
            text += "**The claim is not supported for this pair.**"
        if wins + hollow:
            text += (
                f" In the {wins + hollow} cell(s) where it is higher, it also fits the train "
                f"split better (lower train loss, beyond seed noise) in {fits_more} and its "
                f"generalization gap is smaller (beyond seed noise) in {gap_smaller}"
                + (
                    ": a gain that comes with a better fit is (also) an optimization effect, "
                    "not only flatness."
                    if fits_more
                    else "."
                )
            )
        if losses:
            text += (
                f" In the {losses} cell(s) where it is lower, it fits the train split less "
                f"(higher train loss, beyond seed noise) in {fits_less} and its generalization "
                f"gap is larger (beyond seed noise) in {gap_larger}."
            )
        if incomplete:
            text += (
                f" In {incomplete} cell(s) a seed has a non-finite value on one side (a diverged "
                'run) and is left out of that cell\'s paired differences ("k of N seeds n/a" '
                "in the table): there the comparison rests on fewer seeds."
            )
        better, worse, _ = _vs_best_baseline(data, agg, sib)
        if better + worse + _:
            text += (
                f" For context, `{sib}` itself is worse than the best tuned baseline (chosen on "
                f"the validation split) beyond seed noise in {worse} of {better + worse + _} "
                f"cells (better in {better})."
            )
        summary.append(text)
    lines += ["", "Summary:", "", *summary, ""]
    lines.append(
        "Δ train loss and Δ gap (regularized − sibling, means) say where a difference comes "
        "from: a positive Δ train loss means the regularized rule fits the training set less; "
        'a negative Δ gap means its test loss is closer to its train loss. "k of N seeds n/a" '
        "marks a difference that leaves out seeds with a non-finite value (diverged runs)."
    )
    lines.append("")
    return lines


def selected_validation(data: dict[str, Any], task: str, opt: str, h: int) -> tuple[float, float]:
    """(mean validation accuracy, mean validation loss) over the tuning seeds of the
    hyper-parameters selected for ``opt`` at (task, h); NaNs when the file does not record them."""
    rec = data.get("tuning", {}).get(task, {}).get(opt) or {}
    chosen = rec.get("selected", {}).get(str(h))
    for trial in rec.get("trials", []):
        if chosen is not None and trial["hparams"] == chosen:
            val = trial["val"].get(str(h), {})
            return float_or_nan(val.get("val_accuracy")), float_or_nan(val.get("val_loss"))
    return math.nan, math.nan


def _best_baseline(data: dict[str, Any], agg: dict, task: str, h: int) -> str | None:
    """The reference baseline at (task, h), chosen on the VALIDATION split: the tuned baseline
    whose selected hyper-parameters have the highest mean validation accuracy over the tuning
    seeds (ties: lower validation loss, then :data:`TUNED_REFERENCE` order). A baseline without
    recorded validation numbers cannot be chosen; the test split is never looked at here."""
    best, key = None, None
    for b in TUNED_REFERENCE:
        if (task, b, h) not in agg or b not in data["optimizers"]:
            continue
        acc, loss = selected_validation(data, task, b, h)
        if not math.isfinite(acc):
            continue
        k = (acc, -loss if math.isfinite(loss) else -math.inf)
        if key is None or k > key:
            best, key = b, k
    return best


def _vs_best_baseline(data: dict[str, Any], agg: dict, opt: str) -> tuple[int, int, int]:
    """(better, worse, within noise) cell counts of ``opt`` against the best tuned baseline."""
    counts = [0, 0, 0]
    for task in data["config"]["tasks"]:
        for h in horizons_of(data):
            best = _best_baseline(data, agg, task, h)
            if best is None or (task, opt, h) not in agg:
                continue
            v = paired_metric(data, task, opt, best, h, "test_accuracy").verdict("better", "worse")
            counts[0 if v.startswith("better") else 1 if v.startswith("worse") else 2] += 1
    return counts[0], counts[1], counts[2]


def _q2(data: dict[str, Any], agg: dict) -> list[str]:
    lines = ["## 2. Learned optimizers against tuned Adam, SGD and SAM", ""]
    learned = [n for n in optimizer_order(data) if data["optimizers"][n]["kind"] == "learned"]
    refs = [b for b in TUNED_REFERENCE if b in data["optimizers"]]
    if not learned or not refs:
        return [*lines, "Not answerable from this file (needs learned rules and baselines).", ""]
    lines += [
        "Test accuracy of each learned rule minus that of the best tuned baseline among "
        f"{', '.join(f'`{b}`' for b in refs)} for that task and horizon, paired by seed. The "
        "best baseline is chosen on the VALIDATION split: the one whose selected "
        "hyper-parameters have the highest mean validation accuracy over the tuning seeds (val "
        "acc in the table); its test accuracy is then reported, never used to choose it.",
        "",
        "| task | steps | best tuned baseline (val acc): test acc | "
        + " | ".join(f"`{n}`" for n in learned)
        + " |",
        "|---|---|---|" + "---|" * len(learned),
    ]
    counts = {n: [0, 0, 0] for n in learned}
    unchosen = []
    for task in data["config"]["tasks"]:
        for h in horizons_of(data):
            best = _best_baseline(data, agg, task, h)
            if best is None:
                if any((task, b, h) in agg for b in refs):
                    unchosen.append(f"`{task}`@{h}")
                continue
            cells = []
            for n in learned:
                if (task, n, h) not in agg:
                    cells.append("n/a")
                    continue
                p = paired_metric(data, task, n, best, h, "test_accuracy")
                v = p.verdict("better", "worse")
                counts[n][0 if v.startswith("better") else 1 if v.startswith("worse") else 2] += 1
                mark = " ▲" if v.startswith("better") else " ▼" if v.startswith("worse") else ""
                cells.append(
                    f"{agg[(task, n, h)]['test_accuracy'].fmt_mean()} ({pct(p.mean)}){mark}"
                    + p.note()
                )
            val_acc, _ = selected_validation(data, task, best, h)
            lines.append(
                f"| {task_label(data, task)} | {h} | `{best}` ({val_acc:.3f}): "
                f"{agg[(task, best, h)]['test_accuracy'].fmt()} | " + " | ".join(cells) + " |"
            )
    lines += ["", "▲ / ▼: better / worse than that baseline beyond seed noise."]
    if unchosen:
        lines += [
            "",
            "No reference baseline for "
            + ", ".join(unchosen)
            + ": the file records no validation accuracy for the tuned baselines there (the "
            "reference is never chosen on the test split).",
        ]
    lines += ["", "Summary:", ""]
    for n in learned:
        b, w, t = counts[n]
        lines.append(
            f"- `{n}`: better than the best tuned baseline beyond seed noise in {b} cells, worse "
            f"in {w}, within seed noise in {t}."
        )
    lines.append("")
    return lines


def _q3(data: dict[str, Any], agg: dict) -> list[str]:
    lines = ["## 3. Are the regularized optimizers' solutions flatter?", ""]
    pairs = _pairs(data)
    if not pairs:
        return [*lines, "Not answerable from this file (no regularized/sibling pair).", ""]
    lines += [
        "Hessian trace and |λ_max| of the full-train-split loss at the final iterate; "
        "ratio = regularized / sibling (means; n/a when the sibling's mean trace is not "
        "positive); the verdict is a paired t-test on the per-seed log ratio of the trace, so a "
        "seed whose trace is not positive (or not finite) on either side is left out of it, and "
        "the verdict says how many. A cell where either rule does not train (mean test "
        f"accuracy below {STALL_FACTOR}× chance) is shown but not counted: a rule stuck near "
        "its initialization has a small Hessian without having found a flat minimum.",
        "",
        "| regularized | sibling | task | steps | tr H (reg) | tr H (sibling) | ratio | verdict "
        "| \\|λ_max\\| (reg) | \\|λ_max\\| (sibling) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def logs(opt: str, task: str, h: int) -> dict[int, float]:
        return {
            s: math.log(v) if math.isfinite(v) and v > 0 else math.nan
            for s, v in per_seed(data, task, opt, h, "hessian_trace").items()
        }

    summary = []
    for reg, sib in pairs:
        flatter = sharper = same = 0
        stalled: list[str] = []
        unreadable: list[str] = []
        for task in data["config"]["tasks"]:
            for h in horizons_of(data):
                a, b = agg.get((task, reg, h)), agg.get((task, sib, h))
                if not a or not b:
                    continue
                if not (measured(data, task, reg, h) and measured(data, task, sib, h)):
                    continue  # flatness not measured at this horizon (the suite's budget)
                if a["hessian_trace"].n == 0 or b["hessian_trace"].n == 0:
                    # measured, but no finite trace on one side: say so, never skip silently
                    unreadable.append(f"`{task}`@{h}")
                    lines.append(
                        f"| `{reg}` | `{sib}` | {task_label(data, task)} | {h} | "
                        f"{a['hessian_trace'].fmt(3, sig=True)} | "
                        f"{b['hessian_trace'].fmt(3, sig=True)} | n/a | "
                        "not testable (no finite trace on one side) | "
                        f"{a['hessian_top_eig'].fmt(3, sig=True)} | "
                        f"{b['hessian_top_eig'].fmt(3, sig=True)} |"
                    )
                    continue
                p = paired(logs(reg, task, h), logs(sib, task, h))
                v = p.verdict("sharper", "flatter")
                dead = [o for o in (reg, sib) if _stalled(data, agg, task, o, h)]
                if dead:
                    stalled.append(f"`{task}`@{h}")
                else:
                    flatter += v.startswith("flatter")
                    sharper += v.startswith("sharper")
                    same += v == "within seed noise"
                v += p.note("left out: trace ≤ 0 or n/a")
                v += "".join(f" (`{o}` does not train: not counted)" for o in dead)
                ta, tb = a["hessian_trace"].mean, b["hessian_trace"].mean
                ratio = f"{ta / tb:.2f}" if math.isfinite(ta) and tb > 0 else "n/a"
                lines.append(
                    f"| `{reg}` | `{sib}` | {task_label(data, task)} | {h} | "
                    f"{a['hessian_trace'].fmt(3, sig=True)} | "
                    f"{b['hessian_trace'].fmt(3, sig=True)} | {ratio} | {v} | "
                    f"{a['hessian_top_eig'].fmt(3, sig=True)} | "
                    f"{b['hessian_top_eig'].fmt(3, sig=True)} |"
                )
        total = flatter + sharper + same
        if total or stalled or unreadable:
            text = (
                f"- `{reg}` vs `{sib}`: flatter (lower trace) beyond seed noise in {flatter} of "
                f"{total} cells, sharper in {sharper}, within seed noise in {same}. "
            )
            if total:
                text += (
                    "Its solutions are flatter."
                    if flatter == total
                    else "**That its solutions are flatter is not supported.**"
                    if flatter == 0
                    else "Its solutions are flatter only in part of the cells."
                )
            else:
                text += "**No cell can answer the question.**"
            if stalled:
                text += (
                    f" Not counted: {', '.join(stalled)}, where one of the two rules does not "
                    "train (a low curvature there is no evidence for the regularizer)."
                )
            if unreadable:
                text += (
                    f" No finite trace on one side in {', '.join(unreadable)} (every run's "
                    "flatness readout there is non-finite): those cells cannot answer."
                )
            summary.append(text)
    lines += ["", "Summary:", "", *summary, ""]
    corr = _flatness_accuracy_correlation(data)
    if corr:
        lines += [
            "Across all runs of a task (every optimizer and seed), Spearman rank correlation "
            "between the Hessian trace and test accuracy (negative = flatter solutions test "
            "better):",
            "",
            "| task | steps | runs | left out (non-finite) | Spearman ρ |",
            "|---|---|---|---|---|",
            *corr,
            "",
        ]
    return lines


def _flatness_accuracy_correlation(data: dict[str, Any]) -> list[str]:
    rows = []
    for task in data["config"]["tasks"]:
        for h in horizons_of(data):
            xs, ys, left_out = [], [], 0
            for r in data["runs"]:
                s = r["spec"]
                m = r["metrics"].get(str(h), {})
                if s["task"] == task and h in s["horizons"] and "hessian_trace" in m:
                    tr, acc = float_or_nan(m["hessian_trace"]), float_or_nan(m["test_accuracy"])
                    if math.isfinite(tr) and math.isfinite(acc):
                        xs.append(tr)
                        ys.append(acc)
                    else:
                        left_out += 1
            rho = spearman(xs, ys)
            if xs or left_out:
                shown = f"{rho:+.2f}" if math.isfinite(rho) else "n/a (< 3 runs or constant)"
                rows.append(f"| `{task}` | {h} | {len(xs)} | {left_out} | {shown} |")
    return rows


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``, average ranks for ties); NaN
    with fewer than 3 points or a constant side."""
    from scipy import stats

    if len(x) < 3:
        return math.nan
    with warnings.catch_warnings():  # a constant side: undefined, NaN (said on the page)
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y).statistic)


def _questions(data: dict[str, Any], agg: dict) -> list[str]:
    return [*_q1(data, agg), *_q2(data, agg), *_q3(data, agg)]


def render_results_page(data: dict[str, Any], fig: str = ".", command: str | None = None) -> str:
    """The results page: the generic report with the study's three answers after its setup.

    ``fig`` is the path from the page to the folder holding the PNGs; ``command`` the command
    that regenerates the page (shown at the top)."""
    return render_markdown(data, fig, command, title=TITLE, generator=SCRIPT, questions=_questions)


def write_results_page(
    data: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    docs: str | os.PathLike[str] | None = None,
    command: str | None = None,
) -> list[Path]:
    """Write the PNGs and ``report.md`` into ``out_dir`` and, with ``docs``, the page itself
    (figures linked relative to it); return the written paths."""
    return write_report(data, out_dir, docs=docs, command=command, render=render_results_page)


def main(argv: list[str] | None = None) -> int:
    """Re-render the results page from a results JSON (see the module docstring)."""
    from flatl2o.evaluation.suite import load_results
    from flatl2o.hub import portable_command

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="the results JSON (or the folder holding eval.json)")
    p.add_argument("--out", help="folder for the PNGs and report.md (default: the JSON's)")
    p.add_argument("--docs", metavar="PAGE", help="also write the page here (docs/results.md)")
    args = p.parse_args(argv)
    data = load_results(args.results)
    out, command = rerender_target(f"python {SCRIPT}", args.results, args.out, args.docs)
    written = write_results_page(data, out, docs=args.docs, command=portable_command(command))
    print(f"wrote {len(written)} files to {out}" + (f" and {args.docs}" if args.docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
