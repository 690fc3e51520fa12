"""``flatl2o.L2O`` against the ``torch.optim.Optimizer`` contract, for every rule: closures,
param groups, LR schedulers, exact state-dict resume, dtypes and layouts, chunking, errors,
non-finite gradients and AMP's GradScaler.

The rules have fixed random weights (``make_rule`` under a fixed seed), never hand-set ones:
these tests check the optimizer's mechanics, not what a trained rule learned.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from numerics import BLAS_ROWS_BATCH_INVARIANT
from torch import Tensor, nn

from flatl2o import L2O, make_rule
from flatl2o.kernels import ROW_TILE, KernelUnavailable
from flatl2o.rules import UpdateRule

RULE_NAMES = ["l2o-dm", "rnnprop"]


def _make_rule(name: str, seed: int = 0) -> UpdateRule:
    torch.manual_seed(seed)
    return make_rule(name)


@pytest.fixture(params=RULE_NAMES)
def rule(request: pytest.FixtureRequest) -> UpdateRule:
    return _make_rule(request.param)


@pytest.fixture(autouse=True, params=["reference", "cpu"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every contract test runs on the reference step and on the compiled CPU kernel
    (``backend="auto"`` reads ``FLATL2O_BACKEND``)."""
    monkeypatch.setenv("FLATL2O_BACKEND", request.param)
    return request.param


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def _batch(i: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 6, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)


def _loss(model: nn.Module, i: int) -> Tensor:
    p = next(model.parameters())
    x, y = _batch(i, p.dtype)
    return (model(x) - y).pow(2).mean()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sign: float = 1.0) -> None:
    for i in steps:
        opt.zero_grad()
        (sign * _loss(model, i)).backward()
        opt.step()


