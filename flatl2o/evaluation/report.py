"""Turn a results JSON into tables, plots and the ``docs/results.md`` answer page.

Everything here is a pure function of the JSON written by :func:`flatl2o.evaluation.evaluate`
(no clock, no randomness), so regenerating from the same JSON gives the same bytes. Statistics:
mean and sample standard deviation (ddof = 1) over seeds; comparisons between two optimizers
are paired by seed (same initialization and minibatches): the mean per-seed difference, its
standard deviation, and a two-sided paired t-test at 95% ("beyond seed noise" means the
difference is significant by that test; "within seed noise" means it is not). Nothing is left
out silently: a mean or paired difference that omits a seed (a non-finite value: a diverged
run) says how many it omits.

The reference baseline of question 2 is chosen on the VALIDATION split (docs/method.md §5):
per (task, horizon), the tuned baseline whose selected hyper-parameters have the highest mean
validation accuracy over the tuning seeds; only its test accuracy is reported. The top
eigenvalue is reported as ``|λ_max|`` (docs/method.md §4), and only where power iteration
converged: a value whose relative residual exceeds :data:`EIG_RESIDUAL_TOL` is left out and
counted as "unconverged".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Stats",
    "aggregate",
    "paired",
    "render_markdown",
    "write_plots",
    "write_report",
]

BASELINE_ORDER = ("adam", "sgd", "sam-sgd", "sam-adam", "entropy-sgd")
#: Baselines that question 2 compares against ("tuned Adam, SGD and SAM").
TUNED_REFERENCE = ("adam", "sgd", "sam-sgd", "sam-adam")
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

# Two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond 30).
_T95 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
    9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
    17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
    25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}  # fmt: skip


# ------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Stats:
    """Mean, sample std and count of finite values (``n_nan`` non-finite ones excluded; for
    the top eigenvalue, ``n_unconverged`` values whose power iteration did not converge)."""

    mean: float
    std: float
    n: int
    n_nan: int = 0
    n_unconverged: int = 0

    @staticmethod
    def of(values: Sequence[float]) -> Stats:
        """Statistics of ``values`` (non-finite values are counted and left out)."""
        finite = [float(v) for v in values if v is not None and math.isfinite(v)]
        n_nan = len(values) - len(finite)
        if not finite:
            return Stats(math.nan, math.nan, 0, n_nan)
        mean = math.fsum(finite) / len(finite)
        var = math.fsum((v - mean) ** 2 for v in finite) / max(len(finite) - 1, 1)
        return Stats(mean, math.sqrt(var) if len(finite) > 1 else 0.0, len(finite), n_nan)

    def fmt(self, digits: int = 3, sig: bool = False) -> str:
        """``mean ± std`` (fixed ``digits`` decimals, or significant digits with ``sig``)."""
        if self.n == 0:
            return "n/a" + (f" ({self.n_unconverged} unconverged)" if self.n_unconverged else "")
        f = (lambda v: f"{v:.{digits}g}") if sig else (lambda v: f"{v:.{digits}f}")
        return f"{f(self.mean)} ± {f(self.std)}{self.note()}"

    def note(self) -> str:
        """`` (k n/a)`` / `` (k unconverged)`` for the seeds the mean leaves out, else ``""``."""
        parts = [f"{self.n_nan} n/a"] if self.n_nan else []
        parts += [f"{self.n_unconverged} unconverged"] if self.n_unconverged else []
        return f" ({', '.join(parts)})" if parts else ""

    def fmt_mean(self, spec: str = ".3f") -> str:
        """The mean alone (``n/a`` without values), with :meth:`note`."""
        return self.fmt() if self.n == 0 else f"{self.mean:{spec}}{self.note()}"


@dataclass(frozen=True)
class Paired:
    """A paired (same seeds) comparison of A against B: differences A - B.

    ``missing`` counts the seeds of either side left out of the comparison (absent on the
    other side, or a non-finite value on either side)."""

    mean: float
    std: float
    n: int
    t: float
    significant: bool
    missing: int = 0

    def note(self, why: str = "n/a") -> str:
        """`` (k of N seeds n/a)`` when seeds were left out of the comparison, else ``""``."""
        return f" ({self.missing} of {self.n + self.missing} seeds {why})" if self.missing else ""

    def fmt_mean(self, spec: str = "+.3f") -> str:
        """The mean difference (``n/a`` without a comparable seed), with :meth:`note`."""
        return ("n/a" if self.n == 0 else f"{self.mean:{spec}}") + self.note()

    def verdict(self, higher: str = "higher", lower: str = "lower") -> str:
        """``higher``/``lower`` beyond seed noise, or within seed noise."""
        if self.n < 2:
            return "not testable (fewer than 2 paired seeds)"
        if not self.significant:
            return "within seed noise"
        return f"{higher if self.mean > 0 else lower}, beyond seed noise"


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Paired comparison of per-seed values ``a`` and ``b`` (seeds present in both, finite);
    the other seeds are counted in ``missing``."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    missing = len(set(a) | set(b)) - n
    if n == 0:
        return Paired(math.nan, math.nan, 0, math.nan, False, missing)
    mean = math.fsum(d) / n
    if n < 2:
        return Paired(mean, math.nan, n, math.nan, False, missing)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return Paired(mean, 0.0, n, math.inf if mean else 0.0, mean != 0, missing)
    t = mean / (sd / math.sqrt(n))
    return Paired(mean, sd, n, t, abs(t) > _T95.get(n - 1, 1.96), missing)


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


def _float_or_nan(v: Any) -> float:
    """A metric from the JSON as a float (a non-finite value is stored as ``null``)."""
    return math.nan if v is None else float(v)


def per_seed(
    data: dict[str, Any], task: str, opt: str, horizon: int, metric: str, kind: str = "runs"
) -> dict[int, float]:
    """``{seed: value}`` of ``metric`` at ``horizon`` for (task, optimizer)."""
    out: dict[int, float] = {}
    for r in data.get(kind, []):
        s = r["spec"]
        if s["task"] == task and s["optimizer"] == opt and horizon in s["horizons"]:
            v = r["metrics"].get(str(horizon), {}).get(metric)
            out[int(s["seed"])] = _float_or_nan(v)
    return out


def paired_metric(
    data: dict[str, Any], task: str, a: str, b: str, horizon: int, metric: str
) -> Paired:
    """Paired comparison of ``metric`` at ``horizon`` between optimizers ``a`` and ``b`` on the
    same evaluation seeds (differences a - b)."""
    return paired(
        per_seed(data, task, a, horizon, metric), per_seed(data, task, b, horizon, metric)
    )


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


def _diverged(data: dict[str, Any], task: str, opt: str, horizon: int, kind: str = "runs") -> int:
    n = 0
    for r in data.get(kind, []):
        s = r["spec"]
        if s["task"] == task and s["optimizer"] == opt and horizon in s["horizons"]:
            if r["diverged_at"] is not None and r["diverged_at"] <= horizon:
                n += 1
    return n


# ------------------------------------------------------------------------ markdown


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} pp" if math.isfinite(x) else "n/a"


def _task_label(data: dict[str, Any], task: str) -> str:
    return f"`{task}` ({'seen' if data['tasks'].get(task, {}).get('seen') else 'unseen'})"


def _role(info: dict[str, Any]) -> str:
    if not info.get("seen"):
        return "unseen"
    by = info.get("seen_by")
    return f"seen (meta-training task{' of ' + ', '.join(f'`{n}`' for n in by) if by else ''})"


def _pairs(data: dict[str, Any]) -> list[tuple[str, str]]:
    opts = data["optimizers"]
    return [
        (n, o["sibling"])
        for n, o in sorted(opts.items())
        if o["kind"] == "learned" and o.get("sibling") and o["sibling"] in opts
    ]


def _setup(data: dict[str, Any], fig: str) -> list[str]:
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
                    f"| `{reg}` | `{sib}` | {_task_label(data, task)} | {h} | "
                    f"{agg[(task, reg, h)]['test_accuracy'].fmt()} | "
                    f"{agg[(task, sib, h)]['test_accuracy'].fmt()} | "
                    f"{_pct(acc.mean)} ± {100 * acc.std:.1f}{acc.note()} | {acc.t:+.2f} | "
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
            return _float_or_nan(val.get("val_accuracy")), _float_or_nan(val.get("val_loss"))
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
                    f"{agg[(task, n, h)]['test_accuracy'].fmt_mean()} ({_pct(p.mean)}){mark}"
                    + p.note()
                )
            val_acc, _ = selected_validation(data, task, best, h)
            lines.append(
                f"| {_task_label(data, task)} | {h} | `{best}` ({val_acc:.3f}): "
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
                if not (_measured(data, task, reg, h) and _measured(data, task, sib, h)):
                    continue  # flatness not measured at this horizon (the suite's budget)
                if a["hessian_trace"].n == 0 or b["hessian_trace"].n == 0:
                    # measured, but no finite trace on one side: say so, never skip silently
                    unreadable.append(f"`{task}`@{h}")
                    lines.append(
                        f"| `{reg}` | `{sib}` | {_task_label(data, task)} | {h} | "
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
                    f"| `{reg}` | `{sib}` | {_task_label(data, task)} | {h} | "
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


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if undefined."""
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    mx, my = math.fsum(rx) / len(rx), math.fsum(ry) / len(ry)
    cov = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.fsum((a - mx) ** 2 for a in rx)
    vy = math.fsum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else math.nan


