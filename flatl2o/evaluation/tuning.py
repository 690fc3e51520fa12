"""Hyper-parameter selection for the baselines, on the VALIDATION split only.

For each optimizee and each baseline, every point of the baseline's grid
(:data:`flatl2o.evaluation.baselines.BASELINES`) is trained on ``tune seeds`` (seeds
:data:`TUNE_SEED_BASE` + i, disjoint from the evaluation seeds) up to the largest horizon,
and measured on the validation split at every horizon; tuning runs never evaluate the test
split (:func:`flatl2o.evaluation.runner.train_run` with ``purpose="tune"`` reads only "val").
Per horizon, the selected point is the one with the highest mean validation accuracy over
the tune seeds, ties broken by the lower mean validation loss, then by grid order; a point
whose run diverged on any tune seed is not eligible.

A grid is small to fit the runtime budget, so it grows where it must: when a selection (at
any horizon) sits at an end of the values tried for a hyper-parameter, one more value beyond
that end is tried (the grid's own ratio between its two outermost values on that side),
crossed with the values tried for the other hyper-parameters, and the selection is made again
- up to :data:`MAX_EXTENSIONS` value(s) beyond each end. A selection still at an end after
that is reported as such (:func:`at_edge`); one next to an extension that diverged is not
(divergence bounds the search on that side).

SAM reuses the tuned learning rate of its base optimizer at each horizon and tunes only rho
(as Foret et al. tuned rho on top of standard base settings), so its trials are planned once
the base's selection is known. Learned rules are not tuned: they run at their lr as shipped
(``optimizers.shipped_lr``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.runner import RunSpec, train_run
from flatl2o.meta.tasks import Task

__all__ = [
    "MAX_EXTENSIONS",
    "TUNE_SEED_BASE",
    "advance_tuning",
    "at_edge",
    "ends_selected",
    "extension_points",
    "grid_points",
    "plan_trials",
    "select",
    "summarize_trials",
    "tune",
    "values_beyond",
]

#: Tuning runs use seeds TUNE_SEED_BASE + i (generators EVAL_SEED_OFFSET + TUNE_SEED_BASE + i).
TUNE_SEED_BASE = 1000
#: At most this many values are added beyond each end of a hyper-parameter's grid.
MAX_EXTENSIONS = 1


def grid_points(name: str) -> list[dict[str, float]]:
    """Every grid point of baseline ``name`` in grid order (first key varies slowest)."""
    grid = BASELINES[name].grid
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def plan_trials(
    name: str, base_selected: dict[int, dict[str, float]] | None = None
) -> list[dict[str, float]]:
    """The hyper-parameter points to try for baseline ``name``.

    For a baseline tuned after another (SAM), ``base_selected`` maps each horizon to the base
    optimizer's selected hyper-parameters; the trials are that ``lr`` (for each distinct value)
    crossed with this baseline's own grid.
    """
    baseline = BASELINES[name]
    if baseline.tune_after is None:
        return grid_points(name)
    if not base_selected:
        raise ValueError(f"{name} is tuned after {baseline.tune_after}: pass its selection")
    lrs = sorted({float(hp["lr"]) for hp in base_selected.values()})
    return [{"lr": lr, **pt} for lr in lrs for pt in grid_points(name)]


def _tuned_keys(name: str) -> list[str]:
    """The hyper-parameters whose grid can grow: every grid key with at least two values
    (a SAM baseline's ``lr`` is its base's selection, not a grid)."""
    return [k for k, values in BASELINES[name].grid.items() if len(values) >= 2]


def _selections(
    name: str,
    trials: Sequence[dict[str, Any]],
    horizons: Sequence[int],
    base_selected: dict[int, dict[str, float]] | None,
) -> list[dict[str, float]]:
    baseline = BASELINES[name]
    out = []
    for h in horizons:
        lr = float(base_selected[h]["lr"]) if baseline.tune_after and base_selected else None
        out.append(select(trials, h, lr=lr))
    return out


def at_edge(
    name: str,
    trials: Sequence[dict[str, Any]],
    selected: dict[str, dict[str, float]],
) -> dict[str, list[str]]:
    """``{str(horizon): [hyper-parameter, ...]}`` whose selected value is the smallest or
    largest value tried: the optimum may lie beyond what was searched."""
    return ends_selected([t["hparams"] for t in trials], selected, _tuned_keys(name))


def ends_selected(
    points: Sequence[dict[str, float]],
    selected: dict[str, dict[str, float]],
    keys: Sequence[str],
) -> dict[str, list[str]]:
    """``{horizon: [key, ...]}`` of the ``keys`` whose ``selected`` value is the smallest or
    largest value among the tried ``points`` (horizons without one are left out)."""
    out: dict[str, list[str]] = {}
    for h, hp in selected.items():
        found = []
        for k in keys:
            tried = sorted({float(p[k]) for p in points})
            if float(hp[k]) in (tried[0], tried[-1]):
                found.append(k)
        if found:
            out[h] = found
    return out


def values_beyond(
    grid: Sequence[float], tried: Sequence[float], picks: Sequence[float]
) -> list[float]:
    """The values of one hyper-parameter to try next: one step past each end of ``tried``
    where one of the ``picks`` (its selections) sits, by the ``grid``'s own ratio between its
    two outermost values on that side (3 significant digits), and at most
    :data:`MAX_EXTENSIONS` values past each end of the grid; ``[]`` when none is due."""
    values = sorted({float(x) for x in grid})
    tried = sorted({float(x) for x in tried})
    picks = {float(x) for x in picks}
    new = []
    if tried[0] in picks and sum(x < values[0] for x in tried) < MAX_EXTENSIONS:
        new.append(float(f"{tried[0] * values[0] / values[1]:.3g}"))
    if tried[-1] in picks and sum(x > values[-1] for x in tried) < MAX_EXTENSIONS:
        new.append(float(f"{tried[-1] * values[-1] / values[-2]:.3g}"))
    return new


def extension_points(
    name: str,
    trials: Sequence[dict[str, Any]],
    horizons: Sequence[int],
    base_selected: dict[int, dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """The points to try next because a selection sits at an end of the tried values (see
    the module docstring); ``[]`` when every selection is inside or the extensions are spent.

    The new value beyond an end is the grid's ratio between its two outermost values on that
    side (3 significant digits); the new points cross it with every value tried for the other
    hyper-parameters (and, for SAM, with each of its base's selected learning rates).
    """
    grid = BASELINES[name].grid
    tried = {k: sorted({float(t["hparams"][k]) for t in trials}) for k in grid}
    picks = _selections(name, trials, horizons, base_selected)
    grown = {k: list(v) for k, v in tried.items()}
    for k in _tuned_keys(name):
        grown[k] += values_beyond(grid[k], tried[k], [hp[k] for hp in picks])
    if grown == {k: list(v) for k, v in tried.items()}:
        return []
    done = {_key(t["hparams"]) for t in trials}
    keys = list(grid)
    points = [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*grown.values())]
    if BASELINES[name].tune_after:
        lrs = sorted({float(t["hparams"]["lr"]) for t in trials})
        points = [{"lr": lr, **pt} for lr in lrs for pt in points]
    return [pt for pt in points if _key(pt) not in done]


def _key(hparams: dict[str, float]) -> str:
    return ",".join(f"{k}={hparams[k]!r}" for k in sorted(hparams))


def summarize_trials(
    name: str, results: Sequence[dict[str, Any]], horizons: Sequence[int]
) -> list[dict[str, Any]]:
    """Group tuning-run records by hyper-parameters: per horizon, means over the tune seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    for r in results:
        k = _key(r["spec"]["hparams"])
        if k not in groups:
            groups[k], _ = [], order.append(k)
        groups[k].append(r)
    trials = []
    for k in order:
        runs = sorted(groups[k], key=lambda r: r["spec"]["seed"])
        val: dict[str, dict[str, Any]] = {}
        for h in horizons:
            accs = [r["metrics"][str(h)]["val_accuracy"] for r in runs]
            losses = [r["metrics"][str(h)]["val_loss"] for r in runs]
            diverged = sum(
                1 for r in runs if r["diverged_at"] is not None and r["diverged_at"] <= h
            )
            val[str(h)] = {
                "val_accuracy": math.fsum(accs) / len(accs),
                "val_loss": math.fsum(losses) / len(losses),
                "per_seed_accuracy": accs,
                "per_seed_loss": losses,
                "diverged": diverged,
            }
        trials.append(
            {
                "hparams": dict(runs[0]["spec"]["hparams"]),
                "seeds": [r["spec"]["seed"] for r in runs],
                "val": val,
            }
        )
    return trials


def select(
    trials: Sequence[dict[str, Any]],
    horizon: int,
    *,
    lr: float | None = None,
) -> dict[str, float]:
    """The selected hyper-parameters at ``horizon`` (see the module docstring for the rule).

    ``lr`` restricts the choice to trials with that learning rate (SAM on its base's lr).
    """
    best: tuple[float, float, int] | None = None
    chosen: dict[str, float] | None = None
    for i, t in enumerate(trials):
        if lr is not None and float(t["hparams"].get("lr", math.nan)) != lr:
            continue
        v = t["val"][str(horizon)]
        if v["diverged"] or not (math.isfinite(v["val_loss"]) and math.isfinite(v["val_accuracy"])):
            continue
        score = (-v["val_accuracy"], v["val_loss"], i)
        if best is None or score < best:
            best, chosen = score, t["hparams"]
    if chosen is None:
        raise RuntimeError(
            f"every tuning trial at horizon {horizon} diverged or gave a non-finite validation "
            "metric; widen the grid towards smaller learning rates"
        )
    return dict(chosen)


def tune(
    task: Task,
    name: str,
    *,
    horizons: Sequence[int],
    seeds: int = 2,
    base_selected: dict[int, dict[str, float]] | None = None,
    run: Callable[[RunSpec, Task], dict[str, Any]] = train_run,
) -> dict[str, Any]:
    """Tune baseline ``name`` on ``task`` serially; return its trials and per-horizon choice.

    The returned dict is the suite's JSON ``tuning`` entry: ``grid``, ``seeds``, ``trials``
    (per hyper-parameter point, mean validation accuracy/loss per horizon) and ``selected``
    (``{str(horizon): hparams}``). For SAM pass the base optimizer's ``selected`` (with int
    horizons) as ``base_selected``.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    horizons = sorted(set(int(h) for h in horizons))
    tune_seeds = [TUNE_SEED_BASE + i for i in range(seeds)]
    records: list[dict[str, Any]] = []
    points = plan_trials(name, base_selected)
    while True:
        for hp in points:
            for s in tune_seeds:
                spec = RunSpec(
                    task=task.name,
                    optimizer=name,
                    seed=s,
                    horizons=tuple(horizons),
                    purpose="tune",
                    hparams=hp,
                    batch_size=task.batch_size,
                    trace_probes=0,
                    eig_iters=0,
                )
                records.append(run(spec, task))
        points, entry = advance_tuning(name, records, horizons, tune_seeds, base_selected)
        if entry is not None:
            return entry


def advance_tuning(
    name: str,
    records: Sequence[dict[str, Any]],
    horizons: Sequence[int],
    tune_seeds: Sequence[int],
    base_selected: dict[int, dict[str, float]] | None = None,
) -> tuple[list[dict[str, float]], dict[str, Any] | None]:
    """The step after a round of tuning runs, taken by :func:`tune` and the parallel suite
    alike: ``(points, None)`` when a selection sits at an end of the grid and ``points`` must
    be tried next, else ``([], entry)`` with the finished JSON ``tuning`` entry."""
    trials = summarize_trials(name, records, horizons)
    points = extension_points(name, trials, horizons, base_selected)
    if points:
        return points, None
    return [], _tuning_entry(name, trials, records, horizons, tune_seeds, base_selected)


def _tuning_entry(
    name: str,
    trials: list[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    horizons: Sequence[int],
    tune_seeds: Sequence[int],
    base_selected: dict[int, dict[str, float]] | None,
) -> dict[str, Any]:
    """The JSON ``tuning`` entry: the trials, what was tried, and the selection per horizon."""
    baseline = BASELINES[name]
    selected = {
        str(h): hp
        for h, hp in zip(horizons, _selections(name, trials, horizons, base_selected), strict=True)
    }
    return {
        "baseline": name,
        "tune_after": baseline.tune_after,
        "grid": {k: list(v) for k, v in baseline.grid.items()},
        "tried": {k: sorted({float(t["hparams"][k]) for t in trials}) for k in baseline.grid},
        "at_edge": at_edge(name, trials, selected),
        "fixed": dict(baseline.fixed),
        "seeds": list(tune_seeds),
        "horizons": list(horizons),
        "trials": trials,
        "selected": selected,
        "seconds": math.fsum(r["seconds"] for r in records),
    }