def _snapshot(opt: L2O) -> list[dict[str, Tensor]]:
    """Every parameter's state, cloned, in parameter order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append({k: v.clone() for k, v in opt.state[p].items()})
    return out


def _assert_snapshots_equal(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def _assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def _params_changed(before: list[Tensor], model: nn.Module) -> list[bool]:
    return [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]


def _clone_params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------- torch contract
def test_step_closure_returns_loss_with_grad_enabled(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    seen = []

    def closure() -> Tensor:
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        return loss

    before = _clone_params(model)
    with torch.no_grad():
        result = opt.step(closure)
    assert seen == [True]
    assert isinstance(result, Tensor) and result.grad_fn is not None
    assert all(_params_changed(before, model))
    assert opt.step() is None


def test_step_hooks_run(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    _train(model, opt, range(1))
    assert calls == ["pre", "post"]


def test_state_layout(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(3))
    for p in model.parameters():
        state = opt.state[p]
        assert state["step"].item() == 3.0
        assert state["step"].dtype == torch.float32
        for key, shape in rule.state_shapes().items():
            assert state[key].shape == (p.numel(), *shape)
            assert state[key].dtype == torch.float32
            assert torch.isfinite(state[key]).all()
    sd = opt.state_dict()
    assert sd["rule"]["fingerprint"] == rule.fingerprint()
    assert sd["rule"]["architecture"] == rule.architecture
    assert sd["rule"]["config"] == rule.config.to_dict()


def _zero_param_step(rule: UpdateRule, groups: list[dict], grad: Tensor) -> list[Tensor]:
    """One step from zero parameters: the displacement is exactly ``-lr * s`` (s the rule's
    output), since ``0 - lr*s`` rounds like ``lr*s`` and halving is exact in binary."""
    params = []
    for group in groups:
        p = nn.Parameter(torch.zeros_like(grad))
        p.grad = -grad if group.get("maximize") else grad.clone()
        params.append(p)
        group["params"] = [p]
    opt = L2O(groups, rule)
    opt.step()
    return [p.detach() for p in params]


def test_param_groups_per_group_lr_and_maximize(rule: UpdateRule) -> None:
    grad = torch.randn(40)
    full, half, tensor_half, maxi = _zero_param_step(
        rule,
        [{}, {"lr": 0.5}, {"lr": torch.tensor(0.5)}, {"maximize": True}],
        grad,
    )
    assert full.abs().sum() > 0
    assert torch.equal(half, full * 0.5)
    assert torch.equal(tensor_half, full * 0.5)
    assert torch.equal(maxi, full)  # maximize with gradient -g == minimize with g


def test_lr_zero_advances_state_only(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule, lr=0.0)
    before = _clone_params(model)
    _train(model, opt, range(2))
    assert not any(_params_changed(before, model))
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=6, cycle_momentum=False
    ),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lr_schedulers_scale_the_step_exactly(rule: UpdateRule, scheduler: str) -> None:
    """With a scheduler, each step equals a step taken with the scheduled lr set by hand."""
    model_a, model_b = _model(), _model()
    opt_a = L2O(model_a.parameters(), rule)
    opt_b = L2O(model_b.parameters(), rule)
    sched = SCHEDULERS[scheduler](opt_a)
    lrs = []
    for i in range(5):
        lr = opt_a.param_groups[0]["lr"]
        lrs.append(lr)
        opt_b.param_groups[0]["lr"] = lr
        _train(model_a, opt_a, range(i, i + 1))
        _train(model_b, opt_b, range(i, i + 1))
        sched.step()  # type: ignore[attr-defined]
        _assert_params_equal(model_a, model_b)
    assert len(set(lrs)) > 1, lrs


def _resume_check(
    rule: UpdateRule, dtype: torch.dtype, through_buffer: bool, **options: object
) -> None:
    model = _model(dtype=dtype)
    opt = L2O(model.parameters(), rule, **options)
    _train(model, opt, range(5))
    sd = opt.state_dict()
    if through_buffer:
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        buffer.seek(0)
        sd = torch.load(buffer, weights_only=True)
    model2 = copy.deepcopy(model)
    opt2 = L2O(model2.parameters(), copy.deepcopy(rule), **options)
    opt2.load_state_dict(sd)
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for key, value in opt2.state[p2].items():
            assert value.dtype == torch.float32, (key, value.dtype)
            assert value is not opt.state[p][key]  # no aliasing between the two optimizers
            assert torch.equal(value, opt.state[p][key])
    _train(model, opt, range(5, 10))
    _train(model2, opt2, range(5, 10))
    _assert_params_equal(model, model2)
    _assert_snapshots_equal(_snapshot(opt), _snapshot(opt2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("through_buffer", [False, True], ids=["direct", "torch.save"])
def test_state_dict_lockstep_resume(
    rule: UpdateRule, dtype: torch.dtype, through_buffer: bool
) -> None:
    _resume_check(rule, dtype, through_buffer)


def test_state_dict_resume_keeps_group_options(rule: UpdateRule) -> None:
    _resume_check(rule, torch.float32, True, lr=0.5, maximize=True, chunk_size=7)
    model = _model()
    opt = L2O(model.parameters(), rule, lr=0.25, chunk_size=100)
    _train(model, opt, range(1))
    opt2 = L2O(_model().parameters(), rule)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.25
    assert opt2.param_groups[0]["chunk_size"] == 100


def test_params_without_grad_are_untouched(rule: UpdateRule) -> None:
    model = _model()
    model[0].requires_grad_(False)
    unused = nn.Parameter(torch.randn(3))
    opt = L2O([*model.parameters(), unused], rule)
    before = _clone_params(model)
    unused_before = unused.detach().clone()
    _train(model, opt, range(2))
    assert _params_changed(before, model) == [False, False, True, True]
    assert torch.equal(unused, unused_before)
    assert model[0].weight not in opt.state and unused not in opt.state
    assert len(opt.state) == 2


def test_maximize_equals_minimizing_negated_loss(rule: UpdateRule) -> None:
    model_a, model_b = _model(), _model()
    opt_a = L2O(model_a.parameters(), rule, maximize=True)
    opt_b = L2O(model_b.parameters(), rule)
    _train(model_a, opt_a, range(4))
    _train(model_b, opt_b, range(4), sign=-1.0)
    _assert_params_equal(model_a, model_b)
    _assert_snapshots_equal(_snapshot(opt_a), _snapshot(opt_b))


def test_deepcopy_steps_independently(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(2))
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(twin_params, model.parameters(), strict=True))
    assert twin.rule is not opt.rule and twin.rule.fingerprint() == opt.rule.fingerprint()
    snapshot, before = _snapshot(opt), _clone_params(model)

    grads = [torch.randn_like(p) for p in twin_params]
    for p, g in zip(twin_params, grads, strict=True):
        p.grad = g.clone()
    twin.step()
    assert not any(_params_changed(before, model))
    _assert_snapshots_equal(_snapshot(opt), snapshot)

    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, q in zip(model.parameters(), twin_params, strict=True):
        assert torch.equal(p, q)
    _assert_snapshots_equal(_snapshot(opt), _snapshot(twin))


def test_pickle_round_trip(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(2))
    clone = pickle.loads(pickle.dumps(opt))
    _assert_snapshots_equal(_snapshot(clone), _snapshot(opt))
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()
    assert clone.state[clone.param_groups[0]["params"][0]]["step"].item() == 3


def test_zero_grad(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(1))
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_after_construction(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model[0].parameters(), rule, chunk_size=100)
    _train(model, opt, range(2))
    assert model[2].weight not in opt.state
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5})  # a generator
    group = opt.param_groups[1]
    assert len(group["params"]) == 2
    assert group["lr"] == 0.5 and group["chunk_size"] == 100 and group["nonfinite"] == "skip"
    before = _clone_params(model)
    _train(model, opt, range(2, 3))
    assert all(_params_changed(before, model))
    assert opt.state[model[2].weight]["step"].item() == 1
    assert opt.state[model[0].weight]["step"].item() == 3


def test_named_parameters(rule: UpdateRule) -> None:
    model, twin = _model(), _model()
    opt = L2O(model.named_parameters(), rule)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in twin.named_parameters()]
    opt_twin = L2O(twin.parameters(), rule)
    _train(model, opt, range(2))
    _train(twin, opt_twin, range(2))
    _assert_params_equal(model, twin)
    extra = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="can only optimize floating point or complex"):
        L2O([("w", model[0].weight), ("extra", extra)], rule)


# ------------------------------------------------------------------ dtypes and layouts
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_update_like_fp32(rule: UpdateRule, dtype: torch.dtype) -> None:
    """A half-precision parameter takes the fp32 computation's step, rounded once; a
    double one is updated in double."""
    work = torch.promote_types(dtype, torch.float32)
    torch.manual_seed(3)
    p = nn.Parameter(torch.randn(30).to(dtype))
    ref = nn.Parameter(p.detach().to(work))
    opt = L2O([p], rule)
    ref_opt = L2O([ref], rule)
    for _ in range(3):
        g = torch.randn(30).to(dtype)
        p.grad, ref.grad = g, g.to(work)
        before = p.detach().clone()
        opt.step()
        ref_opt.step()
        assert p.dtype == dtype
        assert not torch.equal(p, before)
        assert torch.equal(p, ref.detach().to(dtype))
        ref.data.copy_(p.detach().to(work))  # both continue from the stored value
    for key, value in opt.state[p].items():
        assert value.dtype == torch.float32, key
    _assert_snapshots_equal(_snapshot(opt), _snapshot(ref_opt))


def test_float32_params(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    before = _clone_params(model)
    _train(model, opt, range(1))
    assert all(_params_changed(before, model))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_non_contiguous_param_updates_like_contiguous(rule: UpdateRule) -> None:
    torch.manual_seed(4)
    strided = nn.Parameter(torch.randn(4, 6).t())
    assert not strided.is_contiguous()
    dense = nn.Parameter(strided.detach().contiguous())
    opt_s, opt_d = L2O([strided], rule, chunk_size=7), L2O([dense], rule, chunk_size=7)
    for i in range(3):
        g = torch.randn(4, 6).t() if i % 2 else torch.randn(6, 4)  # strided grads too
        strided.grad, dense.grad = g.clone(), g.contiguous()
        opt_s.step()
        opt_d.step()
        assert torch.equal(strided, dense)
    assert strided.stride() == (1, 6)  # updated in place, layout kept
    _assert_snapshots_equal(_snapshot(opt_s), _snapshot(opt_d))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_param_is_its_real_view(rule: UpdateRule, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    z = nn.Parameter(torch.randn(5, 3, dtype=dtype))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z, opt_r = L2O([z], rule), L2O([r], rule)
    for _ in range(3):
        g = torch.randn(5, 3, dtype=dtype)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
        assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert opt_z.state[z]["h0"].shape[0] == 30
    _assert_snapshots_equal(_snapshot(opt_z), _snapshot(opt_r))


def test_complex_param_trains_through_autograd(rule: UpdateRule) -> None:
    torch.manual_seed(6)
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = L2O([z], rule, maximize=True)
    before = z.detach().clone()
    opt.zero_grad()
    (z.abs() ** 2).sum().backward()
    opt.step()
    assert not torch.equal(z, before)


# ------------------------------------------------------------------------ chunking
def _wide_model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(40, 25), nn.Tanh(), nn.Linear(25, 1))  # 1025 + 26 coords


def _train_wide(model: nn.Module, opt: L2O, steps: int) -> None:
    gen = torch.Generator().manual_seed(8)
    for _ in range(steps):
        x, y = torch.randn(8, 40, generator=gen), torch.randn(8, 1, generator=gen)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("chunk_size", [7, 64, 100, 1000])
def test_chunk_size_does_not_change_results(rule: UpdateRule, chunk_size: int) -> None:
    ref, model = _wide_model(), _wide_model()
    ref_opt = L2O(ref.parameters(), rule, chunk_size=10**6)
    opt = L2O(model.parameters(), rule, chunk_size=chunk_size)
    _train_wide(ref, ref_opt, 3)
    _train_wide(model, opt, 3)
    for p_ref, p in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-7)
    for s_ref, s in zip(_snapshot(ref_opt), _snapshot(opt), strict=True):
        for key in s_ref:
            torch.testing.assert_close(s[key], s_ref[key], rtol=1e-5, atol=1e-6)
    if BLAS_ROWS_BATCH_INVARIANT:  # then the 64-row tiling makes it exact
        _assert_params_equal(ref, model)
        _assert_snapshots_equal(_snapshot(ref_opt), _snapshot(opt))


@pytest.mark.parametrize(("chunk_size", "rows"), [(7, 64), (64, 64), (100, 128), (10**6, None)])
def test_rule_sees_at_most_one_chunk(rule: UpdateRule, chunk_size: int, rows: int | None) -> None:
    """The transient memory of a step is bounded: the rule never sees more than one chunk
    (rounded up to whole 64-row tiles), and sees only whole tiles."""
    model = _wide_model()
    opt = L2O(model.parameters(), rule, chunk_size=chunk_size, backend="reference")
    sizes: list[int] = []
    handle = rule.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        _train_wide(model, opt, 1)
    finally:
        handle.remove()
    assert all(s % ROW_TILE == 0 for s in sizes)
    numels = [p.numel() for p in model.parameters()]  # 1000, 25, 25, 1
    if rows is None:  # one call per parameter
        assert sizes == [-(-n // ROW_TILE) * ROW_TILE for n in numels]
    else:
        assert max(sizes) == rows
        assert len(sizes) == sum(-(-n // rows) for n in numels)


# --------------------------------------------------------------------------- errors
def _p() -> nn.Parameter:
    return nn.Parameter(torch.randn(3))


@pytest.mark.parametrize(
    ("lr", "match"),
    [
        (-1.0, "Invalid learning rate: -1.0"),
        (math.nan, "Invalid learning rate: nan"),
        (math.inf, "Invalid learning rate: inf"),
    ],
)
def test_invalid_learning_rate(rule: UpdateRule, lr: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        L2O([_p()], rule, lr=lr)
    with pytest.raises(ValueError, match=match):
        L2O([{"params": [_p()]}, {"params": [_p()], "lr": lr}], rule)
    opt = L2O([_p()], rule)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [_p()], "lr": lr})
    assert len(opt.param_groups) == 1


def test_invalid_tensor_lr(rule: UpdateRule) -> None:
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        L2O([_p()], rule, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="lr must be a float"):
        L2O([_p()], rule, lr="0.1")  # type: ignore[arg-type]


def test_empty_parameter_list(rule: UpdateRule) -> None:
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        L2O([], rule)


def test_duplicate_parameters(rule: UpdateRule) -> None:
    p = _p()
    # twice in one group: torch warns (code that runs with Adam must run with L2O) ...
    with pytest.warns(UserWarning, match="parameter group with duplicate parameters"):
        opt = L2O([p, p], rule)
    with pytest.warns(UserWarning, match="parameter group with duplicate parameters"):
        adam = torch.optim.Adam([q := p.detach().clone().requires_grad_(), q])
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()
    adam.step()
    assert opt.state[p]["step"].item() == 2.0  # ... and, like Adam, steps it twice
    assert adam.state[q]["step"].item() == 2.0
    # ... in two groups: torch raises
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        L2O([{"params": [p]}, {"params": [p], "lr": 0.5}], rule)
    opt = L2O([p], rule)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [p]})


def test_params_of_the_wrong_kind(rule: UpdateRule) -> None:
    with pytest.raises(
        ValueError, match=r"can only optimize floating point or complex tensors.*int64"
    ):
        L2O([torch.zeros(3, dtype=torch.int64)], rule)
    with pytest.raises(TypeError, match="params argument given to the optimizer"):
        L2O(_p(), rule)
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        L2O([_p(), 1.0], rule)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="ordered collections"):
        L2O([{"params": {_p()}}], rule)


def test_sparse_gradients_are_refused_before_any_update(rule: UpdateRule) -> None:
    dense = _p()
    emb = nn.Embedding(10, 3, sparse=True)
    opt = L2O([dense, *emb.parameters()], rule)
    dense.grad = torch.ones(3)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="L2O does not support sparse gradients"):
        opt.step()
    assert torch.equal(dense, before) and len(opt.state) == 0


@pytest.mark.parametrize("chunk_size", [0, -5, 2.5, True, "64"])
def test_invalid_chunk_size(rule: UpdateRule, chunk_size: object) -> None:
    with pytest.raises(ValueError, match="Invalid chunk_size"):
        L2O([_p()], rule, chunk_size=chunk_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid chunk_size"):
        L2O([{"params": [_p()], "chunk_size": chunk_size}], rule)


@pytest.mark.parametrize("policy", ["ignore", None, "RAISE"])
def test_invalid_nonfinite_policy(rule: UpdateRule, policy: object) -> None:
    with pytest.raises(ValueError, match="Invalid nonfinite policy"):
        L2O([_p()], rule, nonfinite=policy)  # type: ignore[arg-type]


def test_load_options_need_a_name(rule: UpdateRule) -> None:
    with pytest.raises(TypeError, match=r"load options \['revision'\] only apply"):
        L2O([_p()], rule, revision="main")


@pytest.mark.parametrize("other", ["same-architecture", "other-architecture"])
def test_load_state_dict_of_another_rule(rule: UpdateRule, other: str) -> None:
    if other == "same-architecture":
        other_rule = _make_rule(rule.architecture, seed=1)
    else:
        other_rule = _make_rule(next(n for n in RULE_NAMES if n != rule.architecture))
    model = _model()
    opt = L2O(model.parameters(), other_rule)
    _train(model, opt, range(1))
    target = L2O(_model().parameters(), rule)
    with pytest.raises(ValueError, match=r"produced by the .* rule .* but this optimizer uses"):
        target.load_state_dict(opt.state_dict())
    assert len(target.state) == 0


def test_load_adam_state_dict(rule: UpdateRule) -> None:
    model = _model()
    adam = torch.optim.Adam(model.parameters())
    _train(model, adam, range(1))
    opt = L2O(_model().parameters(), rule)
    with pytest.raises(ValueError, match=r"no 'rule' entry: it was not produced by flatl2o\.L2O"):
        opt.load_state_dict(adam.state_dict())


def test_load_state_dict_of_another_model(rule: UpdateRule) -> None:
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(1))
    sd = opt.state_dict()
    torch.manual_seed(0)
    shapes = [nn.Parameter(torch.randn(s)) for s in [(5, 6), (5,), (2, 5), (3,)]]  # last differs
    other = L2O(shapes, rule)
    with pytest.raises(ValueError, match=r"state of parameter 3 \(shape \(3,\)\)"):
        other.load_state_dict(sd)
    assert len(other.state) == 0
    bad_options = copy.deepcopy(sd)
    bad_options["param_groups"][0]["nonfinite"] = "ignore"
    with pytest.raises(ValueError, match="Invalid nonfinite policy: 'ignore'"):
        L2O(_model().parameters(), rule).load_state_dict(bad_options)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        L2O([{"params": shapes[:2]}, {"params": shapes[2:]}], rule).load_state_dict(sd)


@pytest.mark.parametrize("new_size", [40, 3])
def test_resized_parameter_is_refused_before_any_update(rule: UpdateRule, new_size: int) -> None:
    """A parameter resized after its first step (pruning, a grown embedding) must not hand
    the kernels a state of the old size (out-of-bounds on the C kernel); nothing moves."""
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(10))
    opt = L2O([a, b], rule)
    a.grad, b.grad = torch.randn(5), torch.randn(10)
    opt.step()
    b.data = torch.randn(new_size)
    a.grad, b.grad = torch.randn(5), torch.randn(new_size)
    before, state = [a.detach().clone(), b.detach().clone()], _snapshot(opt)
    with pytest.raises(
        RuntimeError, match=rf"state '\w+' has shape \(10,.*\), expected \({new_size},"
    ):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    _assert_snapshots_equal(_snapshot(opt), state)
    del opt.state[b]  # the documented way out: b's recurrent state restarts
    opt.step()
    assert opt.state[b]["h0"].shape[0] == new_size and opt.state[b]["step"].item() == 1
    assert opt.state[a]["step"].item() == 2


def test_explicit_backend_that_cannot_run_raises_before_any_update(
    rule: UpdateRule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend="triton" on CPU tensors raises (it never silently runs the reference step),
    before any parameter or step counter moves."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = _p()
    opt = L2O([p], rule, backend="triton")
    p.grad = torch.randn(3)
    before = p.detach().clone()
    with pytest.raises(KernelUnavailable):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_float64_gradient_beyond_float32_range_is_nonfinite(
    rule: UpdateRule, nonfinite: str
) -> None:
    """A float64 gradient of 1e39 is finite, but inf in the rule's float32 arithmetic: it is
    treated like inf, so it cannot poison the recurrent state."""
    p = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = L2O([p], rule, nonfinite=nonfinite)
    p.grad = torch.tensor([1e-3, 1e39, -2e-3, 0.0], dtype=torch.float64)
    match = r"contains NaN, inf or values beyond float32's range"
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=match):
            opt.step()
    else:
        with pytest.warns(RuntimeWarning, match=match):
            opt.step()
    assert torch.equal(p, torch.ones(4, dtype=torch.float64)) and len(opt.state) == 0
    p.grad = torch.tensor([1e-3, 1e15, -2e-3, 0.0], dtype=torch.float64)  # within range
    opt.step()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_state_dict_hooks_run_where_torch_runs_them(rule: UpdateRule) -> None:
    """Load pre-hooks see the whole dict and what they return is what is loaded (here: the
    two same-shape parameters swapped); post-hooks see the final state; state-dict
    post-hooks see the "rule" entry."""
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = L2O([a, b], rule)
    a.grad, b.grad = torch.randn(4), torch.randn(4) * 10
    opt.step()
    seen: dict[str, object] = {}

    def record_saved(o: torch.optim.Optimizer, sd: dict) -> None:
        seen["saved"] = sorted(sd)

    opt.register_state_dict_post_hook(record_saved)
    sd = opt.state_dict()
    assert seen["saved"] == ["param_groups", "rule", "state"]

    def swap(o: torch.optim.Optimizer, sd: dict) -> dict:
        seen["loaded"] = sorted(sd)
        return {**sd, "state": {0: sd["state"][1], 1: sd["state"][0]}}

    def check_final(o: torch.optim.Optimizer) -> None:
        seen["final_dtype"] = o.state[a2]["h0"].dtype

    a2 = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    b2 = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    target = L2O([a2, b2], rule)
    target.register_load_state_dict_pre_hook(swap)
    target.register_load_state_dict_post_hook(check_final)
    target.load_state_dict(sd)
    assert seen["loaded"] == ["param_groups", "rule", "state"]
    assert seen["final_dtype"] == torch.float32  # the state stays fp32 for bf16 parameters
    for mine, theirs in [(a2, b), (b2, a)]:
        for key, value in opt.state[theirs].items():
            assert torch.equal(target.state[mine][key], value)


def test_unknown_options_and_from_pretrained_device(rule: UpdateRule) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'eps'"):
        L2O.from_pretrained([_p()], "rnnprop", eps=1e-8)
    opt = L2O.from_pretrained([_p()], "rnnprop", weight_decay=1e-4)  # an option now
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'betas'"):
        L2O([_p()], rule, betas=(0.9, 0.99))
    opt = L2O.from_pretrained([_p()], "rnnprop", device="cpu", lr=np.float32(0.5))
    assert opt.rule.architecture == "rnnprop" and opt.param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------- non-finite gradients
BAD = [math.nan, math.inf, -math.inf]


def _two_params(rule: UpdateRule, **options: object) -> tuple[nn.Parameter, nn.Parameter, L2O]:
    torch.manual_seed(9)
    good, bad = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(4))
    opt = L2O([good, bad], rule, **options)
    good.grad, bad.grad = torch.randn(5), torch.randn(4)
    opt.step()  # a normal first step, so that both have non-trivial state
    return good, bad, opt


@pytest.mark.parametrize("value", BAD)
def test_nonfinite_skip(rule: UpdateRule, value: float) -> None:
    good, bad, opt = _two_params(rule)
    ref_good, ref_bad, ref_opt = _two_params(rule)
    bad_before, bad_state = bad.detach().clone(), _snapshot(opt)[1]
    good_before = good.detach().clone()
    g = torch.randn(4)
    g[2] = value
    good.grad, bad.grad = torch.ones(5), g
    with pytest.warns(
        RuntimeWarning, match=r"shape \(4,\) contains NaN or inf; its update was"
    ) as record:
        opt.step()
    assert record[0].filename == __file__  # points at the caller, past torch's wrappers
    assert torch.equal(bad, bad_before)
    _assert_snapshots_equal([_snapshot(opt)[1]], [bad_state])
    assert not torch.equal(good, good_before)
    # same as a run in which `bad` had no gradient at that step
    ref_good.grad, ref_bad.grad = torch.ones(5), None
    ref_opt.step()
    for _ in range(2):  # a later finite step continues normally
        g1, g2 = torch.randn(5), torch.randn(4)
        good.grad, bad.grad, ref_good.grad, ref_bad.grad = g1, g2, g1.clone(), g2.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(good, ref_good) and torch.equal(bad, ref_bad)
    _assert_snapshots_equal(_snapshot(opt), _snapshot(ref_opt))
    assert all(torch.isfinite(v).all() for s in _snapshot(opt) for v in s.values())


@pytest.mark.parametrize("value", BAD)
def test_nonfinite_raise_changes_nothing(rule: UpdateRule, value: float) -> None:
    good, bad, opt = _two_params(rule, nonfinite="raise")
    before, state = [good.detach().clone(), bad.detach().clone()], _snapshot(opt)
    g = torch.randn(4)
    g[0] = value
    good.grad, bad.grad = torch.ones(5), g  # `good` comes first: it must not move either
    with pytest.raises(FloatingPointError, match=r"shape \(4,\) contains NaN or inf; nothing"):
        opt.step()
    assert torch.equal(good, before[0]) and torch.equal(bad, before[1])
    _assert_snapshots_equal(_snapshot(opt), state)
    bad.grad = torch.randn(4)
    opt.step()
    assert not torch.equal(good, before[0]) and not torch.equal(bad, before[1])
    assert all(s["step"].item() == 2 for s in _snapshot(opt))


def test_nonfinite_policy_per_group(rule: UpdateRule) -> None:
    a, b = _p(), _p()
    opt = L2O([{"params": [a]}, {"params": [b], "nonfinite": "raise"}], rule)
    a.grad, b.grad = torch.full((3,), math.nan), torch.ones(3)
    with pytest.warns(RuntimeWarning):
        opt.step()
    a.grad, b.grad = torch.ones(3), torch.full((3,), math.inf)
    with pytest.raises(FloatingPointError):
        opt.step()


def test_grad_scaler_skips_overflow_steps(rule: UpdateRule) -> None:
    """AMP on CPU: an overflowing step is skipped by the scaler; the L2O state is unchanged
    and training continues exactly as if that batch had never been seen."""
    model, ref = _model(), _model()
    opt, ref_opt = L2O(model.parameters(), rule), L2O(ref.parameters(), rule)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    for i in range(5):
        opt.zero_grad()
        scaler.scale(_loss(model, i)).backward()
        if i == 2:
            model[0].weight.grad[0, 0] = math.inf  # an overflow in the scaled backward
        state, params, scale = _snapshot(opt), _clone_params(model), scaler.get_scale()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="L2O")  # the scaler skips, not L2O
            scaler.step(opt)
        scaler.update()
        if i == 2:
            assert scaler.get_scale() == scale / 2
            assert not any(_params_changed(params, model))
            _assert_snapshots_equal(_snapshot(opt), state)
        else:
            _train(ref, ref_opt, range(i, i + 1))  # power-of-two scaling is exact
            _assert_params_equal(model, ref)
    _assert_snapshots_equal(_snapshot(opt), _snapshot(ref_opt))


# ------------------------------------------------------------------- multiple devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_params_on_two_devices(rule: UpdateRule) -> None:
    torch.manual_seed(10)
    cpu_p = nn.Parameter(torch.randn(300))
    gpu_p = nn.Parameter(cpu_p.detach().cuda())
    opt = L2O([cpu_p, gpu_p], rule)
    for _ in range(3):
        g = torch.randn(300)
        cpu_p.grad, gpu_p.grad = g, g.cuda()
        opt.step()
    assert all(v.device == gpu_p.device for k, v in opt.state[gpu_p].items() if k != "step")
    torch.testing.assert_close(gpu_p.detach().cpu(), cpu_p.detach(), rtol=1e-5, atol=1e-6)
    assert next(rule.parameters()).device.type == "cpu"  # the user's rule is not moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rule_copy_on_another_device_follows_the_rule(rule: UpdateRule) -> None:
    gpu_p = nn.Parameter(torch.zeros(100, device="cuda"))
    opt = L2O([gpu_p], rule)
    grad = torch.randn(100, device="cuda")

    def displacement() -> Tensor:
        gpu_p.data.zero_()
        opt.state.clear()
        gpu_p.grad = grad.clone()
        opt.step()
        return gpu_p.detach().cpu().clone()

    first = displacement()
    with torch.no_grad():
        rule.readout.bias.add_(1.0)  # e.g. meta-training continued on the CPU rule
    second = displacement()
    assert not torch.equal(first, second)
    cpu_p = nn.Parameter(torch.zeros(100))
    cpu_p.grad = grad.cpu()
    L2O([cpu_p], rule).step()
    torch.testing.assert_close(second, cpu_p.detach(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------- the zero-gradient contract


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_always_zero_gradient_coordinates_never_move(
    rule: UpdateRule, state_dtype: torch.dtype
) -> None:
    """A padding row, masked (pruned) weights and a parameter whose gradient is a zero tensor
    (``zero_grad(set_to_none=False)`` on a parameter the loss does not use) keep their values
    and their initial state over many steps, as with Adam; every other coordinate moves."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=0)
    lin = nn.Linear(4, 3)
    mask = (torch.rand(3, 4) > 0.5).float()
    unused = nn.Parameter(torch.randn(5))
    params = [emb.weight, lin.weight, lin.bias, unused]
    opt = L2O(params, rule, state_dtype=state_dtype)
    before = [p.detach().clone() for p in params]
    for i in range(30):
        opt.zero_grad(set_to_none=False)
        gen = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 10, (8, 5), generator=gen)
        ids[:, 0] = 0  # the padding row is looked up but gets no gradient
        out = nn.functional.linear(emb(ids), lin.weight * mask, lin.bias)
        out.pow(2).mean().backward()
        unused.grad = torch.zeros_like(unused)
        opt.step()
    still = [emb.weight[0], lin.weight[mask == 0], unused]
    first = [before[0][0], before[1][mask == 0], before[3]]
    for now, then in zip(still, first, strict=True):
        assert torch.equal(now, then)
    coords = {  # rows of the state: one per coordinate
        0: torch.arange(4),
        1: torch.nonzero(mask.flatten() == 0).flatten(),
        3: torch.arange(5),
    }
    for index, rows in coords.items():
        for key, value in opt.state[params[index]].items():
            if key != "step":
                kept = value[rows]
                assert torch.equal(kept, torch.zeros_like(kept)), key
                assert not torch.signbit(kept).any(), key
    assert (emb.weight[1:] != before[0][1:]).all()
    assert (lin.weight[mask == 1] != before[1][mask == 1]).all()


