"""NormProp (issue 17): the per-tensor RMS-normalized rule, its config bounds, its reductions
(exact under the reference kernel's chunking, differentiable), and the optimizer around it.

Rules have fixed random weights (``make_rule`` under a seed), never hand-set ones; where a test
needs a non-trivial learned gain it re-draws the gain head at random.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from numerics import BLAS_ROWS_BATCH_INVARIANT
from torch import Tensor, nn

from flatl2o import L2O, make_rule
from flatl2o.kernels import KernelUnavailable, ReferenceKernel
from flatl2o.meta.objective import MetaObjective
from flatl2o.meta.recipe import recipe_from_dict
from flatl2o.meta.tasks import make_task
from flatl2o.rules import ConfigError, NormProp, RuleConfig, UpdateRule, build_rule


@pytest.fixture(autouse=True)
def default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backend="auto"`` as a user gets it (the C kernel on CPU), whatever the environment."""
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)


def _rule(
    seed: int = 0, random_gain: bool = True, random_readout: bool = True, **options: object
) -> NormProp:
    """A NormProp with random weights. Its gain head starts at zero (gain 1) and its readout
    near zero (the direction about tanh of Adam's step); ``random_gain`` / ``random_readout``
    draw them at random, so that the gain is not 1 and the direction depends on the LSTM."""
    torch.manual_seed(seed)
    rule = make_rule("normprop", **options)
    assert isinstance(rule, NormProp)
    with torch.no_grad():
        if random_gain:
            rule.gain.weight.normal_(0.0, 1.0)
            rule.gain.bias.normal_(0.0, 0.5)
        if random_readout:
            rule.readout.weight.normal_(0.0, 1.0)
            rule.readout.bias.normal_(0.0, 0.5)
    return rule


def _grads(n: int, seed: int = 1, zeros: int = 0) -> Tensor:
    """Gradients of both signs over several magnitudes; the first ``zeros`` are exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * 10.0 ** torch.empty(n).uniform_(-3, 1, generator=gen)
    g[:zeros] = 0.0
    return g


def _rms(x: Tensor) -> Tensor:
    return x.double().pow(2).mean().sqrt()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 25), nn.Tanh(), nn.Linear(25, 3))  # 1000, 25, 75, 3


def _loss(model: nn.Module, i: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 40, generator=gen), torch.randn(16, 3, generator=gen)
    return (model(x) - y).pow(2).mean()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, sign: float = 1.0) -> None:
    for i in steps:
        opt.zero_grad()
        (sign * _loss(model, i)).backward()
        opt.step()


def _assert_equal_or_close(a: Tensor, b: Tensor) -> None:
    """Bit for bit where the BLAS rounds a row the same whatever the batch (tests/numerics.py),
    else to float rounding."""
    if BLAS_ROWS_BATCH_INVARIANT:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- config
def test_state_is_eleven_floats_per_coordinate() -> None:
    rule = _rule()
    assert rule.state_floats_per_coordinate() == 11
    assert list(rule.state_shapes()) == ["m_fast", "m_slow", "v", "h0", "c0"]
    assert rule.config.output_scale == 1.0  # weight decay is AdamW's: p *= 1 - lr * wd


@pytest.mark.parametrize(("hidden", "layers", "floats"), [(8, 1, 19), (4, 2, 19), (7, 1, 17)])
def test_config_over_sixteen_state_floats_is_refused(hidden: int, layers: int, floats: int) -> None:
    with pytest.raises(ConfigError, match=rf"give {floats} floats of state per coordinate.*<= 6"):
        make_rule("normprop", hidden_size=hidden, num_layers=layers)


def test_config_at_the_bound_and_round_trip() -> None:
    rule = _rule(hidden_size=3, num_layers=2, log_gain_bound=0.5)  # 3 + 12 = 15 floats
    assert rule.state_floats_per_coordinate() == 15
    config = RuleConfig.from_dict(json.loads(json.dumps(rule.config.to_dict())))
    assert config == rule.config
    assert build_rule(config).state_floats_per_coordinate() == 15


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"log_gain_bound": -1.0}, "log_gain_bound must be in"),
        ({"beta_slow": 1.0}, r"beta_slow must be in \[0, 1\)"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"output_scale": 0.0}, "output_scale must be > 0"),
        ({"input_size": 0}, "input_size must be >= 1"),
        ({"adam_skip": -1.0}, r"adam_skip must be in \[0, 10\]"),
    ],
)
def test_config_errors(options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_rule("normprop", **options)


# ----------------------------------------------------------------------- the rule
def test_step_rms_is_adams_times_the_gain_on_a_real_module() -> None:
    """Same gradients into torch.optim.Adam and L2O(normprop) at lr 1e-3: each tensor's step
    has Adam's step RMS times the gain the rule computes from its hidden state."""
    rule = _rule()
    model = _model()
    twin = copy.deepcopy(model)
    opt = L2O(model.parameters(), rule, backend="reference")
    adam = torch.optim.Adam(twin.parameters(), lr=1e-3)
    assert opt.param_groups[0]["lr"] == 1e-3  # the rule's default_lr
    b = rule.config.log_gain_bound
    for i in range(4):
        opt.zero_grad()
        _loss(model, i).backward()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                q.copy_(p)
                q.grad = p.grad.clone()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        adam.step()
        for p, q, p0 in zip(model.parameters(), twin.parameters(), before, strict=True):
            h = opt.state[p]["h0"]
            gain = math.exp(b * math.tanh(float(rule.gain(h).mean().detach())))
            assert gain != pytest.approx(1.0, abs=1e-3)
            expected = _rms(q.detach() - p0) * gain
            torch.testing.assert_close(_rms(p.detach() - p0), expected, rtol=2e-5, atol=0)


