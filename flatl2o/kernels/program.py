"""What the fused kernels need from a rule: its weights laid out for one fused pass.

The rule modules in :mod:`flatl2o.rules` stay the single definition of each update rule;
a :class:`RuleProgram` is a read-only re-packing of one rule's weights (concatenated
``[W_ih | W_hh]`` per LSTM layer, summed biases) that the CPU and Triton kernels consume.
Only the exact built-in classes are supported: a subclass may change ``forward``, so it
runs on the reference path. :data:`IMPLEMENTED` says which of them each fused kernel runs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from flatl2o.rules import L2ODM, NormProp, RNNprop, UpdateRule

#: Preprocessing kinds understood by the kernels.
PREP_DM = 0
PREP_RNNPROP = 1
PREP_NORMPROP = 2


@dataclasses.dataclass(frozen=True)
class RuleProgram:
    """Weights and constants of one built-in rule, packed for a fused kernel (fp32)."""

    prep: int
    hidden: int
    layers: int
    layer_weights: tuple[Tensor, ...]  # (4H, k_l + H): [W_ih | W_hh], gate order i, f, g, o
    layer_biases: tuple[Tensor, ...]  # (4H,): b_ih + b_hh
    layer_inputs: tuple[int, ...]  # k_l
    w_out: Tensor  # (H,)
    b_out: float
    out_tanh: bool
    scale: float
    # L2O-DM
    dm_k: float = 1.0
    dm_eps: float = 1.0
    # RNNprop
    beta1: float = 0.0
    beta2: float = 0.0
    rp_eps: float = 1.0
    w_in: Tensor | None = None  # (I, 2) for RNNprop, (I, 3) for NormProp
    b_in: Tensor | None = None  # (I,)
    # NormProp (also w_in/b_in, beta2 and rp_eps as eps; its input layer is followed by ELU):
    # per coordinate d = tanh(adam_skip * adam + w_out.h + b_out), per tensor the update is
    # scale * rms(adam) * exp(log_gain_bound * tanh(mean(w_gain.h + b_gain))) / rms(d) * d
    beta_fast: float = 0.0
    beta_slow: float = 0.0
    adam_skip: float = 0.0
    w_gain: Tensor | None = None  # (H,)
    b_gain: float = 0.0
    log_gain_bound: float = 0.0

    def to(self, device: torch.device) -> RuleProgram:
        """The same program with its tensors on ``device``."""
        moved = {f.name: _move(getattr(self, f.name), device) for f in dataclasses.fields(self)}
        return RuleProgram(**moved)

    def state_names(self) -> list[str]:
        """State tensor names in the rule's order."""
        lstm = [n for i in range(self.layers) for n in (f"h{i}", f"c{i}")]
        moments = {PREP_DM: [], PREP_RNNPROP: ["m", "v"], PREP_NORMPROP: ["m_fast", "m_slow", "v"]}
        return moments[self.prep] + lstm


#: The built-in rules each fused kernel runs ("cpu": the C kernel, "triton"). A built-in rule
#: that a kernel does not implement yet runs on the reference step: ``backend="auto"`` says so
#: once, and an explicit fast backend refuses it.
IMPLEMENTED: dict[str, tuple[type[UpdateRule], ...]] = {
    "cpu": (L2ODM, RNNprop, NormProp),
    "triton": (L2ODM, RNNprop, NormProp),
}
BUILT_IN: tuple[type[UpdateRule], ...] = (L2ODM, RNNprop, NormProp)


def not_yet_implemented(rule: UpdateRule, kind: str) -> bool:
    """Whether ``rule`` is a built-in rule that kernel ``kind`` does not implement yet."""
    return type(rule) in BUILT_IN and type(rule) not in IMPLEMENTED[kind]


def _move(value: object, device: torch.device) -> object:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


@torch.no_grad()
def rule_program(rule: UpdateRule) -> RuleProgram | None:
    """The fused-kernel program of ``rule``, or ``None`` when only the reference path applies
    (a class that is not one of the built-in rules)."""
    if type(rule) not in BUILT_IN:
        return None
    cells = list(rule.lstm.cells)
    weights, biases, inputs = [], [], []
    for cell in cells:
        w = torch.cat((cell.weight_ih, cell.weight_hh), dim=1)
        b = torch.zeros(4 * cell.hidden_size, dtype=torch.float32, device=w.device)
        if cell.bias:
            b = cell.bias_ih + cell.bias_hh
        weights.append(w.detach().float().contiguous())
        biases.append(b.detach().float().contiguous())
        inputs.append(cell.input_size)
    c = rule.config
    readout = rule.readout
    common = dict(
        hidden=c.hidden_size,
        layers=c.num_layers,
        layer_weights=tuple(weights),
        layer_biases=tuple(biases),
        layer_inputs=tuple(inputs),
        w_out=readout.weight.detach().float().reshape(-1).contiguous(),
        b_out=float(readout.bias) if readout.bias is not None else 0.0,
        scale=float(c.output_scale),
    )
    if isinstance(rule, L2ODM):
        return RuleProgram(
            prep=PREP_DM, out_tanh=False, dm_k=float(c.k), dm_eps=float(c.eps), **common
        )
    lin = rule.input
    w_in = lin.weight.detach().float().contiguous()
    b_in = (
        (lin.bias if lin.bias is not None else torch.zeros(lin.out_features))
        .detach()
        .float()
        .contiguous()
    )
    if isinstance(rule, NormProp):
        return RuleProgram(
            prep=PREP_NORMPROP,
            out_tanh=True,
            beta_fast=float(c.beta_fast),
            beta_slow=float(c.beta_slow),
            beta2=float(c.beta2),
            rp_eps=float(c.eps),
            w_in=w_in,
            b_in=b_in,
            adam_skip=float(c.adam_skip),
            w_gain=rule.gain.weight.detach().float().reshape(-1).contiguous(),
            b_gain=float(rule.gain.bias) if rule.gain.bias is not None else 0.0,
            log_gain_bound=float(c.log_gain_bound),
            **common,
        )
    return RuleProgram(
        prep=PREP_RNNPROP,
        out_tanh=True,
        beta1=float(c.beta1),
        beta2=float(c.beta2),
        rp_eps=float(c.eps),
        w_in=w_in,
        b_in=b_in,
        **common,
    )


def dm_exp_k(program: RuleProgram) -> float:
    """``e^k`` of L2O-DM's sign input, as the reference computes it (``math.exp``)."""
    return math.exp(program.dm_k)
