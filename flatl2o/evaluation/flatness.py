"""Flatness readouts at a final iterate: Hessian trace and top eigenvalue of the full-split loss.

The estimators are :mod:`flatl2o.hessian`'s (the same code the meta-training regularizers
use), run on the loss over the WHOLE split (not a minibatch) at a detached copy of the iterate,
through one kept gradient graph shared by all probes. This module adds what a readout reports
beside the estimate: the Hutchinson mean's standard error and the power iteration's signed
eigenvalue with its residual. Nothing is differentiable and the random vectors come from the
``generator`` passed in (the suite seeds it per run, identically for every optimizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flatl2o.hessian import Hessian

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


def hutchinson_trace(
    loss_fn: LossFn, theta: Tensor, *, probes: int, generator: torch.Generator
) -> tuple[float, float]:
    """Hutchinson estimate of tr H(theta) and its standard error over Rademacher probes.

    Returns ``(mean of v^T H v, std of v^T H v / sqrt(probes))``; the error is 0 for one probe
    (not estimable). The probes are :meth:`flatl2o.hessian.Hessian.probe_values`', drawn as the
    ``hessian-trace`` regularizer draws them.
    """
    return _trace(Hessian(loss_fn, theta.detach()), probes=probes, generator=generator)


def _trace(hess: Hessian, *, probes: int, generator: torch.Generator) -> tuple[float, float]:
    values = [float(q) for q in hess.probe_values(probes, generator=generator)]
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
    iterations were needed or the top two eigenvalues are close); ``(0.0, 0.0)`` if Hv = 0.
    Costs ``iters + 1`` HVPs.
    """
    return _eigenvalue(Hessian(loss_fn, theta.detach()), iters=iters, generator=generator)


def _eigenvalue(hess: Hessian, *, iters: int, generator: torch.Generator) -> tuple[float, float]:
    v, hv = hess.power_iteration(iters, generator=generator)
    lam = float(v @ hv)
    if lam == 0:  # v is in the null space (e.g. a loss linear in theta)
        return 0.0, 0.0
    return lam, float((hv - lam * v).norm()) / abs(lam)


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
    hess = Hessian(full_split_loss(task, split), theta.detach())  # one graph for all HVPs
    trace, se = _trace(hess, probes=probes, generator=generator)
    lam, resid = _eigenvalue(hess, iters=iters, generator=generator)
    return FlatnessReadout(trace, se, lam, resid)
