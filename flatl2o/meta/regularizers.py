"""Flatness regularizers for meta-training (docs/method.md §4).

Every regularizer takes a closure ``loss_fn(theta) -> scalar`` (the optimizee minibatch loss)
and a flat parameter vector ``theta`` of shape ``(n,)``. When ``theta`` requires grad and grad
mode is on, the returned value is differentiable in ``theta`` (Hessian terms use double
backward with ``create_graph=True``), so its gradient reaches whatever ``theta`` depends on,
e.g. the learned optimizer's weights. When ``theta`` does not require grad (an evaluation
readout) the Hessian-vector products are taken w.r.t. a detached copy and no higher-order
graph is kept. Random probes are drawn fresh on every call from the ``generator`` passed in;
nothing is cached between calls. Dtypes are used as given.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "REGULARIZERS",
    "hessian_eig",
    "hessian_esd",
    "hessian_trace",
    "hvp",
    "local_entropy",
    "make_regularizer",
    "regularized_steps",
    "regularized_unroll",
]

LossFn = Callable[[Tensor], Tensor]


def _tracks_grad(theta: Tensor) -> bool:
    """Whether the result must carry a graph back to theta (grad mode on and theta needs grad)."""
    return torch.is_grad_enabled() and theta.requires_grad


def _grad_with_graph(loss_fn: LossFn, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Return (x, ∇loss(x)) with the gradient's graph kept, so several HVPs can share it.

    ``x`` is ``theta`` itself when it requires grad (keeping its upstream graph), else a
    detached copy that requires grad (HVPs then work, but nothing upstream is reached).
    """
    x = theta if theta.requires_grad else theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    return x, g


