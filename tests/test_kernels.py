"""The fast step kernels against the reference rule module (the single definition of each
rule): the compiled CPU kernel here, the Triton kernel through Triton's CPU interpreter (and
on CUDA where a GPU exists), plus how a backend is chosen and what happens without one."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

import flatl2o.kernels.cpu as cpu
from flatl2o import L2O, make_rule
from flatl2o.kernels import (
    KernelUnavailable,
    ReferenceKernel,
    make_kernel,
    resolve_backend,
    rule_program,
)
from flatl2o.kernels.accuracy import contract_violations, untouched_case
from flatl2o.rules import L2ODM, NormProp, UpdateRule

RULE_NAMES = ["l2o-dm", "rnnprop"]
ROOT = Path(__file__).resolve().parents[1]


def _rule(name: str, scale: float = 3.0, **options: object) -> UpdateRule:
    """Fixed random weights, scaled up so gates saturate and the nonlinearities matter."""
    torch.manual_seed(0)
    rule = make_rule(name, **options)
    with torch.no_grad():
        for p in rule.parameters():
            p.mul_(scale)
    return rule


def _inputs(rule: UpdateRule, n: int, seed: int = 1) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Gradients spanning 1e-8..10 in magnitude (both signs, exact zeros), random state."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * torch.logspace(-8, 1, n)
    g[::97] = 0.0
    state = {
        k: (torch.rand if k == "v" else torch.randn)(v.shape, generator=gen)
        for k, v in rule.init_state(n).items()
    }
    return g, state, torch.randn(n, generator=gen)


def _run(kernel, rule, n: int, steps: int, maximize: bool = False, chunk: int = 1 << 16):
    """``steps`` steps at lr 0.7 (NormProp: lr 0.01 and gradients alternating in sign, since
    its update is Adam-sized, about 1 per coordinate, so it moves as far per step)."""
    g, state, p = _inputs(rule, n)
    normprop = isinstance(rule, NormProp)
    for t in range(1, steps + 1):
        grad = g * (1 + 0.1 * t) * ((-1) ** t if normprop else 1)
        kernel.update(p, grad, state, t, 0.01 if normprop else 0.7, maximize, chunk)
    return p, state


def _assert_matches_reference(kernel, rule, n: int, steps: int = 4, maximize: bool = False):
    p, state = _run(kernel, rule, n, steps, maximize)
    p_ref, state_ref = _run(ReferenceKernel(rule), rule, n, steps, maximize)
    # the same function: differences at float32 rounding only (polynomial exp/log, FMA)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    for k in state:
        torch.testing.assert_close(state[k], state_ref[k], rtol=1e-5, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------ CPU kernel
@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 40_003])
def test_cpu_kernel_matches_reference(name: str, n: int) -> None:
    rule = _rule(name)
    _assert_matches_reference(cpu.CPUKernel(rule_program(rule)), rule, n)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_cpu_kernel_other_sizes_and_maximize(name: str) -> None:
    rule = _rule(name, hidden_size=7, num_layers=3)
    _assert_matches_reference(cpu.CPUKernel(rule_program(rule)), rule, 333, maximize=True)


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("hidden", [1, 4, 7, 16, 20, 33, 64])
def test_cpu_kernel_every_packed_layout(name: str, hidden: int) -> None:
    """Hidden sizes covering the AVX-512 layout's cases: tail quads only (partial or not),
    full 16-unit blocks only, both, and 16 gate vectors split into register blocks."""
    rule = _rule(name, hidden_size=hidden, num_layers=2)
    _assert_matches_reference(cpu.CPUKernel(rule_program(rule)), rule, 37, steps=2)


def _avx2_build():
    """The AVX2 path (x86 without AVX-512), forced with -DFLATL2O_NO_AVX512; None where the
    compiler or the CPU has no AVX2."""
    try:
        flags = next(
            line.split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return None
    if "avx2" not in flags or "fma" not in flags:
        return None
    lib = cpu._build(("FLATL2O_NO_AVX512",))
    return lib if lib.flatl2o_layout() == 1 else None


def _build(which: str):
    """The default build, or the AVX2 / portable C builds (skipping where unavailable)."""
    if which == "default":
        return cpu.library()
    if which == "portable":
        return cpu._build(("FLATL2O_PORTABLE",))
    lib = _avx2_build()
    if lib is None:
        pytest.skip("needs an x86 CPU with AVX2 and FMA")
    return lib


BUILDS = ["default", "avx2", "portable"]


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("hidden", [1, 4, 7, 16, 20, 33, 64])
def test_avx2_build_matches_reference(name: str, hidden: int) -> None:
    """The AVX2 path on the same packed layout, every layout case, plus maximize."""
    lib = _avx2_build()
    if lib is None:
        pytest.skip("needs an x86 CPU with AVX2 and FMA")
    rule = _rule(name, hidden_size=hidden, num_layers=2)
    kernel = cpu.CPUKernel(rule_program(rule), lib=lib)
    _assert_matches_reference(kernel, rule, 37, steps=2, maximize=hidden == 20)
    if hidden == 20:
        _assert_matches_reference(kernel, rule, 1000)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("name", RULE_NAMES)
def test_bf16_state_in_the_kernel_equals_fp32_steps_rounded_by_torch(name: str, build: str) -> None:
    """bf16 rows widened and rounded inside the kernel give exactly the fp32 step followed by
    torch's rounding of the state to bf16 (the chunked path's semantics), bit for bit."""
    _assert_bf16_state_is_fp32_rounded(_rule(name), _build(build), lr=0.5)


def _assert_bf16_state_is_fp32_rounded(rule, lib, lr: float) -> None:
    """Three steps with bf16 state rows equal three fp32 steps each followed by torch's
    rounding of the state to bf16, bit for bit (parameters and state)."""
    kernel = cpu.CPUKernel(rule_program(rule), lib=lib)
    for n in (37, 1000):
        g, state, p = _inputs(rule, n)
        bf = {k: v.to(torch.bfloat16) for k, v in state.items()}
        fp = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
        p2 = p.clone()
        for t in (1, 2, 3):
            kernel.update(p, g * t, bf, t, lr, False, 1 << 14)
            kernel.update(p2, g * t, fp, t, lr, False, 1 << 14)
            fp = {k: v.to(torch.bfloat16).float() for k, v in fp.items()}
        assert torch.equal(p, p2)
        assert all(torch.equal(bf[k].float(), fp[k]) for k in bf)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_portable_c_build_matches_reference(name: str) -> None:
    """The plain-C build used where AVX-512 is absent (forced here with -DFLATL2O_PORTABLE)."""
    lib = _build("portable")
    assert lib.flatl2o_layout() == 0
    for hidden, layers in ((20, 2), (7, 3)):
        rule = _rule(name, hidden_size=hidden, num_layers=layers)
        kernel = cpu.CPUKernel(rule_program(rule), lib=lib)
        _assert_matches_reference(kernel, rule, 333, maximize=True)


# ------------------------------------------------------------------ NormProp in the C kernel
#: (hidden_size, num_layers): 1 to 6 units in one layer, and two layers where the 16 floats
#: of state per coordinate allow (3 + 2 * hidden * layers <= 16)
NORMPROP_SHAPES = [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (1, 2), (3, 2)]


def _normprop(hidden: int = 4, layers: int = 1, adam_skip: float = 1.0, seed: int = 0):
    """A NormProp as meta-training leaves one: random LSTM and input weights (scaled up so
    gates saturate), and a gain head and read-out drawn at random, so that the gain is not 1
    and the direction depends on the LSTM (a fresh rule's are zero and near zero)."""
    torch.manual_seed(seed)
    rule = make_rule("normprop", hidden_size=hidden, num_layers=layers, adam_skip=adam_skip)
    with torch.no_grad():
        for p in rule.parameters():
            p.mul_(3.0)
        rule.gain.weight.normal_(0.0, 1.0)
        rule.gain.bias.normal_(0.0, 0.5)
        rule.readout.weight.normal_(0.0, 1.0)
        rule.readout.bias.normal_(0.0, 0.5)
    return rule


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(("hidden", "layers"), NORMPROP_SHAPES)
def test_normprop_cpu_kernel_matches_reference(build: str, hidden: int, layers: int) -> None:
    """Every build against the reference rule module: both passes (state, direction, the
    per-tensor sums, scale and step) over sizes with tile and block tails, several steps,
    the Adam skip on and off, and maximize."""
    lib = _build(build)
    for adam_skip in (1.0, 0.0):
        rule = _normprop(hidden, layers, adam_skip)
        kernel = cpu.CPUKernel(rule_program(rule), lib=lib)
        for n in (1, 37, 333, 2049):
            _assert_matches_reference(kernel, rule, n, maximize=n == 333)


def test_normprop_cpu_kernel_matches_reference_on_a_large_tensor() -> None:
    """Many blocks split across threads, at the default hidden size."""
    rule = _normprop()
    _assert_matches_reference(cpu.CPUKernel(rule_program(rule)), rule, 40_003)


@pytest.mark.parametrize("build", BUILDS)
def test_normprop_cpu_kernel_error_is_of_fp32_order(build: str) -> None:
    """Against the rule in float64, the kernel drifts no more than a small multiple of
    torch's own float32 path (as the other rules: tests above)."""
    _assert_drift_of_fp32_order(_normprop(seed=1), _build(build))


def test_normprop_does_not_depend_on_thread_split_or_chunking(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-tensor sums are per block by a fixed tree, added in a fixed order: one
    thread, four uneven parts, and fp32 chunks of the strided-state path all give the same
    bits."""
    rule = _normprop()
    kernel = cpu.CPUKernel(rule_program(rule))
    _assert_thread_split_gives_the_same_bits(kernel, rule, monkeypatch)
    # a strided state goes through fp32 chunks (rounded up to whole blocks of the sums)
    g, state, p = _inputs(rule, 1000)
    strided = {k: torch.stack((v, v), dim=-1)[..., 0] for k, v in state.items()}
    assert not any(v.is_contiguous() for v in strided.values())
    p2 = p.clone()
    kernel.update(p, g, state, 1, 0.01, False, 1 << 16)
    kernel.update(p2, g, strided, 1, 0.01, False, 100)
    assert torch.equal(p, p2)
    assert all(torch.equal(strided[k], state[k]) for k in state)


@pytest.mark.parametrize("build", BUILDS)
def test_normprop_bf16_state_in_the_kernel_equals_fp32_steps_rounded(build: str) -> None:
    """bf16 rows widened and rounded inside the kernel: exactly the fp32 step followed by
    torch's rounding of the state (as for the other rules), sums and scale included."""
    _assert_bf16_state_is_fp32_rounded(_normprop(), _build(build), lr=0.01)


def test_normprop_bf16_params_and_the_zero_gradient_contract() -> None:
    """bf16 parameters take the converted path (the step applied by torch, in fp32); the
    contract's rows neither move nor count in the tensor's sums."""
    rule = _normprop()
    kernel = cpu.CPUKernel(rule_program(rule))
    g, state, p = _inputs(rule, 1000)
    pb, ref_p = p.to(torch.bfloat16), p.to(torch.bfloat16)
    ref_state = {k: v.clone() for k, v in state.items()}
    kernel.update(pb, g.to(torch.bfloat16), state, 1, 0.01, False, 64)
    ReferenceKernel(rule).update(ref_p, g.to(torch.bfloat16), ref_state, 1, 0.01, False, 64)
    assert (pb.float() - ref_p.float()).abs().max() <= 2 * (2**-8) * pb.float().abs().max()
    for build in BUILDS:
        kernel = cpu.CPUKernel(rule_program(rule), lib=_build(build))
        for dtype in (torch.float32, torch.bfloat16):
            assert contract_violations(kernel, rule, state_dtype=dtype) == [], (build, dtype)
    # many exact zeros with fresh state: the scale is over the other coordinates only
    grad, state, param, keep = untouched_case(rule, 4 * 64)
    assert keep.any()
    ref_state = {k: v.clone() for k, v in state.items()}
    ref_param = param.clone()
    cpu.CPUKernel(rule_program(rule)).update(param, grad, state, 1, 0.01, False, 1 << 16)
    ReferenceKernel(rule).update(ref_param, grad, ref_state, 1, 0.01, False, 1 << 16)
    torch.testing.assert_close(param, ref_param, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", BUILDS)
def test_normprop_saturates_like_the_reference(build: str) -> None:
    """Extreme cell states and gradients (see the test for the other rules): finite, and the
    step and state close to the reference's."""
    _assert_saturates_like_the_reference(_normprop(), _build(build), lr=0.01, atol=1e-6)


def test_every_load_of_a_library_declares_its_functions() -> None:
    """Every ``CDLL`` object has function objects of its own, also a second load of the same
    library (the tests load each build more than once): each must be declared, or ctypes
    passes pointers and int64 counts as 32-bit ints (NormProp's totals crashed)."""
    lib = _build("portable")
    again = cpu.load(lib._name)
    assert again is not lib
    for name in ("flatl2o_step", "flatl2o_block_totals", "flatl2o_scale_step"):
        assert getattr(again, name).argtypes, name
    rule = _normprop()
    kernel = cpu.CPUKernel(rule_program(rule), lib=again)
    _assert_matches_reference(kernel, rule, 100)


def test_auto_picks_the_cpu_kernel_for_normprop_without_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C kernel implements NormProp: ``backend="auto"`` and ``"cpu"`` take it, silently
    (before, the C kernel refused it and auto warned and ran the reference step)."""
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)
    import flatl2o.kernels as kernels

    monkeypatch.setattr(kernels, "_warned", set())
    rule = _normprop()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(make_kernel(rule, torch.device("cpu")), cpu.CPUKernel)
        assert isinstance(make_kernel(rule, torch.device("cpu"), "cpu"), cpu.CPUKernel)
        model = torch.nn.Linear(30, 20)
        opt = L2O(model.parameters(), rule)
        model(torch.randn(4, 30)).pow(2).sum().backward()
        before = [q.detach().clone() for q in model.parameters()]
        opt.step()
    assert all(not torch.equal(q, b) for q, b in zip(model.parameters(), before, strict=True))


# -------------------------------------------------- the C ABI and the packed layouts, declared once
@pytest.mark.parametrize("build", BUILDS)
def test_c_argument_struct_is_read_from_the_library(build: str) -> None:
    """The ctypes mirror of the argument struct is built from the table each build exports
    (cpu_step.c: ARGS) and has exactly the fields the Python side writes, at the compiler's
    offsets, with the compiler's size."""
    lib = _build(build)
    struct = cpu.args_type(lib)
    names = [f[0] for f in struct._fields_]
    assert set(names) == cpu.ARGS_WRITTEN and len(names) == len(cpu.ARGS_WRITTEN)
    assert ctypes.sizeof(struct) == lib.flatl2o_args_size()
    assert struct.h.size == struct.w.size == cpu.MAX_LAYERS * ctypes.sizeof(ctypes.c_void_p)


def _edited_source(tmp_path: Path, old: str, new: str) -> Path:
    """cpu_step.c with one edit, as a later version of the C side might make it."""
    text = cpu.SOURCE.read_text()
    assert text.count(old) == 1
    path = tmp_path / "cpu_step.c"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        # a type changed in C but not its kind: Python would write a float into a double
        ("FIELD(float, lr, 'f')", "FIELD(double, lr, 'f')", "field 'lr' is 8 bytes of kind 'f'"),
        # a field added in C that Python does not set
        (
            "FIELD(int32_t, negate, 'i')",
            "FIELD(int32_t, negate, 'i') FIELD(int32_t, threads, 'i')",
            r"unknown: \['threads'\]",
        ),
    ],
    ids=["type", "new-field"],
)
def test_a_library_of_another_argument_layout_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str, why: str
) -> None:
    """The loader compares the library's own description of its argument struct with what
    it writes and refuses a mismatch with one line, before any call."""
    monkeypatch.setenv("FLATL2O_CACHE_DIR", str(tmp_path / "cache"))
    source = _edited_source(tmp_path, old, new)
    with pytest.raises(KernelUnavailable, match=why) as e:
        cpu._build(("FLATL2O_PORTABLE",), source=source)
    assert "does not match this flatl2o" in str(e.value) and "\n" not in str(e.value)