def _measured(data: dict[str, Any], task: str, opt: str, horizon: int) -> bool:
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
    return pts, (len(tr) - len(pts) if _measured(data, task, opt, horizon) else 0)


def _flatness_accuracy_correlation(data: dict[str, Any]) -> list[str]:
    rows = []
    for task in data["config"]["tasks"]:
        for h in horizons_of(data):
            xs, ys, left_out = [], [], 0
            for r in data["runs"]:
                s = r["spec"]
                m = r["metrics"].get(str(h), {})
                if s["task"] == task and h in s["horizons"] and "hessian_trace" in m:
                    tr, acc = _float_or_nan(m["hessian_trace"]), _float_or_nan(m["test_accuracy"])
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


def _full_tables(data: dict[str, Any], agg: dict) -> list[str]:
    lines = ["## Full results", "", "Mean ± sample std over seeds at each horizon.", ""]
    for h in horizons_of(data):
        for task in data["config"]["tasks"]:
            rows = [o for o in optimizer_order(data) if (task, o, h) in agg]
            if not rows:
                continue
            lines += [
                f"### {_task_label(data, task)}, {h} steps",
                "",
                "| optimizer | " + " | ".join(label for _, label in METRICS) + " | diverged |",
                "|---|" + "---|" * (len(METRICS) + 1),
            ]
            for o in rows:
                cell = agg[(task, o, h)]
                vals = [cell[m].fmt(3, sig=m.startswith("hessian")) for m, _ in METRICS]
                div = _diverged(data, task, o, h)
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
            div = _diverged(data, task, o, marks[-1], "long_runs")
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
        parts.append(f"test acc improves ({_pct(acc1 - acc0)})")
    elif acc1 < acc0 - 0.005:
        parts.append(f"test acc degrades ({_pct(acc1 - acc0)})")
    else:
        parts.append("test acc flat")
    if math.isfinite(te0) and math.isfinite(te1) and te1 > 1.1 * te0:
        parts.append("test loss grows (overfitting)")
    return "; ".join(parts)


