"""Tests for the flatness regularizers: the local entropy against closed forms, the name table,
option validation and schedules. The Hessian measures themselves are tested in test_hessian.py."""

from __future__ import annotations

import pytest
import torch
from tiny_mlp import DT, gen, mlp_problem

import flatl2o.hessian
from flatl2o.meta.regularizers import (
    REGULARIZERS,
    hessian_trace,
    local_entropy,
    make_regularizer,
    regularized_steps,
    regularized_unroll,
)


def test_hessian_regularizers_are_the_hessian_modules_estimators():
    """One implementation: the recipe names map to flatl2o.hessian's functions, which the
    flatness readouts also use (no second copy kept equal by a test)."""
    assert REGULARIZERS["hessian-trace"] is flatl2o.hessian.hessian_trace
    assert REGULARIZERS["hessian-eig"] is flatl2o.hessian.hessian_eig
    assert REGULARIZERS["hessian-esd"] is flatl2o.hessian.hessian_esd


def _quadratic(dim: int = 3):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen(7), dtype=DT))
    a = q @ torch.diag(torch.tensor([0.5, 1.0, 2.0], dtype=DT)) @ q.T
    return a, (lambda t: 0.5 * t @ a @ t)


def test_local_entropy_gradient_matches_gibbs_mean_noiseless():
    a, loss_fn = _quadratic()
    gamma = 1.0
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    reg = local_entropy(loss_fn, theta, gamma=gamma, steps=400, lr=0.1, noise=0.0, generator=gen())
    (grad,) = torch.autograd.grad(reg, theta)
    mu = gamma * torch.linalg.solve(a + gamma * torch.eye(3, dtype=DT), theta.detach())
    torch.testing.assert_close(grad, gamma * (theta.detach() - mu), rtol=1e-8, atol=1e-10)


def test_local_entropy_gradient_matches_gibbs_mean_with_noise():
    # For a quadratic f the Gibbs measure is Gaussian with mean γ(A + γI)⁻¹θ at any temperature
    # ε, and Langevin (Euler-Maruyama) keeps that mean exactly; the noise only adds variance.
    a, loss_fn = _quadratic()
    gamma, lr, noise, average = 1.0, 0.1, 1e-3, 0.995
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    reg = local_entropy(
        loss_fn,
        theta,
        gamma=gamma,
        steps=3000,
        lr=lr,
        noise=noise,
        average=average,
        generator=gen(),
    )
    (grad,) = torch.autograd.grad(reg, theta)
    mu = gamma * torch.linalg.solve(a + gamma * torch.eye(3, dtype=DT), theta.detach())
    # Per coordinate of μ: Gibbs variance ≤ ε/(λ_min + γ) = 6.7e-4, reduced by the EMA
    # (window ~200 steps vs autocorrelation ~1/(lr(λ_min+γ)) ≈ 7 steps) to std ≲ 5e-3.
    torch.testing.assert_close(grad, gamma * (theta.detach() - mu), rtol=0.0, atol=2.5e-2)


def _all_regularizers():
    return {
        "hessian-trace": dict(probes=2),
        "hessian-eig": dict(iters=5),
        "hessian-esd": dict(steps=5),
        "entropy": dict(gamma=0.5, steps=5),
    }


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_gradient_flows_to_upstream_parameter(name):
    loss_fn, theta0 = mlp_problem()
    g0 = torch.autograd.grad(loss_fn(theta0.requires_grad_(True)), theta0)[0].detach()
    theta0 = theta0.detach()
    w = torch.tensor(0.3, dtype=DT, requires_grad=True)
    theta = theta0 - w * g0  # stands in for an L2O update with weight w
    reg = make_regularizer(name, **_all_regularizers()[name])
    (dw,) = torch.autograd.grad(reg(loss_fn, theta, generator=gen()), w)
    assert torch.isfinite(dw) and dw.abs() > 1e-8


def test_local_entropy_keeps_no_graph_under_no_grad_or_without_theta_grad():
    loss_fn, theta = mlp_problem()
    with torch.no_grad():
        ent = local_entropy(loss_fn, theta.requires_grad_(True), generator=gen())
    assert ent.grad_fn is None and torch.isfinite(ent) and ent > 0
    assert local_entropy(loss_fn, theta.detach(), generator=gen()).grad_fn is None


def test_make_regularizer_validates_name_and_options():
    with pytest.raises(ValueError, match=r"unknown regularizer 'hessian'.*hessian-trace"):
        make_regularizer("hessian")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['probe'\].*probes"):
        make_regularizer("hessian-trace", probe=3)
    with pytest.raises(ValueError, match="generator"):
        make_regularizer("entropy", generator=None)
    reg = make_regularizer("hessian-trace", probes=3)
    loss_fn, theta = mlp_problem()
    expected = hessian_trace(loss_fn, theta, probes=3, generator=gen())
    torch.testing.assert_close(reg(loss_fn, theta, generator=gen()), expected)


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("hessian-trace", {"probes": 0}, "probes"),
        ("hessian-trace", {"probes": 1.5}, "probes"),
        ("hessian-trace", {"probes": True}, "probes"),
        ("hessian-trace", {"probes": "2"}, "probes"),
        ("hessian-eig", {"iters": 0}, "iters"),
        ("hessian-esd", {"steps": 0}, "steps"),
        ("entropy", {"gamma": -0.01}, "gamma"),
        ("entropy", {"gamma": float("nan")}, "gamma"),
        ("entropy", {"steps": 0}, "steps"),
        ("entropy", {"lr": 0}, "lr"),
        ("entropy", {"noise": -1e-4}, "noise"),
        ("entropy", {"average": 1.0}, "average"),
    ],
)
def test_make_regularizer_rejects_bad_option_values_up_front(name, options, option):
    """A bad value fails when the regularizer is built (recipe validation), not at the first
    regularized step, and the message names the option and a valid value."""
    with pytest.raises(ValueError, match=rf"{name}.*option {option} .*set {option} = "):
        make_regularizer(name, **options)


def test_every_option_has_a_value_check_and_its_default_passes():
    import inspect

    for name, fn in REGULARIZERS.items():
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "generator"
        }
        make_regularizer(name, **defaults)  # KeyError if an option had no check
    make_regularizer("entropy", gamma=1, lr=1, noise=0, average=0)  # ints accepted as floats


def test_regularized_steps_counts_the_steps_that_compute_r():
    """What recipe validation uses to refuse a regularizer that would never run."""
    # 2 unrolls of 10: all -> steps 1..20; posterior -> 11..20; prior -> 1..10
    assert regularized_steps("all", 1, 20, 10) == 20
    assert regularized_steps("posterior", 1, 20, 10) == 10
    assert regularized_steps("prior", 5, 20, 10) == 2
    assert regularized_steps("all", 20, 20, 10) == 1
    assert regularized_steps("all", 21, 20, 10) == 0  # every > trajectory
    assert regularized_steps("posterior", 1, 10, 10) == 0  # one unroll: u=0 is not "later"
    assert regularized_steps("prior", 1, 10, 10) == 10
    # posterior with every = 15 in 4 unrolls of 5: later half is steps 11..20, 15 is in it
    assert regularized_steps("posterior", 15, 20, 5) == 1
    assert regularized_steps("prior", 15, 20, 5) == 0  # earlier half 1..10 has no multiple
    assert [regularized_unroll("posterior", u, 3) for u in range(3)] == [False, False, True]
