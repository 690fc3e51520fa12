"""The evaluation suite: plan every run, execute them (in parallel), write the results JSON.

:func:`evaluate` takes an :class:`EvalConfig` and returns (and writes) one JSON-ready dict:

- ``tuning``: per task and baseline, the validation-split trials and the selected
  hyper-parameters per horizon (:mod:`flatl2o.evaluation.tuning`);
- ``runs``: one record per (task, optimizer, seed), trained to the largest horizon and
  measured at every horizon on the full train and test splits, with flatness
  (:mod:`flatl2o.evaluation.runner`); baselines use the hyper-parameters selected for that
  horizon, so a baseline whose selection differs between horizons has one run per horizon;
- ``long_runs``: the long-horizon runs (``long_horizon`` steps, ``long_seeds`` seeds) on
  ``long_tasks``, with baselines at the hyper-parameters tuned for the largest horizon;
- ``optimizers`` (what each one is, regularizer, sibling), ``tasks``, ``config``,
  ``environment`` and ``timing``.

Every run is a pure function of its :class:`~flatl2o.evaluation.runner.RunSpec` and of the
code, torch, CPU and torch threads that compute it, so results do not depend on ``jobs``. The
runs are executed by :func:`flatl2o.evaluation.engine.run_planned` (workers, progress bars,
``eval.partial.json``, ``resume``: finished runs made by the same code are reused).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.engine import RESULTS_NAME, read_results, run_planned, task_named
from flatl2o.evaluation.optimizers import (
    OptimizerInfo,
    default_optimizers,
    resolve_optimizers,
    shipped_lr,
)
from flatl2o.evaluation.runner import RunSpec
from flatl2o.evaluation.tuning import (
    MAX_EXTENSIONS,
    TUNE_SEED_BASE,
    advance_tuning,
    plan_trials,
)
from flatl2o.hub import checkpoint_location, portable_command
from flatl2o.meta.tasks import TASKS

__all__ = [
    "RESULTS_NAME",
    "SEEN_TASK",
    "STANDARD_TASKS",
    "EvalConfig",
    "evaluate",
    "load_results",
    "seen_tasks",
]

#: The meta-training optimizee of every shipped checkpoint ("seen"); the others are unseen.
#: Only a fallback: :func:`seen_tasks` reads the learned checkpoints' recipes when they have one.
SEEN_TASK = "mnist-mlp-sigmoid"
STANDARD_TASKS = ("mnist-mlp-sigmoid", "mnist-mlp-relu", "mnist-mlp-deep", "mnist-conv")
FORMAT = "flatl2o-evaluation/1"


@dataclass
class EvalConfig:
    """What to evaluate and how much: the standard table is ``EvalConfig()``.

    ``optimizers`` empty means every shipped checkpoint plus every baseline at run time.
    ``flatness`` maps a task to its own ``(trace_probes, eig_iters)``, ``(0, 0)`` = not
    measured. The default skips the conv net: one Hessian-vector product over its full train
    split costs ~0.4 s on one core (~100x an MLP's), so 100 probes + 20 iterations at two
    horizons would cost more CPU time than the whole rest of the standard table.
    """

    optimizers: tuple[str, ...] = ()
    tasks: tuple[str, ...] = STANDARD_TASKS
    seeds: int = 5
    horizons: tuple[int, ...] = (100, 1000)
    long_horizon: int = 0
    long_tasks: tuple[str, ...] = (SEEN_TASK,)
    long_seeds: int = 2
    batch_size: int = 128
    tune_seeds: int = 2
    trace_probes: int = 100
    eig_iters: int = 20
    flatness: dict[str, tuple[int, int]] = field(default_factory=lambda: {"mnist-conv": (0, 0)})
    curve_points: int = 250
    seen_task: str = SEEN_TASK

    @classmethod
    def quick(cls, **overrides: Any) -> EvalConfig:
        """A tiny configuration for tests and smoke runs (8x8 digits, tens of steps)."""
        base: dict[str, Any] = dict(
            tasks=("digits-mlp",),
            seeds=2,
            horizons=(10, 30),
            long_horizon=60,
            long_tasks=("digits-mlp",),
            long_seeds=1,
            tune_seeds=1,
            trace_probes=4,
            eig_iters=3,
            flatness={},
            curve_points=100,
            seen_task="digits-mlp",
        )
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the problem and the fix."""
        unknown = [t for t in (*self.tasks, *self.long_tasks) if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(sorted(TASKS))}")
        if not self.tasks:
            raise ValueError("no tasks selected; pass at least one of " + ", ".join(TASKS))
        if not 1 <= self.seeds <= TUNE_SEED_BASE:
            raise ValueError(f"seeds must be in [1, {TUNE_SEED_BASE}], got {self.seeds}")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"horizons must be positive step counts, got {self.horizons}")
        if self.long_horizon and self.long_horizon < max(self.horizons):
            raise ValueError(
                f"long_horizon {self.long_horizon} must be 0 (off) or >= the largest horizon "
                f"{max(self.horizons)}"
            )
        if self.long_horizon and not set(self.long_tasks) <= set(self.tasks):
            raise ValueError(
                f"long_tasks {list(self.long_tasks)} must be among the evaluated tasks "
                f"{list(self.tasks)} (their baselines are tuned there)"
            )
        if self.long_horizon and not 1 <= self.long_seeds <= self.seeds:
            raise ValueError(f"long_seeds must be in [1, seeds={self.seeds}]")
        if self.tune_seeds < 1 or self.batch_size < 1:
            raise ValueError("tune_seeds and batch_size must be >= 1")
        bad = [t for t in self.flatness if t not in TASKS]
        if bad:
            raise ValueError(f"flatness budget for unknown task(s) {bad}; tasks: {sorted(TASKS)}")
        for task in {*self.tasks, *self.flatness}:
            probes, iters = self.flatness_for(task)
            if probes < 0 or iters < 0 or (probes == 0) != (iters == 0):
                raise ValueError(
                    f"flatness budget of {task!r} must be two positive counts (probes, "
                    f"iterations) or (0, 0) to skip it, got ({probes}, {iters})"
                )

    def flatness_for(self, task: str) -> tuple[int, int]:
        """(trace probes, power iterations) used on ``task``."""
        probes, iters = self.flatness.get(task, (self.trace_probes, self.eig_iters))
        return int(probes), int(iters)

    def long_checkpoints(self) -> tuple[int, ...]:
        """Steps at which long runs are measured: the horizons, 1-3-10 steps, the end."""
        if not self.long_horizon:
            return ()
        marks = {h for h in self.horizons if h <= self.long_horizon} | {self.long_horizon}
        v = 1
        while v <= self.long_horizon:
            for m in (v, 3 * v):
                if min(self.horizons) <= m <= self.long_horizon:
                    marks.add(m)
            v *= 10
        return tuple(sorted(marks))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        for k in ("optimizers", "tasks", "horizons", "long_tasks"):
            d[k] = list(d[k])
        d["flatness"] = {k: list(v) for k, v in self.flatness.items()}
        return d


