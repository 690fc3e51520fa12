"""Flatness regularizers for meta-training (docs/method.md §4).

Every regularizer takes a closure ``loss_fn(theta) -> scalar`` (the optimizee minibatch loss)
and a flat parameter vector ``theta`` of shape ``(n,)``. When ``theta`` requires grad and grad
mode is on, the returned value is differentiable in ``theta``, so its gradient reaches whatever
``theta`` depends on, e.g. the learned optimizer's weights; otherwise no graph is kept (an
evaluation readout). The three Hessian measures are :mod:`flatl2o.hessian`'s estimators (double
backward with ``create_graph=True``); the local entropy is defined here. Random probes and
noise are drawn fresh on every call from the ``generator`` passed in; nothing is cached between
calls. Dtypes are used as given. This module adds the recipe-facing parts: the name table
``REGULARIZERS``, option validation (:func:`make_regularizer`) and the schedules.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import Tensor

from flatl2o.hessian import hessian_eig, hessian_esd, hessian_trace

__all__ = [
    "REGULARIZERS",
    "SCHEDULES",
    "hessian_eig",
    "hessian_esd",
    "hessian_trace",
    "local_entropy",
    "make_regularizer",
    "regularized_steps",
    "regularized_unroll",
]

LossFn = Callable[[Tensor], Tensor]


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
