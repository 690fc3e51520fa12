"""The GPU fast path: a Triton kernel that does one whole rule step per block of coordinates.

Each program reads a block's gradient and recurrent state once, computes preprocessing, both
LSTM layers (gate pre-activations as small ``tl.dot`` tiles; the weights, a few KB, stay in
L1/L2) and the read-out, and writes the new state and parameter once. State may be fp32 or
bf16 (arithmetic is fp32 either way). ``TRITON_INTERPRET=1`` runs the same kernel on the CPU,
which is how CI checks it against the reference rule without a GPU.

Triton is optional: without it (or without CUDA) ``backend="auto"`` uses the reference step.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from flatl2o.kernels.errors import KernelUnavailable
from flatl2o.kernels.layout import pack, padded
from flatl2o.kernels.program import PREP_DM, RuleProgram, dm_exp_k
from flatl2o.rules import UpdateRule

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency
    triton = None
    tl = None

#: How a program gets the LSTM weights (LaunchConfig.variant): ``"strided"`` loads its gate
#: tiles from the ``[W_ih | W_hh]`` rows with strided loads (the layout last timed on an
#: H200); ``"packed"`` from tiles pre-packed on the host (layout.py: ``"tiles"``), every load
#: contiguous; ``"persistent"`` packed, on a grid of PROGRAMS_PER_SM programs per
#: multiprocessor, each looping over blocks.
VARIANTS = ("strided", "packed", "persistent")
PROGRAMS_PER_SM = 4
#: Arithmetic of the gate products (LaunchConfig.precision): ``"ieee"`` plain fp32 FMA;
#: ``"tf32x3"`` Triton's fp32-accurate use of tensor cores (both operands split into TF32
#: parts inside every ``tl.dot``); ``"3xtf32"`` the same arithmetic with the weights split
#: once on the host and each layer's inputs once per block (packed variants only);
#: ``"tf32"`` one TF32 pass (10-bit mantissa products: NOT fp32-accurate).
PRECISIONS = ("ieee", "tf32x3", "3xtf32", "tf32")
#: The environment variable that overrides the per-device defaults of every kernel built
#: while it is set (read when a kernel is built, never at import): comma-separated
#: ``name=value`` settings of LaunchConfig, e.g. ``variant=strided,precision=ieee,block=32``.
CONFIG_ENV = "FLATL2O_TRITON_CONFIG"


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is compiled and launched on one device: ``variant`` (VARIANTS),
    ``precision`` (PRECISIONS), ``block`` coordinates and ``warps`` warps per program,
    ``maxnreg`` the register cap passed to ptxas (0 leaves it to ptxas, which often settles
    on 32 registers for this kernel and spills 5-9 KB per thread:
    benchmarks/triton_resources.py)."""

    variant: str
    precision: str
    block: int
    warps: int
    maxnreg: int


_SETTINGS = {f.name: f.type for f in dataclasses.fields(LaunchConfig)}


def default_config(device: torch.device) -> LaunchConfig:
    """The configuration for ``device`` when nothing is overridden. Defaults chosen WITHOUT
    timing them on a GPU, from the kernel compiled for sm_90
    (benchmarks/triton_resources.py): GPUs with TF32 tensor cores (compute capability 8.0+)
    get "3xtf32" on 64 coordinates x 4 warps with a 168-register cap (about 5,200
    instructions per coordinate, 136 B of spills, 12 resident warps per SM: the no-stall
    bound is the H200's bandwidth floor; without the cap, 213 registers and 8 warps per SM,
    the occupancy at which the previous kernel ran 6-10x its bound); older GPUs fp32 FMA on
    32 x 2 with a 255 cap (about 19,100 instructions: at most 27% of copy bandwidth).
    benchmarks/gpu.sh times these against the alternatives."""
    return launch_config(device, _environment=False)


