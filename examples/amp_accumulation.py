"""A plain PyTorch loop with flatl2o, ``torch.amp`` autocast, ``GradScaler`` and gradient
accumulation.

    python examples/amp_accumulation.py --steps 100 --accum 4

Autocast runs the forward pass in bf16 on CPU (fp16 on CUDA); the parameters, their gradients
and L2O's recurrent state stay fp32. ``GradScaler`` scales the loss so that fp16 gradients do
not underflow; ``scaler.step`` unscales them before ``L2O.step`` sees them and skips the step
(leaving the recurrent state untouched) when any is inf/NaN. On CPU with bf16 the scaler is not
needed and is disabled by default (``--scaler`` turns it on).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import torch
from torch import nn

import flatl2o


def make_model(seed: int = 0) -> nn.Module:
    """A small randomly initialized MLP classifier (32 features, 4 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 4))


def batches(micro_batch: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches of a synthetic task: the class is the argmax of 4 fixed
    projections of the input."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(32, 4, generator=gen)
    while True:
        x = torch.randn(micro_batch, 32, generator=gen)
        yield x, (x @ proj).argmax(dim=1)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    accum: int = 1,
    amp_dtype: torch.dtype | None = torch.bfloat16,
    scaler: torch.amp.GradScaler | None = None,
    max_norm: float | None = 1.0,
) -> list[float]:
    """``steps`` optimizer steps, each over ``accum`` micro-batches; returns the step losses.

    ``amp_dtype=None`` disables autocast; ``scaler=None`` uses a disabled ``GradScaler``.
    """
    device_type = next(model.parameters()).device.type
    scaler = scaler or torch.amp.GradScaler(device_type, enabled=False)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(accum):
            x, y = next(data)
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = nn.functional.cross_entropy(model(x), y) / accum  # mean over the step
            scaler.scale(loss).backward()
            total += float(loss.detach())
        if max_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)  # unscales (if not done), skips the step on inf/NaN
        scaler.update()
        losses.append(total)
    return losses


def main(argv: Sequence[str] | None = None) -> list[float]:
    """Train with autocast and accumulation; print the loss at the start and the end."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--scaler", action="store_true", help="use GradScaler on CPU too")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model().to(device)
    optimizer = flatl2o.L2O(model.parameters())  # the default shipped rule
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda" or args.scaler)
    data = ((x.to(device), y.to(device)) for x, y in batches(args.micro_batch))
    losses = train(
        model,
        optimizer,
        data,
        steps=args.steps,
        accum=args.accum,
        amp_dtype=amp_dtype,
        scaler=scaler,
    )
    print(f"loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (last 10 mean)")
    return losses


if __name__ == "__main__":
    main()
