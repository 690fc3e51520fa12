"""What the fused kernels need from a rule: its weights laid out for one fused pass.

The rule modules in :mod:`flatl2o.rules` stay the single definition of each update rule;
a :class:`RuleProgram` is a read-only re-packing of one rule's weights (concatenated
``[W_ih | W_hh]`` per LSTM layer, summed biases) that the CPU and Triton kernels consume.
Only the exact built-in classes are supported: a subclass may change ``forward``, so it
runs on the reference path.
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
    w_in: Tensor | None = None  # (I, 2)
    b_in: Tensor | None = None  # (I,)

    def to(self, device: torch.device) -> RuleProgram:
        """The same program with its tensors on ``device``."""
        moved = {f.name: _move(getattr(self, f.name), device) for f in dataclasses.fields(self)}
        return RuleProgram(**moved)

    def state_names(self) -> list[str]:
        """State tensor names in the rule's order."""
        lstm = [n for i in range(self.layers) for n in (f"h{i}", f"c{i}")]
        return (["m", "v"] if self.prep == PREP_RNNPROP else []) + lstm


#: Built-in rules that the fused kernels do not implement yet: they run on the reference step,
#: ``backend="auto"`` says so once, and an explicit fast backend refuses them.
NOT_YET_IMPLEMENTED: tuple[type[UpdateRule], ...] = (NormProp,)


def not_yet_implemented(rule: UpdateRule) -> bool:
    """Whether ``rule`` is a built-in rule that the fused kernels do not implement yet."""
    return type(rule) in NOT_YET_IMPLEMENTED


def _move(value: object, device: torch.device) -> object:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


@torch.no_grad()
def rule_program(rule: UpdateRule) -> RuleProgram | None:
    """The fused-kernel program of ``rule``, or ``None`` when only the reference path applies."""
    if type(rule) not in (L2ODM, RNNprop):
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
    return RuleProgram(
        prep=PREP_RNNPROP,
        out_tanh=True,
        beta1=float(c.beta1),
        beta2=float(c.beta2),
        rp_eps=float(c.eps),
        w_in=lin.weight.detach().float().contiguous(),
        b_in=(lin.bias if lin.bias is not None else torch.zeros(lin.out_features))
        .detach()
        .float()
        .contiguous(),
        **common,
    )


def dm_exp_k(program: RuleProgram) -> float:
    """``e^k`` of L2O-DM's sign input, as the reference computes it (``math.exp``)."""
    return math.exp(program.dm_k)
