"""``flatl2o.L2O``: a ``torch.optim.Optimizer`` that applies a learned update rule.

Each parameter's coordinates carry the rule's recurrent state in ``self.state[p]`` (fp32
whatever the parameter's dtype), so ``state_dict``/``load_state_dict`` resume exactly.
The step is ``p <- p - lr * rule(grad)``, so every ``torch.optim.lr_scheduler`` composes with
it unchanged; ``lr`` defaults to the rule's ``default_lr``: 1.0 for L2O-DM and RNNprop (whose
output is the step), 1e-3 for NormProp (whose output has the RMS of Adam's step at lr 1, so
``lr`` means the same as Adam's). ``weight_decay`` is
decoupled (AdamW-style), and a coordinate whose gradient has been exactly zero at every step
so far is never moved (docs/api.md, "Zero gradients").
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from flatl2o.distributed import (
    all_finite_flags,
    finite_flags,
    is_dtensor,
    local_grad,
    local_shard,
    local_state,
    shard_state_like,
    state_coords_shape,
)
from flatl2o.hub import default_pretrained_name, load_rule
from flatl2o.kernels import (
    KernelUnavailable,
    ReferenceKernel,
    StepKernel,
    check_backend,
    make_kernel,
)
from flatl2o.rules import TensorwiseRule, UpdateRule

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
#: What a gradient that fails the finiteness check holds (index: a float64 parameter).
_NONFINITE = (
    "NaN or inf",
    "NaN, inf or values beyond float32's range (the rule computes in float32)",
)
NONFINITE_POLICIES = ("skip", "raise")
#: Storage dtypes of the recurrent state; the arithmetic is fp32 either way. bf16 halves the
#: optimizer's memory (see docs/performance.md for its measured effect on training).
STATE_DTYPES = (torch.float32, torch.bfloat16)

#: Coordinates processed at once; bounds the step's transient memory (about 1.5 KB per
#: coordinate for a 2x20 LSTM rule) independently of the model size.
DEFAULT_CHUNK_SIZE = 16384

#: The options every param group carries (the constructor's defaults fill in missing ones).
GROUP_OPTIONS = ("lr", "weight_decay", "maximize", "chunk_size", "nonfinite")
#: Param-group options that :func:`_check_options` validates.
CHECKED_OPTIONS = ("lr", "weight_decay", "chunk_size", "nonfinite")

#: Keyword arguments of :func:`flatl2o.load_rule` that ``L2O(params, "name", ...)`` forwards.
LOAD_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "device")


class L2O(Optimizer):
    """Drop-in replacement for ``torch.optim.Adam`` driven by a learned update rule.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        rule: an :class:`~flatl2o.rules.UpdateRule`, or a name / folder / Hub repo id given
            to :func:`flatl2o.load_rule`. ``None`` uses the default shipped checkpoint.
        lr: multiplier of the rule's output. ``None`` (default) takes the rule's
            ``default_lr``: 1.0 for L2O-DM and RNNprop, whose output is the step itself; 1e-3
            for NormProp, whose output per tensor has the RMS of Adam's step at lr 1, so that
            its ``lr`` (and schedule) means the same as Adam's.
        weight_decay: decoupled (AdamW-style) weight decay: each step first shrinks a
            parameter that has a gradient by ``1 - lr * rule.config.output_scale *
            weight_decay`` (``lr * output_scale`` is the rule's effective learning rate, so the
            number used with AdamW means the same strength; see docs/api.md). Default 0.
        maximize: maximize the objective instead of minimizing it.
        chunk_size: coordinates evaluated at once by the reference step (and converted at
            once for non-fp32 parameters by the fast kernels): the memory bound of one step,
            rounded up to a multiple of ``ROW_TILE`` (64); the result does not depend on it
            beyond float rounding (see ``flatl2o.kernels.reference.ROW_TILE``).
        nonfinite: what to do with a parameter whose gradient has NaN/inf: ``"skip"`` leaves
            that parameter and its recurrent state untouched and warns; ``"raise"`` raises.
        backend: how the step is computed: ``"auto"`` (fused Triton kernel on CUDA, compiled
            C kernel on CPU, when available), ``"reference"`` (the rule module itself),
            ``"cpu"`` or ``"triton"`` (that kernel or an error). See :mod:`flatl2o.kernels`.
        state_dtype: storage dtype of the recurrent state, ``torch.float32`` (default) or
            ``torch.bfloat16`` (half the memory; the step's arithmetic stays fp32).
        **load_options: ``revision``, ``cache_dir``, ``token``, ``local_files_only``,
            ``force_download``, ``device``, passed to :func:`flatl2o.load_rule` when ``rule``
            is a name or path.
    """

    def __init__(
        self,
        params: ParamsT,
        rule: UpdateRule | str | os.PathLike[str] | None = None,
        lr: float | Tensor | None = None,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        nonfinite: str = "skip",
        backend: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        **load_options: Any,
    ) -> None:
        if lr is not None:
            _check_options(lr=lr)
        _check_options(weight_decay=weight_decay, chunk_size=chunk_size, nonfinite=nonfinite)
        self.backend = check_backend(backend)
        if state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"Invalid state_dtype: {state_dtype}; choose one of "
                f"{', '.join(str(d) for d in STATE_DTYPES)}"
            )
        self.state_dtype = state_dtype
        unknown = [k for k in load_options if k not in LOAD_OPTIONS]
        if unknown:
            raise TypeError(
                f"L2O.__init__() got an unexpected keyword argument {unknown[0]!r}; its options "
                "are lr, weight_decay, maximize, chunk_size, nonfinite, backend, state_dtype "
                f"and, for a rule given by name or path, {', '.join(LOAD_OPTIONS)}"
            )
        if not isinstance(rule, UpdateRule):
            rule = load_rule(default_pretrained_name() if rule is None else rule, **load_options)
        elif load_options:
            raise TypeError(
                f"load options {sorted(load_options)} only apply when `rule` is a name or path"
            )
        self.rule = rule
        if lr is None:
            lr = float(rule.default_lr)
        self._device_rules: dict[torch.device, tuple[tuple[Any, ...], UpdateRule]] = {}
        self._kernels: dict[torch.device, tuple[tuple[Any, ...], StepKernel]] = {}
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            maximize=maximize,
            chunk_size=chunk_size,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    @classmethod
    def from_pretrained(
        cls,
        params: ParamsT,
        name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> L2O:
        """An optimizer whose rule is loaded from a folder, shipped name or Hub repo id;
        ``options`` are the constructor's (``lr``, ``maximize``, ``backend``, ...)."""
        if isinstance(name_or_path, UpdateRule):  # already loaded: nothing to resolve
            return cls(params, name_or_path, **options)
        return cls(
            params,
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            device=device,
            **options,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group (dtypes, options) before torch registers it (and warns about a
        parameter listed twice, as for every torch optimizer)."""
        if isinstance(param_group, dict) and not isinstance(param_group.get("params"), set):
            # Materialize once: a generator (``model.parameters()``) can only be read once,
            # and torch must see the same parameters we validated.
            params = param_group["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group["params"] = params
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # named params
            for p in tensors:
                if not isinstance(p, Tensor):
                    continue  # torch's own check below reports it
                if not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(
                        f"L2O can only optimize floating point or complex tensors, but got a "
                        f"parameter of dtype {p.dtype}; convert it with .float() or leave it "
                        "out of the optimizer"
                    )
                if is_dtensor(p) and isinstance(self.rule, TensorwiseRule):
                    raise ValueError(
                        f"L2O: the {self.rule.architecture} rule normalizes each parameter's "
                        "step over the whole tensor, which a sharded (DTensor/FSDP2) parameter "
                        "does not hold on one rank; it does not support sharded parameters yet. "
                        "Use an rnnprop or l2o-dm rule, or unsharded (DDP) parameters"
                    )
            # a parameter listed twice in a group is torch's to handle: it warns, as for Adam
            _check_options(**{k: param_group[k] for k in CHECKED_OPTIONS if k in param_group})
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults/state/param_groups; without the rule, a deep copy or
        # an unpickled optimizer could not step.
        return {
            **super().__getstate__(),
            "rule": self.rule,
            "backend": self.backend,
            "state_dtype": self.state_dtype,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch's load_state_dict also calls this, with only state/param_groups: keep ours
        if not hasattr(self, "backend"):
            self.backend = "auto"
        if not hasattr(self, "state_dtype"):
            self.state_dtype = torch.float32
        # a group saved without an option (an older flatl2o, or a key dropped on purpose)
        # gets this optimizer's default for it, as torch's optimizers do
        for group in self.param_groups:
            for key in GROUP_OPTIONS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
        self._device_rules = {}
        self._kernels = {}

    # ------------------------------------------------------------------ stepping
    def _rule_on(self, device: torch.device) -> UpdateRule:
        """The rule on ``device``: ``self.rule`` itself, or a cached copy that is refreshed
        whenever ``self.rule``'s tensors change (continued meta-training, a reload)."""
        tensors = [*self.rule.parameters(), *self.rule.buffers()]
        if tensors[0].device == device:
            return self.rule
        version = tuple((id(t), t._version) for t in tensors)
        cached = self._device_rules.get(device)
        if cached is None or cached[0] != version:
            cached = (version, copy.deepcopy(self.rule).to(device))
            self._device_rules[device] = cached
        return cached[1]

    def _kernel_on(self, device: torch.device) -> StepKernel:
        """The step kernel for ``device`` (see :mod:`flatl2o.kernels`), rebuilt whenever the
        rule's tensors change, since fast kernels keep a packed copy of the weights."""
        rule = self._rule_on(device)
        version = tuple((id(t), t._version) for t in [*rule.parameters(), *rule.buffers()])
        cached = self._kernels.get(device)
        if cached is None or cached[0] != version:
            cached = (version, make_kernel(rule, device, self.backend))
            self._kernels[device] = cached
        return cached[1]

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        fresh = self.rule.init_state(
            _num_coords(local_shard(p)), device=p.device, dtype=self.state_dtype
        )
        state.update(shard_state_like(p, fresh))  # a DTensor's state is sharded like it
        return state

    @torch.compiler.disable  # Dynamo would graph-break in it anyway, and mis-traced its state
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure: a closure that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every gradient before touching anything, so that an error (sparse gradient,
        # nonfinite="raise") leaves all parameters and states as they were.
        todo: list[tuple[Tensor, dict[str, Any]]] = []
        skipped: list[Tensor] = []
        candidates: list[tuple[Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.layout != torch.strided:
                    raise RuntimeError(
                        "L2O does not support sparse gradients; use a dense embedding "
                        "(sparse=False) or convert the gradient with grad.to_dense()"
                    )
                self._check_state_fits(p)
                candidates.append((p, group))
        # one answer per parameter, the same on every rank for a sharded (DTensor) parameter
        finite = finite_flags([p for p, _ in candidates])
        for (p, group), ok in zip(candidates, finite, strict=True):
            if ok:
                todo.append((p, group))
            elif group["nonfinite"] == "raise":
                raise FloatingPointError(
                    f"L2O: the gradient of a parameter of shape {tuple(p.shape)} contains "
                    f"{_NONFINITE[p.dtype == torch.float64]}; nothing was updated. Fix the "
                    "loss, clip gradients, or use nonfinite='skip' to skip such parameters"
                )
            else:
                skipped.append(p)
        # an explicit backend that cannot run raises here, before anything moves
        kernels = {device: self._kernel_on(device) for device in {p.device for p, _ in todo}}
        for p in skipped:
            warnings.warn(
                f"L2O: the gradient of a parameter of shape {tuple(p.shape)} contains "
                f"{_NONFINITE[p.dtype == torch.float64]}; its update was skipped and its "
                "recurrent state kept (nonfinite='skip')",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        for p, group in todo:
            self._update(p, group, kernels[p.device])
        return loss

    def _state_shapes_of(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        """The shape each recurrent-state tensor of ``p`` must have (see ``state_coords_shape``)."""
        lead = state_coords_shape(p)
        return {key: (*lead, *shape) for key, shape in self.rule.state_shapes().items()}

    def _check_state_fits(self, p: Tensor) -> None:
        """Refuse a state that no longer fits its parameter (resized after its first step),
        which the kernels would otherwise read and write out of bounds."""
        state = self.state.get(p)
        if not state:
            return
        for key, expected in self._state_shapes_of(p).items():
            t = state.get(key)
            got = tuple(t.shape) if isinstance(t, Tensor) else t
            if got != expected:
                raise RuntimeError(
                    f"L2O: the state of a parameter of shape {tuple(p.shape)} does not fit it: "
                    f"state {key!r} has shape {got}, expected {expected} (was the "
                    "parameter resized after its first step?); nothing was updated. Drop its "
                    "state with `del optimizer.state[param]` to restart its recurrent state, "
                    "or rebuild the optimizer"
                )

    def _effective_lr(self, group: dict[str, Any]) -> float:
        """``lr * output_scale``: the learning rate the rule's step amounts to (its output is
        a per-coordinate step of at most about ``output_scale``), which weight decay uses so
        that AdamW's ``weight_decay`` means the same shrink per unit of learning rate."""
        return float(group["lr"]) * float(self.rule.config.output_scale)

    def _update(self, p: Tensor, group: dict[str, Any], kernel: StepKernel) -> None:
        local, local_g = local_shard(p), local_grad(p)  # a DTensor's (FSDP2) local shard
        param = torch.view_as_real(local) if local.is_complex() else local
        grad = torch.view_as_real(local_g) if local_g.is_complex() else local_g
        full_state = self.state[p] or self._init_state(p)
        step = int(full_state["step"].item()) + 1  # counted once the update has been made
        state = local_state(full_state, self.rule.state_shapes())  # the shard's rows (views)
        if local.numel() > 0:  # an empty FSDP2 shard (fewer rows than ranks): nothing to do
            if group["weight_decay"]:  # decoupled, before the learned step, as AdamW does
                param.mul_(1.0 - self._effective_lr(group) * group["weight_decay"])
            names = list(self.rule.state_shapes())
            flat_grad = grad.reshape(-1)
            flat_param = param.view(-1) if param.is_contiguous() else param.reshape(-1)
            args = (
                flat_param,
                flat_grad,
                {k: state[k] for k in names},
                step,
                float(group["lr"]),
                bool(group["maximize"]),
                group["chunk_size"],
            )
            try:
                kernel.update(*args)
            except KernelUnavailable:  # a layout this kernel refuses (checked before writing)
                ReferenceKernel(self._rule_on(p.device)).update(*args)
            if not param.is_contiguous():
                param.copy_(flat_param.view_as(param))
        full_state["step"] += 1

    # --------------------------------------------------------------- state dicts
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a ``"rule"`` entry identifying the rule (which
        the state-dict post-hooks see, like every other entry)."""

        def add_rule(opt: Optimizer, sd: dict[str, Any]) -> None:
            sd["rule"] = {
                "architecture": self.rule.architecture,
                "fingerprint": self.rule.fingerprint(),
                "config": self.rule.config.to_dict(),
            }

        # first of the post-hooks for this call only, so that every user hook sees the entry
        handle = self.register_state_dict_post_hook(add_rule, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore exactly: the recurrent state stays fp32 even for bf16/fp16 parameters.

        The loaded tensors are copied once, straight to the state's device and dtype, so the
        optimizer that saved the state dict and the one that loaded it can keep stepping
        independently. Load pre-hooks run first and see the whole dict (``"rule"`` included);
        post-hooks run last, on the loaded state, as in torch.
        """
        restore: list[Callable[[], None]] = []

        def check(opt: Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
            sd, finish = self._prepare_load(sd)
            restore.append(finish)
            return sd

        # for this call only: the check runs after the user's pre-hooks (on what they
        # returned) and the state is restored before the user's post-hooks see it
        handles = (
            self.register_load_state_dict_pre_hook(check),
            self.register_load_state_dict_post_hook(lambda opt: restore.pop()(), prepend=True),
        )
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _prepare_load(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Check ``state_dict`` (after the user's load pre-hooks) before anything is loaded;
        return what torch's load should restore (the groups, and state of no parameter) and
        the function that then copies the parameters' state, once, in ``state_dtype``."""
        state_dict = dict(state_dict)
        info = state_dict.pop("rule", None)
        if not isinstance(info, dict) or "fingerprint" not in info:
            raise ValueError(
                "loaded state dict has no 'rule' entry: it was not produced by flatl2o.L2O "
                "(or was stripped); load a state dict saved from an L2O optimizer"
            )
        mine = self.rule.fingerprint()
        if info["fingerprint"] != mine:
            raise ValueError(
                f"loaded state dict was produced by the {info.get('architecture')!r} rule "
                f"{info['fingerprint']}, but this optimizer uses the {self.rule.architecture!r} "
                f"rule {mine}; construct L2O with the same rule (the same checkpoint) to resume"
            )
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        pairs = [
            (saved_id, p)
            for saved, group in zip(saved_groups, self.param_groups, strict=False)
            for saved_id, p in zip(saved["params"], group["params"], strict=False)
        ]
        same_layout = len(saved_groups) == len(self.param_groups) and all(
            len(saved["params"]) == len(group["params"])
            for saved, group in zip(saved_groups, self.param_groups, strict=True)
        )
        for saved in saved_groups:
            _check_options(**{k: saved[k] for k in CHECKED_OPTIONS if k in saved})
        if same_layout:  # otherwise torch's own check below raises
            for index, (saved_id, p) in enumerate(pairs):
                self._check_loaded_state(index, p, saved_state.get(saved_id, {}))
        # torch's load checks the groups (in its wording) and restores them; the parameters'
        # state is converted here instead, once (torch would first cast it to each
        # parameter's dtype: a second full copy of the state)
        paired = {saved_id for saved_id, _ in pairs}
        unpaired = {k: v for k, v in saved_state.items() if k not in paired}

        def restore_paired() -> None:
            for saved_id, p in pairs:
                saved = saved_state.get(saved_id)
                if saved:
                    self.state[p] = {
                        key: torch.as_tensor(value)  # a Python-number step, as torch accepts
                        .detach()
                        .to(
                            "cpu" if key == "step" else p.device,
                            torch.float32 if key == "step" else self.state_dtype,
                            copy=True,
                        )
                        for key, value in saved.items()
                    }

        return {**state_dict, "state": unpaired}, restore_paired

    def _check_loaded_state(self, index: int, p: Tensor, saved: dict[str, Any]) -> None:
        """Refuse a per-parameter state that does not fit ``p``, or holds NaN/inf, before
        anything is loaded (the backends would disagree on it: the C kernel is built with
        finite math)."""
        if not saved:
            return
        expected = {"step": ()} | self._state_shapes_of(p)
        got: dict[str, Any] = {}
        for key, value in saved.items():
            if isinstance(value, Tensor):
                got[key] = tuple(value.shape)
            elif key == "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                got[key] = ()  # torch's optimizers accept a Python-number step
            else:
                got[key] = f"a {type(value).__name__}, not a tensor"
        if got != expected:
            raise ValueError(
                f"loaded state dict does not match the optimizer's parameters: the state of "
                f"parameter {index} (shape {tuple(p.shape)}) has {got}, expected tensors of "
                f"shapes {expected}; load a state dict saved for the same model"
            )
        keys = list(saved)
        finite = all_finite_flags([torch.as_tensor(saved[k]) for k in keys])  # DTensors agree
        for key, ok in zip(keys, finite, strict=True):
            negative = key == "step" and ok and float(saved[key]) < 0
            if not ok or negative:
                what = "a negative step" if negative else "NaN or inf"
                raise ValueError(
                    f"loaded state dict holds {what} in state {key!r} of parameter {index} "
                    f"(shape {tuple(p.shape)}): the run that saved it had diverged or the file "
                    "is damaged; load an earlier state dict, or drop that parameter's entry "
                    "from state_dict['state'] to restart its recurrent state"
                )


def _user_stacklevel() -> int:
    """``stacklevel`` that points a warning raised in :meth:`L2O.step` at the user's call,
    past torch's wrappers (step hooks, ``no_grad``, LR schedulers' step counters)."""
    torch_dir = os.path.dirname(torch.__file__)
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame.f_back is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(torch_dir)
    ):
        frame, level = frame.f_back, level + 1
    return level


def _num_coords(p: Tensor) -> int:
    """Real coordinates of a parameter (a complex number is two)."""
    return p.numel() * (2 if p.is_complex() else 1)


def _check_options(**options: Any) -> None:
    """Reject invalid hyper-parameters with torch's wording."""
    if "lr" in options:
        lr = options["lr"]
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not (isinstance(lr, (numbers.Real, Tensor)) and not isinstance(lr, bool)):
            raise TypeError(f"lr must be a float or a 1-element Tensor, got {type(lr).__name__}")
        value = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
        if not 0.0 <= value or not math.isfinite(value):
            raise ValueError(f"Invalid learning rate: {lr}")
    if "weight_decay" in options:
        wd = options["weight_decay"]
        if not isinstance(wd, numbers.Real) or isinstance(wd, bool):
            raise TypeError(f"weight_decay must be a float, got {type(wd).__name__}")
        if not 0.0 <= wd or not math.isfinite(wd):
            raise ValueError(f"Invalid weight_decay value: {wd}")
    if "chunk_size" in options:
        c = options["chunk_size"]
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"Invalid chunk_size: {c} (a positive int of coordinates per chunk)")
    if "nonfinite" in options and options["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"Invalid nonfinite policy: {options['nonfinite']!r}; "
            f"choose one of {NONFINITE_POLICIES}"
        )