def test_a_fresh_rule_starts_out_as_adam() -> None:
    """The gain head starts at zero and the readout near it: an untrained rule's update is
    about Adam's step put through tanh, rescaled to the RMS of Adam's step."""
    rule = _rule(random_gain=False, random_readout=False)
    n = 300
    state = rule.init_state(n)
    m, v = torch.zeros(n), torch.zeros(n)
    with torch.no_grad():
        for t in range(1, 4):
            g = _grads(n, seed=t)
            u, state = rule(g, state, t)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            adam = (m / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-8)
            d = torch.tanh(adam)
            expected = d * _rms(adam).float() / _rms(d).float()
            torch.testing.assert_close(u, expected, rtol=0.05, atol=0.01)
            torch.testing.assert_close(_rms(u), _rms(adam), rtol=1e-5, atol=0)  # gain 1
    # with adam_skip=0 the direction is the LSTM's alone (readout drawn at random as usual)
    torch.manual_seed(0)
    plain = make_rule("normprop", adam_skip=0.0)
    assert plain.readout.weight.abs().sum() > 0


def test_update_is_invariant_to_rescaling_a_tensors_gradient() -> None:
    """Like Adam, multiplying a tensor's gradients by a constant leaves its update alone."""
    rule = _rule()
    n = 200
    state_a, state_b = rule.init_state(n), rule.init_state(n)
    with torch.no_grad():
        for t in range(1, 6):
            g = _grads(n, seed=t)
            g = g.sign() * (g.abs() + 0.01)  # eps (1e-8) negligible next to every |g|
            ua, state_a = rule(g, state_a, t)
            ub, state_b = rule(g * 1024.0, state_b, t)
            torch.testing.assert_close(ub, ua, rtol=1e-4, atol=1e-6)  # eps: 1e-8
            assert not torch.equal(ua, torch.zeros_like(ua))


