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
code, torch, CPU and torch threads that compute it, so results do not depend on ``jobs``; with
``resume=True`` runs whose key is already in the output folder's JSON are reused (a checkpoint
retrained in between has a new fingerprint, so a new key), but only when that JSON was made by
the same :data:`REUSE_ENVIRONMENT`: a learned rule's 1000-step trajectory is chaotic enough
that a float-level change (a kernel rewrite, another thread count) moves its test accuracy by
whole percentage points, so runs of different code are never mixed in one results file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.optimizers import OptimizerInfo, default_optimizers, resolve_optimizers
from flatl2o.evaluation.runner import RunSpec, Workload, train_run
from flatl2o.evaluation.tuning import (
    MAX_EXTENSIONS,
    TUNE_SEED_BASE,
    advance_tuning,
    plan_trials,
)
from flatl2o.evaluation.workloads import WORKLOADS, make_workload
from flatl2o.hub import checkpoint_location, portable_command
from flatl2o.meta.tasks import TASKS, Task, make_task

__all__ = [
    "RESULTS_NAME",
    "SEEN_TASK",
    "STANDARD_TASKS",
    "EvalConfig",
    "evaluate",
    "load_results",
    "run_planned",
    "seen_tasks",
]

#: The meta-training optimizee of every shipped checkpoint ("seen"); the others are unseen.
#: Only a fallback: :func:`seen_tasks` reads the learned checkpoints' recipes when they have one.
SEEN_TASK = "mnist-mlp-sigmoid"
STANDARD_TASKS = ("mnist-mlp-sigmoid", "mnist-mlp-relu", "mnist-mlp-deep", "mnist-conv")
#: File name of the results JSON inside the output folder.
RESULTS_NAME = "eval.json"
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


# ----------------------------------------------------------------------- worker side


@functools.cache
def _task(name: str, batch_size: int) -> Task | Workload:
    """The optimizee called ``name``: a realistic workload or a flat :class:`Task`."""
    if name in WORKLOADS:
        workload = make_workload(name)
        if workload.batch_size != batch_size:
            raise ValueError(f"workload {name!r} trains with batch size {workload.batch_size}")
        return workload
    return make_task(name, batch_size=batch_size)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def _run_spec(spec: RunSpec) -> dict[str, Any]:
    """Worker entry point: run one spec on the (cached) task it names."""
    return train_run(spec, _task(spec.task, spec.batch_size))


# ------------------------------------------------------------------------ planning


class _Costs:
    """Rough seconds per run (for longest-first scheduling and the progress bar)."""

    def __init__(self, tasks: Iterable[str], batch_size: int, infos: dict[str, OptimizerInfo]):
        self.grad: dict[str, float] = {}
        self.hvp: dict[str, float] = {}
        self.rule: dict[tuple[str, str], float] = {}
        for name in tasks:
            task = _task(name, batch_size)
            gen = torch.Generator().manual_seed(0)
            theta = task.init_params(gen).requires_grad_(True)
            x, y = task.sample_batch(gen)
            self.grad[name] = _timed(functools.partial(_backward, task, theta, x, y))
            n_train = len(task.dataset.train) if task.dataset is not None else batch_size
            self.hvp[name] = 4 * self.grad[name] * n_train / batch_size
            for info in infos.values():
                if info.kind == "learned" and info.path is not None:
                    self.rule[(name, info.name)] = _rule_seconds(info.path, task.num_params)

    def of(self, spec: RunSpec) -> float:
        """Estimated seconds of ``spec``."""
        steps = max(spec.horizons)
        grads = BASELINES[spec.optimizer].grads_per_step if spec.checkpoint is None else 1
        rule = self.rule.get((spec.task, spec.optimizer), 0.0)
        train = steps * (grads * self.grad[spec.task] * 1.3 + rule)
        n_flat = 1 if spec.flatness_last_only else len(spec.horizons)
        flat = n_flat * (spec.trace_probes + spec.eig_iters + 2) * self.hvp[spec.task]
        return train + (flat if spec.trace_probes and spec.purpose != "tune" else 0.0)


