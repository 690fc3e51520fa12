"""Tests of flatl2o.hessian, the one Hessian module, against an explicit dense Hessian."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from tiny_mlp import DT, N_PARAMS, gen, mlp_problem

import flatl2o.hessian
from flatl2o.evaluation.flatness import hutchinson_trace, top_eigenvalue
from flatl2o.hessian import Hessian, hessian_eig, hessian_esd, hessian_trace, hvp


@pytest.fixture(scope="module")
def mlp():
    loss_fn, theta = mlp_problem()
    hess = torch.autograd.functional.hessian(loss_fn, theta)
    return loss_fn, theta, hess


def _upstream(theta: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``theta - w * grad`` with ``w`` a leaf: an iterate that depends on a rule weight."""
    x = theta.detach().clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(loss_fn(x), x)
    w = torch.tensor(0.3, dtype=DT, requires_grad=True)
    return theta.detach() - w * g0, w


def test_hvp_matches_exact_hessian(mlp):
    loss_fn, theta, hess = mlp
    v = torch.randn(N_PARAMS, generator=gen(3), dtype=DT)
    torch.testing.assert_close(hvp(loss_fn, theta, v), hess @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("differentiable", [False, True])
def test_probes_and_power_iteration_follow_the_dense_hessian(mlp, differentiable):
    """Both paths (the regularizers' differentiable one and the readouts' detached one) take
    the same draws and give what the dense Hessian gives for those draws: Hutchinson's
    vᵀHv for the same Rademacher vectors, power iteration's vector from the same start."""
    loss_fn, theta, hess = mlp
    if differentiable:
        # the dense Hessian at the same point (w = 0.3 moves theta)
        theta, _ = _upstream(theta, loss_fn)
        hess = torch.autograd.functional.hessian(loss_fn, theta.detach())
    op = Hessian(loss_fn, theta)
    assert op.differentiable is differentiable

    values = op.probe_values(5, generator=gen(3))
    draws = gen(3)
    for value in values:
        v = torch.randint(0, 2, (N_PARAMS,), generator=draws).to(DT) * 2 - 1
        torch.testing.assert_close(value.detach(), v @ hess @ v, rtol=1e-10, atol=1e-12)
        assert (value.grad_fn is not None) is differentiable

    v, hv = op.power_iteration(30, generator=gen(1))
    u = torch.randn(N_PARAMS, generator=gen(1), dtype=DT)
    u = u / u.norm()
    for _ in range(30):
        u = hess @ u / (hess @ u).norm()
    torch.testing.assert_close(v, u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hv.detach(), hess @ u, rtol=1e-9, atol=1e-12)
    assert (hv.grad_fn is not None) is differentiable

    # the regularizer and the readout summarize those same draws
    exact = [float(q.detach()) for q in values]
    mean = math.fsum(exact) / len(exact)
    trace = hessian_trace(loss_fn, theta, probes=5, generator=gen(3))
    assert float(trace.detach()) == pytest.approx(mean, rel=1e-12)
    readout, se = hutchinson_trace(loss_fn, theta, probes=5, generator=gen(3))
    assert readout == pytest.approx(mean, rel=1e-12) and se > 0
    lam = float(u @ hess @ u)
    eig = hessian_eig(loss_fn, theta, iters=30, generator=gen(1))
    assert float(eig.detach()) == pytest.approx(abs(lam), rel=1e-9)
    assert top_eigenvalue(loss_fn, theta, iters=30, generator=gen(1))[0] == pytest.approx(
        lam, rel=1e-9
    )


def test_hutchinson_within_four_standard_errors(mlp):
    loss_fn, theta, hess = mlp
    probes = 4000
    # Var(vᵀHv) for Rademacher v is 2 Σ_{i≠j} H_ij²; the mean of `probes` draws has var / probes.
    off_diag = hess - torch.diag(torch.diag(hess))
    stderr = math.sqrt(2 * off_diag.pow(2).sum().item() / probes)
    est = hessian_trace(loss_fn, theta, probes=probes, generator=gen())
    assert abs(est.item() - torch.trace(hess).item()) < 4 * stderr


def test_power_iteration_top_magnitude_eigenvalue(mlp):
    loss_fn, theta, hess = mlp
    top = torch.linalg.eigvalsh(hess).abs().max()
    est = hessian_eig(loss_fn, theta, iters=200, generator=gen())
    torch.testing.assert_close(est, top, rtol=1e-8, atol=0.0)


def test_lanczos_full_dimension_is_exact_trace(mlp):
    loss_fn, theta, hess = mlp
    est = hessian_esd(loss_fn, theta, steps=N_PARAMS, generator=gen())
    torch.testing.assert_close(est, torch.trace(hess), rtol=1e-9, atol=1e-12)


def test_lanczos_partial_is_ritz_sum_within_ky_fan_bounds(mlp):
    loss_fn, theta, hess = mlp
    k = 8
    alphas, betas = Hessian(loss_fn, theta).lanczos(k, generator=gen())
    assert len(alphas) == k and len(betas) == k - 1
    tri = torch.diag(torch.stack(alphas)) + torch.diag(torch.tensor(betas, dtype=DT), 1)
    ritz = torch.linalg.eigvalsh(tri + torch.triu(tri, 1).T)
    eig = torch.linalg.eigvalsh(hess)
    # Ritz values lie inside the spectrum; the largest one approximates λ_max.
    assert eig[0] - 1e-10 <= ritz.min() and ritz.max() <= eig[-1] + 1e-10
    assert ritz.max() > 0.9 * eig[-1]
    est = hessian_esd(loss_fn, theta, steps=k, generator=gen())
    torch.testing.assert_close(est, ritz.sum(), rtol=1e-10, atol=1e-12)
    # Ky Fan: the trace of H on any k-dimensional subspace lies between these sums.
    assert eig[:k].sum() <= est <= eig[-k:].sum()


def test_lanczos_stops_on_invariant_subspace():
    a = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0], dtype=DT))

    def loss_fn(t):
        return 0.5 * t @ a @ t

    alphas, _ = Hessian(loss_fn, torch.zeros(5, dtype=DT)).lanczos(5, generator=gen())
    assert len(alphas) == 3  # three distinct eigenvalues span an invariant Krylov subspace
    est = hessian_esd(loss_fn, torch.zeros(5, dtype=DT), steps=5, generator=gen())
    torch.testing.assert_close(est, torch.tensor(6.0, dtype=DT))  # sum of distinct eigenvalues


