"""``flatl2o.L2O`` through PyTorch's generic optimizer checks.

PyTorch checks every ``torch.optim`` optimizer with ``TestOptimRenewed`` (``test/test_optim.py``
in the PyTorch repository, not shipped in the wheel), driven by one ``OptimizerInfo`` entry per
optimizer (``torch.testing._internal.common_optimizers``, shipped). This file gives ``L2O`` its
``OptimizerInfo`` entry (sample configurations: default, lr, Tensor lr, maximize, weight decay,
both backends, bf16 state; error inputs; scheduler inputs) and re-states each
``TestOptimRenewed`` check that can apply to a CPU optimizer without ``foreach``/``fused``/
``differentiable`` implementations, under the same name, written for this project (pytest, CPU,
float32 unless the original uses float64/complex64). The checks that cannot apply, and why, are
listed in docs/api.md ("PyTorch conformance"); ``test_backends_match_reference`` stands in for
the foreach/fused-vs-forloop parity checks.

Needs ``expecttest`` (imported by torch's testing package; in the ``dev`` extra).
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.nn import Parameter
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

from flatl2o import L2O

DEVICE = "cpu"


def optim_inputs_func_l2o(device: str, dtype: torch.dtype | None = None) -> list[OptimizerInput]:
    """L2O's sample configurations (``params`` is filled in by each check)."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.5}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.5)}, desc="Tensor lr"),
        OptimizerInput(params=None, kwargs={"maximize": True}, desc="maximize"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight_decay"),
        OptimizerInput(
            params=None, kwargs={"weight_decay": 0.1, "maximize": True}, desc="maximize, wd"
        ),
        OptimizerInput(params=None, kwargs={"backend": "reference"}, desc="reference step"),
        OptimizerInput(
            params=None, kwargs={"state_dtype": torch.bfloat16}, desc="bf16 recurrent state"
        ),
    ]


def optim_error_inputs_func_l2o(device: str, dtype: torch.dtype) -> list[ErrorOptimizerInput]:
    """Bad input and the error (or warning) torch's optimizers give for it."""
    p = torch.rand(10, device=device, dtype=dtype)
    sparse = Parameter(torch.zeros(3, 2, device=device, dtype=dtype))
    sparse.grad = torch.rand(3, 2, device=device, dtype=dtype).to_sparse()
    nan = Parameter(torch.zeros(3, device=device, dtype=dtype))
    nan.grad = torch.tensor([0.0, float("nan"), 1.0], device=device, dtype=dtype)
    construction = OptimizerErrorEnum.CONSTRUCTION_ERROR
    return [
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"lr": -1.0}, desc="negative lr"),
            error_on=construction,
            error_type=ValueError,
            error_regex="Invalid learning rate: -1.0",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"weight_decay": -1.0}, desc="negative wd"),
            error_on=construction,
            error_type=ValueError,
            error_regex="Invalid weight_decay value: -1.0",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"lr": torch.tensor([0.1, 0.2])}, desc="lr"),
            error_on=construction,
            error_type=ValueError,
            error_regex="Tensor lr must be 1-element",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": {p}}], kwargs={}, desc="params as a set"),
            error_on=construction,
            error_type=TypeError,
            error_regex="optimizer parameters need to be organized in ordered collections",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[p, p], kwargs={}, desc="a parameter twice in a group"),
            error_on=construction,
            error_type=UserWarning,
            error_regex="optimizer contains a parameter group with duplicate parameters",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [p]}, {"params": [p]}], kwargs={}, desc="groups"),
            error_on=construction,
            error_type=ValueError,
            error_regex="some parameters appear in more than one parameter group",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[sparse], kwargs={}, desc="sparse gradient"),
            error_on=OptimizerErrorEnum.STEP_ERROR,
            error_type=RuntimeError,
            error_regex="L2O does not support sparse gradients",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[nan], kwargs={"nonfinite": "raise"}, desc="NaN gradient"),
            error_on=OptimizerErrorEnum.STEP_ERROR,
            error_type=FloatingPointError,
            error_regex="contains NaN or inf; nothing was updated",
        ),
    ]


