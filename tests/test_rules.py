"""Every learned update rule through the same checks: config round trips and errors, shapes,
the preprocessing formulas of docs/method.md §2, autograd through steps and state, chunking,
fingerprints.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from numerics import BLAS_ROWS_BATCH_INVARIANT

from flatl2o import make_rule
from flatl2o.rules import (
    FORMAT_VERSION,
    RULES,
    ConfigError,
    RuleConfig,
    UpdateRule,
    build_rule,
)

RULE_NAMES = ["l2o-dm", "rnnprop", "normprop"]
#: The rules whose coordinates are independent (normprop normalizes per tensor: its chunking
#: is checked through the reference kernel in tests/test_normprop.py).
COORDINATEWISE = ["l2o-dm", "rnnprop"]

#: Recurrent floats per coordinate stated in docs/method.md §2.
SPEC_STATE_FLOATS = {"l2o-dm": 80, "rnnprop": 82, "normprop": 11}


def _make(name: str, seed: int = 0, **options: object) -> UpdateRule:
    torch.manual_seed(seed)
    return make_rule(name, **options)


@pytest.fixture(params=RULE_NAMES)
def rule(request: pytest.FixtureRequest) -> UpdateRule:
    return _make(request.param)


@pytest.fixture(params=COORDINATEWISE)
def coordinatewise_rule(request: pytest.FixtureRequest) -> UpdateRule:
    return _make(request.param)


def _grads(n: int, seed: int = 1) -> torch.Tensor:
    """Gradients of both signs spanning many magnitudes (1e-8 .. 1e1), plus an exact zero."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** torch.empty(n).uniform_(-8, 1, generator=gen)
    g = torch.randn(n, generator=gen) * scale
    g[0] = 0.0
    return g


def _random_state(rule: UpdateRule, n: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """A non-trivial (mid-trajectory) state: random h, c and positive second moments."""
    gen = torch.Generator().manual_seed(seed)
    state = rule.init_state(n)
    for key, value in state.items():
        value.normal_(generator=gen)
        if key == "v":
            value.abs_().mul_(1e-3)
        elif key == "m":
            value.mul_(1e-2)
    return state


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- configs
def test_registry_names() -> None:
    assert set(RULE_NAMES) == set(RULES)


def test_config_round_trip_through_json(rule: UpdateRule) -> None:
    data = rule.config.to_dict()
    assert data["format_version"] == FORMAT_VERSION
    assert data["architecture"] == rule.architecture
    text = json.dumps(data)
    config = RuleConfig.from_dict(json.loads(text))
    assert type(config) is type(rule.config)
    assert config == rule.config
    assert json.dumps(config.to_dict()) == text
    rebuilt = build_rule(config)
    assert type(rebuilt) is type(rule)
    rebuilt.load_state_dict(rule.state_dict())
    assert rebuilt.fingerprint() == rule.fingerprint()


@pytest.mark.parametrize("name", COORDINATEWISE)  # normprop's bounds: tests/test_normprop.py
def test_config_round_trip_with_options(name: str) -> None:
    rule = _make(name, hidden_size=8, num_layers=3, output_scale=0.05)
    config = RuleConfig.from_dict(json.loads(json.dumps(rule.config.to_dict())))
    assert (config.hidden_size, config.num_layers, config.output_scale) == (8, 3, 0.05)
    assert rule.state_floats_per_coordinate() == build_rule(config).state_floats_per_coordinate()


@pytest.mark.parametrize("name", RULE_NAMES)
def test_config_int_for_float_field_is_the_same_config(name: str) -> None:
    """``output_scale=1`` and ``output_scale=1.0`` must give one config and one fingerprint."""
    a = _make(name, output_scale=1)
    b = _make(name, output_scale=1.0)
    assert isinstance(a.config.output_scale, float)
    assert json.dumps(a.config.to_dict()) == json.dumps(b.config.to_dict())
    assert a.fingerprint() == b.fingerprint()


def _valid(name: str) -> dict[str, object]:
    return _make(name).config.to_dict()


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
        ({"hidden_size": "20"}, r"key 'hidden_size' must be int, got '20'"),
        ({"hidden_size": 20.0}, r"key 'hidden_size' must be int, got 20.0"),
        ({"hidden_size": True}, r"key 'hidden_size' must be int, got True"),
        ({"output_scale": "0.01"}, r"key 'output_scale' must be float, got '0.01'"),
        ({"output_scale": False}, r"key 'output_scale' must be float, got False"),
        ({"output_scale": None}, r"key 'output_scale' must be float, got None"),
        ({"hidden_size": 0}, r"hidden_size=0"),
        ({"num_layers": -1}, r"num_layers=-1"),
        ({"eps": -1.0}, r"eps"),
        ({"architecture": "adam"}, r"unknown architecture 'adam'"),
        ({"format_version": 2}, r"unsupported format_version 2"),
        ({"format_version": "1"}, r"unsupported format_version '1'"),
    ],
)
def test_config_errors_name_the_key(name: str, change: dict[str, object], match: str) -> None:
    data = {**_valid(name), **change}
    with pytest.raises(ConfigError, match=match):
        RuleConfig.from_dict(data)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_config_missing_format_version(name: str) -> None:
    data = _valid(name)
    del data["format_version"]
    with pytest.raises(ConfigError, match="unsupported format_version None"):
        RuleConfig.from_dict(data, source="my/config.json")
    with pytest.raises(ConfigError, match=r"^my/config\.json: "):
        RuleConfig.from_dict(data, source="my/config.json")


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("rnnprop", {"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
        ("rnnprop", {"beta2": -0.1}, r"beta2 must be in \[0, 1\), got -0.1"),
        ("rnnprop", {"input_size": 0}, r"input_size must be >= 1, got 0"),
        ("l2o-dm", {"k": 0.0}, r"k and eps must be > 0, got k=0.0"),
    ],
)
def test_config_rule_specific_values(name: str, change: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RuleConfig.from_dict({**_valid(name), **change})


def test_config_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a JSON object"):
        RuleConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_make_rule_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown architecture 'adam'; known: l2o-dm, normprop, rnnprop"
    ):
        make_rule("adam")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hidden'\]"):
        make_rule("rnnprop", hidden=20)