def test_a_library_that_is_not_the_kernel_is_refused() -> None:
    """Any other shared library (here the C library itself) is refused, not called."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    with pytest.raises(KernelUnavailable, match="exports no argument table") as e:
        cpu.CPUKernel(rule_program(_rule("l2o-dm")), lib=libc)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("hidden", [1, 7, 16, 20, 33])
def test_packed_layouts_follow_their_declaration(name: str, hidden: int) -> None:
    """layout.pack's two packed layouts against their definitions (layout.py's doc): every
    gate row g of layer l lands in its slot multiplied by GATE_SCALES[g] (the one constant):
    for the C kernels rounded once from float64, for the Triton tiles scaled in fp32."""
    from flatl2o.kernels import layout

    program = rule_program(_rule(name, hidden_size=hidden, num_layers=2))
    vec, tiles = layout.pack(program, "vectors16"), layout.pack(program, "tiles")
    full = hidden // 16
    for i, (w, b, k) in enumerate(
        zip(program.layer_weights, program.layer_biases, program.layer_inputs, strict=True)
    ):
        for g, scale in enumerate(layout.GATE_SCALES):
            for unit in range(hidden):
                if unit < 16 * full:
                    slot = (4 * (unit // 16) + g) * 16 + unit % 16
                else:
                    s, u = divmod(unit - 16 * full, 4)
                    slot = (4 * full + s) * 16 + 4 * g + u
                row = w[g * hidden + unit]
                assert torch.equal(vec.weights[i][:, slot], (row.double() * scale).float())
                assert vec.biases[i][slot] == (b[g * hidden + unit].double() * scale).float()
                s32 = torch.tensor(scale, dtype=torch.float32)
                assert torch.equal(tiles.weights[i][g, :k, unit], row[:k] * s32)
                assert torch.equal(tiles.recurrent[i][g, :hidden, unit], row[k:] * s32)
                assert tiles.biases[i][g, unit] == b[g * hidden + unit] * s32
        for t in (tiles.weights[i], tiles.recurrent[i]):  # 3xTF32 parts sum to the weights
            assert torch.equal(t[4:8], layout.tf32_round(t[:4]))
            assert torch.equal(t[8:], layout.tf32_round(t[:4] - t[4:8]))
    rows = layout.pack(program, "rows")
    assert rows.weights is program.layer_weights and rows.w_out is program.w_out
    with pytest.raises(ValueError, match="Invalid layout: 'cols'"):
        layout.pack(program, "cols")


@pytest.mark.parametrize("name", RULE_NAMES)
def test_cpu_kernel_untrained_scale(name: str) -> None:
    """At init scale (small weights) too, not only with saturated gates."""
    rule = _rule(name, scale=1.0)
    _assert_matches_reference(cpu.CPUKernel(rule_program(rule)), rule, 2049)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("name", ["dm", "rnnprop-entropy"])
def test_cpu_kernel_error_is_of_fp32_order(name: str, build: str) -> None:
    """Against the rule in float64, a shipped checkpoint's kernel step drifts no more than a
    small multiple of torch's own float32 path (benchmarks/kernel_accuracy.py: 2-3x)."""
    from flatl2o.hub import load_rule

    _assert_drift_of_fp32_order(load_rule(name), _build(build))


