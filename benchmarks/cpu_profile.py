"""Where the CPU kernel's time goes: the same step with parts of it cheapened, one thread.

    python benchmarks/cpu_profile.py            # ~1 minute
    MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/cpu_profile.py --no-avx512
        # the AVX2 path, against the matmul rate of an AVX2-only machine

Builds profiling variants of flatl2o/kernels/cpu_step.c (the edits in EDITS, applied to a
copy of the source here, so the shipped kernel carries no profiling code: the gate products
replaced by a copy, or the exp/reciprocal-based sigmoid/tanh replaced by linear stand-ins;
their numbers are wrong and only their time is used) and times each on 1M coordinates, next
to one thread's fp32 matmul rate (a 1024x1024 matmul) and Adam. Differences between
variants attribute the step's time.

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
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import make_rule
from flatl2o.kernels import cpu, rule_program

N = 1_000_000
#: Profiling edits of cpu_step.c, as (text, replacement) pairs, each text found exactly once.
#: "cheap nonlinear": sigmoid/tanh become linear (no exp/reciprocal); "skip matvec": the gate
#: products become a copy of the inputs (no FMAs), in each of the three code paths.
EDITS = {
    "cheap nonlinear": [
        (
            "static inline float sigmoid_poly(float x) { return 1.0f / (1.0f + exp_poly(-x)); }",
            "static inline float sigmoid_poly(float x) { return 0.5f + 0.25f * x; }",
        ),
        (
            "static inline float tanh_poly(float x) "
            "{ return 1.0f - 2.0f / (1.0f + exp_poly(2.0f * x)); }",
            "static inline float tanh_poly(float x) { return 0.5f * x; }",
        ),
        (
            "static inline __m512 sig2(__m512 t) {\n",
            "static inline __m512 sig2(__m512 t) {\n"
            "    return _mm512_fmadd_ps(t, _mm512_set1_ps(-0.25f), _mm512_set1_ps(0.5f));\n",
        ),
        (
            "static inline __m256 sig2(__m256 t) {\n",
            "static inline __m256 sig2(__m256 t) {\n"
            "    return _mm256_fmadd_ps(t, _mm256_set1_ps(-0.25f), _mm256_set1_ps(0.5f));\n",
        ),
    ],
    "skip matvec": [
        ("    const float *w = W + V0 * 16;\n", "#if 0\n    const float *w = W + V0 * 16;\n"),
        (
            "    for (int t = 0; t < CB; ++t)\n"
            "        for (int v = 0; v < NV_; ++v) _mm512_storeu_ps(",
            "#else\n"
            "    (void)W, (void)K, (void)H, (void)xs;\n"
            "    for (int t = 0; t < CB; ++t)\n"
            "        for (int v = 0; v < NV_; ++v)\n"
            "            acc[t][v] =\n"
            "                _mm512_add_ps(acc[t][v], _mm512_set1_ps(x[t][0] + h[t][V0 + v]));\n"
            "#endif\n"
            "    for (int t = 0; t < CB; ++t)\n"
            "        for (int v = 0; v < NV_; ++v) _mm512_storeu_ps(",
        ),
        ("    const float *w = W + Y0 * 8;\n", "#if 0\n    const float *w = W + Y0 * 8;\n"),
        (
            "    for (int v = 0; v < NY_; ++v) G[Y0 + v] = acc[v];\n",
            "#else\n"
            "    (void)W, (void)K, (void)H, (void)xs;\n"
            "    for (int v = 0; v < NY_; ++v)\n"
            "        acc[v] = _mm256_add_ps(acc[v], _mm256_set1_ps(x[0] + h[(Y0 + v) % H]));\n"
            "#endif\n"
            "    for (int v = 0; v < NY_; ++v) G[Y0 + v] = acc[v];\n",
        ),
        (
            "        matvec_tile(a->w[l], a->b[l], 4 * H, K + H, in, gates);\n",
            "        for (int r = 0; r < 4 * H; ++r)\n"
            "            for (int t = 0; t < TILE; ++t) gates[r][t] = in[r % (K + H)][t];\n",
        ),
    ],
}
VARIANTS = {
    "full step": (),
    "no exp/reciprocal nonlinearities": ("cheap nonlinear",),
    "no gate products": ("skip matvec",),
    "neither (loads, stores, pre/post-processing)": ("cheap nonlinear", "skip matvec"),
}


def profiling_source(edits: tuple[str, ...], directory: Path) -> Path:
    """cpu_step.c with the named EDITS applied, written to ``directory``."""
    text = cpu.SOURCE.read_text()
    for name in edits:
        for old, new in EDITS[name]:
            if text.count(old) != 1:
                raise SystemExit(f"cpu_step.c changed: update EDITS[{name!r}] ({old[:60]!r})")
            text = text.replace(old, new)
    path = directory / ("cpu_step-" + "-".join(e.replace(" ", "_") for e in edits) + ".c")
    path.write_text(text)
    return path


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
    with tempfile.TemporaryDirectory() as tmp:  # the libraries are cached by cpu._build
        libs = {
            label: cpu._build(extra, source=profiling_source(edits, Path(tmp)))
            for label, edits in VARIANTS.items()
        }
    for name in ("l2o-dm", "rnnprop"):
        rule = make_rule(name)
        for label, lib in libs.items():
            kernel = cpu.CPUKernel(rule_program(rule), lib=lib)
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
