"""Tests for the flatness regularizers against exact Hessians and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from flatl2o.meta.regularizers import (
    REGULARIZERS,
    _grad_with_graph,
    _lanczos,
    hessian_eig,
    hessian_esd,
    hessian_trace,
    hvp,
    local_entropy,
    make_regularizer,
    regularized_steps,
    regularized_unroll,
)

DT = torch.float64
SIZES = [(5, 4), (4, 3)]  # 5-4-3 tanh MLP
N_PARAMS = sum(a * b + b for a, b in SIZES)  # 39


def _mlp_problem(seed: int = 0):
    """A cross-entropy loss of a 5-4-3 tanh MLP over a flat parameter vector, and a point."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (32,), generator=gen)

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        i, h = 0, x
        for layer, (a, b) in enumerate(SIZES):
            w = theta[i : i + a * b].view(b, a)
            bias = theta[i + a * b : i + a * b + b]
            i += a * b + b
            h = h @ w.T + bias
            if layer < len(SIZES) - 1:
                h = torch.tanh(h)
        return torch.nn.functional.cross_entropy(h, y)

    theta = torch.randn(N_PARAMS, generator=gen, dtype=DT)
    return loss_fn, theta


@pytest.fixture(scope="module")
def mlp():
    loss_fn, theta = _mlp_problem()
    hess = torch.autograd.functional.hessian(loss_fn, theta)
    return loss_fn, theta, hess


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hvp_matches_exact_hessian(mlp):
    loss_fn, theta, hess = mlp
    v = torch.randn(N_PARAMS, generator=_gen(3), dtype=DT)
    torch.testing.assert_close(hvp(loss_fn, theta, v), hess @ v, rtol=1e-10, atol=1e-12)


def test_hutchinson_within_four_standard_errors(mlp):
    loss_fn, theta, hess = mlp
    probes = 4000
    # Var(vᵀHv) for Rademacher v is 2 Σ_{i≠j} H_ij²; the mean of `probes` draws has var / probes.
    off_diag = hess - torch.diag(torch.diag(hess))
    stderr = math.sqrt(2 * off_diag.pow(2).sum().item() / probes)
    est = hessian_trace(loss_fn, theta, probes=probes, generator=_gen())
    assert abs(est.item() - torch.trace(hess).item()) < 4 * stderr


def test_power_iteration_top_magnitude_eigenvalue(mlp):
    loss_fn, theta, hess = mlp
    top = torch.linalg.eigvalsh(hess).abs().max()
    est = hessian_eig(loss_fn, theta, iters=200, generator=_gen())
    torch.testing.assert_close(est, top, rtol=1e-8, atol=0.0)


def test_lanczos_full_dimension_is_exact_trace(mlp):
    loss_fn, theta, hess = mlp
    est = hessian_esd(loss_fn, theta, steps=N_PARAMS, generator=_gen())
    torch.testing.assert_close(est, torch.trace(hess), rtol=1e-9, atol=1e-12)


def test_lanczos_partial_is_ritz_sum_within_ky_fan_bounds(mlp):
    loss_fn, theta, hess = mlp
    k = 8
    x, g = _grad_with_graph(loss_fn, theta)
    alphas, betas = _lanczos(x, g, steps=k, generator=_gen(), create_graph=False)
    assert len(alphas) == k and len(betas) == k - 1
    tri = torch.diag(torch.stack(alphas)) + torch.diag(torch.tensor(betas, dtype=DT), 1)
    ritz = torch.linalg.eigvalsh(tri + torch.triu(tri, 1).T)
    eig = torch.linalg.eigvalsh(hess)
    # Ritz values lie inside the spectrum; the largest one approximates λ_max.
    assert eig[0] - 1e-10 <= ritz.min() and ritz.max() <= eig[-1] + 1e-10
    assert ritz.max() > 0.9 * eig[-1]
    est = hessian_esd(loss_fn, theta, steps=k, generator=_gen())
    torch.testing.assert_close(est, ritz.sum(), rtol=1e-10, atol=1e-12)
    # Ky Fan: the trace of H on any k-dimensional subspace lies between these sums.
    assert eig[:k].sum() <= est <= eig[-k:].sum()