def _assert_drift_of_fp32_order(rule, lib) -> None:
    """10 steps on 5,000 coordinates: the kernel's parameter and state drift from the rule in
    float64 is at most 8 times torch's float32 reference step's."""
    from flatl2o.kernels.accuracy import drift_from_float64

    n = 5000
    g = torch.randn(n, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 0, n)
    kernels = {"cpu": cpu.CPUKernel(rule_program(rule), lib=lib), "fp32": ReferenceKernel(rule)}
    drift, _ = drift_from_float64(rule, kernels, g, steps=10)
    (pk, sk), (pr, sr) = drift["cpu"], drift["fp32"]
    assert pk <= 8 * pr + 1e-9 and sk <= 8 * sr + 1e-8, (pk, pr, sk, sr)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("name", RULE_NAMES)
def test_cpu_kernel_saturates_like_the_reference(name: str, build: str) -> None:
    """Extreme values (cell states up to 3e38, where tanh(c)'s argument overflows to inf;
    gradients from 1e-30 to 1e15):
    tanh/sigmoid saturate to the reference's values, never NaN, and the state stays close."""
    _assert_saturates_like_the_reference(_rule(name), _build(build), lr=1.0, atol=1e-5)


def _assert_saturates_like_the_reference(rule, lib, lr: float, atol: float) -> None:
    """Two steps from cell states drawn from huge values and gradients from 1e-30 to 1e15:
    the reference stays finite and the kernel's step (``atol``) and state stay close to it."""
    n = 64
    gen = torch.Generator().manual_seed(3)
    state = rule.init_state(n)
    big = torch.tensor([0.0, 50.0, -50.0, 1e6, -1e6, 1e30, -1e30, 3e38, -3e38, 88.0, 1e-40])
    for k in state:
        if k.startswith("c"):
            state[k] = big[torch.randint(len(big), state[k].shape, generator=gen)]
        elif k.startswith("h"):
            state[k] = torch.rand(state[k].shape, generator=gen) * 2 - 1
    g = torch.logspace(-30, 15, n) * torch.tensor([1.0, -1.0]).repeat(n // 2)  # g^2 finite
    ref = {k: v.clone() for k, v in state.items()}
    p, p_ref = torch.zeros(n), torch.zeros(n)
    kernel = cpu.CPUKernel(rule_program(rule), lib=lib)
    for t in (1, 2):
        kernel.update(p, g, state, t, lr, False, 1 << 14)
        ReferenceKernel(rule).update(p_ref, g, ref, t, lr, False, 1 << 14)
    assert torch.isfinite(p_ref).all() and all(torch.isfinite(v).all() for v in ref.values())
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=atol)
    for k in state:
        torch.testing.assert_close(state[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


def test_cpu_kernel_does_not_depend_on_thread_split(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = _rule("rnnprop")
    _assert_thread_split_gives_the_same_bits(cpu.CPUKernel(rule_program(rule)), rule, monkeypatch)


def _assert_thread_split_gives_the_same_bits(kernel, rule, monkeypatch) -> None:
    """One thread and four uneven parts of 50,001 coordinates: the same bits, two steps."""
    monkeypatch.setattr(cpu, "MIN_COORDS_PER_THREAD", 10**9)  # one thread
    p1, s1 = _run(kernel, rule, 50_001, 2)
    monkeypatch.setattr(cpu, "MIN_COORDS_PER_THREAD", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # four uneven parts
    p4, s4 = _run(kernel, rule, 50_001, 2)
    assert torch.equal(p1, p4)
    assert all(torch.equal(s1[k], s4[k]) for k in s1)


def test_cpu_kernel_bf16_params_use_bounded_chunks() -> None:
    """bf16 params: the kernel writes the step for one chunk at a time, fp32 arithmetic."""
    rule = _rule("l2o-dm")
    kernel = cpu.CPUKernel(rule_program(rule))
    g, state, p = _inputs(rule, 1000)
    pb = p.to(torch.bfloat16)
    ref_state = {k: v.clone() for k, v in state.items()}
    ref_p = pb.clone()
    kernel.update(pb, g.to(torch.bfloat16), state, 1, 1.0, False, 64)
    ReferenceKernel(rule).update(ref_p, g.to(torch.bfloat16), ref_state, 1, 1.0, False, 64)
    torch.testing.assert_close(pb, ref_p, rtol=1e-2, atol=1e-3)  # one bf16 ulp at most
    assert (pb.float() - ref_p.float()).abs().max() <= 2 * (2**-8) * pb.float().abs().max()


def test_cpu_kernel_refuses_unsupported_sizes() -> None:
    with pytest.raises(KernelUnavailable, match="hidden size"):
        cpu.CPUKernel(rule_program(make_rule("l2o-dm", hidden_size=65)))


def test_cpu_kernel_strided_state_goes_through_fp32_chunks() -> None:
    """A strided state (e.g. a view of a sharded tensor) gives the same numbers."""
    rule = _rule("l2o-dm")
    kernel = cpu.CPUKernel(rule_program(rule))
    g, state, p = _inputs(rule, 300)
    strided = {k: v.t().contiguous().t() for k, v in state.items()}
    ref_state = {k: v.clone() for k, v in state.items()}
    ref_p = p.clone()
    kernel.update(p, g, strided, 1, 1.0, False, 64)
    kernel.update(ref_p, g, ref_state, 1, 1.0, False, 64)
    assert torch.equal(p, ref_p)
    assert all(torch.equal(strided[k], ref_state[k]) for k in state)


@pytest.mark.parametrize("name", RULE_NAMES)
def test_bf16_state_matches_reference(name: str) -> None:
    """bf16 state: both paths compute in fp32 and round when storing, so they agree up to a
    rounding flip (one bf16 ulp) where fp32-level differences straddle a rounding boundary."""
    rule = _rule(name)
    g, state, p = _inputs(rule, 1000)
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    ref_state = {k: v.clone() for k, v in state.items()}
    ref_p = p.clone()
    cpu.CPUKernel(rule_program(rule)).update(p, g, state, 1, 1.0, False, 128)
    ReferenceKernel(rule).update(ref_p, g, ref_state, 1, 1.0, False, 128)
    torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    for k in state:
        assert state[k].dtype == torch.bfloat16
        diff = (state[k].float() - ref_state[k].float()).abs()
        ulp = ref_state[k].float().abs() * 2**-7 + 1e-6  # + fp32-level noise near zero
        assert bool((diff <= ulp).all()), k


# ------------------------------------------------------------------------------- selection
def test_auto_picks_cpu_kernel_for_builtin_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)
    for name in RULE_NAMES:
        assert make_kernel(_rule(name), torch.device("cpu")).name == "cpu"


def test_subclassed_rule_runs_on_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)

    class Doubled(L2ODM):
        def forward(self, grad, state, step=1):
            step_out, new = super().forward(grad, state, step)
            return 2 * step_out, new

    rule = Doubled()
    assert make_kernel(rule, torch.device("cpu")).name == "reference"
    with pytest.raises(KernelUnavailable, match="built-in rules only"):
        make_kernel(rule, torch.device("cpu"), "cpu")


def test_backend_names_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="Invalid backend: 'gpu'"):
        L2O([torch.nn.Parameter(torch.zeros(2))], _rule("l2o-dm"), backend="gpu")
    monkeypatch.setenv("FLATL2O_BACKEND", "fast")
    with pytest.raises(ValueError, match="Invalid FLATL2O_BACKEND='fast'"):
        resolve_backend("auto")
    assert resolve_backend("reference") == "reference"  # explicit choice beats the variable


def test_without_a_compiler_auto_falls_back_and_warns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)
    monkeypatch.setenv("FLATL2O_CACHE_DIR", str(tmp_path))  # nothing compiled there
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc, clang
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_library_error", None)
    import flatl2o.kernels as kernels

    monkeypatch.setattr(kernels, "_warned", set())
    rule = _rule("rnnprop")
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert make_kernel(rule, torch.device("cpu")).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert make_kernel(rule, torch.device("cpu")).name == "reference"
    with pytest.raises(KernelUnavailable, match="no C compiler found"):
        make_kernel(rule, torch.device("cpu"), "cpu")