#: L2O's entry, as torch's ``optim_db`` has one per optimizer. No foreach / fused /
#: differentiable implementations; older state dicts may lack the options listed.
L2O_INFO = OptimizerInfo(
    L2O,
    optim_inputs_func=optim_inputs_func_l2o,
    optim_error_inputs_func=optim_error_inputs_func_l2o,
    supported_impls=(),
    not_og_supported_flags=("maximize", "weight_decay", "chunk_size", "nonfinite"),
    supports_complex=True,
)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backend="auto"`` as a user gets it (not a FLATL2O_BACKEND set by the caller)."""
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)


def _inputs(skip_wd: bool = False) -> list[OptimizerInput]:
    """Fresh sample configurations (a Tensor lr must not carry mutations across checks)."""
    inputs = L2O_INFO.optim_inputs_func(device=DEVICE)
    return [i for i in inputs if not (skip_wd and i.kwargs.get("weight_decay", 0) != 0)]


def _ids(inputs: list[OptimizerInput]) -> list[str]:
    return [i.desc for i in inputs]


def assert_equal(a: Any, b: Any, **tol: float) -> None:
    """Nested equality of state dicts (tensors compared with torch's float tolerances)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        torch.testing.assert_close(a, b, **tol)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (a.keys(), b)
        for k in a:
            assert_equal(a[k], b[k], **tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal(x, y, **tol)
    else:
        assert a == b, (a, b)


def _linear_problem(
    dtype: torch.dtype = torch.float32, contiguous: bool = True
) -> tuple[Parameter, Parameter, Tensor]:
    if contiguous:
        weight = Parameter(torch.randn((10, 5), dtype=dtype))
        bias = Parameter(torch.randn(10, dtype=dtype))
    else:
        weight = Parameter(torch.randn((10, 5, 2), dtype=dtype)[..., 0])
        bias = Parameter(torch.randn((10, 2), dtype=dtype)[..., 0])
    return weight, bias, torch.randn(5, dtype=dtype)


def _loss(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return (weight.mv(x) + bias).pow(2).sum()


def _assert_direction(kwargs: dict, final: float, initial: float) -> None:
    if kwargs.get("maximize", False):
        assert final > initial
    else:
        assert final < initial


# ------------------------------------------------------------------------ configuration


def test_optim_infos_do_not_specify_global_cliquey_kwargs() -> None:
    for optim_input in _inputs():
        assert not {"foreach", "fused", "differentiable"} & optim_input.kwargs.keys()


@pytest.mark.parametrize(
    "error_input",
    optim_error_inputs_func_l2o(DEVICE, torch.float32),
    ids=lambda e: e.optimizer_error_input.desc,
)
def test_errors(error_input: ErrorOptimizerInput) -> None:
    optim_input = error_input.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.ones(2))]
    check = (
        pytest.warns(error_input.error_type, match=error_input.error_regex)
        if issubclass(error_input.error_type, Warning)
        else pytest.raises(error_input.error_type, match=error_input.error_regex)
    )
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with check:
            L2O_INFO.optim_cls(params, **optim_input.kwargs)
    else:
        optim = L2O_INFO.optim_cls(params, **optim_input.kwargs)
        with check:
            optim.step()


# ------------------------------------------------------------------------ the algorithm


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [True, False])
def test_forloop_goes_right_direction(contiguous: bool, with_lrsched: bool) -> None:
    torch.manual_seed(0)
    scheduler_sets = L2O_INFO.scheduler_inputs if with_lrsched else [[]]
    for schedulers_c in scheduler_sets:
        for optim_input in _inputs():
            weight, bias, x = _linear_problem(contiguous=contiguous)
            optimizer = L2O_INFO.optim_cls([weight, bias], **optim_input.kwargs)
            schedulers = [s(optimizer) for s in schedulers_c]

            def closure(optimizer=optimizer, weight=weight, bias=bias, x=x) -> Tensor:
                optimizer.zero_grad()
                loss = _loss(weight, bias, x)
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                loss = closure()
                optimizer.step()
                for scheduler in schedulers:
                    if isinstance(scheduler, ReduceLROnPlateau):
                        scheduler.step(loss.item())
                    else:
                        scheduler.step()
            _assert_direction(optim_input.kwargs, closure().item(), initial)


def test_param_group_with_lrscheduler_goes_right_direction() -> None:
    torch.manual_seed(0)
    for schedulers_c in L2O_INFO.scheduler_inputs:
        weight, bias, x = _linear_problem()
        optimizer = L2O_INFO.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        schedulers = [s(optimizer) for s in schedulers_c]

        def closure(optimizer=optimizer, weight=weight, bias=bias, x=x) -> Tensor:
            optimizer.zero_grad()
            loss = _loss(weight, bias, x)
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = optimizer.step(closure)
            for scheduler in schedulers:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(loss.item())
                else:
                    scheduler.step()
        assert closure().item() < initial


