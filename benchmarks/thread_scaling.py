"""How the CPU kernel's step scales from one thread to all of them, by tensor size.

    python benchmarks/thread_scaling.py

For one tensor of each size: the kernel's step on one thread, on torch.get_num_threads()
threads back to back, and on them after 10 ms of idling (the other cores asleep, as when a
step follows a pause). Best of 40 runs each; ns per coordinate (l2o-dm). Then the whole
``L2O.step`` on benchmarks/step.py's 1e5 parameters (three tensors) against the bare kernel
calls on the same tensors, interleaved: the optimizer's own overhead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import L2O, make_rule
from flatl2o.kernels import cpu, rule_program

SIZES = (16_384, 32_768, 65_536, 262_144, 1_048_576)


def best(fn, reps: int = 40, idle: float = 0.0) -> float:
    """Best of ``reps`` runs after a settling pause (``idle`` s before each, if given)."""
    fn()
    time.sleep(0.2)
    times = []
    for _ in range(reps):
        if idle:
            time.sleep(idle)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    threads = torch.get_num_threads()
    rule = make_rule("l2o-dm")
    kernel = cpu.CPUKernel(rule_program(rule))
    print(
        f"| coordinates | 1 thread | {threads} threads | speed-up | {threads} threads after "
        "10 ms idle |"
    )
    print("|---:|---:|---:|---:|---:|")
    for n in SIZES:
        state, g, w = rule.init_state(n), torch.randn(n), torch.randn(n)
        steps = iter(range(1, 10**6))

        def step(state=state, g=g, w=w, steps=steps):
            kernel.update(w, g, state, next(steps), 1e-9, False, 1 << 14)

        # one thread count at a time, as in training: torch.set_num_threads wakes torch's
        # OpenMP workers, whose spinning would otherwise steal the kernel's second core
        torch.set_num_threads(1)
        one = best(step)
        torch.set_num_threads(threads)
        many = best(step)
        woken = best(step, idle=0.01)
        print(
            f"| {n:,} | {one * 1e9 / n:.1f} ns | {many * 1e9 / n:.1f} ns | {one / many:.2f}x "
            f"| {woken * 1e9 / n:.1f} ns |",
            flush=True,
        )
    optimizer_overhead(threads)


def optimizer_overhead(threads: int, n: int = 100_000) -> None:
    """L2O.step against the bare kernel calls on the same three tensors, interleaved."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes = [(n // 2,), (n // 4,), (n - n // 2 - n // 4,)]  # as benchmarks/step.py
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    rule = make_rule("l2o-dm")
    opt = L2O(params, rule, lr=1e-9, backend="cpu")
    opt.step()  # creates the state
    kernel = cpu.CPUKernel(rule_program(rule))
    names = list(rule.state_shapes())
    rows = [
        (p.detach().view(-1), p.grad.view(-1), {k: opt.state[p][k] for k in names}) for p in params
    ]
    steps = iter(range(2, 10**6))

    def bare() -> None:
        t = next(steps)
        for w, g, state in rows:
            kernel.update(w, g, state, t, 1e-9, False, 1 << 14)

    best_of = {"L2O.step": float("inf"), "bare kernel calls": float("inf")}
    for _ in range(30):
        for name, fn in (("L2O.step", opt.step), ("bare kernel calls", bare)):
            t0 = time.perf_counter()
            fn()
            best_of[name] = min(best_of[name], time.perf_counter() - t0)
    print(
        f"\n{n:,} parameters in three tensors, {threads} threads, interleaved best of 30: "
        + ", ".join(f"{k} {v * 1e9 / n:.1f} ns/coordinate" for k, v in best_of.items())
    )


if __name__ == "__main__":
    main()