def test_optimizer_follows_rule_weight_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel packs the weights; editing the rule (continued meta-training) repacks."""
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)
    rule = _rule("l2o-dm")
    p = torch.nn.Parameter(torch.ones(100))
    q = torch.nn.Parameter(torch.ones(100))
    fast = L2O([p], rule)
    ref = L2O([q], rule, backend="reference")
    for i in range(3):
        with torch.no_grad():
            rule.readout.bias.add_(0.5)  # changes every step
        p.grad = torch.full_like(p, 0.1 * (i + 1))
        q.grad = p.grad.clone()
        fast.step()
        ref.step()
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- the zero-gradient contract
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("build", ["reference", *BUILDS])
@pytest.mark.parametrize("name", RULE_NAMES)
def test_zero_gradient_contract(name: str, build: str, state_dtype: torch.dtype) -> None:
    """Rows with a zero gradient (either sign) and the initial state keep every bit of their
    parameter and state; every other row moves (the definition: reference.untouched)."""
    rule = _rule(name)
    if build == "reference":
        kernel = ReferenceKernel(rule)
    else:
        kernel = cpu.CPUKernel(rule_program(rule), lib=_build(build))
    assert contract_violations(kernel, rule, state_dtype=state_dtype) == []
    # bf16 parameters take the converted (delta) path of the CPU kernel
    grad, state, param, keep = untouched_case(rule, 100)
    param = param.to(torch.bfloat16)
    start = param.clone()
    kernel.update(param, grad, state, 1, 1.0, False, 32)
    assert torch.equal(param[keep], start[keep]) and (param[~keep] != start[~keep]).any()


@pytest.mark.parametrize("name", RULE_NAMES)
def test_reference_step_is_the_rule_where_the_contract_does_not_apply(name: str) -> None:
    """The mask changes nothing else: rows with a gradient or a non-initial state get exactly
    the rule module's output (one chunk, a whole number of ROW_TILEs: the same BLAS calls)."""
    rule = _rule(name)
    n = 4 * 64
    grad, state, param, keep = untouched_case(rule, n)
    expected_state = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        delta, new = rule(grad, expected_state, 1)
    expected = param - 0.5 * delta
    ReferenceKernel(rule).update(param, grad, state, 1, 0.5, False, n)
    assert keep.any() and (~keep).any()
    assert torch.equal(param[~keep], expected[~keep])
    for k in state:
        assert torch.equal(state[k][~keep], new[k][~keep]), k


