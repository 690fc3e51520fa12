"""Where the CPU kernel's time goes: the same step with parts of it cheapened, one thread.

    python benchmarks/cpu_profile.py            # ~1 minute
    MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/cpu_profile.py --no-avx512
        # the AVX2 path, against the matmul rate of an AVX2-only machine

Builds profiling variants of flatl2o/kernels/cpu_step.c (``-DFLATL2O_PROFILE_...``: the
gate products replaced by a copy, or the exp/reciprocal-based sigmoid/tanh replaced by
linear stand-ins; their numbers are wrong and only their time is used) and times each on
1M coordinates, next to one thread's fp32 matmul rate (a 1024x1024 matmul) and Adam.
Differences between variants attribute the step's time.

Every measurement is the best of ``--reps`` runs, and the runs are interleaved (matmul,
Adam, every variant of both rules, then again): on a shared machine interference only
adds time, so the minimum is the machine's own speed, and interleaving exposes every
variant to the same quiet and busy moments.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "no exp/reciprocal nonlinearities": ("FLATL2O_PROFILE_CHEAP_NONLINEAR",),
    "no gate products": ("FLATL2O_PROFILE_SKIP_MATVEC",),
    "neither (loads, stores, pre/post-processing)": (
        "FLATL2O_PROFILE_CHEAP_NONLINEAR",
        "FLATL2O_PROFILE_SKIP_MATVEC",
    ),
}


def gate_flops(rule) -> int:
    """FLOPs per coordinate of the LSTM gate products (the step's matmul work)."""
    h = rule.config.hidden_size
    return sum(2 * 4 * h * (c.input_size + h) for c in rule.lstm.cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/)")
    ap.add_argument(
        "--no-avx512",
        action="store_true",
        help="build the kernel's AVX2 path (-DFLATL2O_NO_AVX512); run with "
        "MKL_ENABLE_INSTRUCTIONS=AVX2 so the matmul floor is an AVX2 machine's too",
    )
    args = ap.parse_args()
    extra = ("FLATL2O_NO_AVX512",) if args.no_avx512 else ()
    if args.no_avx512 and os.environ.get("MKL_ENABLE_INSTRUCTIONS") != "AVX2":
        print("note: MKL_ENABLE_INSTRUCTIONS=AVX2 is not set, the floor uses AVX-512 matmuls")
    out_name = "cpu_profile_avx2.json" if args.no_avx512 else "cpu_profile.json"
    args.out = args.out or f"benchmarks/results/{out_name}"
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    p = torch.nn.Parameter(torch.randn(N))
    p.grad = torch.randn(N)
    adam = torch.optim.Adam([p], foreach=True)
    cases = {"matmul": lambda: a @ b, "adam": adam.step}
    for name in ("l2o-dm", "rnnprop"):
        rule = make_rule(name)
        for label, defines in VARIANTS.items():
            kernel = cpu.CPUKernel(rule_program(rule), lib=cpu._build(defines + extra))
            state, g, w = rule.init_state(N), torch.randn(N), torch.randn(N)
            steps = iter(range(1, 10**6))
            cases[(name, label)] = lambda k=kernel, s=state, i=steps, w=w, g=g: k.update(
                w, g, s, next(i), 1e-9, False, 1 << 14
            )
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():
        fn()  # warm-up: state allocation, first-touch pages
    for _ in range(args.reps):
        for key, fn in cases.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    gemm = 2 * 1024**3 / best["matmul"]
    print(
        f"{'AVX2 path, ' if args.no_avx512 else ''}one thread, best of {args.reps} interleaved "
        f"runs: fp32 matmul {gemm / 1e9:.0f} GFLOP/s; "
        f"Adam (foreach) {best['adam'] * 1e9 / N:.1f} ns/param"
    )
    print("| rule | variant | ns / coordinate | share of full step | × floor |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for name in ("l2o-dm", "rnnprop"):
        floor = gate_flops(make_rule(name)) / gemm
        full = best[(name, "full step")]
        for label in VARIANTS:
            t = best[(name, label)]
            rows.append(dict(rule=name, variant=label, ns_per_coord=t * 1e9 / N, share=t / full))
            print(
                f"| {name} | {label} | {t * 1e9 / N:.1f} | {t / full:.0%} | {t / N / floor:.2f} |"
            )
        print(f"| {name} | gate products at the matmul rate (floor) | {floor * 1e9:.1f} | | 1 |")
        rows.append(dict(rule=name, variant="floor", ns_per_coord=floor * 1e9))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                gemm_flops=gemm,
                adam_seconds_per_param=best["adam"] / N,
                reps=args.reps,
                avx2_path=args.no_avx512,
                rows=rows,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
