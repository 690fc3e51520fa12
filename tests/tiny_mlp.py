"""A tiny optimizee with an explicit Hessian, shared by the Hessian and regularizer tests."""

from __future__ import annotations

from collections.abc import Callable

import torch

DT = torch.float64
SIZES = [(5, 4), (4, 3)]  # 5-4-3 tanh MLP
N_PARAMS = sum(a * b + b for a, b in SIZES)  # 39


def mlp_problem(seed: int = 0) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """A cross-entropy loss of a 5-4-3 tanh MLP over a flat parameter vector, and a point."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (32,), generator=gen)

    def loss_fn(theta: torch.Tensor) -> torch.Tensor:
        i, h = 0, x
        for layer, (a, b) in enumerate(SIZES):
            w = theta[i : i + a * b].view(b, a)
            bias = theta[i + a * b : i + a * b + b]
            i += a * b + b
            h = h @ w.T + bias
            if layer < len(SIZES) - 1:
                h = torch.tanh(h)
        return torch.nn.functional.cross_entropy(h, y)

    theta = torch.randn(N_PARAMS, generator=gen, dtype=DT)
    return loss_fn, theta


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)
