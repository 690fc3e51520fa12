"""Cost of one optimizee step of each meta-training task: parameters and milliseconds.

    python benchmarks/meta_tasks.py                     # every registered task, 5 repetitions
    python benchmarks/meta_tasks.py --tasks digits-mlp digits-cnn-bn --reps 3

One optimizee step is what meta-training does per step besides the rule: draw a minibatch
(the task's own default batch size), compute the loss with ``Task.loss`` (``functional_call``
on the flat parameter vector) and its gradient with ``torch.autograd.grad``. Each repetition
times ``--steps`` steps of every task in turn (the order rotates between repetitions, so load
from other jobs hits all tasks alike); reported: the median over repetitions of the wall time
and of the process CPU time per step, on ``--threads`` torch threads (default 1). Results go to
``--out`` (JSON) and the same path with ``.md`` (the table docs/meta-training.md quotes).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _results import write_result  # noqa: E402

from flatl2o.meta.tasks import TASKS, Task, make_task  # noqa: E402


def time_steps(task: Task, theta: torch.Tensor, gen: torch.Generator, steps: int) -> tuple:
    """(wall seconds, CPU seconds) of ``steps`` optimizee steps (batch, loss, gradient)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, y = task.sample_batch(gen)
        torch.autograd.grad(task.loss(theta, x, y), theta)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(names: list[str], reps: int, steps: int) -> list[dict]:
    """Per task: parameters, tensors, batch size, median ms per step (wall and CPU)."""
    tasks = {n: make_task(n) for n in names}
    thetas = {
        n: t.init_params(torch.Generator().manual_seed(0)).requires_grad_(True)
        for n, t in tasks.items()
    }
    gens = {n: torch.Generator().manual_seed(1) for n in names}
    for n in names:  # warm-up: first-call allocations and lazy initialization
        time_steps(tasks[n], thetas[n], gens[n], 2)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            w, c = time_steps(tasks[n], thetas[n], gens[n], steps)
            wall[n].append(1e3 * w / steps)
            cpu[n].append(1e3 * c / steps)
    return [
        {
            "task": n,
            "params": tasks[n].num_params,
            "tensors": len(tasks[n].segment_sizes),
            "batch_size": tasks[n].batch_size,
            "ms_per_step": round(statistics.median(wall[n]), 3),
            "cpu_ms_per_step": round(statistics.median(cpu[n]), 3),
        }
        for n in names
    ]


def markdown(rows: list[dict], command: str, threads: int) -> str:
    machine = platform.processor() or platform.machine()
    lines = [
        f"Measured with `{command}` ({threads} torch thread(s), {machine}).",
        "",
        "| task | parameters | tensors | batch | ms / step (wall) | ms / step (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['task']}` | {r['params']:,} | {r['tensors']} | {r['batch_size']} | "
            f"{r['ms_per_step']:.2f} | {r['cpu_ms_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    p.add_argument("--reps", type=int, default=5, help="repetitions (median reported)")
    p.add_argument("--steps", type=int, default=20, help="optimizee steps per repetition")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/meta_tasks.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.tasks, args.reps, args.steps)
    command = "python benchmarks/meta_tasks.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:])
    )
    report = markdown(rows, command, args.threads)
    result = {
        "command": command,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "reps": args.reps,
        "steps": args.steps,
        "rows": rows,
    }
    out = write_result(args.out, result, report)
    print(report)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