# ---------------------------------------------------------------------------------- Triton
# What the interpreter scripts share: a kernel of a given launch, a rule with weights that make
# every part matter (benchmarks/gpu_check.py's, which the GPU check uses), and the checks
# against the reference step and of the contract.
_TRITON_PRELUDE = """
import torch, sys
sys.path.insert(0, {root!r})
from benchmarks.gpu_check import rule_for
from flatl2o.kernels import KernelUnavailable, ReferenceKernel, rule_program
from flatl2o.kernels import triton_step
from flatl2o.kernels.accuracy import contract_violations
from flatl2o import make_rule

cpu = torch.device("cpu")


def make(name, **opts):
    return rule_for(name, cpu, **opts)


def kernel(rule, variant, precision="ieee"):
    config = triton_step.launch_config(cpu, variant=variant, precision=precision)
    return triton_step.TritonKernel(rule_program(rule), cpu, config)


def check(name, opts, variant, sdt, c_scale=1.0, precision="ieee", steps=2, n=150):
    rule = make(name, **opts)
    # n = 150: 5 blocks of 32 (3 of 64), a partial last block; the persistent grid (2
    # programs) loops, past the last block
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(n, generator=gen) * torch.logspace(-8, 1, n)
    init = {{k: (torch.rand if k == "v" else torch.randn)(v.shape, generator=gen)
            for k, v in rule.init_state(n).items()}}
    for k in init:  # c_scale: cell states far past saturation (the gate exponent cap)
        if k.startswith("c"):
            init[k] *= c_scale
    if name == "normprop":  # rows the zero-gradient contract keeps: neither moved nor counted
        g[::7] = 0.0
        for v in init.values():
            v[::3] = 0.0
    st = {{k: v.to(sdt, copy=True) for k, v in init.items()}}
    ref = {{k: v.to(sdt).float() for k, v in init.items()}}
    p = torch.randn(n, generator=gen)
    pr = p.clone()
    kern = kernel(rule, variant, precision)
    for t in range(1, steps + 1):
        kern.update(p, g, st, t, 0.5, t == 2, 0)
        ReferenceKernel(rule).update(pr, g, ref, t, 0.5, t == 2, 1 << 16)
        if sdt == torch.bfloat16:
            ref = {{k: v.to(sdt).float() for k, v in ref.items()}}
    # bf16 state: a rounding flip at step 1 (fp32-level differences) propagates into
    # step 2, so allow a few bf16 ulps there
    tol = 1e-5 if sdt == torch.float32 else 5e-2
    if c_scale > 1:  # sigmoid(z) c = O(1) from c ~ 1e30 means z ~ -70: exp amplifies z's
        tol = 1e-4   # fp32 rounding ~70x in any fp32 implementation (the reference's too)
    # bf16 state: such a flip moves a coordinate's next step by about a bf16 ulp (2^-8) of
    # it, a step of output_scale (0.01 for L2O-DM and RNNprop; ~1 for NormProp)
    ptol = 1e-5 if sdt == torch.float32 else 1e-2 * rule.config.output_scale
    torch.testing.assert_close(p, pr, rtol=ptol, atol=ptol)
    for k in st:
        torch.testing.assert_close(st[k].float(), ref[k], rtol=tol, atol=tol, msg=k)


def check_contract(name, opts, variant, sdt):
    # the zero-gradient contract (flatl2o.kernels.reference.untouched), every bit
    rule = make_rule(name, **opts)
    kern = kernel(rule, variant)
    bad = contract_violations(kern, rule, n=150, state_dtype=sdt)
    assert not bad, (name, opts, variant, sdt, bad)
"""