def test_zero_gradient_after_nonzero_ones_still_steps(rule: UpdateRule) -> None:
    """Only coordinates that never had a gradient are left alone: one whose state has moved
    takes the rule's step on a zero gradient (so does Adam's, through its moments)."""
    p = nn.Parameter(torch.zeros(4))
    opt = L2O([p], rule)
    p.grad = torch.tensor([1.0, -1.0, 0.5, 0.0])
    opt.step()
    moved = p.detach().clone()
    p.grad = torch.zeros(4)
    opt.step()
    assert (p[:3] != moved[:3]).all()
    assert p[3] == 0.0


# --------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_decay_is_decoupled_and_scaled_by_the_effective_lr(
    rule: UpdateRule, dtype: torch.dtype
) -> None:
    """``p <- p * (1 - lr * output_scale * wd)``, then the learned step (which does not
    depend on p): the same as the plain optimizer on the shrunk parameter, bit for bit."""
    lr, wd = 0.5, 0.3
    factor = 1 - lr * rule.config.output_scale * wd
    start = torch.randn(37).to(dtype)
    a = nn.Parameter(start.clone())
    b = nn.Parameter(start.clone())
    opt_a = L2O([a], rule, lr=lr, weight_decay=wd)
    opt_b = L2O([b], rule, lr=lr)
    for i in range(3):
        grad = torch.randn(37, generator=torch.Generator().manual_seed(i)).to(dtype)
        grad[::5] = 0.0  # decoupled decay shrinks zero-gradient coordinates too (as AdamW)
        a.grad, b.grad = grad.clone(), grad.clone()
        with torch.no_grad():
            b.mul_(factor)
        opt_a.step()
        opt_b.step()
        assert torch.equal(a, b)
    assert opt_a.state_dict()["param_groups"][0]["weight_decay"] == wd


