"""The Triton kernel itself: the ``@triton.jit`` source of one whole rule step per block of
coordinates (:data:`step_kernel`), launched by :class:`flatl2o.kernels.triton_step.TritonKernel`.

Each program reads a block's gradient and recurrent state once, computes preprocessing, both
LSTM layers (gate pre-activations as small ``tl.dot`` tiles; the weights, a few KB, stay in
L1/L2) and the read-out, and writes the new state and parameter once. State may be fp32 or
bf16 (arithmetic is fp32 either way). ``TRITON_INTERPRET=1`` runs the same kernel on the CPU.
Its compile-time arguments come from :func:`flatl2o.kernels.triton_config.launch_constexprs`.

NormProp's update is normalized per tensor, so its step is two launches: :data:`step_kernel`
updates the state and writes each coordinate's direction and each block's partial sums, the
host sums the partials in a fixed order, and :data:`normprop_apply_kernel` moves the
parameters.

Triton is optional: this is the one module that imports it; without it ``triton``,
``step_kernel`` and ``normprop_apply_kernel`` are None.
"""

from __future__ import annotations

from flatl2o.rules.normprop import TINY as NORMPROP_TINY

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency
    triton = None
    tl = None

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)
    #: Cap on the exponents t of tanh's ``(1 - 2^t) / (1 + 2^t)`` (gate g, and c for h): it
    #: keeps ``1 - 2^t`` finite, and a product ``(1 + 2^t_i)(1 + 2^t_g)`` (likewise o, c)
    #: can then overflow only when the sigmoid factor is below 2^-65, so its reciprocal's 0
    #: is right to fp32 precision. Sigmoid-only exponents need no cap: 2^t = inf gives 0.
    T_MAX = tl.constexpr(63.0)
    #: NormProp's TINY (added under the roots of its per-tensor means), as the rule has it.
    TINY = tl.constexpr(NORMPROP_TINY)
    #: The bits of -0.0, which marks a coordinate the zero-gradient contract keeps in NormProp's
    #: directions: no direction is -0.0 (``_tanh`` ends in ``r - 1.0``, and an exact zero
    #: difference is +0.0), and a kept coordinate must not move even when the scale is not
    #: finite.
    KEPT_BITS = tl.constexpr(-(2**31))

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
    def _normprop_partials(
        blk, dirn, adam, gh, go, rm, rows, n, dir_ptr, part_ptr, BLOCK: tl.constexpr
    ):
        """NormProp's first pass, after the state update: the directions go to ``dir_ptr``
        (a kept coordinate's as KEPT), and row ``blk`` of the ``(blocks, 4)`` partial sums
        ``part_ptr`` gets the block's sums over the counted coordinates (``go``) of d^2,
        Adam's step squared and the gain head, and their number. The tensor's sums are
        then taken by the host from the partials in a fixed order (no atomics)."""
        kept = tl.full([BLOCK], KEPT_BITS, tl.int32).to(tl.float32, bitcast=True)
        tl.store(dir_ptr + rows, tl.where(go, dirn, kept), mask=rm)
        s_dd = tl.sum(tl.where(go, dirn * dirn, 0.0), axis=0)
        s_aa = tl.sum(tl.where(go, adam * adam, 0.0), axis=0)
        s_gh = tl.sum(tl.where(go, gh, 0.0), axis=0)
        s_n = tl.sum(go.to(tl.float32), axis=0)
        q = tl.arange(0, 4)
        part = tl.where(q == 0, s_dd, tl.where(q == 1, s_aa, tl.where(q == 2, s_gh, s_n)))
        # a persistent program's blocks past the end have no row
        tl.store(part_ptr + blk.to(tl.int64) * 4 + q, part, mask=blk.to(tl.int64) * BLOCK < n)

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
        ms_ptr,
        beta_slow,
        inv_bc_slow,
        adam_skip,
        wgain_ptr,
        b_gain,
        dir_ptr,
        part_ptr,
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
        if PREP == 2:
            keep = keep & _zero_bits(tl.load(ms_ptr + rows, mask=keep, other=0.0))
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
        else:  # RNNprop and NormProp: moving averages, normalized inputs, ELU input layer
            # (NormProp: m is m_fast, and x0 Adam's step; its inputs are x0, m_slow's, x1)
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
            bi = tl.load(bin_ptr + ci, mask=cim, other=0.0)
            if PREP == 2:  # w_in is (I, 3)
                ms = tl.load(ms_ptr + rows, mask=rm, other=0.0).to(tl.float32)
                ms = beta_slow * ms + (1.0 - beta_slow) * g
                tl.store(ms_ptr + rows, ms.to(ms_ptr.dtype.element_ty), mask=go)
                wa = tl.load(win_ptr + 3 * ci, mask=cim, other=0.0)
                wm = tl.load(win_ptr + 3 * ci + 1, mask=cim, other=0.0)
                wb = tl.load(win_ptr + 3 * ci + 2, mask=cim, other=0.0)
                xm = ms * inv_bc_slow / d
                u = x0[:, None] * wa[None, :] + xm[:, None] * wm[None, :]
                u += x1[:, None] * wb[None, :] + bi[None, :]
            else:  # w_in is (I, 2)
                wa = tl.load(win_ptr + 2 * ci, mask=cim, other=0.0)
                wb = tl.load(win_ptr + 2 * ci + 1, mask=cim, other=0.0)
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
        if PREP == 2:  # NormProp's first pass: the direction and the block's sums
            dirn = _tanh(adam_skip * x0 + out)
            wg = tl.load(wgain_ptr + j, mask=j < H, other=0.0)
            gh = tl.sum(h * wg[None, :], axis=1) + b_gain
            _normprop_partials(blk, dirn, x0, gh, go, rm, rows, n, dir_ptr, part_ptr, BLOCK)
        else:
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
        ms_ptr,
        beta_slow,
        inv_bc_slow,
        adam_skip,
        wgain_ptr,
        b_gain,
        dir_ptr,
        part_ptr,
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
                dm_eps, dm_exp_k, beta1, beta2, inv_bc1, inv_bc2, rp_eps, ms_ptr, beta_slow,
                inv_bc_slow, adam_skip, wgain_ptr, b_gain, dir_ptr, part_ptr, w0_ptr, b0_ptr,
                w1_ptr, b1_ptr, wx0_ptr, wh0_ptr, bp0_ptr, wx1_ptr, wh1_ptr, bp1_ptr, PREP,
                LAYERS, H, HP, I, IP, OUT_TANH, BLOCK, PREC, PACKED, FAST,
            )  # fmt: skip
            it += 1

    @triton.jit
    def _normprop_apply_kernel(
        param_ptr, dir_ptr, tot_ptr, n, lr, scale, log_gain_bound, BLOCK: tl.constexpr
    ):
        """NormProp's second pass: ``param -= lr * scale_T * d`` with the tensor's scale
        ``output_scale * rms(adam) * gain / rms(d)`` from the sums ``tot_ptr`` (fp64: d^2,
        adam^2, gain head, count) as :meth:`flatl2o.rules.NormProp.finish` computes it (the
        count clamped to 1, TINY under the roots). Coordinates marked KEPT do not move."""
        count = tl.maximum(tl.load(tot_ptr + 3), 1.0)
        mean_dd = (tl.load(tot_ptr) / count).to(tl.float32)
        mean_aa = (tl.load(tot_ptr + 1) / count).to(tl.float32)
        mean_gh = (tl.load(tot_ptr + 2) / count).to(tl.float32)
        gain = tl.exp(log_gain_bound * _tanh(mean_gh))
        s = scale * (tl.sqrt(mean_aa + TINY) * gain / tl.sqrt(mean_dd + TINY))
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        dirn = tl.load(dir_ptr + rows, mask=rows < n, other=0.0)
        go = (rows < n) & (dirn.to(tl.int32, bitcast=True) != KEPT_BITS)
        p = tl.load(param_ptr + rows, mask=go, other=0.0).to(tl.float32)
        tl.store(param_ptr + rows, (p - lr * (s * dirn)).to(param_ptr.dtype.element_ty), mask=go)

    #: NormProp's second pass (one program per NORMPROP_APPLY_BLOCK coordinates).
    normprop_apply_kernel = _normprop_apply_kernel

    #: The kernel: one launch does one step of every coordinate (grid: one program per block,
    #: or the persistent variant's fixed number of programs looping over blocks).
    step_kernel = _step_kernel
else:
    step_kernel = None
    normprop_apply_kernel = None
