"""NormProp: a small coordinatewise LSTM whose update is RMS-normalized per tensor.

The LSTM proposes a bounded direction per coordinate; each tensor's update is that direction
rescaled to the RMS of Adam's own step on the same tensor, times a learned per-tensor gain. So
``lr`` means what it means for Adam (``L2O(params, rule)`` defaults to 1e-3), schedules and
decoupled weight decay carry over, and no tensor's step can run away from Adam's scale
(docs/method.md, "NormProp"). The normalization follows Celo2 (Moudgil et al., ICLR 2026).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatl2o.rules.base import (
    MAX_WIDTH,
    ConfigError,
    LSTMStack,
    RuleConfig,
    State,
    TensorwiseRule,
    check_upper_bound,
)

#: Most floats of state a NormProp coordinate may carry (4x Adam's two; issue 17's budget).
MAX_STATE_FLOATS = 16

#: Added under the square roots of the per-tensor means: keeps an all-zero tensor finite and
#: differentiable, and is far below any mean square that float32 gradients produce.
TINY = 1e-30


#: A fresh rule's readout weights are PyTorch's default draw times this (with ``adam_skip``).
READOUT_INIT_SCALE = 0.01


@dataclasses.dataclass
class NormPropConfig(RuleConfig):
    """NormProp: three Adam-normalized inputs, one small LSTM layer, a tanh direction, and a
    per-tensor update of Adam's step RMS times a gain in ``[e^-b, e^b]``, ``b = log_gain_bound``.

    The state per coordinate is ``m_fast``, ``m_slow``, ``v`` and the LSTM's ``(h, c)``:
    ``3 + 2 * hidden_size * num_layers`` floats, at most :data:`MAX_STATE_FLOATS`.
    """

    architecture = "normprop"
    hidden_size: int = 4
    num_layers: int = 1
    output_scale: float = 1.0
    beta_fast: float = 0.9
    beta_slow: float = 0.99
    beta2: float = 0.999
    eps: float = 1e-8
    input_size: int = 8
    log_gain_bound: float = 1.3862943611198906  # log(4)
    adam_skip: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta_fast", "beta_slow", "beta2"):
            beta = getattr(self, name)
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"NormPropConfig: {name} must be in [0, 1), got {beta!r}")
        if not self.eps > 0:
            raise ConfigError(f"NormPropConfig: eps must be > 0, got {self.eps!r}")
        if not self.output_scale > 0:
            raise ConfigError(
                f"NormPropConfig: output_scale must be > 0, got {self.output_scale!r}"
            )
        if not 0.0 <= self.log_gain_bound <= 10.0:
            raise ConfigError(
                "NormPropConfig: log_gain_bound must be in [0, 10] (0 disables the learned "
                f"gain), got {self.log_gain_bound!r}"
            )
        if not 0.0 <= self.adam_skip <= 10.0:
            raise ConfigError(
                "NormPropConfig: adam_skip must be in [0, 10] (0: the direction is the LSTM's "
                f"alone), got {self.adam_skip!r}"
            )
        if self.input_size < 1:
            raise ConfigError(f"NormPropConfig: input_size must be >= 1, got {self.input_size}")
        check_upper_bound(self, "input_size", MAX_WIDTH)
        floats = 3 + 2 * self.hidden_size * self.num_layers
        if floats > MAX_STATE_FLOATS:
            raise ConfigError(
                f"NormPropConfig: hidden_size={self.hidden_size}, num_layers={self.num_layers} "
                f"give {floats} floats of state per coordinate (3 + 2 * hidden_size * "
                f"num_layers), over the limit of {MAX_STATE_FLOATS}; lower hidden_size or "
                "num_layers so that hidden_size * num_layers <= 6"
            )


class NormProp(TensorwiseRule):
    """Inputs ``m_fast_hat/(sqrt(v_hat)+eps)`` (Adam's step), ``m_slow_hat/(...)``, ``g/(...)``
    -> Linear -> ELU -> LSTM -> ``d = tanh(adam_skip * adam + readout(h))``; per tensor T the
    update is
    ``u = a_T * gain_T * d / rms_T(d)`` with ``a_T`` the RMS of Adam's step
    ``m_fast_hat/(sqrt(v_hat)+eps)`` over T and ``gain_T = exp(b * tanh(mean_T(gain(h))))``.
    """

    config_class = NormPropConfig
    config: NormPropConfig
    default_lr = 1e-3
    #: stats columns: d^2, Adam's step^2, the gain head's output
    reductions = 3

    def __init__(self, config: NormPropConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.input = nn.Linear(3, c.input_size)
        self.lstm = LSTMStack(c.input_size, c.hidden_size, c.num_layers)
        self.readout = nn.Linear(c.hidden_size, 1)
        self.gain = nn.Linear(c.hidden_size, 1)
        # A fresh rule's gain is exactly 1: its step has the RMS of Adam's, whatever its LSTM.
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.gain.bias)
        if c.adam_skip:  # and its direction is near tanh(Adam's step): it starts out as Adam,
            # with a readout small enough not to matter yet large enough for meta-gradients
            with torch.no_grad():
                self.readout.weight.mul_(READOUT_INIT_SCALE)
            nn.init.zeros_(self.readout.bias)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"m_fast": (), "m_slow": (), "v": (), **super().state_shapes()}

    def coordinatewise(
        self, grad: Tensor, state: State, step: int | Tensor
    ) -> tuple[Tensor, State, Tensor]:
        """The direction ``d``, the new state and stats ``(d^2, adam^2, gain(h))`` per row."""
        c = self.config
        t = float(step)
        if t < 1:
            raise ValueError(f"NormProp: step must be >= 1 (1-based step index), got {t:g}")
        m_fast = c.beta_fast * state["m_fast"] + (1.0 - c.beta_fast) * grad
        m_slow = c.beta_slow * state["m_slow"] + (1.0 - c.beta_slow) * grad
        v = c.beta2 * state["v"] + (1.0 - c.beta2) * grad * grad
        denom = torch.sqrt(v / (1.0 - c.beta2**t)) + c.eps
        adam = (m_fast / (1.0 - c.beta_fast**t)) / denom
        x = torch.stack((adam, (m_slow / (1.0 - c.beta_slow**t)) / denom, grad / denom), dim=-1)
        h, lstm_state = self.lstm(F.elu(self.input(x)), state)
        d = torch.tanh(c.adam_skip * adam + self.readout(h).squeeze(-1))
        stats = torch.stack((d * d, adam * adam, self.gain(h).squeeze(-1)), dim=-1)
        return d, {"m_fast": m_fast, "m_slow": m_slow, "v": v, **lstm_state}, stats

    def finish(self, direction: Tensor, totals: Tensor, count: Tensor) -> Tensor:
        """``output_scale * rms(adam) * gain / rms(d) * d`` over one tensor."""
        mean = totals / count.clamp(min=1).to(totals.dtype)
        gain = torch.exp(self.config.log_gain_bound * torch.tanh(mean[2]))
        scale = torch.sqrt(mean[1] + TINY) * gain / torch.sqrt(mean[0] + TINY)
        return (self.config.output_scale * scale) * direction
