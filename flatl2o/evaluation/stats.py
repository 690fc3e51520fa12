"""Seed statistics of the results JSONs: means over seeds and paired comparisons.

Mean and sample standard deviation (ddof = 1) over seeds; two optimizers are compared paired
by seed (same initialization and minibatches): the mean per-seed difference, its standard
deviation, and a two-sided paired t-test at 95% (t = mean / (sd / √n) against Student's t
quantile with n − 1 degrees of freedom, from ``scipy.stats.t``). "Beyond seed noise" means
significant by that test, "within seed noise" means not. Nothing is left out silently: a mean
or paired difference that omits a seed (a non-finite value: a diverged run) says how many it
omits. Used by both suites' reports and by the demo's verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flatl2o.meta.optimizee import mean_std

__all__ = [
    "EIG_RESIDUAL_TOL",
    "Paired",
    "Stats",
    "aggregate",
    "diverged_runs",
    "flatness_points",
    "float_or_nan",
    "horizons_of",
    "measured",
    "optimizer_order",
    "paired",
    "paired_metric",
    "per_seed",
]

#: Two-sided significance level of the paired t-test.
ALPHA = 0.05
#: Baselines in the order the tables list them.
BASELINE_ORDER = ("adam", "sgd", "sam-sgd", "sam-adam", "entropy-sgd")
#: The metrics of a (task, optimizer, horizon) cell, with their table labels.
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
        mean, std = mean_std(finite)
        return Stats(mean, std, len(finite), n_nan)

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
    the other seeds are counted in ``missing``. Differences that are all equal have no spread:
    a nonzero one is significant (t infinite), zero is not."""
    from scipy import stats

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
    critical = float(stats.t.ppf(1 - ALPHA / 2, n - 1))
    return Paired(mean, sd, n, t, abs(t) > critical, missing)


def float_or_nan(v: Any) -> float:
    """A metric from the JSON as a float (a non-finite value is stored as ``null``)."""
    return math.nan if v is None else float(v)


def per_seed(
    data: dict[str, Any], task: str, opt: str, horizon: int, metric: str, kind: str = "runs"
) -> dict[int, float]:
    """``{seed: value}`` of ``metric`` at ``horizon`` for (task, optimizer) in ``data[kind]``."""
    out: dict[int, float] = {}
    for r in data.get(kind, []):
        s = r["spec"]
        if s["task"] == task and s["optimizer"] == opt and horizon in s["horizons"]:
            v = r["metrics"].get(str(horizon), {}).get(metric)
            out[int(s["seed"])] = float_or_nan(v)
    return out


def paired_metric(
    data: dict[str, Any],
    task: str,
    a: str,
    b: str,
    horizon: int,
    metric: str,
    kind: str = "runs",
) -> Paired:
    """Paired comparison of ``metric`` at ``horizon`` between optimizers ``a`` and ``b`` on the
    same evaluation seeds (differences a - b)."""
    return paired(
        per_seed(data, task, a, horizon, metric, kind),
        per_seed(data, task, b, horizon, metric, kind),
    )


def diverged_runs(
    data: dict[str, Any], task: str, opt: str, horizon: int, kind: str = "runs"
) -> int:
    """How many runs of (task, optimizer) in ``data[kind]`` diverged by ``horizon``."""
    return sum(
        1
        for r in data.get(kind, [])
        if r["spec"]["task"] == task
        and r["spec"]["optimizer"] == opt
        and horizon in r["spec"]["horizons"]
        and r["diverged_at"] is not None
        and r["diverged_at"] <= horizon
    )


# ------------------------------------------------------------- the suite's results JSON


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