def render_markdown(data: dict[str, Any], fig: str = ".", command: str | None = None) -> str:
    """The results page: setup, the three answers, full tables, long horizon, figures.

    ``fig`` is the path from the page to the folder holding the PNGs; ``command`` the command
    that regenerates the page (shown at the top).
    """
    agg = aggregate(data)
    hs = horizons_of(data)
    lines = [
        "# Results: does flatness-aware L2O generalize better?",
        "",
        "<!-- generated by flatl2o.evaluation.report from the results JSON; do not edit -->",
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
    lines += _setup(data, fig)
    lines += _q1(data, agg)
    lines += _q2(data, agg)
    lines += _q3(data, agg)
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


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _curve_plot(ax: Any, data: dict[str, Any], runs: list[dict[str, Any]], colors: dict) -> None:
    for opt in optimizer_order(data):
        mine = [r for r in runs if r["spec"]["optimizer"] == opt and r["curve"]]
        if not mine:
            continue
        # the run with the most horizons per seed (baselines may have one run per horizon)
        by_seed: dict[int, dict[str, Any]] = {}
        for r in mine:
            s = r["spec"]["seed"]
            if s not in by_seed or max(r["spec"]["horizons"]) > max(by_seed[s]["spec"]["horizons"]):
                by_seed[s] = r
        curves = []
        every = max(r["curve_every"] for r in by_seed.values())
        for r in by_seed.values():
            c = [math.nan if v is None else v for v in r["curve"]]
            curves.append(_smooth(c, max(1, len(c) // 50)))
        n = max(len(c) for c in curves)
        xs, mean, lo, hi = [], [], [], []
        for i in range(n):  # geometric mean and ± 1 std band of log(loss): a log-scale plot
            vals = [
                math.log(c[i]) for c in curves if i < len(c) and math.isfinite(c[i]) and c[i] > 0
            ]
            if not vals:
                continue
            st = Stats.of(vals)
            xs.append((i + 1) * every)
            mean.append(math.exp(st.mean))
            lo.append(math.exp(st.mean - st.std))
            hi.append(math.exp(st.mean + st.std))
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
) -> list[Path]:
    """Write the PNGs and ``report.md`` into ``out_dir`` and, with ``docs``, the docs page.

    The docs page links the PNGs in ``out_dir`` by relative path. Returns the written paths.
    """
    out = Path(out_dir)
    written = write_plots(data, out)
    page = out / "report.md"
    page.write_text(render_markdown(data, ".", command))
    written.append(page)
    if docs is not None:
        docs_path = Path(docs)
        docs_path.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(out.resolve(), docs_path.parent.resolve()).replace(os.sep, "/")
        docs_path.write_text(render_markdown(data, rel, command))
        written.append(docs_path)
    return written
