"""The reference step: the rule ``nn.Module`` itself, applied to bounded chunks of coordinates.

Works for every rule (also user-registered ones) on every device; the fast kernels are
tested against it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flatl2o.rules import TensorwiseRule, UpdateRule
from flatl2o.rules.base import REDUCTION_BLOCK, block_partials, untouched

__all__ = ["ROW_TILE", "ReferenceKernel", "apply_step", "untouched"]

#: The rule always sees a multiple of this many rows: chunk sizes are rounded up to it and a
#: parameter's last chunk is padded (zero gradient, zero state; the padding is discarded).
#: BLAS and vectorized kernels round a tail of rows differently from full tiles, so without
#: this a coordinate's update would depend (in the last bits) on how it was chunked. With it,
#: chunk_size changes no bit where the BLAS computes a row identically whatever the number of
#: whole tiles (MKL's AVX-512 and SSE kernels); elsewhere (MKL's AVX2 kernels) only rounding.
ROW_TILE = 64
# a chunk is whole blocks of a per-tensor rule's sums (rules.base.REDUCTION_BLOCK)
assert ROW_TILE % REDUCTION_BLOCK == 0


def apply_step(target: Tensor, delta: Tensor, lr: float) -> None:
    """``target -= lr * delta`` in place; fp16/bf16/fp64 targets get (at least) fp32
    arithmetic and are stored back in their own dtype."""
    if target.dtype == torch.float32:
        target.add_(delta, alpha=-lr)
    else:
        work = target.to(torch.promote_types(target.dtype, torch.float32))
        target.copy_(work.add_(delta.to(work.dtype), alpha=-lr))


class ReferenceKernel:
    """Runs the rule module chunk by chunk (transient memory bounded by ``chunk_size``)."""

    name = "reference"

    def __init__(self, rule: UpdateRule) -> None:
        self.rule = rule

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
        """``param -= lr * rule(grad)`` in place (1-D ``param``/``grad``; state rows updated).

        ``param`` is one tensor (one segment). A :class:`~flatl2o.rules.TensorwiseRule` takes
        two passes: the chunks' directions (one float per coordinate, kept until the end) and
        block sums, then the tensor's update from the sums (exactly as the rule's forward)."""
        tensorwise = isinstance(self.rule, TensorwiseRule)
        n = param.numel()
        chunk = -(-chunk_size // ROW_TILE) * ROW_TILE
        if tensorwise:
            directions = grad.new_empty(n, dtype=torch.float32)
            kept = torch.empty(n, dtype=torch.bool, device=grad.device)
            partials: list[Tensor] = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            g = grad[start:stop].to(torch.float32)
            if maximize:
                g = g.neg()
            views = {k: v[start:stop] for k, v in state.items()}
            # reduced-precision state (bf16) is computed in fp32 and rounded when stored
            exact = {k: v if v.dtype == torch.float32 else v.float() for k, v in views.items()}
            keep = untouched(g, exact)
            pad = -(stop - start) % ROW_TILE
            if pad:  # only the last chunk of a parameter; see ROW_TILE
                g = torch.cat((g, g.new_zeros(pad)))
                rows = {
                    k: torch.cat((v, v.new_zeros((pad, *v.shape[1:])))) for k, v in exact.items()
                }
            else:
                rows = exact
            if tensorwise:
                delta, new_state, stats = self.rule.coordinatewise(g, rows, step)
                # the rows kept by the contract, and the padding, are not counted
                counted = ~torch.cat((keep, keep.new_ones(pad))) if pad else ~keep
                partials.append(block_partials(torch.where(counted.unsqueeze(-1), stats, 0.0)))
                directions[start:stop] = delta[: stop - start]
                kept[start:stop] = keep
            else:
                delta, new_state = self.rule(g, rows, step)
            for k, v in views.items():
                rows_kept = keep.view(-1, *(1,) * (v.dim() - 1))
                v.copy_(torch.where(rows_kept, exact[k], new_state[k][: stop - start]))
            if not tensorwise:
                delta = torch.where(keep, 0.0, delta[: stop - start])
                apply_step(param[start:stop], delta, lr)
        if tensorwise and n:
            totals = torch.cat(partials).sum(dim=0)
            update = self.rule.finish(directions, totals, (~kept).sum())
            apply_step(param, torch.where(kept, 0.0, update), lr)
