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


def untouched_case(
    rule: UpdateRule, n: int, seed: int = 3
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """CPU ``(grad, state, param, keep)`` for the zero-gradient contract
    (:func:`flatl2o.kernels.reference.untouched`): :func:`check_inputs` with exact zeros (of
    both signs) in half the gradients and the initial (all-zero) state in a third of the
    rows; ``keep`` marks the rows with both, which a step must leave exactly as they are."""
    grad, state, param = check_inputs(rule, n, seed)
    grad[::2] = 0.0
    grad[::4] = -0.0
    fresh = torch.zeros(n, dtype=torch.bool)
    fresh[::3] = True
    for v in state.values():
        v[fresh] = 0.0
    return grad, state, param, fresh & (grad == 0)


def contract_violations(
    kernel: object,
    rule: UpdateRule,
    n: int = 300,
    state_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[str]:
    """What ``kernel`` gets wrong of the zero-gradient contract in three steps (the second
    with ``maximize``) on :func:`untouched_case`: kept rows must not change by a bit (their
    state stays +0.0) and every other row must move. Empty when it keeps the contract."""
    grad, state, param, keep = untouched_case(rule, n)
    grad, param, keep = grad.to(device), param.to(device), keep.to(device)
    state = {k: v.to(device, state_dtype) for k, v in state.items()}
    start = param.clone()
    for t in (1, 2, 3):
        kernel.update(param, grad, state, t, 0.5, t == 2, 64)  # type: ignore[attr-defined]
    bad = []
    if not torch.equal(param[keep], start[keep]):
        bad.append("a zero-gradient coordinate at its initial state moved")
    for k, v in state.items():
        rows = v[keep]
        if not bool((rows.eq(0) & ~torch.signbit(rows)).all()):
            bad.append(f"state {k!r} of a zero-gradient coordinate left its initial value")
    if not bool((param[~keep] != start[~keep]).all()):
        bad.append("a coordinate with a gradient or a non-initial state did not move")
    return bad
