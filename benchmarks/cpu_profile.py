"""Where the CPU kernel's time goes: the same step with parts of it cheapened, one thread.

    python benchmarks/cpu_profile.py

Builds profiling variants of flatl2o/kernels/cpu_step.c (``-DFLATL2O_PROFILE_...``: the
gate products replaced by a copy, or exp/division-based sigmoid/tanh replaced by linear
stand-ins; their numbers are wrong and only their time is used) and times each with CPU
thread time (robust to other processes on the machine) on 1M coordinates, next to one
thread's fp32 matmul rate and Adam. Differences between variants attribute the step's time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import make_rule
from flatl2o.kernels import cpu, rule_program

N = 1_000_000
VARIANTS = {
    "full step": (),
    "no exp/div nonlinearities": ("FLATL2O_PROFILE_CHEAP_NONLINEAR",),
    "no gate products": ("FLATL2O_PROFILE_SKIP_MATVEC",),
    "neither (loads, stores, pre/post-processing)": (
        "FLATL2O_PROFILE_CHEAP_NONLINEAR",
        "FLATL2O_PROFILE_SKIP_MATVEC",
    ),
}


def thread_seconds(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gemm = 2 * 1024**3 / thread_seconds(lambda: a @ b)
    p = torch.nn.Parameter(torch.randn(N))
    p.grad = torch.randn(N)
    adam = torch.optim.Adam([p], foreach=True)
    t_adam = thread_seconds(adam.step)
    rows = []
    print(f"one thread: fp32 matmul {gemm / 1e9:.0f} GFLOP/s; Adam {t_adam * 1e9 / N:.1f} ns/param")
    print("| rule | variant | ns / coordinate | share of full step |")
    print("|---|---|---:|---:|")
    for name in ("l2o-dm", "rnnprop"):
        rule = make_rule(name)
        full = None
        for label, defines in VARIANTS.items():
            kernel = cpu.CPUKernel(rule_program(rule), lib=cpu._build(defines))
            state = rule.init_state(N)
            g = torch.randn(N)
            w = torch.randn(N)
            step = iter(range(1, 10**6))
            t = thread_seconds(
                lambda k=kernel, s=state, i=step, w=w, g=g: k.update(
                    w, g, s, next(i), 1e-9, False, 1 << 14
                )
            )
            full = full or t
            rows.append(dict(rule=name, variant=label, ns_per_coord=t * 1e9 / N, share=t / full))
            print(f"| {name} | {label} | {t * 1e9 / N:.1f} | {t / full:.0%} |")
        flops = sum(
            2 * 4 * rule.config.hidden_size * (c.input_size + rule.config.hidden_size)
            for c in rule.lstm.cells
        )
        print(f"| {name} | gate products at the matmul rate (floor) | {flops / gemm * 1e9:.1f} | |")
    out = Path("benchmarks/results/cpu_profile.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(dict(gemm_flops=gemm, adam_seconds_per_param=t_adam / N, rows=rows), indent=1)
    )


if __name__ == "__main__":
    main()