def _backward(task: Task, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    task.loss(theta, x, y).backward()


def _timed(fn: Callable[[], Any], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@functools.cache
def _rule_seconds(path: str, n: int) -> float:
    from flatl2o import load_rule

    rule = load_rule(path)
    state = rule.init_state(n)
    g = torch.full((n,), 1e-3)
    with torch.no_grad():
        return _timed(lambda: rule(g, state, 1), repeats=3)


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
                    specs += self._eval_specs(
                        task, name, {str(h): {"lr": 1.0} for h in self.horizons}
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


# ------------------------------------------------------------------------ execution


#: Entries of the results' ``environment`` that a reused run must share with this invocation.
REUSE_ENVIRONMENT = ("code_sha", "torch", "cpu", "threads_per_job")


def code_sha() -> str:
    """SHA-256 (20 hex digits) of the flatl2o package's ``.py`` and ``.c`` files: the code
    that computes a run, whether or not it is a git checkout with uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c") and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def _environment(jobs: int, threads: int) -> dict[str, Any]:
    from flatl2o import __version__
    from flatl2o.kernels.cpu import _cpu_model

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    return {
        "flatl2o": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jobs": jobs,
        "threads_per_job": threads,
        "git_commit": git("rev-parse", "HEAD"),
        "code_sha": code_sha(),
        "cpu": _cpu_model().strip(),
    }


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results JSON written by :func:`evaluate` (a file or the folder holding it)."""
    return read_results(
        path,
        FORMAT,
        missing="no evaluation results at {}; run `flatl2o evaluate --out DIR` first",
        wrong="{} is not a flatl2o evaluation results file (format {})",
    )


def read_results(
    path: str | os.PathLike[str], fmt: str, *, missing: str, wrong: str
) -> dict[str, Any]:
    """A suite's results JSON (a file or the folder holding it) whose ``format`` is ``fmt``;
    ``missing`` / ``wrong`` word the errors (formatted with the path, and the format)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME
    if not p.is_file():
        raise FileNotFoundError(missing.format(p))
    data = json.loads(p.read_text())
    if data.get("format") != fmt:
        raise ValueError(wrong.format(p, fmt))
    return data


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _previous_records(out: Path | None, environment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finished runs in ``out``'s results JSONs that were made by this ``environment``'s
    :data:`REUSE_ENVIRONMENT` (others are not reused, with a warning saying why)."""
    found: dict[str, dict[str, Any]] = {}
    if out is None:
        return found
    for name in (RESULTS_NAME, "eval.partial.json"):
        p = out / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            theirs = data.get("environment") or {}
            differ = [k for k in REUSE_ENVIRONMENT if theirs.get(k) != environment[k]]
            if differ:
                warnings.warn(
                    f"--resume: not reusing the runs in {p}: they were made with another "
                    + ", ".join(f"{k} ({theirs.get(k)!r}, now {environment[k]!r})" for k in differ)
                    + "; they are run again",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            for k in ("runs", "long_runs", "tuning_runs"):
                for r in data.get(k, []):
                    found[r["key"]] = r
    return found


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Turn SIGTERM into KeyboardInterrupt (so workers are stopped); return the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


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
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    names = list(config.optimizers) or default_optimizers()
    infos = resolve_optimizers(names)
    tasks_used = list(
        dict.fromkeys([*config.tasks, *(config.long_tasks if config.long_horizon else ())])
    )
    planner = _Planner(config, infos)

    def assemble(results: dict[str, list[dict[str, Any]]], env: dict, t0: float, final: bool):
        return _assemble(config, infos, planner, results, env, t0, command, final)

    return run_planned(
        planner,
        lambda: _Costs(tasks_used, config.batch_size, infos),
        assemble,
        out=out,
        jobs=jobs,
        threads=threads,
        progress=progress,
        resume=resume,
    )


def run_planned(
    planner: Any,
    costs: Callable[[], Any],
    assemble: Callable[[dict[str, list[dict[str, Any]]], dict[str, Any], float, bool], dict],
    *,
    out: str | os.PathLike[str] | None,
    jobs: int,
    threads: int,
    progress: bool,
    resume: bool,
) -> dict[str, Any]:
    """Execute a planner's runs (``planner.initial()``, then what ``planner.done`` unlocks) and
    write the results JSON that ``assemble(results, environment, t_start, final)`` builds: the
    engine shared by this suite and the realistic one (parallel workers, progress bar,
    ``eval.partial.json`` every 30 s and on an interruption, ``resume``).

    ``costs()`` builds the cost model (``.of(spec)``: estimated seconds) under the run threads.
    """
    out_dir = Path(out) if out is not None else None
    # the code, torch and settings that compute the runs, read once before any run starts
    # (read at the end, it would name whatever the checkout holds by then)
    environment = _environment(jobs, threads)
    previous = _previous_records(out_dir, environment) if resume else {}
    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    undo_signal = _sigterm_as_interrupt()
    try:
        cost_model = costs()
        kinds = ("eval", "long", "tune", "reused")
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        partial = out_dir / "eval.partial.json" if out_dir is not None else None

        def snapshot(final: bool) -> dict[str, Any]:
            return assemble(results, environment, t_start, final)

        try:
            _execute(
                planner,
                cost_model,
                previous,
                results,
                jobs,
                threads,
                progress,
                on_progress=(lambda: _write_json(snapshot(False), partial)) if partial else None,
            )
        except BaseException:  # keep what finished, for --resume
            if partial is not None:
                _write_json(snapshot(False), partial)
            raise
    finally:
        torch.set_num_threads(prev_threads)
        undo_signal()
    data = snapshot(True)
    if out_dir is not None:
        _write_json(data, out_dir / RESULTS_NAME)
        if partial is not None and partial.exists():
            partial.unlink()
    return data


def _execute(
    planner: Any,
    costs: Any,
    previous: dict[str, dict[str, Any]],
    results: dict[str, list[dict[str, Any]]],
    jobs: int,
    threads: int,
    progress: bool,
    on_progress: Callable[[], None] | None,
) -> None:
    """Run every planned spec, longest first, feeding results back to the planner."""
    heap: list[tuple[float, int, RunSpec]] = []
    counter = 0
    bars = PhaseProgress(planner, enabled=progress)
    last_save = time.perf_counter()

    def push(specs: list[RunSpec]) -> None:
        nonlocal counter
        for spec in specs:
            heapq.heappush(heap, (-costs.of(spec), counter, spec))
            counter += 1
        bars.added(specs)

    def finish(spec: RunSpec, record: dict[str, Any]) -> None:
        nonlocal last_save
        results[spec.purpose].append(record)
        push(planner.done(spec, record))
        bars.finished(spec)
        if on_progress is not None and time.perf_counter() - last_save > 30:
            on_progress()
            last_save = time.perf_counter()

    push(planner.initial())
    try:
        if jobs == 1:
            while heap:
                _, _, spec = heapq.heappop(heap)
                if spec.key() in previous:
                    results["reused"].append({"key": spec.key()})
                record = previous.get(spec.key()) or _run_spec(spec)
                finish(spec, record)
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)
        )
        try:
            running: dict[Future, RunSpec] = {}
            while heap or running:
                while heap and len(running) < jobs:
                    _, _, spec = heapq.heappop(heap)
                    if spec.key() in previous:
                        results["reused"].append({"key": spec.key()})
                        finish(spec, previous[spec.key()])
                        continue
                    running[pool.submit(_run_spec, spec)] = spec
                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    finish(running.pop(fut), fut.result())
        except BaseException:  # Ctrl-C, SIGTERM or a failed run: stop the workers now
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    finally:
        bars.close()


#: The phases of an evaluation as the progress display names them, by run purpose.
PHASES = {"tune": "tuning baselines", "eval": "final runs", "long": "final runs"}


class PhaseProgress:
    """The progress of ``flatl2o evaluate``, one bar per phase (tuning the baselines, then the
    final runs of every optimizer), counted in runs.

    Runs are planned as tuning proceeds (a grid grows, SAM's trials and a baseline's final runs
    wait for a selection), so a bar's total starts at the most runs the phase can need
    (the planner's ``progress_bounds()``) and only shrinks to the exact count as each tuning
    finishes: a bar never goes backwards. ``planner.tuning[task]`` holds the finished tunings."""

    def __init__(self, planner: Any, *, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.planner = planner
        self.bound = planner.progress_bounds()
        self.known: dict[str, dict[tuple[str, str], int]] = {p: {} for p in self.bound}
        self.done = dict.fromkeys(self.bound, 0)
        self.bars = {
            phase: tqdm(
                total=self.total(phase),
                desc=f"{phase:<16}",
                unit="run",
                position=i,
                disable=not enabled,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs "
                "[{elapsed}<{remaining}]",
            )
            for i, phase in enumerate(self.bound)
        }

    def total(self, phase: str) -> int:
        """The runs of ``phase``: exact where known, else the most it can need."""
        known, bound = self.known[phase], self.bound[phase]
        return sum(known.values()) + sum(
            max(0, b - known.get(key, 0)) for key, b in bound.items() if self._open(phase, key)
        )

    def _open(self, phase: str, key: tuple[str, str]) -> bool:
        """Whether more runs of ``key`` may still be planned in ``phase``."""
        task, name = key
        if phase == "tuning baselines":
            return name not in self.planner.tuning.get(task, {})
        return key not in self.known[phase]  # a baseline's final runs are planned at once

    def added(self, specs: list[RunSpec]) -> None:
        """Account for newly planned runs."""
        for spec in specs:
            known = self.known[PHASES[spec.purpose]]
            key = (spec.task, spec.optimizer)
            known[key] = known.get(key, 0) + 1
        self._show()

    def finished(self, spec: RunSpec) -> None:
        """Account for a finished (or reused) run."""
        self.done[PHASES[spec.purpose]] += 1
        self._show()

    def fractions(self) -> dict[str, tuple[int, int]]:
        """``{phase: (runs done, runs in total)}``."""
        return {phase: (self.done[phase], self.total(phase)) for phase in self.bound}

    def _show(self) -> None:
        for phase, (done, total) in self.fractions().items():
            bar = self.bars[phase]
            bar.total = total
            bar.n = done
            bar.refresh()

    def close(self) -> None:
        """Close the bars."""
        for bar in self.bars.values():
            bar.close()


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
        task = _task(name, config.batch_size)
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
