"""The evaluation's execution engine, shared by the MNIST suite and the realistic one.

:func:`run_planned` runs what a planner plans: ``planner.initial()`` first, then whatever
``planner.done(spec, record)`` unlocks as runs finish (a baseline's final runs wait on its
tuning), in worker processes or in this one, and writes the results JSON that the suite's
``assemble`` builds, ``eval.partial.json`` every 30 s and on an interruption (Ctrl-C, SIGTERM or
a failed run), ``eval.json`` at the end. ``resume=True`` reuses the runs found in the output
folder whose key is planned again, but only when they were made by the same
:data:`REUSE_ENVIRONMENT` (code, torch, CPU, threads): a learned rule's 1000-step trajectory is
chaotic enough that a float-level change moves its test accuracy by whole percentage points, so
runs of different code are never mixed in one results file. :class:`PhaseProgress` shows one
progress bar per phase.

Runs start largest first (most gradient evaluations: steps x gradients per step), so a long run
does not start last and leave the other workers idle; the order changes no result.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.runner import RunSpec, Workload, train_run
from flatl2o.evaluation.workloads import WORKLOADS, make_workload
from flatl2o.meta.tasks import Task, make_task

__all__ = [
    "PHASES",
    "RESULTS_NAME",
    "REUSE_ENVIRONMENT",
    "PhaseProgress",
    "code_sha",
    "read_results",
    "run_planned",
    "task_named",
]

#: File name of the results JSON inside the output folder.
RESULTS_NAME = "eval.json"


# ----------------------------------------------------------------------- worker side


@functools.cache
def task_named(name: str, batch_size: int) -> Task | Workload:
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
    return train_run(spec, task_named(spec.task, spec.batch_size))


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
        "cpu": cpu_name(_cpu_model()),
    }


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


def cpu_name(line: str) -> str:
    """The CPU's model name from its ``/proc/cpuinfo`` line (``model name\t: X`` -> ``X``);
    any other line as it is. Also cleans environments recorded before this existed."""
    key, sep, value = line.strip().partition(":")
    return value.strip() if sep and key.strip() == "model name" else line.strip()


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


def run_planned(
    planner: Any,
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
    engine shared by both suites (parallel workers, progress bars,
    ``eval.partial.json`` every 30 s and on an interruption, ``resume``).
    """
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
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
        kinds = ("eval", "long", "tune", "reused")
        results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        partial = out_dir / "eval.partial.json" if out_dir is not None else None

        def snapshot(final: bool) -> dict[str, Any]:
            return assemble(results, environment, t_start, final)

        try:
            _execute(
                planner,
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


def _size(spec: RunSpec) -> int:
    """Gradient evaluations of ``spec``'s training (the order runs start in: largest first)."""
    baseline = BASELINES.get(spec.optimizer) if spec.checkpoint is None else None
    return max(spec.horizons) * (baseline.grads_per_step if baseline else 1)


def _execute(
    planner: Any,
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
            heapq.heappush(heap, (-_size(spec), counter, spec))
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
