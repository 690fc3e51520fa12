"""The realistic suite: is the default learned optimizer better than AdamW where users train?

``flatl2o evaluate --suite realistic`` runs, on each workload of
:mod:`flatl2o.evaluation.workloads` (a transformer LM, a BatchNorm ResNet, an MLP regression,
an LSTM, a fine-tuning), with the evaluation's one runner and execution engine
(:func:`flatl2o.evaluation.engine.run_planned`: workers, progress, ``--resume``), these arms:

- ``adam``: Adam at lr 1e-3, untuned (what users start with);
- ``adamw``: AdamW, lr and weight decay tuned, linear warmup + cosine decay (what users run);
- ``sgd``: SGD with momentum 0.9, lr tuned;
- ``muon``: ``torch.optim.Muon`` on the 2-D hidden weights, AdamW on the rest, lr tuned
  (workloads that have 2-D hidden weights: not the CNN, whose hidden weights are convolutions);
- every shipped checkpoint through ``flatl2o.L2O(model.parameters(), name)`` at its lr as
  shipped (1.0 for the paper's rules, 1e-3 for NormProp; the
  default checkpoint among them is the one-line swap, untuned);
- ``l2o-lr``: the default checkpoint with its lr multiplier tuned;
- ``l2o-cosine``: the default checkpoint with AdamW's warmup + cosine schedule on its
  multiplier (peak 1.0, untuned).

Tuning uses the VALIDATION split only (``purpose="tune"`` runs never read the test split) and
:data:`~flatl2o.evaluation.tuning.TUNE_SEED_BASE` seeds; per horizon the point with the lowest
mean validation loss over the tune seeds is selected, a point that diverged on any tune seed is
not eligible. As in the MNIST suite's tuning, a selection at an end of the learning rates
tried gets one more value beyond that end (the grid's outer ratio), crossed with the other
values tried, and the selection is made again; one still at an end is recorded in
``at_edge``. A scheduled arm (``adamw``, ``l2o-cosine``) is a different run at every horizon
(its schedule ends there); a constant-lr arm is one run measured at every horizon. The long
horizon reuses the hyper-parameters selected at the largest horizon. A workload's
``lr_scale`` (fine-tuning: 0.1) scales every tuning grid's learning rates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.engine import read_results, run_planned
from flatl2o.evaluation.optimizers import shipped_lr
from flatl2o.evaluation.runner import RunSpec
from flatl2o.evaluation.suite import _published_info, _published_run
from flatl2o.evaluation.tuning import (
    MAX_EXTENSIONS,
    TUNE_SEED_BASE,
    ends_selected,
    values_beyond,
)
from flatl2o.evaluation.workloads import (
    STANDARD,
    STANDARD_TINY,
    WORKLOADS,
    describe,
    make_workload,
)

__all__ = ["FORMAT", "RealisticConfig", "evaluate_realistic", "load_realistic", "select_by_loss"]

FORMAT = "flatl2o-realistic/1"
#: Tuning grids of the arms that are not in BASELINES with the grid the suite uses.
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "adamw": BASELINES["adamw"].grid,
    "muon": BASELINES["muon"].grid,
    "sgd": {"lr": (0.01, 0.03, 0.1, 0.3)},
    "l2o-lr": {"lr": (0.1, 0.3, 1.0, 3.0)},
}
#: Arms built on the default learned checkpoint.
DEFAULT_ARMS = ("l2o-lr", "l2o-cosine")


@dataclass
class RealisticConfig:
    """What the realistic suite runs; ``RealisticConfig()`` is the full suite.

    ``checkpoints`` empty means every shipped checkpoint. ``long_arms`` are the arms that also
    run ``long_horizon`` steps on ``long_workloads`` (``"default"``: the default checkpoint;
    empty: every arm). The default leaves out the non-default checkpoints: 3 seeds x 20,000
    steps of five more learned rules would double the suite's time, and they are measured at
    the other horizons.
    """

    workloads: tuple[str, ...] = STANDARD
    seeds: int = 3
    horizons: tuple[int, ...] = (1000, 5000)
    long_horizon: int = 20000
    long_workloads: tuple[str, ...] = ("lm",)
    long_arms: tuple[str, ...] = ("adam", "adamw", "sgd", "muon", "default", *DEFAULT_ARMS)
    tune_seeds: int = 1
    checkpoints: tuple[str, ...] = ()
    curve_points: int = 100

    @classmethod
    def quick(cls, **overrides: Any) -> RealisticConfig:
        """Toy sizes (``-tiny`` workloads, tens of steps) for smoke runs and the tests."""
        base: dict[str, Any] = dict(
            workloads=STANDARD_TINY,
            seeds=2,
            horizons=(10, 30),
            long_horizon=60,
            long_workloads=("lm-tiny",),
            curve_points=30,
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem and the fix."""
        unknown = [w for w in (*self.workloads, *self.long_workloads) if w not in WORKLOADS]
        if unknown:
            raise ValueError(f"unknown workload(s) {unknown}; available: {', '.join(WORKLOADS)}")
        if not self.workloads or self.seeds < 1 or self.tune_seeds < 1:
            raise ValueError("need at least one workload, seeds >= 1 and tune_seeds >= 1")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"horizons must be positive step counts, got {self.horizons}")
        if self.long_horizon and self.long_horizon <= max(self.horizons):
            raise ValueError(f"long_horizon must be 0 (off) or > {max(self.horizons)}")
        if not set(self.long_workloads) <= set(self.workloads):
            raise ValueError("long_workloads must be among the workloads (they are tuned there)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _scaled(grid: dict[str, tuple[float, ...]], scale: float) -> list[dict[str, float]]:
    """Grid points (first key slowest), learning rates times ``scale``."""
    import itertools

    keys = list(grid)
    return [
        {
            k: float(f"{v * scale:.3g}") if k == "lr" else float(v)
            for k, v in zip(keys, vs, strict=True)
        }
        for vs in itertools.product(*grid.values())
    ]


def select_by_loss(
    trials: list[dict[str, Any]], horizon: int
) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
    """The tuning records' point with the lowest mean validation loss at ``horizon`` (points
    that diverged on a tune seed are not eligible), and the per-point summary."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in trials:
        groups.setdefault(json.dumps(r["spec"]["hparams"], sort_keys=True), []).append(r)
    summary, best = [], None
    for hp, runs in groups.items():
        losses = [
            r["metrics"][str(horizon)]["val_loss"] for r in runs if str(horizon) in r["metrics"]
        ]
        if not losses:
            continue
        diverged = sum(
            1 for r in runs if r["diverged_at"] is not None and r["diverged_at"] <= horizon
        )
        mean = math.fsum(losses) / len(losses) if all(map(math.isfinite, losses)) else math.nan
        summary.append({"hparams": json.loads(hp), "val_loss": mean, "diverged": diverged})
        if not diverged and math.isfinite(mean) and (best is None or mean < best[0]):
            best = (mean, json.loads(hp))
    summary.sort(key=lambda t: json.dumps(t["hparams"], sort_keys=True))
    return (best[1] if best else None), summary


#: Per-step curves, kept for the evaluation runs only (the tuning runs' would bloat the JSON).
_CURVES = ("curve", "norm_curve", "curve_seconds")


class _Planner:
    """The realistic suite's runs; tuned arms' evaluations unlock when their tuning ends."""

    def __init__(self, config: RealisticConfig, infos: dict[str, dict[str, Any]]) -> None:
        self.config = config
        self.infos = infos
        self.horizons = tuple(sorted(set(config.horizons)))
        self.tune_seeds = [TUNE_SEED_BASE + i for i in range(config.tune_seeds)]
        self.pending: dict[tuple[str, str], int] = {}
        self.records: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.points: dict[tuple[str, str], list[dict[str, float]]] = {}
        self.tuning: dict[str, dict[str, Any]] = {w: {} for w in config.workloads}
        self.default = next(n for n, i in infos.items() if i.get("default"))

    def _shipped_lr(self, arm: str) -> float:
        """The lr a checkpoint arm runs at as shipped (``l2o-lr`` / ``l2o-cosine``: the
        default checkpoint's)."""
        return shipped_lr(self.infos[arm if arm in self.infos else self.default]["architecture"])

    def _lr_scale(self, workload: str, arm: str) -> float:
        """What an arm's lr grid is multiplied by: the workload's ``lr_scale``, and for
        ``l2o-lr`` (a grid of multipliers) the default checkpoint's lr as shipped."""
        scale = make_workload(workload).lr_scale
        return scale * self._shipped_lr(arm) if arm == "l2o-lr" else scale

    def arms(self, workload: str) -> list[str]:
        """The arms run on ``workload`` (Muon only where there are 2-D hidden weights)."""
        out = ["adam", "adamw", "sgd"]
        w = make_workload(workload)
        model = w.factory()
        if any(g["role"] == "hidden" for g in w.param_groups(model)):
            out.append("muon")
        return [*out, *(n for n, i in self.infos.items() if i["kind"] == "learned"), *DEFAULT_ARMS]

    def _long(self, workload: str, arm: str) -> bool:
        c = self.config
        chosen = not c.long_arms or arm in c.long_arms
        chosen = chosen or (arm == self.default and "default" in c.long_arms)
        return bool(c.long_horizon) and workload in c.long_workloads and chosen

    def _spec(self, workload: str, arm: str, seed: int, horizons, **kw: Any) -> RunSpec:
        learned = arm in self.infos or arm in DEFAULT_ARMS
        info = self.infos[arm if arm in self.infos else self.default]
        fields: dict[str, Any] = dict(
            checkpoint=info["path"] if learned else None,
            fingerprint=info["fingerprint"] if learned else None,
            batch_size=make_workload(workload).batch_size,
            trace_probes=0,
            eig_iters=0,
            curve_points=self.config.curve_points,
            schedule="warmup-cosine" if arm in ("adamw", "l2o-cosine") else None,
        )
        fields.update(kw)
        return RunSpec(task=workload, optimizer=arm, seed=seed, horizons=tuple(horizons), **fields)

    def _eval(self, workload: str, arm: str, chosen: dict[int, dict[str, float]]) -> list[RunSpec]:
        """Evaluation (and long) runs of an arm at its per-horizon hyper-parameters."""
        scheduled = arm in ("adamw", "l2o-cosine")
        groups: dict[str, list[int]] = {}
        for h in self.horizons:
            key = json.dumps(chosen[h], sort_keys=True) + (f"@{h}" if scheduled else "")
            groups.setdefault(key, []).append(h)
        specs = [
            self._spec(workload, arm, s, hs, hparams=chosen[hs[0]])
            for hs in groups.values()
            for s in range(self.config.seeds)
        ]
        if self._long(workload, arm):
            last = chosen[self.horizons[-1]]
            marks = sorted(
                {*self.horizons, self.config.long_horizon // 2, self.config.long_horizon}
            )
            specs += [
                self._spec(workload, arm, s, marks, purpose="long", hparams=last)
                for s in range(self.config.seeds)
            ]
        return specs

    def _tune(
        self, workload: str, arm: str, points: list[dict[str, float]] | None = None
    ) -> list[RunSpec]:
        """Tuning runs of ``points`` (default: the arm's grid, learning rates scaled)."""
        key = (workload, arm)
        if points is None:
            points = _scaled(GRIDS[arm], self._lr_scale(workload, arm))
            self.records[key], self.points[key] = [], []
        self.points[key] += points
        runs = [(h,) for h in self.horizons] if arm == "adamw" else [self.horizons]
        specs = [
            self._spec(workload, arm, s, hs, purpose="tune", hparams=hp, curve_points=0)
            for hp in points
            for hs in runs
            for s in self.tune_seeds
        ]
        self.pending[key] = self.pending.get(key, 0) + len(specs)
        return specs

    def _extension(self, key: tuple[str, str], chosen: dict[int, dict[str, float]]):
        """Points one lr step beyond an end of the tried values where a selection sits there
        (:func:`~flatl2o.evaluation.tuning.values_beyond` on the scaled grid), crossed with
        the other keys' tried values."""
        tried = self.points[key]
        grid = [p["lr"] for p in _scaled(GRIDS[key[1]], self._lr_scale(*key))]
        picks = [pick["lr"] for pick in chosen.values()]
        new = values_beyond(grid, [p["lr"] for p in tried], picks)
        others = {
            json.dumps({k: v for k, v in p.items() if k != "lr"}, sort_keys=True) for p in tried
        }
        return [{"lr": lr, **json.loads(o)} for lr in sorted(new) for o in sorted(others)]

    def initial(self) -> list[RunSpec]:
        """Untuned arms' runs and every tuning trial."""
        specs: list[RunSpec] = []
        for w in self.config.workloads:
            for arm in self.arms(w):
                if arm in GRIDS:
                    specs += self._tune(w, arm)
                elif arm == "adam":
                    specs += self._eval(w, arm, {h: {"lr": 1e-3} for h in self.horizons})
                else:  # checkpoints and l2o-cosine: at their lr as shipped
                    lr = self._shipped_lr(arm)
                    specs += self._eval(w, arm, {h: {"lr": lr} for h in self.horizons})
        return specs

    def progress_bounds(self) -> dict[str, dict[tuple[str, str], int]]:
        """``{phase: {(workload, arm): most runs}}`` of the tuned arms, whose run counts wait on
        their tuning (for :class:`~flatl2o.evaluation.engine.PhaseProgress`): the lr values grow
        by at most ``MAX_EXTENSIONS`` beyond each end; the final runs need at most one choice
        per horizon (plus the long runs)."""
        bounds: dict[str, dict[tuple[str, str], int]] = {"tuning baselines": {}, "final runs": {}}
        for w in self.config.workloads:
            for arm in self.arms(w):
                if arm not in GRIDS:
                    continue
                points = 1
                for k, values in GRIDS[arm].items():
                    points *= len(values) + (2 * MAX_EXTENSIONS if k == "lr" else 0)
                per_point = len(self.horizons) if arm == "adamw" else 1
                bounds["tuning baselines"][(w, arm)] = points * per_point * len(self.tune_seeds)
                finals = len(self.horizons) * self.config.seeds
                bounds["final runs"][(w, arm)] = finals + (
                    self.config.seeds if self._long(w, arm) else 0
                )
        return bounds

    def done(self, spec: RunSpec, record: dict[str, Any]) -> list[RunSpec]:
        """Account for a finished run; return the evaluations a finished tuning unlocks."""
        if spec.purpose != "tune":
            return []
        key = (spec.task, spec.optimizer)
        self.records[key].append(record)
        self.pending[key] -= 1
        if self.pending[key]:
            return []
        chosen, trials = {}, {}
        tried = self.points[key]
        scale = self._lr_scale(spec.task, spec.optimizer)
        for h in self.horizons:
            pick, trials[str(h)] = select_by_loss(self.records[key], h)
            if pick is None:  # every point diverged: report it, evaluate the smallest lr
                pick = dict(min(tried, key=lambda p: p["lr"]))
            chosen[h] = pick
        more = self._extension(key, chosen)
        if more:  # a selection sits at an end of the grid: try one step beyond it first
            return self._tune(spec.task, spec.optimizer, more)
        values = {k: sorted({p[k] for p in tried}) for k in tried[0]}
        selected = {str(h): hp for h, hp in chosen.items()}
        self.tuning[spec.task][spec.optimizer] = {
            "grid": {
                k: sorted({p[k] for p in _scaled(GRIDS[spec.optimizer], scale)})
                for k in GRIDS[spec.optimizer]
            },
            "tried": values,
            "seeds": self.tune_seeds,
            "trials": trials,
            "selected": selected,
            # every key with more than one value tried (the extensions grow only lr)
            "at_edge": ends_selected(tried, selected, [k for k, v in values.items() if len(v) > 1]),
        }
        return self._eval(spec.task, spec.optimizer, chosen)


def _learned_infos(checkpoints: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Name -> path, fingerprint, architecture, description of each learned checkpoint."""
    from flatl2o.evaluation.optimizers import resolve_optimizers
    from flatl2o.hub import default_pretrained_name, list_pretrained

    names = list(checkpoints) or list_pretrained()
    default = default_pretrained_name()
    if default not in names:
        names.append(default)
    infos = resolve_optimizers(names)
    out = {}
    for n, i in infos.items():
        if i.kind != "learned":
            raise ValueError(f"{n!r} is not a learned checkpoint; the baselines are always run")
        out[n] = {**i.to_dict(), "default": n == default}
        out[n].pop("recipe")
    return out


def evaluate_realistic(
    config: RealisticConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    resume: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the realistic suite; return (and write to ``out``/eval.json) its results JSON."""
    config = config or RealisticConfig()
    config.validate()
    infos = _learned_infos(config.checkpoints)
    planner = _Planner(config, infos)

    def order(r: dict[str, Any]) -> tuple:
        s = r["spec"]
        return (s["task"], s["optimizer"], s["horizons"], s["seed"], json.dumps(s["hparams"]))

    def assemble(results: dict, environment: dict, t_start: float, final: bool) -> dict:
        arms = {w: planner.arms(w) for w in config.workloads}
        return {
            "format": FORMAT,
            "complete": final,
            "command": command,
            "config": config.to_dict(),
            "environment": environment,
            "default": planner.default,
            "learned": {n: _published_info(i) for n, i in infos.items()},
            "arms": arms,
            "optimizers": _arm_descriptions(infos),
            "workloads": {w: describe(w) for w in config.workloads},
            "tuning": planner.tuning,
            "runs": [_published_run(r) for r in sorted(results["eval"], key=order)],
            "long_runs": [_published_run(r) for r in sorted(results["long"], key=order)],
            "tuning_runs": [
                _published_run({k: v for k, v in r.items() if k not in _CURVES})
                for r in sorted(results["tune"], key=order)
            ],
            "timing": {
                "wall_seconds": time.perf_counter() - t_start,
                "run_cpu_seconds": {
                    k: math.fsum(r.get("cpu_seconds", 0.0) for r in results[k])
                    for k in ("eval", "long", "tune")
                },
                "runs_reused": len(results["reused"]),
            },
        }

    return run_planned(
        planner,
        assemble,
        out=out,
        jobs=jobs,
        threads=threads,
        progress=progress,
        resume=resume,
    )


def _arm_descriptions(infos: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    default = next(n for n, i in infos.items() if i.get("default"))
    out = {
        "adam": {"kind": "baseline", "description": "Adam at lr 1e-3, untuned (the user's start)"},
        "adamw": {"kind": "baseline", "description": BASELINES["adamw"].description},
        "sgd": {"kind": "baseline", "description": "SGD with momentum 0.9, lr tuned"},
        "muon": {"kind": "baseline", "description": BASELINES["muon"].description},
    }
    for n, i in infos.items():
        tag = " (the default: `L2O(model.parameters())`, untuned)" if i.get("default") else ""
        lr = shipped_lr(i["architecture"])
        out[n] = {"kind": "learned", "description": f"shipped checkpoint `{n}` at lr {lr!r}{tag}"}
    out["l2o-lr"] = {"kind": "learned", "description": f"`{default}` with its lr multiplier tuned"}
    out["l2o-cosine"] = {
        "kind": "learned",
        "description": f"`{default}` with AdamW's warmup + cosine schedule on its multiplier",
    }
    return out


def load_realistic(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a realistic-suite results JSON (a file or the folder holding it)."""
    return read_results(
        path,
        FORMAT,
        missing="no realistic results at {}; run `flatl2o evaluate --suite realistic --out DIR`",
        wrong="{} is not a realistic-suite results file (format {})",
    )