def test_segments_equal_separate_calls_and_keep_tensors_apart() -> None:
    rule = _rule()
    sizes = [128, 192]  # whole 64-row tiles: the same BLAS calls either way
    g = _grads(sum(sizes))
    state = rule.init_state(sum(sizes))
    with torch.no_grad():
        u, new = rule(g, state, 1, sizes)
        parts = [
            rule(gs, {k: v[a : a + s] for k, v in state.items()}, 1)
            for gs, a, s in zip(g.split(sizes), (0, 128), sizes, strict=True)
        ]
        _assert_equal_or_close(u, torch.cat([p[0] for p in parts]))
        for key in new:
            _assert_equal_or_close(new[key], torch.cat([p[1][key] for p in parts]))
        # changing the second tensor's gradient does not touch the first tensor's update
        g2 = torch.cat((g[:128], -g[128:].abs()))
        u2, _ = rule(g2, state, 1, sizes)
        assert torch.equal(u2[:128], u[:128])
        # as one tensor, it does (the two share one RMS of d)
        one, _ = rule(g, state, 1)
        one2, _ = rule(g2, state, 1)
        assert not torch.allclose(one2[:128], one[:128])
        u_none, _ = rule(g, state, 1, None)
        assert torch.equal(u_none, one)


def test_bad_segments_are_refused() -> None:
    rule = _rule()
    with pytest.raises(ValueError, match="sum to the gradient's 10 coordinates"):
        rule(torch.ones(10), rule.init_state(10), 1, [4, 5])


@pytest.mark.parametrize("chunk_size", [7, 64, 100, 1000])
def test_reference_kernel_chunking_is_exact(chunk_size: int) -> None:
    """The kernel's two passes over chunks give forward()'s update and state, exact zeros
    (kept and not counted) included, over several steps of carried state."""
    rule = _rule()
    n = 320  # whole 64-row tiles, so that forward() makes the same BLAS calls
    kernel = ReferenceKernel(rule)
    state_k, state_f = rule.init_state(n), rule.init_state(n)
    with torch.no_grad():
        for t in range(1, 4):
            g = _grads(n, seed=t, zeros=70 if t == 1 else 0)
            param = torch.zeros(n)  # so that -param is the update, exactly
            kernel.update(param, g, state_k, t, 1.0, False, chunk_size)
            u, state_f = rule(g, state_f, t)
            _assert_equal_or_close(-param, u)
            for key in state_f:
                _assert_equal_or_close(state_k[key], state_f[key])
            if t == 1:  # the zeros were left alone: not moved, state still all +0.0
                assert torch.all(param[:70] == 0) and torch.all(param[70:] != 0)
                assert all(torch.all(v[:70] == 0) for v in state_k.values())


@pytest.mark.parametrize("chunk_size", [7, 64, 100])
def test_optimizer_chunk_size_does_not_change_results(chunk_size: int) -> None:
    rule = _rule()
    ref, model = _model(), _model()
    ref_opt = L2O(ref.parameters(), rule, chunk_size=10**6, backend="reference")
    opt = L2O(model.parameters(), rule, chunk_size=chunk_size, backend="reference")
    _train(ref, ref_opt, range(3))
    _train(model, opt, range(3))
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        _assert_equal_or_close(b.detach(), a.detach())


def test_gradcheck_through_the_per_tensor_reductions() -> None:
    """The meta-gradient flows through the per-tensor sums, to the inputs and the weights."""
    rule = _rule().double()
    sizes = [5, 7]
    names = ["gain.weight", "readout.weight", "input.weight"]
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    g = _grads(12, seed=4).double().requires_grad_(True)
    state = {
        k: torch.randn_like(v) * 0.1 for k, v in rule.init_state(12, dtype=torch.float64).items()
    }
    state["v"] = state["v"].abs() + 0.01

    def f(g: Tensor, *picked: Tensor) -> Tensor:
        params = {**weights, **dict(zip(names, picked, strict=True))}
        u, new = torch.func.functional_call(rule, params, (g, state, 3, sizes))
        return torch.cat((u, new["h0"].reshape(-1)))

    assert torch.autograd.gradcheck(f, (g, *(weights[k] for k in names)))
    # coupling inside a tensor, none across tensors
    u, _ = rule(g, state, 3, sizes)
    (row,) = torch.autograd.grad(u[0], g)
    assert row[1:5].abs().min() > 0 and torch.all(row[5:] == 0)