@pytest.mark.parametrize("optim_input", _inputs(), ids=_ids(_inputs()))
def test_tensor_lr(optim_input: OptimizerInput) -> None:
    torch.manual_seed(0)
    weight, bias, x = _linear_problem()
    weight_c = weight.detach().clone().requires_grad_(True)
    bias_c = bias.detach().clone().requires_grad_(True)
    kwargs = dict(optim_input.kwargs)
    kwargs["lr"] = 1e-3
    optimizer_r = L2O_INFO.optim_cls([weight, bias], **kwargs)
    kwargs["lr"] = torch.tensor(1e-3)
    optimizer = L2O_INFO.optim_cls([weight_c, bias_c], **kwargs)
    for _ in range(5):
        for opt, w, b in ((optimizer_r, weight, bias), (optimizer, weight_c, bias_c)):
            opt.zero_grad()
            _loss(w, b, x).backward()
            opt.step()
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)


@pytest.mark.parametrize("optim_input", _inputs(), ids=_ids(_inputs()))
def test_complex(optim_input: OptimizerInput) -> None:
    """A complex parameter steps as its ``view_as_real`` (a real one mixed in)."""
    torch.manual_seed(0)
    complex_params = [
        torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
    ]
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
        for p in complex_params
    ]
    complex_opt = L2O_INFO.optim_cls(complex_params, **optim_input.kwargs)
    real_opt = L2O_INFO.optim_cls(real_params, **optim_input.kwargs)
    for _ in range(3):
        for cp, rp in zip(complex_params, real_params, strict=True):
            rp.grad = torch.randn_like(rp)
            cp.grad = torch.view_as_complex(rp.grad) if cp.is_complex() else rp.grad.clone()
        real_opt.step()
        complex_opt.step()
        as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
        for a, b in zip(as_real, real_params, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("optim_input", _inputs(), ids=_ids(_inputs()))
def test_complex_2d(optim_input: OptimizerInput) -> None:
    """A complex pair steps like its real and imaginary parts given as two parameters."""

    def rosenbrock(t: Tensor) -> Tensor:
        x, y = t
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    torch.manual_seed(0)
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    optim1 = L2O_INFO.optim_cls([a1], **optim_input.kwargs)
    optim2 = L2O_INFO.optim_cls([a1_real, a1_imag], **optim_input.kwargs)
    for _ in range(3):
        optim1.zero_grad()
        optim2.zero_grad()
        rosenbrock(a1).abs().backward()
        rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
        torch.testing.assert_close(a1.grad.real, a1_real.grad)
        torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
        optim1.step()
        optim2.step()
        torch.testing.assert_close(a1.real, a1_real)
        torch.testing.assert_close(a1.imag, a1_imag)


def test_backends_match_reference() -> None:
    """Stands in for test_foreach_matches_forloop / test_fused_matches_forloop: the fast
    (compiled CPU) step against the reference step (the rule module), params and state, over
    7 iterations that freeze and unfreeze a layer and skip a backward (grads left as they
    were), float64 parameters as there, plus a zero-size parameter."""
    models, optimizers = [], []
    for backend in ("reference", "cpu"):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).double()
        empty = torch.empty((), dtype=torch.float64, requires_grad=True)
        empty.grad = torch.rand_like(empty)
        models.append(model)
        optimizers.append(L2O([*model.parameters(), empty], backend=backend))
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64).reshape(3, 2)
    for i in range(7):
        for model, optimizer in zip(models, optimizers, strict=True):
            optimizer.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(x).sum().backward()
            optimizer.step()
        for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
            for k, v in optimizers[0].state[pa].items():
                torch.testing.assert_close(v, optimizers[1].state[pb][k], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- param groups


@pytest.mark.parametrize("optim_input", _inputs(), ids=_ids(_inputs()))
def test_param_groups_weight_decay(optim_input: OptimizerInput) -> None:
    torch.manual_seed(0)
    weight, bias, x = _linear_problem()
    bias_kwargs = {**optim_input.kwargs, "weight_decay": 0.0}
    ctor = {k: v for k, v in optim_input.kwargs.items() if k in ("backend", "state_dtype")}
    groups = [
        {"params": [weight], **{k: v for k, v in optim_input.kwargs.items() if k not in ctor}},
        {"params": [bias], **{k: v for k, v in bias_kwargs.items() if k not in ctor}},
    ]
    optimizer = L2O_INFO.optim_cls(groups, **ctor)
    initial = _loss(weight, bias, x).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = _loss(weight, bias, x)
        loss.backward()
        optimizer.step()
    _assert_direction(optim_input.kwargs, loss.item(), initial)


@pytest.mark.parametrize("optim_input", _inputs(), ids=_ids(_inputs()))
def test_param_groups_lr(optim_input: OptimizerInput) -> None:
    torch.manual_seed(0)
    kwargs = dict(optim_input.kwargs)
    ctor = {k: kwargs.pop(k) for k in ("backend", "state_dtype") if k in kwargs}
    if "lr" not in kwargs or kwargs["lr"] == 0:  # the group's own lr, > 0
        kwargs["lr"] = 1e-3
    weight, bias, x = _linear_problem()
    irrelevant = Parameter(torch.randn(2))
    irrelevant_clone = irrelevant.detach().clone()
    optimizer = L2O_INFO.optim_cls(
        [{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}], lr=1e-28, **ctor
    )
    initial = _loss(weight, bias, x).item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = _loss(weight, bias, x)
        loss.backward()
        irrelevant.grad = torch.rand_like(irrelevant)
        optimizer.step()
    _assert_direction(optim_input.kwargs, loss.item(), initial)
    torch.testing.assert_close(irrelevant, irrelevant_clone)


# ------------------------------------------------------------------------------ no-ops


def test_step_is_noop_when_params_have_no_grad() -> None:
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    for optim_input in _inputs():
        optimizer = L2O_INFO.optim_cls(params, **optim_input.kwargs)
        optimizer.step(lambda: torch.tensor([1.0]))
    for p, o in zip(params, old, strict=True):
        assert torch.equal(p, o)


def test_step_is_noop_for_zero_grads() -> None:
    """Fails on an L2O without the zero-gradient contract (docs/api.md)."""
    param = torch.randn((5, 1), requires_grad=True)
    old = param.detach().clone()
    for optim_input in _inputs(skip_wd=True):  # weight decay shrinks even for zero grads
        optimizer = L2O_INFO.optim_cls([param], **optim_input.kwargs)
        param.grad = torch.zeros_like(param)
        optimizer.step(lambda: torch.tensor([1.0]))
        assert torch.equal(param, old), optim_input.desc


def test_optimizer_can_be_printed() -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in _inputs():
        text = repr(L2O_INFO.optim_cls(params, **optim_input.kwargs))
        assert text.startswith("L2O (") and "weight_decay" in text


def test_non_empty_state() -> None:
    model = torch.nn.Linear(5, 5)
    x = torch.rand(2, 5)
    for optim_input in _inputs():
        optim = L2O_INFO.optim_cls(model.parameters(), **optim_input.kwargs)
        optim.zero_grad()
        model(x).sum().backward()
        optim.step()
        assert all(len(state) > 0 for state in optim.state.values())


# ------------------------------------------------------------------------- state dicts


def _named(params: list[Parameter], named: bool) -> list:
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(state_dict: dict) -> dict:
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
def test_state_dict_deterministic(is_named_optim0: bool, is_named_optim1: bool) -> None:
    torch.manual_seed(0)
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)

    def fwd_bwd(optim: Optimizer, w: Tensor, b: Tensor) -> Tensor:
        optim.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    for optim_input in _inputs():
        optimizer = L2O_INFO.optim_cls(
            _named([weight, bias], is_named_optim0), **optim_input.kwargs
        )
        for _ in range(10):
            fwd_bwd(optimizer, weight, bias)
            optimizer.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = L2O_INFO.optim_cls(
            _named([weight_c, bias_c], is_named_optim1), **optim_input.kwargs
        )
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            fwd_bwd(optimizer, weight, bias)
            fwd_bwd(optimizer_c, weight_c, bias_c)
            optimizer.step()
            optimizer_c.step()
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)
        assert_equal(
            _without_param_names(optimizer.state_dict()),
            _without_param_names(optimizer_c.state_dict()),
        )
        # repeated parameters have identical representations
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        assert_equal(
            _without_param_names(optimizer.state_dict())["param_groups"][-1],
            _without_param_names(optimizer_c.state_dict())["param_groups"][-1],
        )


