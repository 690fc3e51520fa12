"""The layouts of a rule's LSTM weights that the fused kernels read, declared once.

:func:`pack` is the one function that lays a :class:`~flatl2o.kernels.program.RuleProgram`'s
weights out for a kernel; the CPU kernel asks for the layout its compiled library reports
(``flatl2o_layout()``), the Triton kernel for the one its launch configuration reads:

- ``"rows"``: the program's own ``[W_ih | W_hh]`` rows ``(4H, k + H)`` (gate order i, f, g,
  o) and summed biases, unscaled: the portable C build and Triton's ``"strided"`` variant.
- ``"vectors16"``: the AVX-512 / AVX2 C builds. With ``A = H // 16`` full blocks and
  ``Q = ceil((H % 16) / 4)`` tail quads, a coordinate's gates are ``NV = 4A + Q`` vectors
  of 16: vector ``4b + g`` is gate ``g`` of units ``16b .. 16b+15``; vector ``4A + s`` holds
  gate ``g`` of unit ``16A + 4s + u`` in lane ``4g + u``. Weights are ``(k + H, NV * 16)``
  (each input's column vectors together), biases ``(NV * 16,)``, the read-out ``(16A +
  16Q,)`` (each tail quad's four weights repeated four times, one copy per coordinate of a
  4-coordinate block).
- ``"tiles"``: Triton's ``"packed"`` and ``"persistent"`` variants. Per layer, input tiles
  ``(12, KP, HP)``, recurrent tiles ``(12, HP, HP)`` and biases ``(4, HP)`` (``KP``, ``HP``:
  the widths padded to powers of two), ``tile[q][k][j] = W[q*H + j][k]``, zero-padded so
  each loads contiguously. Tiles 0-3 are the weights; "3xtf32" reads their TF32-rounded
  parts from tiles 4-7 and the rounded rest from tiles 8-11.

Both packed layouts multiply gate ``g``'s rows by ``GATE_SCALES[g]``, so a kernel evaluates
every gate as ``1 / (1 + 2^t)`` of its packed pre-activation ``t`` without scaling it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from flatl2o.kernels.program import RuleProgram

#: What the packed layouts multiply gates i, f, g, o by: sigmoid(z) = 1 / (1 + 2^t) and
#: tanh(z) = (1 - 2^t) / (1 + 2^t) with t = -log2(e) z (-2 log2(e) z for the tanh gate g).
GATE_SCALES = (-math.log2(math.e), -math.log2(math.e), -2 * math.log2(math.e), -math.log2(math.e))

LAYOUTS = ("rows", "vectors16", "tiles")
#: ``flatl2o_layout()`` of a compiled CPU library -> the layout it reads (cpu_step.c).
C_LAYOUTS = {0: "rows", 1: "vectors16"}


@dataclasses.dataclass(frozen=True)
class PackedWeights:
    """A program's weights in one layout: per layer ``weights`` (the input tiles for
    ``"tiles"``), ``recurrent`` (``"tiles"`` only, else empty) and ``biases``; ``w_out``."""

    layout: str
    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    w_out: Tensor
    recurrent: tuple[Tensor, ...] = ()


def padded(width: int, floor: int = 16) -> int:
    """``width`` rounded up to a power of two, at least ``floor`` (a Triton tile's side)."""
    return max(floor, 1 << (int(width) - 1).bit_length())


def tf32_round(x: Tensor) -> Tensor:
    """fp32 ``x`` rounded to TF32 (10 mantissa bits), to nearest, ties to even."""
    bits = x.float().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192
    return bits.view(torch.float32)


def pack(program: RuleProgram, layout: str) -> PackedWeights:
    """``program``'s weights laid out as ``layout`` (see the module doc), on its device."""
    if layout == "rows":
        return PackedWeights(layout, program.layer_weights, program.layer_biases, program.w_out)
    if layout == "vectors16":
        return _vectors16(program)
    if layout == "tiles":
        return _tiles(program)
    raise ValueError(f"Invalid layout: {layout!r}; choose one of {LAYOUTS}")


def _scaled_gates(w: Tensor, b: Tensor, hidden: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Layer weights ``(4, H, k + H)`` and biases ``(4, H)`` times GATE_SCALES, computed in
    ``dtype`` (the C layout rounds once from float64; the Triton tiles scale in fp32)."""
    scales = torch.tensor(GATE_SCALES, dtype=dtype, device=w.device)
    return (
        w.to(dtype).reshape(4, hidden, -1) * scales[:, None, None],
        b.to(dtype).reshape(4, hidden) * scales[:, None],
    )


def _vectors16(program: RuleProgram) -> PackedWeights:
    h = program.hidden
    full, tail = h // 16, -(-(h % 16) // 4)
    nv = 4 * full + tail
    # slot[g, unit] = flat index (vector * 16 + lane) of gate g of a unit
    slot = torch.empty(4, h, dtype=torch.long)
    for g in range(4):
        for unit in range(h):
            b, u = divmod(unit, 16)
            if b < full:
                slot[g, unit] = (4 * b + g) * 16 + u
            else:
                s, u = divmod(unit - 16 * full, 4)
                slot[g, unit] = (4 * full + s) * 16 + 4 * g + u
    weights, biases = [], []
    for w, b in zip(program.layer_weights, program.layer_biases, strict=True):
        ws, bs = _scaled_gates(w.cpu(), b.cpu(), h, torch.float64)
        wp = torch.zeros(nv * 16, w.shape[1], dtype=torch.float64)
        wp[slot.reshape(-1)] = ws.reshape(4 * h, -1)
        weights.append(wp.t().contiguous().float())  # (k + H, NV * 16)
        bp = torch.zeros(nv * 16, dtype=torch.float64)
        bp[slot.reshape(-1)] = bs.reshape(-1)
        biases.append(bp.float())
    w_out = torch.zeros(16 * (full + tail), dtype=torch.float32)
    w_out[: 16 * full] = program.w_out[: 16 * full]
    for s in range(tail):
        quad = torch.zeros(4, dtype=torch.float32)
        units = program.w_out[16 * full + 4 * s : 16 * full + 4 * s + 4]
        quad[: units.numel()] = units
        w_out[16 * (full + s) : 16 * (full + s + 1)] = quad.repeat(4)
    return PackedWeights("vectors16", tuple(weights), tuple(biases), w_out)


def _tiles(program: RuleProgram) -> PackedWeights:
    h, hp = program.hidden, padded(program.hidden)
    inputs, recurrent, biases = [], [], []
    for w, b, k in zip(
        program.layer_weights, program.layer_biases, program.layer_inputs, strict=True
    ):
        kp = padded(k)
        gates, bias = _scaled_gates(w, b, h, w.dtype)
        wx = w.new_zeros(12, kp, hp)
        wx[:4, :k, :h] = gates[:, :, :k].transpose(1, 2)
        wh = w.new_zeros(12, hp, hp)
        wh[:4, :h, :h] = gates[:, :, k:].transpose(1, 2)
        for t in (wx, wh):
            t[4:8] = tf32_round(t[:4])
            t[8:] = tf32_round(t[:4] - t[4:8])
        bp = b.new_zeros(4, hp)
        bp[:, :h] = bias
        inputs.append(wx.contiguous())
        recurrent.append(wh.contiguous())
        biases.append(bp.contiguous())
    return PackedWeights("tiles", tuple(inputs), tuple(biases), program.w_out, tuple(recurrent))