# ----------------------------------------------------------------------- the optimizer
def test_state_dict_resume_is_bit_for_bit() -> None:
    rule = _rule()
    model = _model()
    opt = L2O(model.parameters(), rule, weight_decay=0.1)
    _train(model, opt, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, range(3, 6))
    resumed = _model(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = L2O(resumed.parameters(), _rule(), weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, range(3, 6))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(opt2.state[b][key], value), key


def test_maximize_equals_minimizing_the_negated_loss() -> None:
    rule = _rule()
    a, b = _model(), _model()
    _train(a, L2O(a.parameters(), rule, maximize=True), range(3), sign=-1.0)
    _train(b, L2O(b.parameters(), rule), range(3))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_weight_decay_is_adamws() -> None:
    """``weight_decay`` shrinks by ``1 - lr * wd`` (output_scale is 1), before the step."""
    rule = _rule()
    a, b = _model(), _model()
    opt_a = L2O(a.parameters(), rule, weight_decay=0.5)
    opt_b = L2O(b.parameters(), rule)
    for step in range(3):
        _train(a, opt_a, range(step, step + 1))
        opt_b.zero_grad()
        _loss(b, step).backward()
        with torch.no_grad():  # AdamW's decay, after the gradient, before the step
            for p in b.parameters():
                p.mul_(1.0 - 1e-3 * 0.5)
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_zero_gradients_stay_untouched_and_do_not_dilute_the_rms() -> None:
    """Coordinates whose gradient has always been exactly 0 keep their value and all-zero
    state, and the tensor's step RMS over the others is Adam's RMS over the others."""
    rule = _rule(random_gain=False)  # gain 1: the step RMS is Adam's
    model = _model()
    mask = torch.ones(25, 40)
    mask[:, :30] = 0.0  # 750 of the 1000 weights never get a gradient
    model[0].weight.register_hook(lambda g: g * mask)
    twin = copy.deepcopy(model)
    opt, adam = L2O(model.parameters(), rule), torch.optim.Adam(twin.parameters(), lr=1e-3)
    w0 = model[0].weight.detach().clone()
    _train(model, opt, range(1))
    _train(twin, adam, range(1))
    step, adam_step = model[0].weight.detach() - w0, twin[0].weight.detach() - w0
    assert torch.equal(step[:, :30], torch.zeros(25, 30))
    for key, value in opt.state[model[0].weight].items():
        if key != "step":
            assert torch.all(value.reshape(1000, -1)[mask.reshape(-1) == 0] == 0), key
    torch.testing.assert_close(_rms(step[:, 30:]), _rms(adam_step[:, 30:]), rtol=1e-5, atol=0)


def test_bf16_state() -> None:
    rule = _rule()
    a, b = _model(), _model()
    opt_a = L2O(a.parameters(), rule, state_dtype=torch.bfloat16)
    opt_b = L2O(b.parameters(), rule)
    _train(a, opt_a, range(3))
    _train(b, opt_b, range(3))
    assert opt_a.state[a[0].weight]["v"].dtype == torch.bfloat16
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=3e-4)  # 3 steps of about 1e-3


def test_default_lr_comes_from_the_rule() -> None:
    p = nn.Parameter(torch.ones(3))
    assert L2O([p], _rule()).param_groups[0]["lr"] == 1e-3
    torch.manual_seed(0)
    assert L2O([p], make_rule("rnnprop")).param_groups[0]["lr"] == 1.0
    assert L2O([p], _rule(), lr=0.02).param_groups[0]["lr"] == 0.02