def launch_config(
    device: torch.device,
    *,
    variant: str | None = None,
    precision: str | None = None,
    block: int | None = None,
    warps: int | None = None,
    maxnreg: int | None = None,
    _environment: bool = True,
) -> LaunchConfig:
    """The configuration a kernel on ``device`` is built with: the settings given here, then
    those of ``$FLATL2O_TRITON_CONFIG`` (CONFIG_ENV), then the device's defaults
    (default_config; block, warps and register cap follow the precision). Invalid settings
    raise ValueError naming the setting and where it came from."""
    given = {
        k: v
        for k, v in dict(
            variant=variant, precision=precision, block=block, warps=warps, maxnreg=maxnreg
        ).items()
        if v is not None
    }
    env = _environment_settings() if _environment else {}
    source = {k: "the argument" for k in given} | {
        k: f"${CONFIG_ENV}" for k in env if k not in given
    }
    s = {**env, **given}
    if "precision" not in s:
        tensor_cores = (  # TF32 on NVIDIA; AMD GPUs take fp32 FMA
            device.type == "cuda"
            and not _amd()
            and torch.cuda.get_device_capability(device) >= (8, 0)
        )
        s["precision"] = "3xtf32" if tensor_cores else "ieee"
    fp32_fma = s["precision"] == "ieee"
    config = LaunchConfig(
        variant=s.get("variant", "packed"),
        precision=s["precision"],
        block=s.get("block", 32 if fp32_fma else 64),
        warps=s.get("warps", 2 if fp32_fma else 4),
        maxnreg=s.get("maxnreg", 255 if fp32_fma else 168),
    )

    def bad(name: str, rule: str) -> ValueError:
        where = source.get(name, "the default")
        return ValueError(
            f"Invalid Triton launch setting {name}={getattr(config, name)!r} (from {where}): {rule}"
        )

    if config.variant not in VARIANTS:
        raise bad("variant", f"choose one of {VARIANTS}")
    if config.precision not in PRECISIONS:
        raise bad("precision", f"choose one of {PRECISIONS}")
    if config.precision == "3xtf32" and config.variant == "strided":
        raise bad("precision", "'3xtf32' needs the packed or persistent variant")
    if config.block < 16 or config.block & (config.block - 1):
        raise bad("block", "use a power of two >= 16")
    if config.warps < 1 or config.warps & (config.warps - 1):
        raise bad("warps", "use a power of two")
    if not 0 <= config.maxnreg <= 255:
        raise bad("maxnreg", "use 0 (ptxas decides) up to 255")
    return config


def _environment_settings() -> dict[str, str | int]:
    """The settings of ``$FLATL2O_TRITON_CONFIG`` (empty when it is unset or blank)."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    settings: dict[str, str | int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or name not in _SETTINGS:
            raise ValueError(
                f"Invalid ${CONFIG_ENV} item {item!r}: write name=value pairs separated by "
                f"commas, names from {tuple(_SETTINGS)}, or unset it"
            )
        if _SETTINGS[name] in (int, "int"):
            try:
                settings[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"Invalid ${CONFIG_ENV} item {item!r}: {name} takes an integer"
                ) from None
        else:
            settings[name] = value
    return settings


def _has_maxnreg() -> bool:
    """Whether this Triton's CUDA backend takes a ``maxnreg`` option (Triton >= 3.1)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


_HAS_MAXNREG = triton is not None and _has_maxnreg()


def _amd() -> bool:
    """A ROCm build of torch: its GPUs are device type "cuda" but take no PTX and no ptxas
    options."""
    return torch.version.hip is not None


