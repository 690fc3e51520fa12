"""Implementations of one optimizer step of a learned rule, and how one is chosen.

- ``reference``: the rule ``nn.Module`` on bounded chunks (any rule, any device).
- ``cpu``: a compiled C kernel that fuses the whole step per tile of coordinates.
- ``triton``: a Triton GPU kernel that does the same per block of coordinates.

The fast kernels read a rule through ``program`` (its weights, copied once) and ``layout``
(those weights laid out for each kernel, every layout declared once). The C kernel's
argument struct is declared once, in ``cpu_step.c``, and checked when a library is loaded;
the Triton kernel's launch configuration is chosen when a kernel is built
(``triton_step.launch_config``).

``backend="auto"`` (the default of :class:`flatl2o.L2O`, overridable with the environment
variable ``FLATL2O_BACKEND``) takes ``triton`` on CUDA and ``cpu`` on the CPU when they can
run this rule, and the reference path otherwise, with one warning saying why.
"""

from __future__ import annotations

import os
import warnings
from typing import Protocol

import torch
from torch import Tensor

from flatl2o.kernels.errors import KernelUnavailable
from flatl2o.kernels.program import RuleProgram, not_yet_implemented, rule_program
from flatl2o.kernels.reference import ROW_TILE, ReferenceKernel
from flatl2o.rules import UpdateRule

BACKENDS = ("auto", "reference", "cpu", "triton")
#: How the messages name each fast kernel.
KERNEL_NAMES = {"cpu": "C", "triton": "Triton"}


class StepKernel(Protocol):
    """One optimizer step for one parameter: ``param -= lr * rule(grad)``, state in place."""

    name: str

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        step: int,
        lr: float,
        maximize: bool,
        chunk_size: int,
    ) -> None: ...


_warned: set[str] = set()


def check_backend(backend: str) -> str:
    """Validate a backend name (torch-style wording)."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str) -> str:
    """``backend``, with ``"auto"`` overridden by ``$FLATL2O_BACKEND`` when that is set."""
    check_backend(backend)
    if backend == "auto":
        env = os.environ.get("FLATL2O_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(
                    f"Invalid FLATL2O_BACKEND={env!r}; choose one of {BACKENDS} or unset it"
                )
            return env
    return backend


def _fast_kernel(
    kind: str, rule: UpdateRule, program: RuleProgram, device: torch.device
) -> StepKernel:
    if kind == "cpu":
        from flatl2o.kernels import cpu

        if device.type != "cpu":
            raise KernelUnavailable(f"backend='cpu' runs on CPU tensors, got {device}")
        return cpu.CPUKernel(program)
    from flatl2o.kernels import triton_step

    kernel = triton_step.TritonKernel(program, device)
    kernel.verify(rule)  # once per device and configuration: CI cannot run it on a GPU
    return kernel


def make_kernel(rule: UpdateRule, device: torch.device, backend: str = "auto") -> StepKernel:
    """The kernel that runs ``rule`` on ``device`` for ``backend`` (see the module doc).

    ``rule`` must already be on ``device``. An explicit fast backend that cannot run raises
    :class:`KernelUnavailable`; ``"auto"`` falls back to the reference path and warns once.
    """
    backend = resolve_backend(backend)
    if backend == "reference":
        return ReferenceKernel(rule)
    program = rule_program(rule)
    if backend != "auto":
        if program is not None and not_yet_implemented(rule, backend):
            raise KernelUnavailable(
                f"the {KERNEL_NAMES[backend]} kernel does not implement "
                f"{rule.architecture} yet; use backend='reference' (or 'auto')"
            )
        if program is None:
            raise KernelUnavailable(
                f"backend={backend!r} implements the built-in rules only, not "
                f"{type(rule).__name__}; use backend='reference'"
            )
        return _fast_kernel(backend, rule, program, device)
    kind = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if kind is None:
        return ReferenceKernel(rule)
    if program is None:
        return ReferenceKernel(rule)
    if not_yet_implemented(rule, kind):
        _warn_fallback(
            kind, f"the {KERNEL_NAMES[kind]} kernel does not implement {rule.architecture} yet"
        )
        return ReferenceKernel(rule)
    try:
        return _fast_kernel(kind, rule, program, device)
    except KernelUnavailable as e:
        _warn_fallback(kind, str(e))
        return ReferenceKernel(rule)


def _warn_fallback(kind: str, reason: str) -> None:
    """Say once per kernel kind (per process) that ``"auto"`` runs the reference step."""
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(
            f"flatl2o: the fast {kind} step is unavailable ({reason}); using the reference "
            "step, which is correct but slower. Pass backend='reference' to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )


__all__ = [
    "BACKENDS",
    "ROW_TILE",
    "KernelUnavailable",
    "ReferenceKernel",
    "RuleProgram",
    "StepKernel",
    "check_backend",
    "make_kernel",
    "resolve_backend",
    "rule_program",
]