def test_weight_decay_options(rule: UpdateRule) -> None:
    p = _p()
    with pytest.raises(ValueError, match=r"^Invalid weight_decay value: -0\.1$"):
        L2O([p], rule, weight_decay=-0.1)
    with pytest.raises(ValueError, match="Invalid weight_decay value: nan"):
        L2O([{"params": [p], "weight_decay": float("nan")}], rule)
    no_grad = _p()
    opt = L2O([{"params": [p], "weight_decay": 0.5}, {"params": [no_grad]}], rule, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    kept = no_grad.detach().clone()
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(no_grad, kept)  # no gradient: neither decayed nor stepped (as AdamW)


# ------------------------------------------------------------------ loading state dicts


def test_load_state_dict_fills_missing_group_options_with_defaults(rule: UpdateRule) -> None:
    """A group saved without an option (an older flatl2o had no ``weight_decay``) loads and
    steps with the constructor's default for it, as torch's optimizers do."""
    model = _model()
    opt = L2O(model.parameters(), rule, lr=0.5)
    _train(model, opt, range(2))
    sd = opt.state_dict()
    for key in ("maximize", "weight_decay", "chunk_size", "nonfinite"):
        del sd["param_groups"][0][key]
    target = L2O(_model().parameters(), rule, weight_decay=0.25, maximize=True)
    target.load_state_dict(sd)
    group = target.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["maximize"]) == (0.5, 0.25, True)
    assert group["chunk_size"] == target.defaults["chunk_size"]
    _train(model, target, range(2, 3))