_TRITON_SCRIPT = """
cases = [("l2o-dm", {{}}), ("rnnprop", {{}}), ("rnnprop", dict(num_layers=1, hidden_size=9))]
for name, opts in cases:
    for variant in triton_step.VARIANTS:
        for sdt in (torch.float32, torch.bfloat16):
            check(name, opts, variant, sdt)
            check_contract(name, opts, variant, sdt)
    check(name, opts, "packed", torch.float32, c_scale=1e30)
    # the interpreter multiplies TF32 parts exactly: this checks the split (a wrong one
    # is off by ~2^-11), not the tensor cores
    check(name, opts, "persistent", torch.float32, precision="3xtf32")

# the one-time check make_kernel runs on a GPU: passes as is, catches 0.1% off weights
rule = make_rule("rnnprop")
good = kernel(rule, "packed")
good.verify(rule, n=300)
assert len(triton_step._VERIFIED) == 1
triton_step._VERIFIED.clear()
bad = kernel(rule, "packed")
for t in bad.tiles[1][:2]:
    t.mul_(1.001)
try:
    bad.verify(rule, n=300)
except KernelUnavailable as e:
    assert "disagrees with the reference rule" in str(e) and "h1 off by" in str(e), e
else:
    raise AssertionError("verify missed weights 0.1% off")
print("TRITON-OK")
"""


_TRITON_NORMPROP_SCRIPT = """
import dataclasses
from flatl2o import L2O

# the one-time check on first use covers NormProp: it catches a gain head 1% off, and
# passes the kernel as it is (for the configuration L2O builds here: cached for it below)
rule = make("normprop")
program = rule_program(rule)  # its w_gain shares the rule's storage: replace, not scale
off = dataclasses.replace(program, w_gain=program.w_gain * 1.01)
bad = triton_step.TritonKernel(off, cpu, triton_step.launch_config(cpu))
try:
    bad.verify(rule, n=300)
except KernelUnavailable as e:
    assert "disagrees with the reference rule" in str(e) and "param off by" in str(e), e
else:
    raise AssertionError("verify missed a gain head 1% off")
triton_step.TritonKernel(program, cpu, triton_step.launch_config(cpu)).verify(rule, n=300)
assert len(triton_step._VERIFIED) == 1

# the optimizer with backend="triton" (before: "the Triton kernel does not implement
# normprop yet"): each tensor of a model normalized on its own, as the reference does
models = []
for backend in ("triton", "reference"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = L2O(model.parameters(), rule, backend=backend)
    for i in range(3):
        gen = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    kind = type(opt._kernel_on(cpu))
    assert kind is (triton_step.TritonKernel if backend == "triton" else ReferenceKernel)
    models.append(torch.cat([q.detach().reshape(-1) for q in model.parameters()]))
torch.testing.assert_close(models[0], models[1], rtol=1e-5, atol=1e-6)

# both passes in every variant, fp32 and bf16 state, one and two layers (odd widths),
# with and without the Adam skip, maximize at step 2; kept rows neither moved nor counted
for variant in triton_step.VARIANTS:
    for sdt in (torch.float32, torch.bfloat16):
        check("normprop", {{}}, variant, sdt, steps=3)
        check_contract("normprop", {{}}, variant, sdt)
check("normprop", {{}}, "persistent", torch.float32, precision="3xtf32", steps=3)
check("normprop", {{}}, "packed", torch.float32, n=17, steps=3)  # less than one block
two = dict(num_layers=2, hidden_size=3, adam_skip=0.0)
for sdt in (torch.float32, torch.bfloat16):
    check("normprop", two, "packed", sdt, steps=3)
check_contract("normprop", two, "packed", torch.float32)
check("normprop", two, "strided", torch.float32, steps=3)

# the scratch is kept: tensors of other sizes reuse it; the same steps give the same bits
kern = kernel(rule, "packed")
ref = ReferenceKernel(rule)
sizes = [150, 40, 150]
runs = []
for _ in range(2):
    ps = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    sts = [rule.init_state(n) for n in sizes]
    for t in (1, 2):
        for n, p, st in zip(sizes, ps, sts):
            g = torch.randn(n, generator=torch.Generator().manual_seed(10 * t + n))
            kern.update(p, g, st, t, 0.5, False, 0)
            if t == 1 and n == 150:
                buffer = kern._directions.data_ptr()
            assert kern._directions.data_ptr() == buffer
    runs.append(ps)
assert all(torch.equal(a, b) for a, b in zip(*runs))
prs = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
srs = [rule.init_state(n) for n in sizes]
for t in (1, 2):
    for n, p, st in zip(sizes, prs, srs):
        g = torch.randn(n, generator=torch.Generator().manual_seed(10 * t + n))
        ref.update(p, g, st, t, 0.5, False, 1 << 16)
for p, pr in zip(runs[0], prs):
    torch.testing.assert_close(p, pr, rtol=1e-5, atol=1e-5)

print("TRITON-OK")
"""