def test_the_c_kernel_runs_normprop_silently() -> None:
    """``backend="auto"`` and ``"cpu"`` step NormProp with the C kernel, with no warning,
    as the reference step does to float32 rounding."""
    from flatl2o.kernels.cpu import CPUKernel

    rule = _rule()
    ref, model = _model(), _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = L2O(model.parameters(), rule)
        _train(model, opt, range(3))
    assert all(isinstance(k, CPUKernel) for _, k in opt._kernels.values())
    _train(ref, L2O(ref.parameters(), rule, backend="reference"), range(3))
    for a, b in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_kernel_without_normprop_warns_once_and_an_explicit_one_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where a fused kernel does not implement a built-in rule (as the C kernel did not
    implement NormProp at first): auto runs the reference step
    and says so once; the explicit backend refuses before anything moves."""
    from flatl2o import kernels
    from flatl2o.kernels import program

    monkeypatch.setattr(kernels, "_warned", set())
    others = tuple(r for r in program.IMPLEMENTED["cpu"] if r is not NormProp)
    monkeypatch.setitem(program.IMPLEMENTED, "cpu", others)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KernelUnavailable, match="the C kernel does not implement normprop yet"):
        _train(model, L2O(model.parameters(), _rule(), backend="cpu"), range(1))
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, L2O(model.parameters(), _rule()), range(2))
        _train(model, L2O(model.parameters(), _rule()), range(1))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "does not implement normprop yet" in messages[0]


def test_sharded_parameters_are_refused() -> None:
    """A DTensor parameter's rows are spread over ranks: its RMS is not local."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = nn.Parameter(distribute_tensor(torch.ones(8, 4), mesh))
        with pytest.raises(ValueError, match="does not support sharded parameters yet"):
            L2O([p], _rule())
    finally:
        dist.destroy_process_group()


def test_save_load_round_trip(tmp_path) -> None:
    rule = _rule()
    rule.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "normprop"
    assert {"beta_fast", "beta_slow", "beta2", "log_gain_bound", "hidden_size"} <= set(config)
    loaded = UpdateRule.from_pretrained(str(tmp_path))
    assert isinstance(loaded, NormProp) and loaded.fingerprint() == rule.fingerprint()
    g = _grads(100)
    with torch.no_grad():
        assert torch.equal(
            loaded(g, loaded.init_state(100), 1)[0], rule(g, rule.init_state(100), 1)[0]
        )


