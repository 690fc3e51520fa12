"""Flatness readouts at a final iterate: Hessian trace and top eigenvalue of the full-split loss.

Both use Hessian-vector products by double backward through one kept gradient graph of the
loss over the WHOLE split (not a minibatch), so the probes share the expensive first backward.
They are evaluation readouts, not regularizers: nothing is differentiable and the random
vectors come from the ``generator`` passed in (the suite seeds it per run, identically for
every optimizer). The meta-training regularizers in :mod:`flatl2o.meta.regularizers` compute
the same quantities on a minibatch; a test checks that :func:`hutchinson_trace` equals
``hessian_trace`` given the same generator state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flatl2o.meta.tasks import Task

__all__ = [
    "FlatnessReadout",
    "full_split_loss",
    "hutchinson_trace",
    "measure_flatness",
    "top_eigenvalue",
]

LossFn = Callable[[Tensor], Tensor]


def _grad_graph(loss_fn: LossFn, theta: Tensor) -> tuple[Tensor, Tensor]:
    x = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    return x, g


def _hvp(g: Tensor, x: Tensor, v: Tensor) -> Tensor:
    if not g.requires_grad:  # the loss is linear in theta: H = 0
        return torch.zeros_like(x)
    with torch.enable_grad():
        (hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if hv is None else hv


def hutchinson_trace(
    loss_fn: LossFn, theta: Tensor, *, probes: int, generator: torch.Generator
) -> tuple[float, float]:
    """Hutchinson estimate of tr H(theta) and its standard error over Rademacher probes.

    Returns ``(mean of v^T H v, std of v^T H v / sqrt(probes))``; the error is 0 for one probe
    (not estimable) and the probes are drawn exactly as ``flatl2o.meta.regularizers``'
    ``hessian_trace`` draws them.
    """
    return _trace(*_grad_graph(loss_fn, theta), probes=probes, generator=generator)


def _trace(x: Tensor, g: Tensor, *, probes: int, generator: torch.Generator) -> tuple[float, float]:
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    values = []
    for _ in range(probes):
        v = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        values.append(float(v @ _hvp(g, x, v)))
    mean = math.fsum(values) / probes
    if probes == 1:
        return mean, 0.0
    var = math.fsum((a - mean) ** 2 for a in values) / (probes - 1)
    return mean, math.sqrt(var / probes)


def top_eigenvalue(
    loss_fn: LossFn, theta: Tensor, *, iters: int, generator: torch.Generator
) -> tuple[float, float]:
    """Power iteration for the largest-magnitude Hessian eigenvalue at ``theta``.

    Starts from a Gaussian vector and runs ``iters`` iterations ``v <- Hv / ||Hv||``; returns
    ``(v^T H v, ||Hv - (v^T H v) v|| / |v^T H v|)``: the signed Rayleigh quotient of the final
    unit vector and its relative residual (small once v is an eigenvector; large means more
    iterations were needed or the top two eigenvalues are close). Costs ``iters + 1`` HVPs.
    """
    return _power(*_grad_graph(loss_fn, theta), iters=iters, generator=generator)


def _power(x: Tensor, g: Tensor, *, iters: int, generator: torch.Generator) -> tuple[float, float]:
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v / v.norm()
    for _ in range(iters):
        w = _hvp(g, x, v)
        norm = w.norm()
        if norm == 0:
            return 0.0, 0.0
        v = w / norm
    hv = _hvp(g, x, v)
    lam = float(v @ hv)
    resid = float((hv - lam * v).norm()) / abs(lam) if lam != 0 else 0.0
    return lam, resid


@dataclass(frozen=True)
class FlatnessReadout:
    """Hessian measures of the full-split loss at one iterate."""

    trace: float
    trace_se: float
    top_eig: float
    top_eig_residual: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready metrics (keys as reported by the suite)."""
        return {
            "hessian_trace": self.trace,
            "hessian_trace_se": self.trace_se,
            "hessian_top_eig": self.top_eig,
            "hessian_top_eig_residual": self.top_eig_residual,
        }


def full_split_loss(task: Task, split: str = "train") -> LossFn:
    """The mean loss over the whole ``split`` of ``task`` as a function of flat theta."""
    part = task.dataset.split(split)
    x, y = part.x, part.y

    def loss_fn(theta: Tensor) -> Tensor:
        return task.loss(theta, x, y)

    return loss_fn


def measure_flatness(
    task: Task,
    theta: Tensor,
    *,
    probes: int,
    iters: int,
    generator: torch.Generator,
    split: str = "train",
) -> FlatnessReadout:
    """Hutchinson trace (``probes``) and top eigenvalue (``iters``) of the full ``split`` loss."""
    x, g = _grad_graph(full_split_loss(task, split), theta)  # one graph for all HVPs
    trace, se = _trace(x, g, probes=probes, generator=generator)
    lam, resid = _power(x, g, iters=iters, generator=generator)
    return FlatnessReadout(trace, se, lam, resid)