def test_linear_loss_has_a_zero_hessian_everywhere():
    """No second-order graph at all (the gradient is a constant): every estimator reads 0."""
    c = torch.arange(4, dtype=DT)

    def loss_fn(t):
        return c @ t

    theta = torch.ones(4, dtype=DT)
    assert torch.equal(hvp(loss_fn, theta, c), torch.zeros(4, dtype=DT))
    assert float(hessian_trace(loss_fn, theta, probes=2, generator=gen())) == 0.0
    assert float(hessian_eig(loss_fn, theta, iters=3, generator=gen())) == 0.0
    assert float(hessian_esd(loss_fn, theta, steps=3, generator=gen())) == 0.0
    assert top_eigenvalue(loss_fn, theta, iters=3, generator=gen()) == (0.0, 0.0)
    assert hutchinson_trace(loss_fn, theta, probes=3, generator=gen()) == (0.0, 0.0)


def test_hessian_trace_gradient_matches_finite_difference():
    loss_fn, theta0 = mlp_problem()
    direction = torch.randn(N_PARAMS, generator=gen(5), dtype=DT)

    def value(w):
        return hessian_trace(loss_fn, theta0 + w * direction, probes=3, generator=gen())

    w = torch.tensor(0.0, dtype=DT, requires_grad=True)
    (dw,) = torch.autograd.grad(value(w), w)
    h = 1e-5
    fd = (value(torch.tensor(h, dtype=DT)) - value(torch.tensor(-h, dtype=DT))) / (2 * h)
    torch.testing.assert_close(dw, fd, rtol=1e-5, atol=1e-8)


def test_probes_are_fresh_and_seeded(mlp):
    loss_fn, theta, _ = mlp
    g = gen(11)
    first = hessian_trace(loss_fn, theta, generator=g)
    second = hessian_trace(loss_fn, theta, generator=g)
    assert first != second
    g.manual_seed(11)
    torch.testing.assert_close(hessian_trace(loss_fn, theta, generator=g), first)


def test_no_graph_under_no_grad_or_without_theta_grad(mlp):
    loss_fn, theta, hess = mlp
    upstream, _ = _upstream(theta, loss_fn)
    with torch.no_grad():
        trace = hessian_esd(loss_fn, upstream, steps=N_PARAMS, generator=gen())
    assert trace.grad_fn is None
    detached = hessian_esd(loss_fn, theta, steps=N_PARAMS, generator=gen())
    assert detached.grad_fn is None
    torch.testing.assert_close(detached, torch.trace(hess), rtol=1e-9, atol=1e-12)


