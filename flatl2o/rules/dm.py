"""L2O-DM (Andrychowicz et al. 2016), as configured in the Open-L2O code (docs/method.md §2)."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from flatl2o.rules.base import ConfigError, LSTMStack, RuleConfig, Segments, State, UpdateRule


@dataclasses.dataclass
class DMConfig(RuleConfig):
    """L2O-DM: "log and sign" gradient preprocessing, LSTM stack, linear read-out."""

    architecture = "l2o-dm"
    k: float = 5.0
    eps: float = float(torch.finfo(torch.float32).eps)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.k > 0 and self.eps > 0):
            raise ConfigError(
                f"DMConfig: k and eps must be > 0, got k={self.k!r}, eps={self.eps!r}"
            )


class L2ODM(UpdateRule):
    """Coordinatewise 2-layer LSTM fed the log-magnitude and sign of the gradient.

    Step ``s = output_scale * readout(h)`` with no squashing; state ``(h, c)`` per layer.
    """

    config_class = DMConfig
    config: DMConfig

    def __init__(self, config: DMConfig | None = None) -> None:
        super().__init__(config)
        c = self.config
        self.lstm = LSTMStack(2, c.hidden_size, c.num_layers)
        self.readout = nn.Linear(c.hidden_size, 1)

    def preprocess(self, grad: Tensor) -> Tensor:
        """``[clamp(log(|g|+eps)/k, min=-1), clamp(g*e^k, -1, 1)]`` as an (n, 2) tensor."""
        k = self.config.k
        x1 = torch.clamp(torch.log(grad.abs() + self.config.eps) / k, min=-1.0)
        x2 = torch.clamp(grad * math.exp(k), -1.0, 1.0)
        return torch.stack((x1, x2), dim=-1)

    def forward(
        self, grad: Tensor, state: State, step: int | Tensor = 1, segments: Segments = None
    ) -> tuple[Tensor, State]:
        """One step; coordinatewise, so ``segments`` (tensor boundaries) changes nothing."""
        h, new_state = self.lstm(self.preprocess(grad), state)
        return self.config.output_scale * self.readout(h).squeeze(-1), new_state
