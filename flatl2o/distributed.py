"""flatl2o on ``torch.distributed``: FSDP2 (DTensor) parameters in :class:`flatl2o.L2O`, optimizer
state dicts for ``torch.distributed.checkpoint`` (DCP), and process groups under torchrun.

- DDP needs nothing from here: every rank sees the same averaged gradient, so ``L2O`` takes the
  same step on every rank.
- FSDP2 (``fully_shard``) makes each parameter a DTensor. The rule is coordinatewise, so each
  rank updates its own shard with that shard's recurrent state. A DTensor parameter's state
  tensors are DTensors of shape ``(*param.shape, *state_shape)`` (complex: ``(*param.shape, 2,
  *state_shape)``) laid out exactly like the parameter, so DCP saves and reshards them like
  Adam's moments. (A plain parameter's state keeps the flat ``(numel, *state_shape)`` layout.)
- :func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict` wrap torch's functions of
  the same name: they keep the ``"rule"`` entry that ``L2O.load_state_dict`` checks (torch's
  versions drop it) and never take torch's zero-gradient initialization step, which would
  advance a learned optimizer's recurrent state.
- :func:`init_from_env` joins the process group torchrun describes (used by ``flatl2o
  meta-train``); :func:`rank`, :func:`world_size`, :func:`broadcast_object`,
  :func:`all_gather_object` and :func:`mean_over_ranks` degrade to single-process no-ops.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatl2o.kernels.cpu import all_finite as cpu_all_finite
from flatl2o.rules import UpdateRule

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

__all__ = [
    "all_finite_flags",
    "all_gather_object",
    "broadcast_object",
    "default_backend",
    "finite_flags",
    "get_optimizer_state_dict",
    "init_from_env",
    "is_dtensor",
    "local_grad",
    "local_shard",
    "local_state",
    "mean_over_ranks",
    "rank",
    "set_optimizer_state_dict",
    "shard_state_like",
    "state_coords_shape",
    "world_size",
]


# ------------------------------------------------------------------------ DTensor (FSDP2)
def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (without importing ``torch.distributed.tensor`` if unused)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view sharing its storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def local_grad(p: Tensor) -> Tensor:
    """The local shard of ``p.grad``, laid out like ``p``'s local shard."""
    grad = p.grad
    if grad is None:
        raise ValueError("local_grad: the parameter has no gradient")
    if is_dtensor(p) != is_dtensor(grad):
        raise TypeError(
            f"a {'DTensor' if is_dtensor(p) else 'plain'} parameter has a "
            f"{'DTensor' if is_dtensor(grad) else 'plain'} gradient; shard parameters and "
            "gradients together (fully_shard does) or use neither"
        )
    if not is_dtensor(grad):
        return grad
    if grad.device_mesh != p.device_mesh or tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(p.device_mesh, p.placements)
    return grad.to_local()


def state_coords_shape(p: Tensor) -> tuple[int, ...]:
    """Leading shape of a parameter's recurrent-state tensors in ``L2O.state[p]``.

    ``(numel,)`` (``2 * numel`` for complex) for a plain tensor; for a DTensor the parameter's
    own shape (plus a trailing 2 for complex), so that the state can shard like the parameter.
    """
    if is_dtensor(p):
        return (*p.shape, 2) if p.is_complex() else tuple(p.shape)
    return (p.numel() * (2 if p.is_complex() else 1),)