# ----------------------------------------------------------------------- meta-training
def test_the_meta_training_unroll_matches_the_optimizer() -> None:
    """The meta-training path (MetaObjective's unroll: the task's tensors as segments, the
    rule's default lr) takes the steps L2O takes on the module, on the same minibatches."""
    task = make_task("digits-mlp", batch_size=16)
    rule = _rule()
    theta0 = task.init_params(torch.Generator().manual_seed(3))
    batches = [task.sample_batch(torch.Generator().manual_seed(s)) for s in range(5)]
    it = iter(batches)

    def sample(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return next(it)

    task_fn = copy.copy(task)
    task_fn.sample_batch = sample  # type: ignore[method-assign]
    recipe = recipe_from_dict({"train": {"unroll": 4}})
    objective = MetaObjective(
        rule,
        task_fn,
        recipe,
        regularizer=None,
        generators=[torch.Generator()],
        reg_generators=None,
    )
    _, _, theta, _ = objective.unroll_objective(theta0, rule.init_state(theta0.numel()), 0, False)
    task.load_params(theta0)
    opt = L2O(task.module.parameters(), rule, backend="reference")
    for x, y in batches[:4]:
        opt.zero_grad()
        nn.functional.cross_entropy(task.module(x), y).backward()
        opt.step()
    flat = task.flatten(dict(task.module.named_parameters()))
    torch.testing.assert_close(theta.detach(), flat.detach(), rtol=1e-5, atol=1e-7)


def test_meta_unroll_steps_each_slots_tensors_at_adams_rms() -> None:
    """One unroll step of two slots: each tensor of each slot moves by lr * (Adam's step RMS
    at step 1) exactly when the gain is 1, so segments and lr reach the rule."""
    task = make_task("digits-mlp", batch_size=16)
    recipe = recipe_from_dict({"train": {"unroll": 1}})
    rule = _rule(random_gain=False)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    copies = [torch.Generator().set_state(g.get_state()) for g in gens]
    objective = MetaObjective(
        rule, task, recipe, regularizer=None, generators=gens, reg_generators=None
    )
    theta0 = torch.cat([task.init_params(torch.Generator().manual_seed(s)) for s in (1, 2)])
    _, _, theta1, _ = objective.unroll_objective(theta0, rule.init_state(theta0.numel()), 0, False)
    sizes = task.segment_sizes * 2
    assert sum(sizes) == theta0.numel() and len(sizes) == 2 * len(task.param_shapes)
    grads = []
    for part, gen in zip(theta0.split(task.num_params), copies, strict=True):
        th = part.clone().requires_grad_(True)
        x, y = task.sample_batch(gen)
        grads.append(torch.autograd.grad(task.loss(th, x, y), th)[0])
    g = torch.cat(grads)
    adam = g / (g.abs() + 1e-8)
    for d, a, gs in zip(
        (theta0 - theta1.detach()).split(sizes), adam.split(sizes), g.split(sizes), strict=True
    ):
        counted = gs != 0
        torch.testing.assert_close(_rms(d[counted]), 1e-3 * _rms(a[counted]), rtol=1e-5, atol=0)


def test_imitation_compares_the_rules_step_at_its_own_lr_with_the_teachers() -> None:
    """An imitation unroll scores the step the rule takes in the other unrolls (its default
    lr times its update) against Adam's at ``imitation_lr``: with a teacher at ten times the
    rule's lr, a rule whose ``output_scale`` is 10 is not pulled back to Adam's step at its lr."""
    from flatl2o.meta.objective import adam_teacher_step

    task = make_task("digits-mlp", batch_size=16)
    recipe = recipe_from_dict({"train": {"unroll": 4, "imitation_lr": 1e-2}})
    rule = _rule(output_scale=10.0)
    gen = torch.Generator().manual_seed(7)
    copy_gen = torch.Generator().set_state(gen.get_state())
    objective = MetaObjective(
        rule, task, recipe, regularizer=None, generators=[gen], reg_generators=None
    )
    theta = task.init_params(torch.Generator().manual_seed(1))
    value, moved, _ = objective.imitation_objective(theta, rule.init_state(theta.numel()), 0)
    state = rule.init_state(theta.numel())
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    terms = []
    for t in range(4):
        th = theta.clone().requires_grad_(True)
        x, y = task.sample_batch(copy_gen)
        grad = torch.autograd.grad(task.loss(th, x, y), th)[0]
        teacher, m, v = adam_teacher_step(grad, m, v, t + 1, 1e-2)
        with torch.no_grad():
            delta, state = rule(grad, state, t + 1, task.segment_sizes)
        terms.append(torch.mean((1e-3 * delta - teacher) ** 2) / 1e-2**2)
        theta = theta - teacher
    torch.testing.assert_close(value.detach(), torch.stack(terms).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(moved, theta)


def test_a_meta_training_run_trains_every_weight_and_ships_a_loadable_rule(tmp_path) -> None:
    """A tiny normprop recipe through the meta-trainer (normal and imitation unrolls): every
    weight moves (the meta-gradient reaches the LSTM through the near-zero read-out and the
    zero gain head) and the folder loads into L2O with the rule's lr."""
    from flatl2o.meta.trainer import MetaTrainer

    recipe = recipe_from_dict(
        {
            "name": "tiny-normprop",
            "rule": {"architecture": "normprop"},
            "task": {"name": "digits-mlp", "batch_size": 32},
            "train": {"iterations": 2, "trajectory": 20, "unroll": 10, "imitation_prob": 0.5},
            "curriculum": {"validate_every": 2, "validation_runs": 1},
            "evaluation": {"seeds": 1, "horizons": [20]},
        }
    )
    torch.manual_seed(recipe.train.seed)
    start = make_rule("normprop")
    trainer = MetaTrainer(recipe, tmp_path / "run", progress=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(start.parameters(), trainer.rule.parameters(), strict=True)
    ), "the test must compare against the trainer's own initial rule"
    out = trainer.run()
    trained = UpdateRule.from_pretrained(str(out))
    for (name, a), b in zip(start.named_parameters(), trained.parameters(), strict=True):
        assert not torch.equal(a, b), name
    opt = L2O.from_pretrained(nn.Linear(3, 2).parameters(), str(out))
    assert opt.param_groups[0]["lr"] == 1e-3