#: Values the two pre-merge copies (flatl2o.meta.regularizers' estimators and
#: flatl2o.evaluation.flatness' readouts) gave on mlp_problem(); the one module must reproduce
#: them, draws included, so shipped recipes and published flatness numbers do not move.
#: name -> (value at theta, next uniform draw of its generator, value at theta - 0.3 g, d/dw)
RECORDED = {
    "hessian_trace": (1.3517021140140286, 0.18049061032561686, 1.8516425107054182, 2.79115318534),
    "hessian_eig": (1.032922184623748, 0.36187934651354103, 0.8197960433393241, 0.06781101657419),
    "hessian_esd": (0.18291274458540724, 0.9386906521884646, 0.3130055890343229, 1.36263040291),
}


@pytest.mark.parametrize(
    ("fn", "options"),
    [(hessian_trace, {"probes": 3}), (hessian_eig, {"iters": 5}), (hessian_esd, {"steps": 5})],
)
def test_estimators_reproduce_the_values_recorded_before_the_merge(fn, options):
    loss_fn, theta = mlp_problem()
    value, after, upstream_value, dw = RECORDED[fn.__name__]
    g = gen()
    assert float(fn(loss_fn, theta, generator=g, **options)) == pytest.approx(value, rel=1e-10)
    assert float(torch.rand((), generator=g, dtype=DT)) == after  # same number of draws
    upstream, w = _upstream(theta, loss_fn)
    out = fn(loss_fn, upstream, generator=gen(), **options)
    assert float(out.detach()) == pytest.approx(upstream_value, rel=1e-10)
    assert float(torch.autograd.grad(out, w)[0]) == pytest.approx(dw, rel=1e-9)


def test_readouts_reproduce_the_values_recorded_before_the_merge():
    loss_fn, theta = mlp_problem()
    g = gen(1)
    mean, se = hutchinson_trace(loss_fn, theta, probes=4, generator=g)
    assert (mean, se) == pytest.approx((0.9463795501748867, 0.6021376974118634), rel=1e-10)
    assert float(torch.rand((), generator=g, dtype=DT)) == 0.6631863774473565
    g = gen(1)
    lam, resid = top_eigenvalue(loss_fn, theta, iters=5, generator=g)
    assert (lam, resid) == pytest.approx((1.0522942226774954, 0.2776707671967359), rel=1e-9)
    assert float(torch.rand((), generator=g, dtype=DT)) == 0.28649118705369403


@pytest.mark.parametrize(
    ("fn", "option"), [(hessian_trace, "probes"), (hessian_eig, "iters"), (hessian_esd, "steps")]
)
def test_a_count_below_one_fails_before_any_backward(fn, option):
    def loss_fn(t):
        raise AssertionError("the loss was evaluated before the count was checked")

    with pytest.raises(ValueError, match=rf"^{option} must be >= 1, got 0$"):
        fn(loss_fn, torch.zeros(3), generator=gen(), **{option: 0})


def test_the_module_sits_below_meta_and_evaluation():
    """Both the regularizers (flatl2o.meta) and the readouts (flatl2o.evaluation) import it,
    so it imports no flatl2o module at all."""
    tree = ast.parse(Path(flatl2o.hessian.__file__).read_text(encoding="utf-8"))
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not [m for m in imported if m and m.split(".")[0] == "flatl2o"], imported


def test_trace_through_scaled_dot_product_attention_is_differentiable():
    """A transformer's loss uses F.scaled_dot_product_attention, whose fused CPU kernel has no
    double backward; the Hessian module must still regularize it (meta-training's
    text-transformer tasks under hessian-trace)."""
    from torch.func import functional_call

    from flatl2o.meta.models import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(d=8, blocks=1, heads=2, context=6)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    idx = torch.randint(0, 256, (2, 7), generator=gen(1))

    def loss_fn(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            params[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        logits = functional_call(model, params, (idx[:, :-1],))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))

    w = torch.tensor(0.0, requires_grad=True)
    value = hessian_trace(loss_fn, flat0 + w * flat0, probes=1, generator=gen())
    (dw,) = torch.autograd.grad(value, w)
    assert torch.isfinite(value) and torch.isfinite(dw)