def test_rule_rejects_config_of_another_rule() -> None:
    dm_config = _make("l2o-dm").config
    with pytest.raises(TypeError, match="RNNprop needs a RNNpropConfig, got DMConfig"):
        RULES["rnnprop"](dm_config)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ shapes
def test_state_matches_state_shapes(rule: UpdateRule) -> None:
    n = 37
    state = rule.init_state(n)
    shapes = rule.state_shapes()
    assert state.keys() == shapes.keys()
    for key, value in state.items():
        assert value.shape == (n, *shapes[key])
        assert value.dtype == torch.float32
        assert not value.any()
    assert rule.state_floats_per_coordinate() == SPEC_STATE_FLOATS[rule.architecture]
    assert rule.init_state(3, dtype=torch.float64)[next(iter(shapes))].dtype == torch.float64


def test_forward_shapes(rule: UpdateRule) -> None:
    n = 37
    shapes = rule.state_shapes()
    state = rule.init_state(n)
    for step in (1, 2, 3):
        out, state = rule(_grads(n, seed=step), state, step)
        assert out.shape == (n,)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert state.keys() == shapes.keys()
        for key, value in state.items():
            assert value.shape == (n, *shapes[key]), key
            assert torch.isfinite(value).all(), key


def test_forward_on_zero_coordinates(rule: UpdateRule) -> None:
    out, state = rule(torch.zeros(0), rule.init_state(0), 1)
    assert out.shape == (0,)
    assert all(v.shape[0] == 0 for v in state.values())


def test_output_scale_bounds_rnnprop() -> None:
    rule = _make("rnnprop")
    out, _ = rule(_grads(500) * 1e6, rule.init_state(500), 1)
    assert out.abs().max() <= rule.config.output_scale


