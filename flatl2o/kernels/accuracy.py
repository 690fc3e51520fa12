"""How far a step kernel drifts from exact arithmetic (the rule module run in float64), and
the inputs a kernel is checked against the reference rule on.

Used by ``benchmarks/kernel_accuracy.py`` (the table in docs/performance.md), by
``tests/test_kernels.py`` (which bounds the fast kernels' error by a multiple of torch's own
float32 error), and by the Triton kernel's first-use check and ``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from flatl2o.rules import UpdateRule


def check_inputs(rule: UpdateRule, n: int, seed: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """CPU ``(grad, state, param)`` for ``n`` coordinates: gradients spread over 9 decades
    (1e-8..10, both signs), a random state (``v`` positive) and random parameters."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=gen) * torch.logspace(-8, 1, n)
    state = {
        k: (torch.rand if k == "v" else torch.randn)(v.shape, generator=gen)
        for k, v in rule.init_state(n).items()
    }
    return grad, state, torch.randn(n, generator=gen)


def drift_from_float64(
    rule: UpdateRule, kernels: dict[str, object], grad: Tensor, steps: int
) -> tuple[dict[str, tuple[float, float]], float]:
    """``{name: (max |param - exact|, max |state - exact|)}`` after ``steps`` steps, and the
    largest exact |param| (the scale of those errors).

    Every kernel (``kernel.update(param, grad, state, step, lr, maximize, chunk)``) and a
    float64 copy of ``rule`` start from zero parameters and the rule's initial state and see
    the same gradients: ``grad * (1 + 0.05 t) * (-1)^t`` at step ``t`` (sign flips exercise the
    recurrent state), learning rate 1.
    """
    exact = copy.deepcopy(rule).double()
    n = grad.numel()
    init = rule.init_state(n)
    runs = {}
    for name, kernel in {**kernels, "float64": None}.items():
        dtype = torch.float64 if kernel is None else torch.float32
        p = torch.zeros(n, dtype=dtype)
        state = {k: v.clone().to(dtype) for k, v in init.items()}
        for t in range(1, steps + 1):
            g = (grad * (1 + 0.05 * t) * (-1) ** t).to(dtype)
            if kernel is None:
                with torch.no_grad():
                    delta, new = exact(g, state, t)
                p -= delta
                state.update(new)
            else:
                kernel.update(p, g, state, t, 1.0, False, 1 << 16)
        runs[name] = (p, state)
    p64, s64 = runs.pop("float64")
    drift = {
        name: (
            (p.double() - p64).abs().max().item(),
            max((state[k].double() - s64[k]).abs().max().item() for k in state),
        )
        for name, (p, state) in runs.items()
    }
    return drift, p64.abs().max().item()