if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    #: Cap on the exponents t of tanh's ``(1 - 2^t) / (1 + 2^t)`` (gate g, and c for h): it
    #: keeps ``1 - 2^t`` finite, and a product ``(1 + 2^t_i)(1 + 2^t_g)`` (likewise o, c)
    #: can then overflow only when the sigmoid factor is below 2^-65, so its reciprocal's 0
    #: is right to fp32 precision. Sigmoid-only exponents need no cap: 2^t = inf gives 0.
    T_MAX = tl.constexpr(63.0)

    @triton.jit
    def _tanh(x):
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _ex2(x, FAST: tl.constexpr):
        """2^x: on a GPU one ``ex2.approx.ftz`` instruction (plain ``exp2`` adds range fix-ups
        for results below 2^-126, which only ever feed ``1 + 2^x`` here)."""
        if FAST:
            return tl.inline_asm_elementwise(
                "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            return tl.exp2(x)

    @triton.jit
    def _rcp(x, FAST: tl.constexpr):
        """1/x for x >= 1: on a GPU one ``rcp.approx.ftz`` instruction (1 ulp; ``1.0 / x``
        compiles to a division with range checks and scaling)."""
        if FAST:
            return tl.inline_asm_elementwise(
                "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
            )
        else:
            return 1.0 / x

    @triton.jit
    def _strided_tile(
        w_ptr, ldw, row0, col0, K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, HP: tl.constexpr
    ):
        """W[row0 : row0 + H, col0 : col0 + K] transposed into a zero-padded (KP, HP) tile."""
        k = tl.arange(0, KP)[:, None]
        j = tl.arange(0, HP)[None, :]
        return tl.load(w_ptr + (row0 + j) * ldw + col0 + k, mask=(k < K) & (j < H), other=0.0)

    @triton.jit
    def _packed_tile(t_ptr, q, KP: tl.constexpr, HP: tl.constexpr):
        """Tile ``q`` of a packed (tiles, KP, HP) tensor: one contiguous, unmasked load."""
        k = tl.arange(0, KP)[:, None]
        j = tl.arange(0, HP)[None, :]
        return tl.load(t_ptr + q * KP * HP + k * HP + j)

    @triton.jit
    def _tf32_split(x):
        """``(big, small)`` with ``big + small == x`` exactly and both rounded to TF32's 10
        mantissa bits: a tensor core multiplies them as given, so three TF32 products
        (big*big + big*small + small*big) are as accurate as fp32 (3xTF32)."""
        big = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
        small = x - big
        small = ((small.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
        return big, small

    @triton.jit
    def _dot_tiles(
        a, t_ptr, q: tl.constexpr, acc, KP: tl.constexpr, HP: tl.constexpr, PREC: tl.constexpr
    ):
        """``acc + a @ tile q`` of a packed tensor (layout.py: "tiles"). "3xtf32": ``a`` is its
        _tf32_split, multiplied with the weights' TF32 parts (tiles q + 4 and q + 8)."""
        if PREC == "3xtf32":
            a_big, a_small = a
            w_big = _packed_tile(t_ptr, q + 4, KP, HP)
            w_small = _packed_tile(t_ptr, q + 8, KP, HP)
            acc = tl.dot(a_big, w_small, acc=acc, input_precision="tf32")
            acc = tl.dot(a_small, w_big, acc=acc, input_precision="tf32")
            return tl.dot(a_big, w_big, acc=acc, input_precision="tf32")
        else:
            return tl.dot(a, _packed_tile(t_ptr, q, KP, HP), acc=acc, input_precision=PREC)

    @triton.jit
    def _gate(
        x,
        h,
        q: tl.constexpr,
        w_ptr,
        b_ptr,
        wx_ptr,
        wh_ptr,
        bp_ptr,
        K: tl.constexpr,
        KP: tl.constexpr,
        H: tl.constexpr,
        HP: tl.constexpr,
        PACKED: tl.constexpr,
        PREC: tl.constexpr,
        RANK1: tl.constexpr,
    ):
        """Gate ``q`` (0..3 = i, f, g, o) as the exponent ``t`` of ``sigmoid = 1 / (1 + 2^t)``
        (``tanh = (1 - 2^t) / (1 + 2^t)`` for g): ``z = x W_ih[q]^T + h W_hh[q]^T + b[q]``
        times -log2(e) (-2 log2(e) for g; capped at T_MAX). Packed tiles come pre-scaled
        (layout.py: "tiles"); strided ones are scaled here. Weights are loaded just before use (from
        L1/L2: a layer's are a few KB). With RANK1, ``x`` is L2O-DM's two input columns
        ``(x0, x1)``, added as two outer products instead of a dot over 16 zero-padded
        columns."""
        j = tl.arange(0, HP)
        if PACKED:
            b = tl.load(bp_ptr + q * HP + j)
        else:
            b = tl.load(b_ptr + q * H + j, mask=j < H, other=0.0)
        if RANK1:
            x0, x1 = x
            if PACKED:
                w0 = tl.load(wx_ptr + q * KP * HP + j)
                w1 = tl.load(wx_ptr + q * KP * HP + HP + j)
            else:
                w0 = tl.load(w_ptr + (q * H + j) * (K + H), mask=j < H, other=0.0)
                w1 = tl.load(w_ptr + (q * H + j) * (K + H) + 1, mask=j < H, other=0.0)
            z = b[None, :] + x0[:, None] * w0[None, :] + x1[:, None] * w1[None, :]
        elif PACKED:
            z = _dot_tiles(x, wx_ptr, q, None, KP, HP, PREC) + b[None, :]
        else:
            tx = _strided_tile(w_ptr, K + H, q * H, 0, K, KP, H, HP)
            z = tl.dot(x, tx, input_precision=PREC) + b[None, :]
        if PACKED:
            t = _dot_tiles(h, wh_ptr, q, z, HP, HP, PREC)
        else:
            th = _strided_tile(w_ptr, K + H, q * H, K, H, HP, H, HP)
            t = tl.dot(h, th, acc=z, input_precision=PREC)
        if not PACKED:
            t = t * (-2.0 * LOG2E if q == 2 else -LOG2E)
        if q == 2:
            t = tl.minimum(t, T_MAX)
        return t

    @triton.jit
    def _lstm_layer(
        x,
        h,
        c,
        w_ptr,
        b_ptr,
        wx_ptr,
        wh_ptr,
        bp_ptr,
        K: tl.constexpr,
        KP: tl.constexpr,
        H: tl.constexpr,
        HP: tl.constexpr,
        PACKED: tl.constexpr,
        PREC: tl.constexpr,
        RANK1: tl.constexpr,
        FAST: tl.constexpr,
    ):
        """One LSTM cell on a block: x (B, KP) (or L2O-DM's (x0, x1) with RANK1), h and c
        (B, HP) -> new h, new c. The gates are computed one at a time (f, i, g, o), each
        folded into c or h at once, so only one gate pre-activation is live (the
        four-at-once form spilled registers). With e = 2^t per gate, sigmoid(i) * tanh(g) is
        (1 - e_g) / ((1 + e_i)(1 + e_g)) and sigmoid(o) * tanh(c) likewise: one reciprocal
        each, three per unit instead of five divisions (the exp/rcp unit bounds the kernel
        next to instruction issue: benchmarks/triton_resources.py). Padding units stay 0.
        With "3xtf32" the inputs are split into TF32 parts once here, not once per gate."""
        if PREC == "3xtf32":
            h = _tf32_split(h)
            if not RANK1:
                x = _tf32_split(x)
        zf = _gate(x, h, 1, w_ptr, b_ptr, wx_ptr, wh_ptr, bp_ptr, K, KP, H, HP, PACKED, PREC, RANK1)
        ef = _ex2(zf, FAST)
        c = c * _rcp(1.0 + ef, FAST)
        zi = _gate(x, h, 0, w_ptr, b_ptr, wx_ptr, wh_ptr, bp_ptr, K, KP, H, HP, PACKED, PREC, RANK1)
        ei = _ex2(zi, FAST)
        zg = _gate(x, h, 2, w_ptr, b_ptr, wx_ptr, wh_ptr, bp_ptr, K, KP, H, HP, PACKED, PREC, RANK1)
        eg = _ex2(zg, FAST)
        c += (1.0 - eg) * _rcp((1.0 + ei) * (1.0 + eg), FAST)
        zo = _gate(x, h, 3, w_ptr, b_ptr, wx_ptr, wh_ptr, bp_ptr, K, KP, H, HP, PACKED, PREC, RANK1)
        eo = _ex2(zo, FAST)
        ec = _ex2(tl.minimum(c * (-2.0 * LOG2E), T_MAX), FAST)
        return (1.0 - ec) * _rcp((1.0 + eo) * (1.0 + ec), FAST), c

    @triton.jit
    def _zero_bits(x):
        """Per element: exactly +0.0 (bits all zero: the initial state)."""
        return x.to(tl.float32).to(tl.int32, bitcast=True) == 0

    @triton.jit
    def _zero_rows(ptr, soff, mask):
        """Per row: all of ``ptr[soff]`` (masked) is exactly +0.0."""
        x = tl.load(ptr + soff, mask=mask, other=0.0)
        return tl.sum((~_zero_bits(x)).to(tl.int32), axis=1) == 0

    @triton.jit
    def _block(
        blk,
        grad_ptr,
        param_ptr,
        n,
        lr,
        negate,
        m_ptr,
        v_ptr,
        h0_ptr,
        c0_ptr,
        h1_ptr,
        c1_ptr,
        win_ptr,
        bin_ptr,
        wout_ptr,
        b_out,
        scale,
        dm_inv_k,
        dm_eps,
        dm_exp_k,
        beta1,
        beta2,
        inv_bc1,
        inv_bc2,
        rp_eps,
        w0_ptr,
        b0_ptr,
        w1_ptr,
        b1_ptr,
        wx0_ptr,
        wh0_ptr,
        bp0_ptr,
        wx1_ptr,
        wh1_ptr,
        bp1_ptr,
        PREP: tl.constexpr,
        LAYERS: tl.constexpr,
        H: tl.constexpr,
        HP: tl.constexpr,
        I: tl.constexpr,  # noqa: E741
        IP: tl.constexpr,
        OUT_TANH: tl.constexpr,
        BLOCK: tl.constexpr,
        PREC: tl.constexpr,
        PACKED: tl.constexpr,
        FAST: tl.constexpr,
    ):
        """The whole step for block ``blk`` of BLOCK coordinates."""
        rows = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        rm = rows < n
        j = tl.arange(0, HP)
        sm = rm[:, None] & (j < H)[None, :]
        soff = rows[:, None] * H + j[None, :]

        g = tl.load(grad_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        g = tl.where(negate != 0, -g, g)

        # the zero-gradient contract (flatl2o.kernels.reference.untouched): a coordinate with
        # a zero gradient and an all-(+0.0) state is left as it is, so nothing of it is stored;
        # its state is read here only for zero gradients (masked loads)
        keep = (g == 0.0) & rm
        if PREP != 0:
            keep = keep & _zero_bits(tl.load(m_ptr + rows, mask=keep, other=0.0))
            keep = keep & _zero_bits(tl.load(v_ptr + rows, mask=keep, other=0.0))
        hm = keep[:, None] & (j < H)[None, :]
        keep = keep & _zero_rows(h0_ptr, soff, hm) & _zero_rows(c0_ptr, soff, hm)
        if LAYERS == 2:
            keep = keep & _zero_rows(h1_ptr, soff, hm) & _zero_rows(c1_ptr, soff, hm)
        go = rm & ~keep  # the coordinates that take the step
        sg = go[:, None] & (j < H)[None, :]

        # ---- preprocessing: the input of layer 0 ----
        if PREP == 0:  # L2O-DM: [clamp(log(|g|+eps)/k, min=-1), clamp(g*e^k, -1, 1)]
            x0 = tl.maximum(tl.log(tl.abs(g) + dm_eps) * dm_inv_k, -1.0)
            x1 = tl.minimum(tl.maximum(g * dm_exp_k, -1.0), 1.0)
            x = (x0, x1)  # two columns: outer products, not a dot (see _gate)
        else:  # RNNprop: moving averages, normalized inputs, ELU input layer
            m = tl.load(m_ptr + rows, mask=rm, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + rows, mask=rm, other=0.0).to(tl.float32)
            m = beta1 * m + (1.0 - beta1) * g
            v = beta2 * v + (1.0 - beta2) * g * g
            tl.store(m_ptr + rows, m.to(m_ptr.dtype.element_ty), mask=go)
            tl.store(v_ptr + rows, v.to(v_ptr.dtype.element_ty), mask=go)
            d = tl.sqrt(v * inv_bc2) + rp_eps
            x0 = m * inv_bc1 / d
            x1 = g / d
            ci = tl.arange(0, IP)
            cim = ci < I
            wa = tl.load(win_ptr + 2 * ci, mask=cim, other=0.0)
            wb = tl.load(win_ptr + 2 * ci + 1, mask=cim, other=0.0)
            bi = tl.load(bin_ptr + ci, mask=cim, other=0.0)
            u = x0[:, None] * wa[None, :] + x1[:, None] * wb[None, :] + bi[None, :]
            x = tl.where(u > 0.0, u, tl.exp(u) - 1.0)

        # ---- LSTM stack ----
        h = tl.load(h0_ptr + soff, mask=sm, other=0.0).to(tl.float32)
        c = tl.load(c0_ptr + soff, mask=sm, other=0.0).to(tl.float32)
        h, c = _lstm_layer(
            x, h, c, w0_ptr, b0_ptr, wx0_ptr, wh0_ptr, bp0_ptr, I, IP, H, HP, PACKED, PREC,
            PREP == 0, FAST,
        )  # fmt: skip
        tl.store(h0_ptr + soff, h.to(h0_ptr.dtype.element_ty), mask=sg)
        tl.store(c0_ptr + soff, c.to(c0_ptr.dtype.element_ty), mask=sg)
        if LAYERS == 2:
            h2 = tl.load(h1_ptr + soff, mask=sm, other=0.0).to(tl.float32)
            c2 = tl.load(c1_ptr + soff, mask=sm, other=0.0).to(tl.float32)
            h, c = _lstm_layer(
                h, h2, c2, w1_ptr, b1_ptr, wx1_ptr, wh1_ptr, bp1_ptr, H, HP, H, HP, PACKED, PREC,
                False, FAST,
            )  # fmt: skip
            tl.store(h1_ptr + soff, h.to(h1_ptr.dtype.element_ty), mask=sg)
            tl.store(c1_ptr + soff, c.to(c1_ptr.dtype.element_ty), mask=sg)

        # ---- read-out and update ----
        wo = tl.load(wout_ptr + j, mask=j < H, other=0.0)
        out = tl.sum(h * wo[None, :], axis=1) + b_out
        if OUT_TANH:
            out = _tanh(out)
        out = out * scale
        p = tl.load(param_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        tl.store(param_ptr + rows, (p - lr * out).to(param_ptr.dtype.element_ty), mask=go)

    @triton.jit
    def _step_kernel(
        grad_ptr,
        param_ptr,
        n,
        lr,
        negate,
        m_ptr,
        v_ptr,
        h0_ptr,
        c0_ptr,
        h1_ptr,
        c1_ptr,
        w0_ptr,
        b0_ptr,
        w1_ptr,
        b1_ptr,
        wx0_ptr,
        wh0_ptr,
        bp0_ptr,
        wx1_ptr,
        wh1_ptr,
        bp1_ptr,
        win_ptr,
        bin_ptr,
        wout_ptr,
        b_out,
        scale,
        dm_inv_k,
        dm_eps,
        dm_exp_k,
        beta1,
        beta2,
        inv_bc1,
        inv_bc2,
        rp_eps,
        iters,
        nprog,
        PREP: tl.constexpr,
        LAYERS: tl.constexpr,
        H: tl.constexpr,
        HP: tl.constexpr,
        I: tl.constexpr,  # noqa: E741
        IP: tl.constexpr,
        OUT_TANH: tl.constexpr,
        BLOCK: tl.constexpr,
        PREC: tl.constexpr,
        PACKED: tl.constexpr,
        FAST: tl.constexpr,
    ):
        # block pid, then (persistent grid) every nprog-th block after it; a while loop,
        # which Triton's interpreter runs too; blocks past the end are fully masked
        pid = tl.program_id(0)
        it = 0
        while it < iters:
            _block(
                pid + it * nprog, grad_ptr, param_ptr, n, lr, negate, m_ptr, v_ptr, h0_ptr,
                c0_ptr, h1_ptr, c1_ptr, win_ptr, bin_ptr, wout_ptr, b_out, scale, dm_inv_k,
                dm_eps, dm_exp_k, beta1, beta2, inv_bc1, inv_bc2, rp_eps, w0_ptr, b0_ptr,
                w1_ptr, b1_ptr, wx0_ptr, wh0_ptr, bp0_ptr, wx1_ptr, wh1_ptr, bp1_ptr, PREP,
                LAYERS, H, HP, I, IP, OUT_TANH, BLOCK, PREC, PACKED, FAST,
            )  # fmt: skip
            it += 1


#: Coordinates of TritonKernel.verify's check (not a multiple of any block size).
VERIFY_COORDS = 4099
_VERIFIED: set[tuple] = set()


def _excess(x: Tensor, ref: Tensor, tol: float) -> float:
    """The largest ``|x - ref| / (tol * (1 + |ref|))``: above 1 means out of tolerance
    (NaN counts as out)."""
    err = (x.float() - ref.float()).abs() / (tol * (1 + ref.float().abs()))
    return float(torch.nan_to_num(err, nan=float("inf")).max())


def plain_math() -> bool:
    """Whether launches here use plain exp2 / division instead of the one-instruction PTX
    forms: in Triton's CPU interpreter (no inline assembly) and on AMD GPUs (no PTX)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or _amd()


def launch_constexprs(program: RuleProgram, config: LaunchConfig, plain: bool) -> dict:
    """The kernel's compile-time arguments for ``program`` under ``config``; ``plain``: see
    plain_math."""
    inputs = 2 if program.prep == PREP_DM else program.w_in.shape[0]
    return dict(
        PREP=program.prep,
        LAYERS=program.layers,
        H=program.hidden,
        HP=padded(program.hidden),
        I=inputs,
        IP=padded(inputs),
        OUT_TANH=program.out_tanh,
        BLOCK=config.block,
        PREC=config.precision,
        PACKED=config.variant != "strided",
        FAST=not plain,
    )


def available() -> str | None:
    """``None`` when the Triton kernel can run, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on the CPU for testing)"
    return None


class TritonKernel:
    """Runs a :class:`RuleProgram` with the Triton kernel on one device."""

    name = "triton"

    def __init__(
        self, program: RuleProgram, device: torch.device, config: LaunchConfig | None = None
    ) -> None:
        """``config``: how to compile and launch it; default :func:`launch_config` (the
        device's defaults, or ``$FLATL2O_TRITON_CONFIG``'s settings when that is set)."""
        why = available()
        if why is not None:
            raise KernelUnavailable(why)
        if program.layers not in (1, 2):
            raise KernelUnavailable(
                f"the Triton kernel supports 1 or 2 LSTM layers, not {program.layers}"
            )
        if program.hidden > 128:
            raise KernelUnavailable("the Triton kernel supports hidden sizes up to 128")
        self.program = program.to(device)
        self.device = device
        self.config = launch_config(device) if config is None else config
        self.constexprs = launch_constexprs(self.program, self.config, plain_math())
        # both layouts: the strided variant reads the rows, the packed ones the tiles
        self.rows = pack(self.program, "rows")
        tiles = pack(self.program, "tiles")
        self.tiles = list(zip(tiles.weights, tiles.recurrent, tiles.biases, strict=True))
        self.last_compiled = None  # the compiled kernel of the last launch (registers, spills)

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        step: int,
        lr: float,
        maximize: bool,
        chunk_size: int,
    ) -> None:
        """``param -= lr * rule(grad)`` in place; ``param``/``grad`` 1-D, state rows updated."""
        p = self.program
        if step < 1:
            raise ValueError(f"step must be >= 1 (1-based step index), got {step}")
        for k in p.state_names():
            s = state[k]
            if not s.is_contiguous() or s.dtype not in (torch.float32, torch.bfloat16):
                raise KernelUnavailable(f"state {k!r} is not a contiguous fp32/bf16 tensor")
        if not (param.is_contiguous() and grad.is_contiguous()):
            raise KernelUnavailable("param and grad must be contiguous")
        if param.dtype == torch.float64:
            raise KernelUnavailable("fp64 parameters use the reference step")
        n = param.numel()
        if n == 0:
            return
        dm = p.prep == PREP_DM
        h1 = state["h1"] if p.layers == 2 else state["h0"]
        c1 = state["c1"] if p.layers == 2 else state["c0"]
        rows = self.rows
        w1 = rows.weights[1] if p.layers == 2 else rows.weights[0]
        b1 = rows.biases[1] if p.layers == 2 else rows.biases[0]
        dummy = p.w_out
        cfg = self.config
        blocks = triton.cdiv(n, cfg.block)
        persistent = cfg.variant == "persistent"
        grid = (min(blocks, self._programs()) if persistent else blocks,)
        tiles0 = self.tiles[0]
        tiles1 = self.tiles[1] if p.layers == 2 else self.tiles[0]
        self.last_compiled = _step_kernel[grid](
            grad,
            param,
            n,
            float(lr),
            int(maximize),
            dummy if dm else state["m"],
            dummy if dm else state["v"],
            state["h0"],
            state["c0"],
            h1,
            c1,
            rows.weights[0],
            rows.biases[0],
            w1,
            b1,
            *tiles0,
            *tiles1,
            dummy if dm else p.w_in,
            dummy if dm else p.b_in,
            p.w_out,
            p.b_out,
            p.scale,
            1.0 / p.dm_k,
            p.dm_eps,
            dm_exp_k(p) if dm else 1.0,
            p.beta1,
            p.beta2,
            1.0 if dm else 1.0 / (1.0 - p.beta1**step),
            1.0 if dm else 1.0 / (1.0 - p.beta2**step),
            p.rp_eps,
            triton.cdiv(blocks, grid[0]) if persistent else 1,  # iters
            grid[0],  # nprog
            **self.constexprs,
            num_warps=cfg.warps,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and _HAS_MAXNREG and not _amd() else {}),
        )

    def verify(self, rule: UpdateRule, n: int = VERIFY_COORDS) -> None:
        """Check this kernel against the reference rule module once per device,
        configuration and kernel shape: two steps on ``n`` coordinates (a partial last
        block) from a random state, with gradients spread over 9 decades. Raises
        :class:`KernelUnavailable` with the worst differences when they exceed fp32-level
        tolerances (TF32's when ``precision="tf32"``): CI runs this GPU code only in
        Triton's interpreter, so a GPU it has never run on gets checked before use."""
        from flatl2o.kernels.accuracy import check_inputs, contract_violations
        from flatl2o.kernels.reference import ReferenceKernel

        key = (str(self.device), self.config, tuple(sorted(self.constexprs.items())))
        if key in _VERIFIED:
            return
        grad, state, param = check_inputs(rule, n, seed=0)
        grad, param = grad.to(self.device), param.to(self.device)
        state = {k: v.to(self.device) for k, v in state.items()}
        ref_state = {k: v.clone() for k, v in state.items()}
        ref_param = param.clone()
        ref = ReferenceKernel(rule)
        for step in (1, 2):
            try:
                self.update(param, grad, state, step, 0.5, step == 2, 0)
            except KernelUnavailable:
                raise
            except Exception as e:  # compiler or driver: this GPU / Triton cannot run it
                raise KernelUnavailable(
                    f"the Triton kernel ({self.config}) failed to compile or run on "
                    f"{self.device}: {type(e).__name__}: {str(e)[:500]}"
                ) from e
            ref.update(ref_param, grad, ref_state, step, 0.5, step == 2, 1 << 16)
        tol = 1e-2 if self.config.precision == "tf32" else 1e-4
        worst = {"param": _excess(param, ref_param, tol / 10)}
        worst.update((k, _excess(state[k], ref_state[k], tol)) for k in state)
        bad = {k: v for k, v in worst.items() if v > 1}
        if bad:
            what = ", ".join(f"{k} off by {v:.3g}x the tolerance" for k, v in bad.items())
            raise KernelUnavailable(
                f"the Triton kernel ({self.config}) disagrees with the reference rule on "
                f"{self.device}: {what} - please report this with your GPU model; "
                "backend='reference' is correct"
            )
        broken = contract_violations(self, rule, device=self.device)
        if broken:
            raise KernelUnavailable(
                f"the Triton kernel ({self.config}) breaks the zero-gradient contract on "
                f"{self.device}: {'; '.join(broken)} - please report this with your GPU "
                "model; backend='reference' is correct"
            )
        _VERIFIED.add(key)

    def _programs(self) -> int:
        """Programs of the persistent grid: PROGRAMS_PER_SM per multiprocessor (2 without a
        GPU, so Triton's interpreter still runs the loop)."""
        if self.device.type != "cuda":
            return 2
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return PROGRAMS_PER_SM * sms