def _hvp_from_grad(g: Tensor, x: Tensor, v: Tensor, *, create_graph: bool) -> Tensor:
    """H v by differentiating the kept gradient ``g`` of the loss at ``x`` along ``v``."""
    if not g.requires_grad:  # loss is linear in x: the Hessian is zero
        return torch.zeros_like(x)
    with torch.enable_grad():
        (hv,) = torch.autograd.grad(
            g, x, grad_outputs=v, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
    return torch.zeros_like(x) if hv is None else hv


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A fresh vector of independent ±1 entries shaped, typed and placed like ``like``."""
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def hvp(loss_fn: LossFn, theta: Tensor, v: Tensor, *, create_graph: bool = True) -> Tensor:
    """Hessian-vector product H(theta) v by double backward (differentiable if create_graph).

    If ``theta`` does not require grad the product is taken at a detached copy, so the result
    is correct but carries no graph back to ``theta``'s (non-existent) history.
    """
    x, g = _grad_with_graph(loss_fn, theta)
    return _hvp_from_grad(g, x, v, create_graph=create_graph)


def hessian_trace(
    loss_fn: LossFn, theta: Tensor, *, probes: int = 1, generator: torch.Generator | None
) -> Tensor:
    """Hutchinson estimate of tr H(theta): mean of vᵀHv over fresh Rademacher probes v.

    Unbiased; its variance per probe is 2·Σ_{i≠j} H_ij². The gradient is computed once and
    shared by all probes.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    keep = _tracks_grad(theta)
    x, g = _grad_with_graph(loss_fn, theta)
    total = theta.new_zeros(())
    for _ in range(probes):
        v = _rademacher(x, generator)
        total = total + v @ _hvp_from_grad(g, x, v, create_graph=keep)
    return total / probes if keep else (total / probes).detach()


def hessian_eig(
    loss_fn: LossFn, theta: Tensor, *, iters: int = 10, generator: torch.Generator | None
) -> Tensor:
    """|λ| of the top-magnitude Hessian eigenvalue by power iteration ("spectral norm" flatness).

    Power iteration runs on detached vectors from a fresh Gaussian start; the returned value is
    |vᵀHv| for the final unit vector v, differentiable in theta (by Hellmann-Feynman its
    gradient is that of the eigenvalue once v has converged). Costs iters + 1 HVPs.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    keep = _tracks_grad(theta)
    x, g = _grad_with_graph(loss_fn, theta)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v / v.norm()
    for _ in range(iters):
        w = _hvp_from_grad(g, x, v, create_graph=False)
        norm = w.norm()
        if norm == 0:  # v is in the null space: the Rayleigh quotient below is 0
            break
        v = w / norm
    lam = (v @ _hvp_from_grad(g, x, v, create_graph=keep)).abs()
    return lam if keep else lam.detach()


def _lanczos(
    x: Tensor, g: Tensor, *, steps: int, generator: torch.Generator | None, create_graph: bool
) -> tuple[list[Tensor], list[float]]:
    """Lanczos with full reorthogonalization: (alphas, betas) of the tridiagonal matrix T.

    The basis vectors q_i are detached constants; each α_i = q_iᵀ H q_i keeps its graph when
    ``create_graph``. The new direction is H q_i with its components along all previous q
    removed (classical Gram-Schmidt applied twice), which in exact arithmetic is the
    three-term recurrence H q_i − α_i q_i − β_{i-1} q_{i-1}. Stops after ``min(steps, n)``
    steps, or earlier when β is negligible (the Krylov subspace is invariant).
    """
    n = x.numel()
    q = _rademacher(x, generator)
    q = q / q.norm()
    basis, alphas, betas = [q], [], []
    tol = math.sqrt(torch.finfo(x.dtype).eps)
    scale = 0.0  # running estimate of ||H|| to make the breakdown test relative
    k = min(steps, n)
    for i in range(k):
        hq = _hvp_from_grad(g, x, q, create_graph=create_graph)
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


def hessian_esd(
    loss_fn: LossFn, theta: Tensor, *, steps: int = 10, generator: torch.Generator | None
) -> Tensor:
    """Sum of the Ritz values of k Lanczos steps: the public research code's "ESD" option.

    Runs k = min(steps, n) Lanczos steps on H(theta) from a fresh normalized Rademacher start
    with full reorthogonalization and returns trace(T_k) = Σ α_i, where α_i = q_iᵀ H q_i with
    the q_i detached and each α_i differentiable in theta. With k = n this is exactly tr H
    (up to rounding). With k < n it is tr(Q_kᵀ H Q_k), the trace of H restricted to the
    Krylov subspace, which Lanczos fills first with the extreme eigenvalues, so it is
    dominated by them (it lies between the sums of the k smallest and k largest eigenvalues);
    it is not an unbiased trace estimate. Stops early if β ≈ 0 (invariant subspace).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    keep = _tracks_grad(theta)
    x, g = _grad_with_graph(loss_fn, theta)
    alphas, _ = _lanczos(x, g, steps=steps, generator=generator, create_graph=keep)
    total = torch.stack(alphas).sum()
    return total if keep else total.detach()


def local_entropy(
    loss_fn: LossFn,
    theta: Tensor,
    *,
    gamma: float = 1e-2,
    steps: int = 10,
    lr: float = 0.1,
    noise: float = 1e-4,
    average: float = 0.75,
    generator: torch.Generator | None,
) -> Tensor:
    """Negative local entropy −F(theta) as (γ/2)‖theta − μ‖², μ the SGLD Gibbs mean (stopped).

    Entropy-SGD (Chaudhari et al. 2017): the gradient of −F at theta is γ(theta − μ), with μ
    the mean of θ′ under the Gibbs measure ∝ exp(−(f(θ′) + (γ/2)‖theta − θ′‖²)/ε). μ is
    estimated by ``steps`` SGLD steps from θ′ = theta (detached),
    θ′ ← θ′ − lr·[∇f(θ′) + γ(θ′ − theta)] + sqrt(2·lr·ε)·N(0, I) with ε = ``noise``, and, as
    in Entropy-SGD, μ starts at theta and is updated after every step as
    μ ← average·μ + (1 − average)·θ′. The returned value's gradient in theta is exactly
    γ(theta − μ). Defaults follow Entropy-SGD (γ = 1e-2, inner lr 0.1, ε = 1e-4, average
    0.75) with 10 inner steps (they use 20) to halve the cost per call; each step costs one
    gradient of ``loss_fn`` and no higher-order graph.
    """
    if gamma <= 0 or lr <= 0 or noise < 0 or steps < 1 or not 0 <= average < 1:
        raise ValueError(
            "need gamma > 0, lr > 0, noise >= 0, steps >= 1 and 0 <= average < 1; got "
            f"gamma={gamma}, lr={lr}, noise={noise}, steps={steps}, average={average}"
        )
    center = theta.detach()
    mu, walker = center.clone(), center.clone()
    std = math.sqrt(2 * lr * noise)
    with torch.enable_grad():
        for _ in range(steps):
            walker.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(walker), walker)
            step = grad + gamma * (walker.detach() - center)
            eta = torch.randn(
                center.shape, generator=generator, dtype=center.dtype, device=center.device
            )
            walker = walker.detach() - lr * step + std * eta
            mu = average * mu + (1 - average) * walker
    return 0.5 * gamma * (theta - mu).pow(2).sum()