def _run_in_interpreter(script: str) -> None:
    """Run ``_TRITON_PRELUDE + script`` with ``TRITON_INTERPRET=1`` in a fresh process (the
    variable is read when Triton is imported); it must print TRITON-OK."""
    pytest.importorskip("triton", reason="Triton is optional: pip install triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("FLATL2O_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", (_TRITON_PRELUDE + script).format(root=str(ROOT))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-3000:]


def test_triton_kernel_matches_reference_in_interpreter() -> None:
    _run_in_interpreter(_TRITON_SCRIPT)


def test_triton_kernel_runs_normprop_in_interpreter() -> None:
    """NormProp's two passes (state, directions and per-block sums; then the per-tensor scale
    and the update) match the reference step in every launch variant."""
    _run_in_interpreter(_TRITON_NORMPROP_SCRIPT)


def test_triton_launch_config_per_device_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32 tensor cores (compute capability 8.0+) get 3xTF32 on 64 x 4 (168-register cap),
    others fp32 FMA on 32 x 2 (255); explicit settings override, and the block, warps and
    register cap follow an overridden precision; bad ones are refused, naming the setting."""
    from flatl2o.kernels import triton_step as ts

    monkeypatch.delenv(ts.CONFIG_ENV, raising=False)
    cuda = torch.device("cuda")
    assert ts.launch_config(torch.device("cpu")) == ts.LaunchConfig("packed", "ieee", 32, 2, 255)
    for capability, expected in [((9, 0), ("3xtf32", 64, 4, 168)), ((7, 5), ("ieee", 32, 2, 255))]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        config = ts.launch_config(cuda)
        assert (config.precision, config.block, config.warps, config.maxnreg) == expected
        assert ts.default_config(cuda) == config
    monkeypatch.setattr(torch.version, "hip", "6.2")  # AMD: no PTX, no TF32 default
    assert ts.launch_config(cuda).precision == "ieee" and ts.plain_math()
    monkeypatch.setattr(torch.version, "hip", None)
    assert ts.launch_config(cuda, precision="tf32x3", maxnreg=0) == ts.LaunchConfig(
        "packed", "tf32x3", 64, 4, 0
    )
    assert ts.launch_config(cuda, precision="ieee").block == 32
    with pytest.raises(ValueError, match=r"precision='3xtf32' \(from the argument\).*packed or"):
        ts.launch_config(cuda, variant="strided", precision="3xtf32")
    with pytest.raises(ValueError, match=r"block=48 .*power of two >= 16"):
        ts.launch_config(cuda, block=48)
    with pytest.raises(ValueError, match=r"variant='fused' .*choose one of"):
        ts.launch_config(cuda, variant="fused")


def test_triton_config_environment_is_read_when_a_kernel_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$FLATL2O_TRITON_CONFIG (the one environment override, for the kernels L2O builds) is
    read by launch_config, i.e. when a kernel is built, not when the module is imported;
    explicit settings beat it, default_config ignores it, and a malformed value is refused
    with a one-line error naming the variable."""
    from flatl2o.kernels import triton_step as ts

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (9, 0))
    monkeypatch.setenv(ts.CONFIG_ENV, " variant = strided, precision=ieee ,warps=4")
    assert ts.launch_config(cuda) == ts.LaunchConfig("strided", "ieee", 32, 4, 255)
    assert ts.launch_config(cuda, warps=8).warps == 8
    assert ts.default_config(cuda) == ts.LaunchConfig("packed", "3xtf32", 64, 4, 168)
    if ts.triton is not None:  # the kernel takes the configuration when it is built
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        kern = ts.TritonKernel(rule_program(make_rule("l2o-dm")), torch.device("cpu"))
        assert kern.config == ts.LaunchConfig("strided", "ieee", 32, 4, 255)
    monkeypatch.setenv(ts.CONFIG_ENV, "precision=3xtf32,variant=strided")
    with pytest.raises(ValueError, match=r"from \$FLATL2O_TRITON_CONFIG"):
        ts.launch_config(cuda)
    for bad, why in [("block=big", "takes an integer"), ("blocks=64", "name=value pairs")]:
        monkeypatch.setenv(ts.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=why) as e:
            ts.launch_config(cuda)
        assert "\n" not in str(e.value)
    monkeypatch.setenv(ts.CONFIG_ENV, "")
    assert ts.launch_config(cuda) == ts.default_config(cuda)


def test_triton_verify_turns_a_kernel_that_cannot_run_into_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU or Triton version the kernel does not compile or run on is reported as
    KernelUnavailable (so backend="auto" falls back to the reference step), naming why."""
    pytest.importorskip("triton", reason="Triton is optional: pip install triton")
    from flatl2o.kernels import triton_step as ts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rule = make_rule("l2o-dm")
    kern = ts.TritonKernel(rule_program(rule), torch.device("cpu"))

    def ptxas_fails(*args, **kwargs):
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error")

    monkeypatch.setattr(kern, "update", ptxas_fails)
    verified = set(ts._VERIFIED)
    with pytest.raises(KernelUnavailable, match=r"failed to compile or run on cpu.*PTXAS error"):
        kern.verify(rule, n=64)
    assert ts._VERIFIED == verified  # not cached as good


@pytest.mark.parametrize("precision", ["ieee", "3xtf32"])  # defaults without/with TF32 cores
@pytest.mark.parametrize("name", ["l2o-dm", "rnnprop", "normprop"])
def test_triton_kernel_compiles_for_h200_with_one_instruction_gate_math(
    name: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU-only code path (inline PTX, register cap, TF32 splitting), which the
    interpreter cannot run, compiles for sm_90 with Triton's bundled ptxas, and each LSTM unit
    costs 5 ``ex2`` and 3 ``rcp`` single instructions (4 gates + tanh(c); three
    reciprocals), no division."""
    pytest.importorskip("triton", reason="Triton is optional: pip install triton")
    from flatl2o.kernels import triton_step

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.triton_aot import compile_kernel, launch_ints

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("ahead-of-time compilation needs Triton's compiler, not its interpreter")
    config = triton_step.launch_config(torch.device("cpu"), precision=precision)
    consts = triton_step.launch_constexprs(rule_program(make_rule(name)), config, False)
    ints = launch_ints(100_000, config.block)
    k = compile_kernel(triton_step._step_kernel, consts, config.warps, config.maxnreg, 90, ints)
    ex2 = k.ptx.count("ex2.approx.ftz.f32")
    rcp = k.ptx.count("rcp.approx.ftz.f32")
    assert ex2 > 0 and 3 * ex2 == 5 * rcp, (ex2, rcp)
    if name == "l2o-dm":  # RNNprop's input normalization and read-out divide, per coordinate
        assert "div." not in k.ptx and "ex2.approx.f32" not in k.ptx
    if precision == "3xtf32":  # TF32 tensor-core products only, no fp32 FMA dot
        assert ".tf32" in k.ptx
    assert k.registers <= 255
    if name == "normprop":  # and its second pass
        block = triton_step.NORMPROP_APPLY_BLOCK
        apply = compile_kernel(triton_step._normprop_apply_kernel, {"BLOCK": block}, 4, 0, 90, ints)
        assert "div.rn.f64" in apply.ptx and apply.stack_bytes == 0  # the means: fp64 sums


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["l2o-dm", "rnnprop", "normprop"])
def test_triton_kernel_matches_reference_on_cuda(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    from flatl2o.kernels.triton_step import TritonKernel

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.gpu_check import rule_for

    device = torch.device("cuda")
    rule = rule_for(name, device)
    g, state, p = _inputs(rule, 100_003)
    g, p = g.to(device), p.to(device)
    state = {k: v.to(device) for k, v in state.items()}
    ref_state = {k: v.clone() for k, v in state.items()}
    p_ref = p.clone()
    kern, ref = TritonKernel(rule_program(rule), device), ReferenceKernel(rule)
    for t in range(1, 4):
        kern.update(p, g, state, t, 0.7, False, 1 << 16)
        ref.update(p_ref, g, ref_state, t, 0.7, False, 1 << 16)
    # fp32 rounding of the step: NormProp's is ~1 (output_scale 1), the others' ~0.01
    atol = 1e-6 * max(1.0, 10 * rule.config.output_scale)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=atol)
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-4, atol=1e-5, msg=k)


