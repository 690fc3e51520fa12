"""How the CPU kernel's step scales from one thread to all of them, by tensor size.

    python benchmarks/thread_scaling.py

For one tensor of each size: the kernel's step on one thread, on torch.get_num_threads()
threads back to back, and on them after 10 ms of idling (the other cores asleep, as when a
step follows a pause). Best of 30 runs each; ns per coordinate (l2o-dm).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import make_rule
from flatl2o.kernels import cpu, rule_program

SIZES = (16_384, 32_768, 65_536, 262_144, 1_048_576)


def best(fn, reps: int = 30, idle: float = 0.0) -> float:
    fn()
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


if __name__ == "__main__":
    main()