REGULARIZERS: dict[str, Callable[..., Tensor]] = {
    "hessian-trace": hessian_trace,
    "hessian-eig": hessian_eig,
    "hessian-esd": hessian_esd,
    "entropy": local_entropy,
}


#: Allowed values of each regularizer option: (type, test, what the test requires, meaning).
#: ``make_regularizer`` (and so recipe validation) checks options against this table before
#: any work starts; the functions check again on every call.
_OPTION_RULES: dict[str, dict[str, tuple[type, Callable[[float], bool], str, str]]] = {
    "hessian-trace": {
        "probes": (int, lambda v: v >= 1, ">= 1", "Rademacher probes per call"),
    },
    "hessian-eig": {
        "iters": (int, lambda v: v >= 1, ">= 1", "power iterations per call"),
    },
    "hessian-esd": {
        "steps": (int, lambda v: v >= 1, ">= 1", "Lanczos steps per call"),
    },
    "entropy": {
        "gamma": (float, lambda v: v > 0, "> 0", "scope of the local entropy"),
        "steps": (int, lambda v: v >= 1, ">= 1", "Langevin (SGLD) steps per call"),
        "lr": (float, lambda v: v > 0, "> 0", "SGLD step size"),
        "noise": (float, lambda v: v >= 0, ">= 0", "SGLD temperature"),
        "average": (float, lambda v: 0 <= v < 1, "in [0, 1)", "averaging rate of the mean"),
    },
}


def _check_option(name: str, key: str, value: object) -> None:
    kind, ok, requirement, meaning = _OPTION_RULES[name][key]
    default = inspect.signature(REGULARIZERS[name]).parameters[key].default
    typed = (
        not isinstance(value, bool)
        and isinstance(value, (int, float) if kind is float else int)
        and math.isfinite(value)
    )
    if not typed or not ok(value):
        kind_name = "a number" if kind is float else "an integer"
        raise ValueError(
            f"regularizer {name!r}: option {key} ({meaning}) must be {kind_name} "
            f"{requirement}, got {value!r}; set {key} = {default!r} (the default) or another "
            f"value {requirement}"
        )


def make_regularizer(name: str, **options: object) -> Callable[..., Tensor]:
    """Build ``reg(loss_fn, theta, *, generator)`` from a recipe name and its options.

    Validates the name against ``REGULARIZERS``, the option names against the chosen
    function's keyword-only parameters, and each option's type and range (e.g.
    ``probes >= 1``, ``gamma > 0``), so a typo or a bad value in a config fails loudly,
    naming the option, before any work starts instead of at the first regularized step.
    """
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; valid names: {sorted(REGULARIZERS)}")
    fn = REGULARIZERS[name]
    accepted = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "generator"
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for regularizer {name!r}; accepted: {accepted}"
        )
    for key, value in options.items():
        _check_option(name, key, value)
    return functools.partial(fn, **options)


#: Which unrolls of a trajectory carry the regularizer (``[regularizer].schedule``).
SCHEDULES = ("all", "posterior", "prior")


def regularized_unroll(schedule: str, unroll_index: int, num_unrolls: int) -> bool:
    """Whether this unroll of a trajectory carries the regularizer (all/posterior/prior)."""
    if schedule == "all":
        return True
    later_half = unroll_index >= num_unrolls / 2
    return later_half if schedule == "posterior" else not later_half


def regularized_steps(schedule: str, every: int, length: int, unroll: int) -> int:
    """How many times R is computed in a trajectory of ``length`` steps in unrolls of
    ``unroll``: the steps ``s`` (1-based) of regularized unrolls with ``s % every == 0``.

    Recipe validation refuses a regularizer that this counts zero times (docs/method.md §6).
    """
    num_unrolls = length // unroll
    return sum(
        1
        for u in range(num_unrolls)
        if regularized_unroll(schedule, u, num_unrolls)
        for s in range(u * unroll + 1, (u + 1) * unroll + 1)
        if s % every == 0
    )