def _conv_bn() -> tuple[torch.nn.Module, Tensor]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    )
    return model, torch.rand(1, 4, 16, 16)


def _fwd_bwd(optim: Optimizer, model: torch.nn.Module, x: Tensor) -> Tensor:
    optim.zero_grad()
    loss = model(x).sum()
    loss.backward()
    return loss


def test_can_load_older_state_dict() -> None:
    """A state dict from before an option existed (here: every option added after the first
    release) loads, gets the defaults, and steps."""
    for optim_input in _inputs():
        model, x = _conv_bn()
        optimizer = L2O_INFO.optim_cls(model.parameters(), **optim_input.kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, model, x)
            optimizer.step()
        old = copy.deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in L2O_INFO.not_og_supported_flags:
                group.pop(flag, None)
        optimizer.load_state_dict(old)
        _fwd_bwd(optimizer, model, x)
        optimizer.step()


@pytest.mark.parametrize("is_named_optim0", [True, False])
@pytest.mark.parametrize("is_named_optim1", [True, False])
def test_can_load_from_to_named_state_dict(is_named_optim0: bool, is_named_optim1: bool) -> None:
    for optim_input in _inputs():
        model, x = _conv_bn()
        first = model.named_parameters() if is_named_optim0 else model.parameters()
        optimizer = L2O_INFO.optim_cls(first, **optim_input.kwargs)
        for _ in range(3):
            _fwd_bwd(optimizer, model, x)
            optimizer.step()
        old = copy.deepcopy(optimizer.state_dict())
        second = model.named_parameters() if is_named_optim1 else model.parameters()
        optimizer2 = L2O_INFO.optim_cls(second, **optim_input.kwargs)
        optimizer2.load_state_dict(old)
        _fwd_bwd(optimizer2, model, x)
        optimizer2.step()
        if is_named_optim0 or is_named_optim1:
            names = optimizer2.state_dict()["param_groups"][0]["param_names"]
            assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("is_named_optim", [True, False])
