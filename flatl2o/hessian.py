"""The Hessian of a loss over a flat parameter vector: products, trace, top eigenvalue, ESD.

Every Hessian computation in flatl2o lives here, once: the meta-training regularizers
(:mod:`flatl2o.meta.regularizers`, which need values differentiable in ``theta``) and the
evaluation's flatness readouts (:mod:`flatl2o.evaluation.flatness`, which need detached
numbers) both build on :class:`Hessian`. It keeps one gradient graph of ``loss_fn`` at
``theta`` and takes every Hessian-vector product by differentiating that gradient again
(double backward), so the estimators share the expensive first backward.

Whether results carry a graph back to ``theta`` follows ``theta``: when grad mode is on and
``theta`` requires grad (an iterate produced by a learned rule), products are taken with
``create_graph=True`` and their gradient reaches whatever ``theta`` depends on; otherwise they
are taken at a detached copy and keep no higher-order graph. Random vectors are drawn fresh on
every call from the ``generator`` passed in, in a fixed order; nothing is cached between
calls. Dtypes and devices are used as given. docs/method.md §4 describes the estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["Hessian", "hessian_eig", "hessian_esd", "hessian_trace", "hvp"]

LossFn = Callable[[Tensor], Tensor]


def _at_least_one(name: str, value: int) -> None:
    """The one check every estimator's count (probes, iterations, steps) needs."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A fresh vector of independent ±1 entries shaped, typed and placed like ``like``."""
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


