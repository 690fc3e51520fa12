"""RNNprop (Lv, Jiang, Li 2017), as configured in the Open-L2O code (docs/method.md §2)."""

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
    Segments,
    State,
    UpdateRule,
    check_upper_bound,
)


@dataclasses.dataclass
class RNNpropConfig(RuleConfig):
    """RNNprop: Adam-style normalized inputs, ELU input layer, LSTM stack, tanh read-out."""

    architecture = "rnnprop"
    beta1: float = 0.95
    beta2: float = 0.95
    eps: float = 1e-8
    input_size: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta1", "beta2"):
            beta = getattr(self, name)
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"RNNpropConfig: {name} must be in [0, 1), got {beta!r}")
        if not self.eps > 0:
            raise ConfigError(f"RNNpropConfig: eps must be > 0, got {self.eps!r}")
        if self.input_size < 1:
            raise ConfigError(f"RNNpropConfig: input_size must be >= 1, got {self.input_size}")
        check_upper_bound(self, "input_size", MAX_WIDTH)


class RNNprop(UpdateRule):
    """Coordinatewise LSTM fed ``m_hat/(sqrt(v_hat)+eps)`` and ``g/(sqrt(v_hat)+eps)``.

    Step ``s = output_scale * tanh(readout(h))``; state ``m``, ``v`` and ``(h, c)`` per layer.
    """

    config_class = RNNpropConfig
    config: RNNpropConfig

    def __init__(self, config: RNNpropConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.input = nn.Linear(2, c.input_size)
        self.lstm = LSTMStack(c.input_size, c.hidden_size, c.num_layers)
        self.readout = nn.Linear(c.hidden_size, 1)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"m": (), "v": (), **super().state_shapes()}

    def preprocess(
        self, grad: Tensor, m: Tensor, v: Tensor, step: int | Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Update the moving averages; return the (n, 2) network input and new ``m``, ``v``."""
        c = self.config
        m = c.beta1 * m + (1.0 - c.beta1) * grad
        v = c.beta2 * v + (1.0 - c.beta2) * grad * grad
        t = float(step)
        if t < 1:
            raise ValueError(f"RNNprop: step must be >= 1 (1-based step index), got {t:g}")
        m_hat = m / (1.0 - c.beta1**t)
        denom = torch.sqrt(v / (1.0 - c.beta2**t)) + c.eps
        return torch.stack((m_hat / denom, grad / denom), dim=-1), m, v

    def forward(
        self, grad: Tensor, state: State, step: int | Tensor = 1, segments: Segments = None
    ) -> tuple[Tensor, State]:
        """One step; coordinatewise, so ``segments`` (tensor boundaries) changes nothing."""
        x, m, v = self.preprocess(grad, state["m"], state["v"], step)
        h, lstm_state = self.lstm(F.elu(self.input(x)), state)
        step_out = self.config.output_scale * torch.tanh(self.readout(h).squeeze(-1))
        return step_out, {"m": m, "v": v, **lstm_state}