def test_auto_without_cuda_never_selects_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLATL2O_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from flatl2o.kernels import triton_step

    assert triton_step.available() is not None
    with pytest.raises(KernelUnavailable):
        make_kernel(_rule("l2o-dm"), torch.device("cpu"), "triton")


# ------------------------------------------------------------------- reduced-precision state
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bf16_state_halves_memory_and_resumes_exactly(backend: str) -> None:
    rule = _rule("rnnprop", scale=1.0)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def train(m, opt, steps):
        for i in steps:
            gen = torch.Generator().manual_seed(i)
            x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
            opt.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            opt.step()

    a = model()
    opt_a = L2O(a.parameters(), rule, backend=backend, state_dtype=torch.bfloat16)
    train(a, opt_a, range(3))
    for st in opt_a.state.values():
        assert all(v.dtype == torch.bfloat16 for k, v in st.items() if k != "step")
    sd = opt_a.state_dict()
    b = model()
    b.load_state_dict(a.state_dict())
    opt_b = L2O(b.parameters(), rule, backend=backend, state_dtype=torch.bfloat16)
    opt_b.load_state_dict(sd)
    for st in opt_b.state.values():  # torch would cast to the parameter's dtype: we keep bf16
        assert all(v.dtype == torch.bfloat16 for k, v in st.items() if k != "step")
    train(a, opt_a, range(3, 6))
    train(b, opt_b, range(3, 6))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    n = sum(p.numel() for p in a.parameters())
    bytes_bf16 = sum(
        v.numel() * v.element_size()
        for st in opt_a.state.values()
        for k, v in st.items()
        if k != "step"
    )
    assert bytes_bf16 == n * rule.state_floats_per_coordinate() * 2


def test_invalid_state_dtype() -> None:
    with pytest.raises(ValueError, match=r"Invalid state_dtype: torch\.float16"):
        L2O([torch.nn.Parameter(torch.zeros(2))], _rule("l2o-dm"), state_dtype=torch.float16)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("reference", marks=pytest.mark.slow)])
def test_torch_compile_of_a_training_step(backend: str) -> None:
    """``torch.compile`` of a step that calls ``opt.step()`` runs and gives eager's numbers:
    Dynamo graph-breaks around the optimizer step (ctypes/Triton launches, Python loops over
    parameters), which then runs eagerly, while the model's forward and backward compile."""
    torch._dynamo.reset()

    def run(compile_it: bool) -> Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = L2O(model.parameters(), _rule("rnnprop", scale=1.0), backend=backend)

        def step(x: Tensor, y: Tensor) -> Tensor:
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(step, backend="eager") if compile_it else step
        for i in range(3):
            gen = torch.Generator().manual_seed(i)
            fn(torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    assert torch.equal(run(True), run(False))


def test_a_compiled_closure_compiles_inside_the_step() -> None:
    """``L2O.step`` is excluded from Dynamo (``torch.compiler.disable``), but a closure the
    user compiled still runs compiled inside it."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = torch.nn.Linear(4, 1)
    counter = CompileCounter()
    forward = torch.compile(lambda x: model(x).pow(2).mean(), backend=counter)
    opt = L2O(model.parameters(), _rule("rnnprop"))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = forward(torch.randn(8, 4))
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert counter.frame_count == 1 and all(s["step"].item() == 3 for s in opt.state.values())


def test_nan_check_of_a_large_gradient_is_chunked_and_complete() -> None:
    """The NaN/inf check runs in bounded chunks (no mask of the parameter's size) and still
    sees the last element."""
    from flatl2o.distributed import FINITE_CHECK_CHUNK

    # bf16: the torch path (an fp32 CPU gradient is checked in C, test below)
    p = torch.nn.Parameter(torch.zeros(2 * FINITE_CHECK_CHUNK + 3, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    p.grad[-1] = float("nan")
    opt = L2O([p], _rule("l2o-dm"), nonfinite="raise")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        opt.step()
    assert not p.any() and not opt.state[p]


def test_compiled_finite_check_finds_every_nonfinite_value() -> None:
    """The C NaN/inf check (fp32 CPU gradients) against torch.isfinite, at every position
    kind; it declines what it does not handle, so the torch check runs instead."""
    cpu.library()
    x = torch.randn(1000)
    assert cpu.all_finite(x) is True
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 517, 999):
            y = x.clone()
            y[pos] = bad
            assert cpu.all_finite(y) is False
    f = torch.finfo(torch.float32)
    edge = torch.tensor([f.max, -f.max, f.tiny, 1e-45, 0.0, -0.0])
    assert cpu.all_finite(edge) is True
    assert cpu.all_finite(x.double()) is None
    assert cpu.all_finite(x[::2]) is None
    assert cpu.all_finite(torch.empty(0)) is True


def test_profiling_builds_apply_to_the_shipped_source(tmp_path: Path) -> None:
    """benchmarks/cpu_profile.py keeps its profiling variants as edits of cpu_step.c (the
    shipped kernel carries no profiling code); each edit still finds its place exactly once
    and every variant compiles."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpu_profile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert "PROFILE" not in cpu.SOURCE.read_text()
    for edits in cpu_profile.VARIANTS.values():
        source = cpu_profile.profiling_source(edits, tmp_path)
        assert cpu._build(("FLATL2O_PORTABLE",), source=source).flatl2o_layout() == 0