class Hessian:
    """H(theta) of ``loss_fn`` as a linear operator, from one kept gradient graph.

    ``differentiable`` is True when grad mode is on and ``theta`` requires grad: products are
    then part of ``theta``'s graph. Otherwise ``point`` is a detached copy of ``theta`` and
    nothing upstream is reached. ``grad`` is ∇loss at ``point``, kept with its graph so any
    number of products can differentiate it. ``loss_fn`` runs with PyTorch's math attention
    kernel: the fused ones (flash, memory-efficient) have no double backward.
    """

    def __init__(self, loss_fn: LossFn, theta: Tensor) -> None:
        self.differentiable = torch.is_grad_enabled() and theta.requires_grad
        x = theta if theta.requires_grad else theta.detach().requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
        self.point, self.grad = x, g

    def hvp(self, v: Tensor, *, create_graph: bool | None = None) -> Tensor:
        """H v by differentiating the kept gradient along ``v``.

        ``create_graph`` (default: ``differentiable``) keeps the product's own graph, so that
        it can be differentiated in ``theta``.
        """
        x, g = self.point, self.grad
        if not g.requires_grad:  # the loss is linear in theta: the Hessian is zero
            return torch.zeros_like(x)
        keep = self.differentiable if create_graph is None else create_graph
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(
                g, x, grad_outputs=v, retain_graph=True, create_graph=keep, allow_unused=True
            )
        return torch.zeros_like(x) if hv is None else hv

    def probe_values(self, probes: int, *, generator: torch.Generator | None) -> list[Tensor]:
        """Hutchinson's samples of tr H: vᵀHv for ``probes`` fresh Rademacher vectors v.

        Each sample is unbiased for tr H with variance 2·Σ_{i≠j} H_ij². The probes are drawn
        one after the other from ``generator``, each right before its product.
        """
        _at_least_one("probes", probes)
        values = []
        for _ in range(probes):
            v = _rademacher(self.point, generator)
            values.append(v @ self.hvp(v))
        return values

    def power_iteration(
        self, iters: int, *, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``(v, Hv)``: the unit vector after ``iters`` power iterations, and its product.

        Starts from a Gaussian vector; the iterations run on detached vectors (no graph), the
        final product keeps one when ``differentiable``. Stops early if Hv = 0 (v is in the
        null space; then the returned product is 0). Costs ``iters + 1`` products.
        """
        _at_least_one("iters", iters)
        x = self.point
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        v = v / v.norm()
        for _ in range(iters):
            w = self.hvp(v, create_graph=False)
            norm = w.norm()
            if norm == 0:
                break
            v = w / norm
        return v, self.hvp(v)

    def lanczos(
        self, steps: int, *, generator: torch.Generator | None
    ) -> tuple[list[Tensor], list[float]]:
        """Lanczos with full reorthogonalization: (alphas, betas) of the tridiagonal matrix T.

        Starts from a normalized Rademacher vector. The basis vectors q_i are detached
        constants; each α_i = q_iᵀ H q_i keeps its graph when ``differentiable``. The new
        direction is H q_i with its components along all previous q removed (classical
        Gram-Schmidt applied twice), which in exact arithmetic is the three-term recurrence
        H q_i − α_i q_i − β_{i-1} q_{i-1}. Stops after ``min(steps, n)`` steps, or earlier
        when β is negligible (the Krylov subspace is invariant).
        """
        _at_least_one("steps", steps)
        x = self.point
        q = _rademacher(x, generator)
        q = q / q.norm()
        basis, alphas, betas = [q], [], []
        tol = math.sqrt(torch.finfo(x.dtype).eps)
        scale = 0.0  # running estimate of ||H|| to make the breakdown test relative
        k = min(steps, x.numel())
        for i in range(k):
            hq = self.hvp(q)
            alphas.append(q @ hq)
            if i + 1 == k:
                break
            w = hq.detach()
            stacked = torch.stack(basis)
            for _ in range(2):
                w = w - stacked.T @ (stacked @ w)
            beta = w.norm().item()
            scale = max(scale, hq.detach().norm().item())
            if beta <= tol * scale:
                break
            betas.append(beta)
            q = w / beta
            basis.append(q)
        return alphas, betas


def hvp(loss_fn: LossFn, theta: Tensor, v: Tensor, *, create_graph: bool = True) -> Tensor:
    """Hessian-vector product H(theta) v by double backward (differentiable if create_graph).

    If ``theta`` does not require grad the product is taken at a detached copy, so the result
    is correct but carries no graph back to ``theta``'s (non-existent) history.
    """
    return Hessian(loss_fn, theta).hvp(v, create_graph=create_graph)


def hessian_trace(
    loss_fn: LossFn, theta: Tensor, *, probes: int = 1, generator: torch.Generator | None
) -> Tensor:
    """Hutchinson estimate of tr H(theta): mean of vᵀHv over fresh Rademacher probes v.

    Unbiased; its variance per probe is 2·Σ_{i≠j} H_ij². The gradient is computed once and
    shared by all probes. The ``hessian-trace`` regularizer.
    """
    _at_least_one("probes", probes)
    hess = Hessian(loss_fn, theta)
    total = theta.new_zeros(())
    for value in hess.probe_values(probes, generator=generator):
        total = total + value
    return total / probes if hess.differentiable else (total / probes).detach()


def hessian_eig(
    loss_fn: LossFn, theta: Tensor, *, iters: int = 10, generator: torch.Generator | None
) -> Tensor:
    """|λ| of the top-magnitude Hessian eigenvalue by power iteration ("spectral norm" flatness).

    Power iteration runs on detached vectors from a fresh Gaussian start; the returned value is
    |vᵀHv| for the final unit vector v, differentiable in theta (by Hellmann-Feynman its
    gradient is that of the eigenvalue once v has converged). Costs iters + 1 HVPs. The
    ``hessian-eig`` regularizer.
    """
    _at_least_one("iters", iters)
    hess = Hessian(loss_fn, theta)
    v, hv = hess.power_iteration(iters, generator=generator)
    lam = (v @ hv).abs()
    return lam if hess.differentiable else lam.detach()


def hessian_esd(
    loss_fn: LossFn, theta: Tensor, *, steps: int = 10, generator: torch.Generator | None
) -> Tensor:
    """Sum of the Ritz values of k Lanczos steps: the public research code's "ESD" option.

    Runs k = min(steps, n) Lanczos steps on H(theta) (:meth:`Hessian.lanczos`) and returns
    trace(T_k) = Σ α_i, each α_i = q_iᵀ H q_i differentiable in theta. With k = n this is
    exactly tr H (up to rounding). With k < n it is tr(Q_kᵀ H Q_k), the trace of H restricted
    to the Krylov subspace, which Lanczos fills first with the extreme eigenvalues, so it is
    dominated by them (it lies between the sums of the k smallest and k largest eigenvalues);
    it is not an unbiased trace estimate. The ``hessian-esd`` regularizer.
    """
    _at_least_one("steps", steps)
    hess = Hessian(loss_fn, theta)
    alphas, _ = hess.lanczos(steps, generator=generator)
    total = torch.stack(alphas).sum()
    return total if hess.differentiable else total.detach()