def shard_state_like(p: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Turn fresh local state ``(n_local, *s)`` of a DTensor parameter's shard into DTensors
    of global shape ``(*state_coords_shape(p), *s)`` with ``p``'s mesh and placements."""
    if not is_dtensor(p):
        return state
    from torch.distributed.tensor import DTensor

    local = p.to_local()
    lead_local = (*local.shape, 2) if p.is_complex() else tuple(local.shape)
    lead = state_coords_shape(p)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        shape = torch.Size((*lead, *value.shape[1:]))
        out[key] = DTensor.from_local(
            value.reshape(*lead_local, *value.shape[1:]).contiguous(),
            p.device_mesh,
            p.placements,
            run_check=False,
            shape=shape,
            stride=_contiguous_strides(shape),
        )
    return out


def local_state(state: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``state`` with each DTensor entry named in ``shapes`` replaced by a ``(n_local, *shape)``
    view of its local shard (writes through to the DTensor); other entries as they are."""
    sharded = [key for key in shapes if is_dtensor(state[key])]
    if not sharded:
        return state
    return {**state, **{key: state[key].to_local().view(-1, *shapes[key]) for key in sharded}}


#: Elements checked for NaN/inf at once: bounds the check's transient memory (1 byte each).
FINITE_CHECK_CHUNK = 1 << 22


def _all_finite(t: Tensor) -> Tensor:
    """0-dim bool: every element finite, without allocating a mask of ``t``'s size.

    A float64 element beyond float32's range counts as non-finite: the rule computes in
    float32, where it would be inf and poison the recurrent state.
    """
    fast = cpu_all_finite(t)  # an fp32 CPU gradient: one pass in C, no torch op
    if fast is not None:
        return torch.tensor(fast)
    if not t.is_contiguous() or t.numel() <= FINITE_CHECK_CHUNK:
        return _finite(t)
    flat = t.view(-1)
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for start in range(0, flat.numel(), FINITE_CHECK_CHUNK):
        ok &= _finite(flat[start : start + FINITE_CHECK_CHUNK])
    return ok


def _finite(t: Tensor) -> Tensor:
    if t.dtype == torch.float64:  # NaN compares False, so it fails too
        return (t.abs() <= torch.finfo(torch.float32).max).all()
    return torch.isfinite(t).all()


def finite_flags(params: Sequence[Tensor]) -> list[bool]:
    """Whether each parameter's gradient is all finite, agreed on by all ranks for DTensors.

    A DTensor gradient's shards live on different ranks, so each rank's local answer is
    combined with one ``all_reduce`` (MIN) per device mesh; every rank then takes the same
    skip/raise decision and no shard of a parameter is updated while another is skipped.
    """
    return _agreed_finite([local_grad(p) for p in params], params)


def all_finite_flags(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor (a loaded optimizer state, say) is all finite, agreed on by all
    ranks for DTensors in the same way as :func:`finite_flags`."""
    return _agreed_finite([local_shard(t) for t in tensors], tensors)


def _agreed_finite(local: Sequence[Tensor], owners: Sequence[Tensor]) -> list[bool]:
    """``_all_finite`` of each ``local`` tensor, combined over the ranks of its owner's mesh
    where the owner is a DTensor."""
    flags = [_all_finite(torch.view_as_real(t) if t.is_complex() else t) for t in local]
    if not flags:
        return []
    meshes: dict[Any, list[int]] = {}
    for i, owner in enumerate(owners):
        if is_dtensor(owner):
            meshes.setdefault(owner.device_mesh, []).append(i)
    if meshes:
        import torch.distributed as dist

        for mesh, index in meshes.items():
            agreed = torch.stack([flags[i] for i in index]).to(torch.int32)
            for dim in range(mesh.ndim):
                dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
            for i, value in zip(index, agreed, strict=True):
                flags[i] = value.bool()
    return [bool(v) for v in torch.stack([f.to("cpu") for f in flags]).tolist()]


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


# ------------------------------------------------------------------ checkpoint (DCP)
class RuleOptimizer(Protocol):
    """What the DCP wrappers need of a :class:`flatl2o.L2O` (this module sits below the
    optimizer, which imports it, so it names the optimizer by its interface)."""

    rule: UpdateRule
    state: Any
    param_groups: list[dict[str, Any]]

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...
    def _init_state(self, p: Tensor) -> dict[str, Any]: ...


def get_optimizer_state_dict(
    model: nn.Module, optimizer: RuleOptimizer, *, options: StateDictOptions | None = None
) -> dict[str, Any]:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` for an ``L2O``.

    The state is keyed by parameter names (DTensors stay sharded under FSDP2), ready for
    ``torch.distributed.checkpoint.save``, plus the ``"rule"`` entry that identifies the rule.
    An optimizer that has not stepped yet gets its fresh (zero) state rather than torch's
    zero-gradient step, which would advance the learned rule's recurrent state.
    """
    from torch.distributed.checkpoint import state_dict as dsd

    _init_missing_state(optimizer)
    state_dict = dsd.get_optimizer_state_dict(model, optimizer, options=options)
    state_dict["rule"] = optimizer.state_dict()["rule"]
    return state_dict


def set_optimizer_state_dict(
    model: nn.Module,
    optimizer: RuleOptimizer,
    state_dict: dict[str, Any],
    *,
    options: StateDictOptions | None = None,
) -> None:
    """Load a state dict made by :func:`get_optimizer_state_dict` (e.g. after
    ``torch.distributed.checkpoint.load``); ``L2O.load_state_dict`` checks its rule."""
    from torch.distributed.checkpoint import state_dict as dsd

    state_dict = dict(state_dict)
    info = state_dict.pop("rule", None)
    _init_missing_state(optimizer)
    load_with_rule = type(optimizer).load_state_dict

    def load(state_dict: dict[str, Any]) -> None:  # torch passes it by keyword
        load_with_rule(optimizer, {**state_dict, "rule": info})

    # torch calls optimizer.load_state_dict with "state" and "param_groups" only: put the
    # rule entry back (the same instance-attribute patch torch's own helpers use).
    optimizer.load_state_dict = load  # type: ignore[method-assign]
    try:
        dsd.set_optimizer_state_dict(model, optimizer, state_dict, options=options)
    finally:
        del optimizer.load_state_dict


def _init_missing_state(optimizer: RuleOptimizer) -> None:
    """Give every trainable parameter its fresh state, as its first ``step`` would."""
    if not (
        isinstance(optimizer, Optimizer)
        and isinstance(getattr(optimizer, "rule", None), UpdateRule)
        and callable(getattr(optimizer, "_init_state", None))
    ):
        raise TypeError(
            f"expected a flatl2o.L2O optimizer, got {type(optimizer).__name__}; use "
            "torch.distributed.checkpoint.state_dict's functions for other optimizers"
        )
    if optimizer.state:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                optimizer._init_state(p)


# ------------------------------------------------------------------------ process groups
def default_backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where CUDA and NCCL are available."""
    import torch.distributed as dist

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); return whether this process is part of a group of more than one.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or a group is already initialized.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={size} asks for {size} processes, but this torch build has no "
            "torch.distributed; install a torch build with distributed support"
        )
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={size} is set but {', '.join(missing)} is not; launch with torchrun "
            "(e.g. torchrun --nproc-per-node 2 -m flatl2o meta-train ...) or unset WORLD_SIZE"
        )
    backend = backend or default_backend()
    if "nccl" in backend and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)
    return True


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if _initialized() else 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled); ``obj`` itself in a single process."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order; ``[obj]`` in a single process."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks (every rank must pass the same keys)."""
    if world_size() == 1 or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(total)
    mean = {k: float(v) / world_size() for k, v in zip(keys, total, strict=True)}
    return {k: mean[k] for k in values}
