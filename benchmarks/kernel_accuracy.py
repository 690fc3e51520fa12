"""How far the fast step kernels are from exact arithmetic, next to torch's own fp32 path.

    python benchmarks/kernel_accuracy.py

Runs 20 steps of two shipped checkpoints on 200k coordinates (gradients spanning 1e-6..1
in magnitude, alternating sign) three ways: the compiled CPU kernel, the reference rule
module in float32 (what torch computes), and the rule module in float64 (the yardstick).
Prints the largest parameter and state deviation from float64 for both float32 paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o.hub import load_rule
from flatl2o.kernels import ReferenceKernel, cpu, rule_program
from flatl2o.kernels.accuracy import drift_from_float64

N = 200_000
STEPS = 20


def run(name: str) -> list[str]:
    rule = load_rule(name)
    g = torch.randn(N, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 0, N)
    kernels = {
        "cpu kernel": cpu.CPUKernel(rule_program(rule)),
        "torch fp32 reference": ReferenceKernel(rule),
    }
    drift, scale = drift_from_float64(rule, kernels, g, STEPS)
    return [
        f"| {name} | {label} | {dp:.1e} | {scale:.1e} | {ds:.1e} |"
        for label, (dp, ds) in drift.items()
    ]


def main() -> None:
    torch.set_num_threads(1)
    print(f"{STEPS} steps, {N} coordinates; deviation from the float64 rule module")
    print("| checkpoint | path | max param error | max param | max state error |")
    print("|---|---|---:|---:|---:|")
    for name in ("dm", "rnnprop-entropy"):
        for line in run(name):
            print(line, flush=True)


if __name__ == "__main__":
    main()