class _Planner:
    """Decides which runs exist; unlocks baseline evaluations as their tuning completes."""

    def __init__(self, config: EvalConfig, infos: dict[str, OptimizerInfo]) -> None:
        self.config = config
        self.infos = infos
        self.horizons = tuple(sorted(set(config.horizons)))
        self.baselines = [n for n, i in infos.items() if i.kind == "baseline"]
        needed = set(self.baselines)
        for n in self.baselines:
            if BASELINES[n].tune_after:
                needed.add(BASELINES[n].tune_after)
        self.to_tune = [n for n in BASELINES if n in needed]  # registry order: bases first
        self.tune_seeds = [TUNE_SEED_BASE + i for i in range(config.tune_seeds)]
        self.pending: dict[tuple[str, str], int] = {}
        self.records: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.tuning: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in config.tasks}
        self.hparams: dict[str, dict[str, dict[str, dict[str, float]]]] = {
            t: {} for t in config.tasks
        }

    def _spec(
        self, task: str, name: str, seed: int, horizons: tuple[int, ...], **kw: Any
    ) -> RunSpec:
        info = self.infos.get(name)
        probes, iters = self.config.flatness_for(task)
        learned = info is not None and info.kind == "learned"
        fields: dict[str, Any] = dict(
            checkpoint=info.path if learned else None,
            fingerprint=info.fingerprint if learned else None,
            batch_size=self.config.batch_size,
            trace_probes=probes,
            eig_iters=iters,
            curve_points=self.config.curve_points,
        )
        fields.update(kw)
        return RunSpec(task=task, optimizer=name, seed=seed, horizons=horizons, **fields)

    def initial(self) -> list[RunSpec]:
        """Learned-rule runs and the first tuning trials."""
        specs: list[RunSpec] = []
        for task in self.config.tasks:
            for name, info in self.infos.items():
                if info.kind == "learned":
                    lr = shipped_lr(info.architecture)
                    specs += self._eval_specs(
                        task, name, {str(h): {"lr": lr} for h in self.horizons}
                    )
            for name in self.to_tune:
                if BASELINES[name].tune_after is None:
                    specs += self._tune_specs(task, name, plan_trials(name))
        return specs

    def _tune_specs(self, task: str, name: str, points: list[dict[str, float]]) -> list[RunSpec]:
        specs = [
            self._spec(
                task,
                name,
                s,
                self.horizons,
                purpose="tune",
                hparams=hp,
                trace_probes=0,
                eig_iters=0,
                curve_points=0,
            )
            for hp in points
            for s in self.tune_seeds
        ]
        key = (task, name)
        self.pending[key] = self.pending.get(key, 0) + len(specs)
        self.records.setdefault(key, [])  # an extension of the grid keeps the earlier trials
        return specs

    def _eval_specs(
        self, task: str, name: str, chosen: dict[str, dict[str, float]]
    ) -> list[RunSpec]:
        self.hparams[task][name] = chosen
        groups: dict[str, list[int]] = {}
        for h in self.horizons:  # one run per distinct hyper-parameter choice
            groups.setdefault(json.dumps(chosen[str(h)], sort_keys=True), []).append(h)
        specs = [
            self._spec(task, name, s, tuple(hs), purpose="eval", hparams=json.loads(hp))
            for hp, hs in groups.items()
            for s in range(self.config.seeds)
        ]
        if self.config.long_horizon and task in self.config.long_tasks:
            hp = chosen[str(self.horizons[-1])]
            specs += [
                self._spec(
                    task,
                    name,
                    s,
                    self.config.long_checkpoints(),
                    purpose="long",
                    hparams=dict(hp),
                    flatness_last_only=True,
                )
                for s in range(self.config.long_seeds)
            ]
        return specs

    def most_runs(self, phase: str, task: str, name: str) -> int:
        """The most runs baseline ``name`` can need on ``task`` in ``phase`` (``"tune"`` or
        ``"final"``) before its tuning is done: a grid grows by at most
        :data:`~flatl2o.evaluation.tuning.MAX_EXTENSIONS` values beyond each end, SAM crosses
        its grid with at most one base learning rate per horizon, and the final runs need at
        most one hyper-parameter choice per horizon (for the progress display)."""
        if phase == "tune":
            points = 1
            for values in BASELINES[name].grid.values():
                points *= len(values) + (2 * MAX_EXTENSIONS if len(values) >= 2 else 0)
            if BASELINES[name].tune_after:
                points *= len(self.horizons)
            return points * len(self.tune_seeds)
        runs = len(self.horizons) * self.config.seeds
        if self.config.long_horizon and task in self.config.long_tasks:
            runs += self.config.long_seeds
        return runs

    def progress_bounds(self) -> dict[str, dict[tuple[str, str], int]]:
        """``{phase: {(task, baseline): most runs}}`` of the runs whose number waits on tuning
        (for :class:`PhaseProgress`)."""
        bounds: dict[str, dict[tuple[str, str], int]] = {"tuning baselines": {}, "final runs": {}}
        for task in self.config.tasks:
            for name in self.to_tune:
                bounds["tuning baselines"][(task, name)] = self.most_runs("tune", task, name)
            for name in self.baselines:
                bounds["final runs"][(task, name)] = self.most_runs("final", task, name)
        return bounds

    def done(self, spec: RunSpec, record: dict[str, Any]) -> list[RunSpec]:
        """Account for a finished run; return the runs it unlocks."""
        if spec.purpose != "tune":
            return []
        key = (spec.task, spec.optimizer)
        self.records[key].append(record)
        self.pending[key] -= 1
        if self.pending[key]:
            return []
        base = BASELINES[spec.optimizer].tune_after
        base_sel = None
        if base:
            base_sel = {int(h): hp for h, hp in self.tuning[spec.task][base]["selected"].items()}
        more, entry = advance_tuning(
            spec.optimizer, self.records[key], self.horizons, self.tune_seeds, base_sel
        )
        if entry is None:  # a selection sits at an end of the grid: try beyond it first
            return self._tune_specs(spec.task, spec.optimizer, more)
        self.tuning[spec.task][spec.optimizer] = entry
        new: list[RunSpec] = []
        if spec.optimizer in self.baselines:
            new += self._eval_specs(spec.task, spec.optimizer, entry["selected"])
        for name in self.to_tune:
            if BASELINES[name].tune_after == spec.optimizer:
                sel = {int(h): hp for h, hp in entry["selected"].items()}
                new += self._tune_specs(spec.task, name, plan_trials(name, sel))
        return new


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results JSON written by :func:`evaluate` (a file or the folder holding it)."""
    return read_results(
        path,
        FORMAT,
        missing="no evaluation results at {}; run `flatl2o evaluate --out DIR` first",
        wrong="{} is not a flatl2o evaluation results file (format {})",
    )


def evaluate(
    config: EvalConfig | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    resume: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the evaluation described by ``config``; return the results (and write them to ``out``).

    ``jobs`` worker processes (each with ``threads`` torch threads) run independent runs in
    parallel; ``jobs=1`` runs everything in this process. ``out`` receives ``eval.json``
    (and ``eval.partial.json`` while running). ``resume`` reuses finished runs found there.
    """
    config = config or EvalConfig()
    config.validate()
    names = list(config.optimizers) or default_optimizers()
    infos = resolve_optimizers(names)
    planner = _Planner(config, infos)

    def assemble(results: dict[str, list[dict[str, Any]]], env: dict, t0: float, final: bool):
        return _assemble(config, infos, planner, results, env, t0, command, final)

    return run_planned(
        planner,
        assemble,
        out=out,
        jobs=jobs,
        threads=threads,
        progress=progress,
        resume=resume,
    )


