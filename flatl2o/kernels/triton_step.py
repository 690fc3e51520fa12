"""The GPU fast path: :class:`TritonKernel` runs a rule step with the Triton kernel, one program
per block of coordinates, and checks it against the reference rule once per device before use.

The kernel's source is :mod:`flatl2o.kernels.triton_jit`; how it is compiled and launched
(:class:`LaunchConfig`, :func:`launch_config`, ``$FLATL2O_TRITON_CONFIG``) is
:mod:`flatl2o.kernels.triton_config`; both are re-exported here. ``TRITON_INTERPRET=1`` runs
the same kernel on the CPU, which is how CI checks it against the reference rule without a GPU.

Triton is optional: without it (or without CUDA) ``backend="auto"`` uses the reference step.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from flatl2o.kernels.errors import KernelUnavailable
from flatl2o.kernels.layout import pack
from flatl2o.kernels.program import PREP_DM, PREP_NORMPROP, RuleProgram, dm_exp_k
from flatl2o.kernels.triton_config import (
    CONFIG_ENV,
    PRECISIONS,
    PROGRAMS_PER_SM,
    VARIANTS,
    LaunchConfig,
    _amd,
    default_config,
    launch_config,
    launch_constexprs,
    plain_math,
)
from flatl2o.kernels.triton_jit import normprop_apply_kernel as _normprop_apply_kernel
from flatl2o.kernels.triton_jit import step_kernel as _step_kernel
from flatl2o.kernels.triton_jit import triton
from flatl2o.rules import UpdateRule

__all__ = [
    "CONFIG_ENV",
    "PRECISIONS",
    "PROGRAMS_PER_SM",
    "VARIANTS",
    "VERIFY_COORDS",
    "LaunchConfig",
    "TritonKernel",
    "available",
    "default_config",
    "launch_config",
    "launch_constexprs",
    "plain_math",
]


def _has_maxnreg() -> bool:
    """Whether this Triton's CUDA backend takes a ``maxnreg`` option (Triton >= 3.1)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


_HAS_MAXNREG = triton is not None and _has_maxnreg()


#: Coordinates per program of NormProp's second pass (elementwise: param -= lr * scale * d).
NORMPROP_APPLY_BLOCK = 1024

#: Coordinates of TritonKernel.verify's check (not a multiple of any block size).
VERIFY_COORDS = 4099
_VERIFIED: set[tuple] = set()


def _excess(x: Tensor, ref: Tensor, tol: float) -> float:
    """The largest ``|x - ref| / (tol * (1 + |ref|))``: above 1 means out of tolerance
    (NaN counts as out)."""
    err = (x.float() - ref.float()).abs() / (tol * (1 + ref.float().abs()))
    return float(torch.nan_to_num(err, nan=float("inf")).max())


def available() -> str | None:
    """``None`` when the Triton kernel can run, else why not."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on the CPU for testing)"
    return None


class TritonKernel:
    """Runs a :class:`RuleProgram` with the Triton kernel on one device. NormProp takes two
    launches per tensor and keeps a scratch of one float per coordinate of the largest tensor
    stepped so far (its directions, between the passes) and 4 per block (the partial sums)."""

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
        # NormProp's scratch, grown to the largest tensor stepped and then reused: each
        # coordinate's direction, each block's partial sums (4 floats) and the tensor's sums
        self._directions = self._partials = self._totals = None

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
        normprop = p.prep == PREP_NORMPROP
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
        # RNNprop's m and beta1 are NormProp's m_fast and beta_fast (the kernel's m and beta1)
        m, beta1 = (state["m_fast"], p.beta_fast) if normprop else (state.get("m"), p.beta1)
        if normprop:
            directions, partials = self._scratch(n, blocks)
        self.last_compiled = _step_kernel[grid](
            grad,
            param,
            n,
            float(lr),
            int(maximize),
            dummy if dm else m,
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
            beta1,
            p.beta2,
            1.0 if dm else 1.0 / (1.0 - beta1**step),
            1.0 if dm else 1.0 / (1.0 - p.beta2**step),
            p.rp_eps,
            state["m_slow"] if normprop else dummy,
            p.beta_slow,
            1.0 / (1.0 - p.beta_slow**step) if normprop else 1.0,
            p.adam_skip,
            p.w_gain if normprop else dummy,
            p.b_gain,
            directions if normprop else dummy,
            partials if normprop else dummy,
            triton.cdiv(blocks, grid[0]) if persistent else 1,  # iters
            grid[0],  # nprog
            **self.constexprs,
            num_warps=cfg.warps,
            **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and _HAS_MAXNREG and not _amd() else {}),
        )
        if normprop:
            # the tensor's sums, from the blocks' partial sums in a fixed order (fp64: the
            # count is exact), then its scale and the parameter update
            totals = self._totals
            torch.sum(partials.view(blocks, 4), dim=0, dtype=torch.float64, out=totals)
            _normprop_apply_kernel[(triton.cdiv(n, NORMPROP_APPLY_BLOCK),)](
                param,
                directions,
                totals,
                n,
                float(lr),
                p.scale,
                p.log_gain_bound,
                BLOCK=NORMPROP_APPLY_BLOCK,
            )

    def _scratch(self, n: int, blocks: int) -> tuple[Tensor, Tensor]:
        """NormProp's direction buffer (``n`` floats) and partial sums (``blocks`` rows of
        4), views of buffers kept by the kernel and grown only for a larger tensor."""
        if self._directions is None or self._directions.numel() < n:
            self._directions = torch.empty(n, dtype=torch.float32, device=self.device)
        if self._partials is None or self._partials.numel() < 4 * blocks:
            self._partials = torch.empty(4 * blocks, dtype=torch.float32, device=self.device)
        if self._totals is None:
            self._totals = torch.empty(4, dtype=torch.float64, device=self.device)
        return self._directions[:n], self._partials[: 4 * blocks]

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