@pytest.mark.parametrize("step", [2, 2.0], ids=["int", "float"])
def test_load_state_dict_with_a_python_number_step(rule: UpdateRule, step: float) -> None:
    """torch's optimizers accept a plain-number ``step`` in a loaded state (older state
    dicts); the resumed run is the same as from the tensor."""
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(2))
    sd = opt.state_dict()
    plain = copy.deepcopy(sd)
    for state in plain["state"].values():
        state["step"] = step
    a, b = _model(), _model()
    a.load_state_dict(model.state_dict())
    b.load_state_dict(model.state_dict())
    opt_a, opt_b = L2O(a.parameters(), rule), L2O(b.parameters(), rule)
    opt_a.load_state_dict(sd)
    opt_b.load_state_dict(plain)
    assert all(st["step"].dtype == torch.float32 for st in opt_b.state.values())
    _train(a, opt_a, range(2, 4))
    _train(b, opt_b, range(2, 4))
    _assert_params_equal(a, b)
    _assert_snapshots_equal(_snapshot(opt_a), _snapshot(opt_b))
    plain["state"][0]["h0"] = "zeros"
    with pytest.raises(ValueError, match="'h0': 'a str, not a tensor'") as info:
        L2O(_model().parameters(), rule).load_state_dict(plain)
    assert "has shapes" not in str(info.value)  # the values are not called shapes


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_state_dict_refuses_a_nonfinite_state(rule: UpdateRule, value: float) -> None:
    """The C kernel is built with finite math, so NaN/inf in a loaded state would give
    backend-dependent results: refused at load time, before anything is loaded."""
    model = _model()
    opt = L2O(model.parameters(), rule)
    _train(model, opt, range(2))
    sd = opt.state_dict()
    sd["state"][2]["c1"][1, 3] = value
    target = L2O(_model().parameters(), rule)
    with pytest.raises(ValueError, match=r"NaN or inf in state 'c1' of parameter 2 \(shape"):
        target.load_state_dict(sd)
    assert len(target.state) == 0
    sd["state"][2]["c1"][1, 3] = 0.0
    sd["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="a negative step in state 'step' of parameter 0"):
        target.load_state_dict(sd)


def test_dcp_state_dict_wrappers_take_any_l2o_and_refuse_other_optimizers(rule: UpdateRule):
    """``flatl2o.distributed`` sits below the optimizer and names it by its interface: an L2O
    subclass resumes bit for bit through the DCP wrappers (which load through the subclass's
    ``load_state_dict``, so the rule check runs), and a torch optimizer is refused by name."""
    from flatl2o import distributed

    class Resumable(L2O):
        loads = 0

        def load_state_dict(self, state_dict: dict) -> None:
            type(self).loads += 1
            super().load_state_dict(state_dict)

    model = _model()
    opt = Resumable(model.parameters(), rule)
    _train(model, opt, range(2))
    saved = distributed.get_optimizer_state_dict(model, opt)
    assert saved["rule"] == opt.state_dict()["rule"]
    again = Resumable(model.parameters(), rule)
    distributed.set_optimizer_state_dict(model, again, saved)
    assert Resumable.loads == 1 and "load_state_dict" not in vars(again)
    _assert_snapshots_equal(_snapshot(again), _snapshot(opt))
    other = L2O(
        model.parameters(), make_rule("rnnprop" if rule.architecture != "rnnprop" else "l2o-dm")
    )
    with pytest.raises(ValueError, match="loaded state dict was produced by the"):
        distributed.set_optimizer_state_dict(model, other, saved)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"expected a flatl2o\.L2O optimizer, got SGD"):
        distributed.get_optimizer_state_dict(model, sgd)