def test_lanczos_stops_on_invariant_subspace():
    a = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0], dtype=DT))

    def loss_fn(t):
        return 0.5 * t @ a @ t

    x, g = _grad_with_graph(loss_fn, torch.zeros(5, dtype=DT))
    alphas, _ = _lanczos(x, g, steps=5, generator=_gen(), create_graph=False)
    assert len(alphas) == 3  # three distinct eigenvalues span an invariant Krylov subspace
    est = hessian_esd(loss_fn, torch.zeros(5, dtype=DT), steps=5, generator=_gen())
    torch.testing.assert_close(est, torch.tensor(6.0, dtype=DT))  # sum of distinct eigenvalues


def _quadratic(dim: int = 3):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=_gen(7), dtype=DT))
    a = q @ torch.diag(torch.tensor([0.5, 1.0, 2.0], dtype=DT)) @ q.T
    return a, (lambda t: 0.5 * t @ a @ t)


def test_local_entropy_gradient_matches_gibbs_mean_noiseless():
    a, loss_fn = _quadratic()
    gamma = 1.0
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=DT, requires_grad=True)
    reg = local_entropy(loss_fn, theta, gamma=gamma, steps=400, lr=0.1, noise=0.0, generator=_gen())
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
        generator=_gen(),
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
    loss_fn, theta0 = _mlp_problem()
    g0 = torch.autograd.grad(loss_fn(theta0.requires_grad_(True)), theta0)[0].detach()
    theta0 = theta0.detach()
    w = torch.tensor(0.3, dtype=DT, requires_grad=True)
    theta = theta0 - w * g0  # stands in for an L2O update with weight w
    reg = make_regularizer(name, **_all_regularizers()[name])
    (dw,) = torch.autograd.grad(reg(loss_fn, theta, generator=_gen()), w)
    assert torch.isfinite(dw) and dw.abs() > 1e-8


def test_hessian_trace_gradient_matches_finite_difference():
    loss_fn, theta0 = _mlp_problem()
    direction = torch.randn(N_PARAMS, generator=_gen(5), dtype=DT)

    def value(w):
        return hessian_trace(loss_fn, theta0 + w * direction, probes=3, generator=_gen())

    w = torch.tensor(0.0, dtype=DT, requires_grad=True)
    (dw,) = torch.autograd.grad(value(w), w)
    h = 1e-5
    fd = (value(torch.tensor(h, dtype=DT)) - value(torch.tensor(-h, dtype=DT))) / (2 * h)
    torch.testing.assert_close(dw, fd, rtol=1e-5, atol=1e-8)


def test_probes_are_fresh_and_seeded(mlp):
    loss_fn, theta, _ = mlp
    gen = _gen(11)
    first = hessian_trace(loss_fn, theta, generator=gen)
    second = hessian_trace(loss_fn, theta, generator=gen)
    assert first != second
    gen.manual_seed(11)
    torch.testing.assert_close(hessian_trace(loss_fn, theta, generator=gen), first)


def test_works_under_no_grad_and_without_theta_grad(mlp):
    loss_fn, theta, hess = mlp
    with torch.no_grad():
        trace = hessian_esd(loss_fn, theta, steps=N_PARAMS, generator=_gen())
        ent = local_entropy(loss_fn, theta, generator=_gen())
    assert trace.grad_fn is None and ent.grad_fn is None
    torch.testing.assert_close(trace, torch.trace(hess), rtol=1e-9, atol=1e-12)
    assert torch.isfinite(ent) and ent > 0


def test_make_regularizer_validates_name_and_options():
    with pytest.raises(ValueError, match=r"unknown regularizer 'hessian'.*hessian-trace"):
        make_regularizer("hessian")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['probe'\].*probes"):
        make_regularizer("hessian-trace", probe=3)
    with pytest.raises(ValueError, match="generator"):
        make_regularizer("entropy", generator=None)
    reg = make_regularizer("hessian-trace", probes=3)
    loss_fn, theta = _mlp_problem()
    expected = hessian_trace(loss_fn, theta, probes=3, generator=_gen())
    torch.testing.assert_close(reg(loss_fn, theta, generator=_gen()), expected)


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
