"""Train a PyTorch Lightning module with flatl2o: return ``flatl2o.L2O`` (and any
``torch.optim.lr_scheduler``) from ``configure_optimizers``; checkpoints save and restore it.

    pip install "torch==2.13.0" -e ".[integrations]"
    python examples/lightning_module.py --out runs/lightning --epochs 20

The model is a small randomly initialized MLP on a synthetic regression problem.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flatl2o


def make_data(size: int = 256, seed: int = 0) -> TensorDataset:
    """``y = sin(x @ w)`` plus a little noise, with a fixed random ``w``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 8, generator=gen)
    w = torch.randn(8, 1, generator=gen)
    y = torch.sin(x @ w) + 0.01 * torch.randn(size, 1, generator=gen)
    return TensorDataset(x, y)


class Regressor(L.LightningModule):
    """An MLP trained with a learned optimizer; ``rule`` is any ``L2O`` rule argument."""

    def __init__(self, rule: flatl2o.UpdateRule | str | None = None, lr: float = 1.0) -> None:
        super().__init__()
        self.rule = rule
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = flatl2o.L2O(self.parameters(), self.rule, lr=self.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def make_trainer(out: str, epochs: int, **kwargs: Any) -> L.Trainer:
    """A CPU Trainer that checkpoints at the end of every epoch into ``out``."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=out, save_top_k=-1)],
        **kwargs,
    )


def loader(batch_size: int = 32) -> DataLoader:
    """The training batches, in a fixed order (so that a resumed epoch sees the same ones)."""
    return DataLoader(make_data(), batch_size=batch_size, shuffle=False)


def main(argv: Sequence[str] | None = None) -> Regressor:
    """Train (or resume with ``--resume CKPT``) and print the loss before and after."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/lightning")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--resume", default=None, help="a .ckpt file to resume from")
    args = parser.parse_args(argv)
    L.seed_everything(0)
    model = Regressor()
    x, y = make_data().tensors

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x), y))

    before = loss()
    make_trainer(args.out, args.epochs).fit(model, loader(), ckpt_path=args.resume)
    print(f"loss {before:.4f} -> {loss():.4f}")
    return model


if __name__ == "__main__":
    main()