def _compact(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("curve", "curve_every")}


def seen_tasks(config: EvalConfig, infos: dict[str, OptimizerInfo]) -> dict[str, list[str]]:
    """``{task: [learned rules meta-trained on it]}``: the "seen" tasks.

    Read from each learned checkpoint's recipe (``[task] name``); when no learned rule records
    one (baselines only, or checkpoints without a recipe), ``{config.seen_task: []}``.
    """
    seen: dict[str, list[str]] = {}
    for name, info in sorted(infos.items()):
        task = (info.recipe.get("task") or {}).get("name") if info.kind == "learned" else None
        if task:
            seen.setdefault(str(task), []).append(name)
    return seen or {config.seen_task: []}


def _published_info(info: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's entry as the results JSON records it: a learned rule's folder by its
    shipped name or a portable path (:func:`flatl2o.hub.checkpoint_location`), never this
    machine's absolute path."""
    if info.get("path"):
        info = {**info, "path": checkpoint_location(info["path"])}
    return info


def _published_run(record: dict[str, Any]) -> dict[str, Any]:
    """A run record with its checkpoint folder named as :func:`_published_info` names it
    (records reused from an older results file included)."""
    spec = record.get("spec") or {}
    if spec.get("checkpoint"):
        record = {**record, "spec": {**spec, "checkpoint": checkpoint_location(spec["checkpoint"])}}
    return record


def _assemble(
    config: EvalConfig,
    infos: dict[str, OptimizerInfo],
    planner: _Planner,
    results: dict[str, list[dict[str, Any]]],
    environment: dict[str, Any],
    t_start: float,
    command: str | None,
    final: bool,
) -> dict[str, Any]:
    """The results JSON (sorted so that it does not depend on completion order)."""

    def order(r: dict[str, Any]) -> tuple:
        s = r["spec"]
        return (
            s["task"],
            s["optimizer"],
            s["horizons"],
            s["seed"],
            json.dumps(s["hparams"], sort_keys=True),
        )

    tasks: dict[str, Any] = {}
    seen = seen_tasks(config, infos)
    for name in dict.fromkeys([*config.tasks, *(config.long_tasks if config.long_horizon else ())]):
        task = task_named(name, config.batch_size)
        ds = task.dataset
        tasks[name] = {
            "num_params": task.num_params,
            "num_classes": ds.num_classes if ds is not None else None,
            "seen": name in seen,
            "seen_by": seen.get(name, []),
            "dataset": ds.name if ds is not None else None,
            "splits": {s: len(ds.split(s)) for s in ("train", "val", "test")} if ds else {},
            "description": (TASKS[name].__doc__ or "").strip().splitlines()[0],
        }
    kinds = ("eval", "long", "tune")
    cpu = {k: math.fsum(r.get("cpu_seconds", 0.0) for r in results[k]) for k in kinds}
    wall = {k: math.fsum(r["seconds"] for r in results[k]) for k in kinds}
    return {
        "format": FORMAT,
        "complete": final,
        "command": portable_command(command) if command else command,
        "config": config.to_dict(),
        "environment": environment,
        "optimizers": {n: _published_info(i.to_dict()) for n, i in infos.items()},
        "tasks": tasks,
        "tuning": planner.tuning,
        "hparams": planner.hparams,
        "runs": [_published_run(r) for r in sorted(results["eval"], key=order)],
        "long_runs": [_published_run(r) for r in sorted(results["long"], key=order)],
        "tuning_runs": [_published_run(_compact(r)) for r in sorted(results["tune"], key=order)],
        "timing": {
            "wall_seconds": time.perf_counter() - t_start,
            "run_seconds": wall,
            "run_cpu_seconds": cpu,
            "runs_reused": len(results["reused"]),
        },
    }