def test_save_load_equality_with_weights_only(is_named_optim: bool) -> None:
    torch.manual_seed(0)
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    x = torch.randn(3)
    for optim_input in _inputs():
        optimizer = L2O_INFO.optim_cls(_named([weight, bias], is_named_optim), **optim_input.kwargs)

        def closure(optimizer: Optimizer = optimizer) -> Tensor:
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            optimizer.step(closure)
        sd = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        buffer.seek(0)
        assert_equal(torch.load(buffer, weights_only=False), sd)
        buffer.seek(0)
        assert_equal(torch.load(buffer, weights_only=True), sd)


def test_load_nontensor_step() -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for optim_input in _inputs():
        optimizer = L2O_INFO.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        for p_state in state_dict["state"].values():
            p_state["step"] = p_state["step"].item()
        optimizer.load_state_dict(state_dict)
        optimizer.step()


def test_deepcopy_copies_all_public_attrs() -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)

    def public(obj: object) -> set[str]:
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in _inputs():
        optimizer = L2O_INFO.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            optimizer.step()
        assert public(optimizer) == public(copy.deepcopy(optimizer))


# ------------------------------------------------------------------------------- hooks


def _state_dict_pre_hook(optimizer: Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict:
    mine = copy.deepcopy(state_dict)
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_state_dict_post_hook(optimizer: Optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _fresh(optim_input: OptimizerInput) -> Optimizer:
    return L2O_INFO.optim_cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)


def test_state_dict_pre_hook() -> None:
    for optim_input in _inputs():
        optim = _fresh(optim_input)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert optim.state_dict()["state"]["test"] == 1


def test_state_dict_post_hook() -> None:
    for optim_input in _inputs():
        optim = _fresh(optim_input)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        assert optim.state_dict()["ran_state_dict_pre_hook"] is False


def test_state_dict_pre_post_hook() -> None:
    for optim_input in _inputs():
        optim = _fresh(optim_input)
        optim.register_state_dict_pre_hook(_state_dict_pre_hook)
        optim.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = optim.state_dict()
        assert "test" not in state_dict["state"]
        assert state_dict["ran_state_dict_pre_hook"] is True


def test_load_state_dict_pre_hook_and_prepend() -> None:
    for optim_input in _inputs():
        optim = _fresh(optim_input)
        state_dict = optim.state_dict()
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        optim.load_state_dict(state_dict)
        assert optim.param_groups[0]["lr"] == 0.002  # the prepended hook ran first


def test_load_state_dict_post_hook() -> None:
    for optim_input in _inputs():
        optim = _fresh(optim_input)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert not optim.state["ran_load_state_dict_pre_hook2"]
        assert optim.state["ran_load_state_dict_post_hook"]


def test_load_state_dict_pre_post_hook() -> None:
    for optim_input in _inputs():
        optim = _fresh(optim_input)
        optim.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        optim.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        optim.load_state_dict(optim.state_dict())
        assert optim.state["ran_load_state_dict_pre_hook2"]
        assert optim.state["ran_load_state_dict_post_hook"]


def _hooks_added_by_hooks(optim: Optimizer) -> list[str]:
    """What runs when a state-dict pre-hook adds a post-hook, and a load pre-hook adds a load
    post-hook, then the state dict is saved twice and loaded twice."""
    calls: list[str] = []

    def add_post(opt: Optimizer) -> None:
        calls.append("pre")
        if "post" not in calls:
            opt.register_state_dict_post_hook(lambda opt, sd: calls.append("post"))

    def add_load_post(opt: Optimizer, sd: dict[str, Any]) -> None:
        calls.append("load pre")
        if "load post" not in calls:
            opt.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))

    optim.register_state_dict_pre_hook(add_post)
    optim.register_load_state_dict_pre_hook(add_load_post)
    state_dict = optim.state_dict()
    optim.state_dict()
    optim.load_state_dict(state_dict)
    optim.load_state_dict(state_dict)
    return calls