# ------------------------------------------------------------ docs/method.md formulas (§2)
def test_rnnprop_bias_correction_by_hand() -> None:
    rule = _make("rnnprop")
    b1, b2, eps = rule.config.beta1, rule.config.beta2, rule.config.eps
    assert (b1, b2) == (0.95, 0.95)
    n = 50
    g1, g2 = _grads(n, seed=3).double(), _grads(n, seed=4).double()
    m0 = torch.zeros(n, dtype=torch.float64)
    v0 = torch.zeros(n, dtype=torch.float64)

    # step 1: m = (1-b1) g1, v = (1-b2) g1^2; the corrected moments are g1 and g1^2.
    x, m1, v1 = rule.preprocess(g1, m0, v0, 1)
    torch.testing.assert_close(m1, 0.05 * g1, rtol=1e-12, atol=0)
    torch.testing.assert_close(v1, 0.05 * g1 * g1, rtol=1e-12, atol=0)
    expect = g1 / (g1.abs() + eps)
    torch.testing.assert_close(x, torch.stack((expect, expect), -1), rtol=1e-12, atol=1e-15)

    # step 2: corrections 1 - b^2 = 0.0975.
    x, m2, v2 = rule.preprocess(g2, m1, v1, 2)
    m_exp = 0.95 * 0.05 * g1 + 0.05 * g2
    v_exp = 0.95 * 0.05 * g1**2 + 0.05 * g2**2
    torch.testing.assert_close(m2, m_exp, rtol=1e-12, atol=0)
    torch.testing.assert_close(v2, v_exp, rtol=1e-12, atol=0)
    denom = torch.sqrt(v_exp / 0.0975) + eps
    expect = torch.stack((m_exp / 0.0975 / denom, g2 / denom), -1)
    torch.testing.assert_close(x, expect, rtol=1e-10, atol=1e-15)

    # forward keeps the same moments in its new state (float32 path)
    state = rule.init_state(n)
    _, state = rule(g1.float(), state, 1)
    _, state = rule(g2.float(), state, 2)
    torch.testing.assert_close(state["m"], m_exp.float(), rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(state["v"], v_exp.float(), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("step", [0, -1])
def test_rnnprop_rejects_step_below_one(step: int) -> None:
    rule = _make("rnnprop")
    with pytest.raises(ValueError, match="step must be >= 1"):
        rule(torch.ones(3), rule.init_state(3), step)


def test_rnnprop_step_may_be_a_tensor() -> None:
    rule = _make("rnnprop")
    g = _grads(9)
    a, sa = rule(g, rule.init_state(9), 2)
    b, sb = rule(g, rule.init_state(9), torch.tensor(2.0))
    assert torch.equal(a, b)
    _assert_states_equal(sa, sb)


def test_dm_preprocess_matches_spec() -> None:
    rule = _make("l2o-dm")
    k, eps = rule.config.k, rule.config.eps
    assert k == 5.0
    g = torch.tensor([0.0, 1e-30, -1e-5, 1e-3, -0.5, 2.0, -1e3, 1e6])
    x = rule.preprocess(g)
    assert x.shape == (len(g), 2)
    x1 = torch.clamp(torch.log(g.double().abs() + eps) / k, min=-1.0)
    x2 = torch.clamp(g.double() * math.exp(k), -1.0, 1.0)
    torch.testing.assert_close(x[:, 0].double(), x1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x[:, 1].double(), x2, rtol=1e-6, atol=1e-7)
    # the clamps, value by value
    assert x[0, 0] == -1.0 and x[1, 0] == -1.0  # log(|g|+eps)/5 < -1
    assert x[0, 1] == 0.0
    assert x[-1, 0] == pytest.approx(math.log(1e6) / 5, rel=1e-6)  # no upper clamp on x1
    assert x[-1, 1] == 1.0 and x[-2, 1] == -1.0 and x[5, 1] == 1.0
    assert x[3, 1] == pytest.approx(1e-3 * math.exp(5), rel=1e-6)  # not clamped


def test_dm_output_is_scaled_readout() -> None:
    rule = _make("l2o-dm")
    g = _grads(20)
    state = _random_state(rule, 20)
    out, new_state = rule(g, state, 1)
    readout = rule.readout(new_state[f"h{rule.config.num_layers - 1}"]).squeeze(-1)
    torch.testing.assert_close(out, 0.01 * readout, rtol=0, atol=0)


# --------------------------------------------------------------------------- autograd
def test_no_grad_path_equals_differentiable_path(rule: UpdateRule) -> None:
    n = 41
    state_a = _random_state(rule, n)
    state_b = {k: v.clone() for k, v in state_a.items()}
    for step in (1, 2, 3):
        g = _grads(n, seed=10 + step)
        with torch.no_grad():
            out_a, state_a = rule(g, state_a, step)
        out_b, state_b = rule(g, state_b, step)
        assert not out_a.requires_grad and out_b.requires_grad
        assert torch.equal(out_a, out_b)
        _assert_states_equal(state_a, {k: v.detach() for k, v in state_b.items()})


def test_gradients_flow_through_step_and_state(rule: UpdateRule) -> None:
    n = 16
    g1 = _grads(n, seed=5).requires_grad_()
    g2 = _grads(n, seed=6)
    state0 = _random_state(rule, n)
    _, state1 = rule(g1, state0, 1)
    out2, _ = rule(g2, state1, 2)
    loss = (out2 * torch.linspace(-1, 1, n)).sum()
    params = dict(rule.named_parameters())
    grads = torch.autograd.grad(loss, [*params.values(), g1])
    for (name, _), grad in zip(params.items(), grads, strict=False):
        assert grad is not None and torch.isfinite(grad).all(), name
    assert any(grad.abs().sum() > 0 for grad in grads[:-1])
    # through the recurrent state: step 2's output depends on step 1's gradient ...
    assert grads[-1].abs().sum() > 0
    # ... and the weights' gradient includes the path through step 1's state update.
    _, state1 = rule(g1.detach(), state0, 1)
    out2_cut, _ = rule(g2, {k: v.detach() for k, v in state1.items()}, 2)
    assert torch.equal(out2_cut.detach(), out2.detach())
    loss_cut = (out2_cut * torch.linspace(-1, 1, n)).sum()
    grads_cut = torch.autograd.grad(loss_cut, list(params.values()), allow_unused=True)
    differs = [
        name
        for name, full, cut in zip(params, grads, grads_cut, strict=False)
        if cut is None or not torch.allclose(full, cut)
    ]
    assert differs, "no weight gradient flowed through the recurrent state"


# --------------------------------------------------------------------------- chunking
def _run_chunked(
    rule: UpdateRule, sizes: list[int], steps: int, n: int, tile: int = 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``steps`` steps on n coordinates split into consecutive chunks of ``sizes``,
    padding each chunk to a multiple of ``tile`` rows (the padding is discarded)."""
    assert sum(sizes) == n
    state = _random_state(rule, n)
    outs = []
    with torch.no_grad():
        for step in range(1, steps + 1):
            g = _grads(n, seed=20 + step)
            out = torch.empty(n)
            start = 0
            for size in sizes:
                sl = slice(start, start + size)
                pad = -size % tile
                g_c = torch.cat((g[sl], torch.zeros(pad)))
                s_c = {
                    k: torch.cat((v[sl], v.new_zeros((pad, *v.shape[1:]))))
                    for k, v in state.items()
                }
                o, new = rule(g_c, s_c, step)
                out[sl] = o[:size]
                for k in state:
                    state[k][sl] = new[k][:size]
                start += size
            outs.append(out)
    return torch.stack(outs), state


def test_rows_are_independent(coordinatewise_rule: UpdateRule) -> None:
    """Coordinatewise: changing one coordinate's gradient changes only that output."""
    n = 30
    g = _grads(n)
    state = _random_state(coordinatewise_rule, n)
    with torch.no_grad():
        out, _ = coordinatewise_rule(g, state, 1)
        g2 = g.clone()
        g2[7] = 3.0
        out2, _ = coordinatewise_rule(g2, state, 1)
    assert out2[7] != out[7]
    torch.testing.assert_close(
        torch.cat((out2[:7], out2[8:])), torch.cat((out[:7], out[8:])), rtol=1e-5, atol=1e-9
    )


@pytest.mark.parametrize("sizes", [[1, 7, 100, 192], [150, 150], [299, 1]])
def test_chunking_invariance(coordinatewise_rule: UpdateRule, sizes: list[int]) -> None:
    """Any split gives the same numbers up to float rounding (BLAS rounds tails of rows
    differently), over several steps of carried state."""
    full_out, full_state = _run_chunked(coordinatewise_rule, [300], steps=3, n=300)
    out, state = _run_chunked(coordinatewise_rule, sizes, steps=3, n=300)
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-8)
    for key in state:
        torch.testing.assert_close(state[key], full_state[key], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    not BLAS_ROWS_BATCH_INVARIANT, reason="this BLAS rounds a row differently by batch size"
)
@pytest.mark.parametrize("sizes", [[64, 64, 64, 64, 44], [128, 172], [7, 293]])
def test_chunking_invariance_row_tiled_is_bitwise(
    coordinatewise_rule: UpdateRule, sizes: list[int]
) -> None:
    """Padded to whole 64-row tiles, as L2O does, chunking changes no bit."""
    full_out, full_state = _run_chunked(coordinatewise_rule, [300], steps=3, n=300, tile=64)
    out, state = _run_chunked(coordinatewise_rule, sizes, steps=3, n=300, tile=64)
    assert torch.equal(out, full_out)
    _assert_states_equal(state, full_state)


# ------------------------------------------------------------------------ fingerprints
def test_fingerprint(rule: UpdateRule) -> None:
    fp = rule.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16
    assert rule.fingerprint() == fp
    assert copy.deepcopy(rule).fingerprint() == fp
    other = _make(rule.architecture, seed=1)
    assert other.fingerprint() != fp
    changed = copy.deepcopy(rule)
    with torch.no_grad():
        changed.readout.weight[0, 0] += 1e-3
    assert changed.fingerprint() != fp
    changed.load_state_dict(rule.state_dict())
    assert changed.fingerprint() == fp


def test_fingerprint_depends_on_config(rule: UpdateRule) -> None:
    scaled = _make(rule.architecture, output_scale=0.02)
    scaled.load_state_dict(rule.state_dict())
    assert scaled.fingerprint() != rule.fingerprint()
