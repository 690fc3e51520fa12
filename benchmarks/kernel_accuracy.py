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

N = 200_000
STEPS = 20


def run(name: str) -> list[str]:
    rule = load_rule(name)
    exact = load_rule(name).double()
    g = torch.randn(N, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 0, N)
    init = rule.init_state(N)
    paths = {
        "cpu kernel": cpu.CPUKernel(rule_program(rule)),
        "torch fp32 reference": ReferenceKernel(rule),
        "float64": None,
    }
    results = {}
    for label, kernel in paths.items():
        dtype = torch.float64 if kernel is None else torch.float32
        p = torch.zeros(N, dtype=dtype)
        state = {k: v.clone().to(dtype) for k, v in init.items()}
        for t in range(1, STEPS + 1):
            gt = (g * (1 + 0.05 * t) * (-1) ** t).to(dtype)
            if kernel is None:
                with torch.no_grad():
                    delta, new = exact(gt, state, t)
                p -= delta
                state.update(new)
            else:
                kernel.update(p, gt, state, t, 1.0, False, 1 << 16)
        results[label] = (p, state)
    p64, s64 = results.pop("float64")
    lines = []
    for label, (p, state) in results.items():
        dp = (p.double() - p64).abs().max().item()
        ds = max((state[k].double() - s64[k]).abs().max().item() for k in state)
        lines.append(f"| {name} | {label} | {dp:.1e} | {p64.abs().max().item():.1e} | {ds:.1e} |")
    return lines


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