def test_hooks_registered_by_hooks_stay_registered() -> None:
    """A hook that a hook registers is kept and runs, as with torch's own optimizers (L2O once
    swapped torch's hook dicts out while torch's method ran, and lost such hooks)."""
    expected = _hooks_added_by_hooks(torch.optim.Adam([torch.rand(2, 3, requires_grad=True)]))
    assert expected.count("post") == 2 and expected.count("load post") == 2
    for optim_input in _inputs():
        assert _hooks_added_by_hooks(_fresh(optim_input)) == expected, optim_input.desc


def _check_step_hook(register: str) -> None:
    """A hook added with ``optimizer.<register>`` runs once per step until it is removed."""
    calls = 0

    def hook(opt: Optimizer, args: tuple, kwargs: dict) -> None:
        nonlocal calls
        calls += 1

    params = [torch.tensor([1.0, 1.0])]
    for optim_input in _inputs():
        optim = L2O_INFO.optim_cls(params, **optim_input.kwargs)
        calls = 0
        handle = getattr(optim, register)(hook)
        optim.step()
        optim.step()
        assert calls == 2
        handle.remove()
        optim.step()
        assert calls == 2


def test_step_post_hook() -> None:
    _check_step_hook("register_step_post_hook")


def test_step_pre_hook() -> None:
    _check_step_hook("register_step_pre_hook")


def test_step_all_hooks() -> None:
    data: list[int] = []

    def hook(value: int):
        return lambda opt, args, kwargs: data.append(value)

    params = [torch.tensor([1.0, 1.0])]
    for optim_input in _inputs():
        optim = L2O_INFO.optim_cls(params, **optim_input.kwargs)
        optim2 = SGD(params)
        data.clear()
        handles = [
            register_optimizer_step_pre_hook(hook(0)),
            register_optimizer_step_post_hook(hook(5)),
            optim.register_step_pre_hook(hook(1)),
            optim.register_step_post_hook(hook(2)),
            optim2.register_step_pre_hook(hook(1)),
            optim2.register_step_post_hook(hook(2)),
        ]
        try:
            optim.step()
            assert data == [0, 1, 2, 5]
            optim2.step()
            assert data == [0, 1, 2, 5] * 2
            optim.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for handle in handles:
                handle.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3


def test_warning_free_on_the_happy_path() -> None:
    """Not a torch check: none of the configurations above warns in normal use (a warning
    would be noise in every user's training log)."""
    model, x = _conv_bn()
    for optim_input in _inputs():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            optimizer = L2O_INFO.optim_cls(model.parameters(), **optim_input.kwargs)
            _fwd_bwd(optimizer, model, x)
            optimizer.step()
            optimizer.load_state_dict(optimizer.state_dict())
