"""Data-parallel (DDP) or sharded (FSDP2) training with flatl2o on ``torch.distributed``, with
sharded checkpoints (``torch.distributed.checkpoint``, DCP) that resume.

    torchrun --nproc-per-node 2 examples/distributed_train.py --mode fsdp2 --ckpt runs/dist
    # run the same command again (after a kill, or with more --steps): it resumes from the
    # newest checkpoint in --ckpt

gloo on CPU, NCCL on CUDA (one GPU per process). Under DDP every rank holds the whole model
and ``L2O`` takes the same step everywhere; under FSDP2 (``fully_shard``) each rank updates
its own shard of every parameter with that shard's recurrent state, and the checkpoint holds
the sharded parameters and optimizer state (loadable on any number of FSDP2 ranks).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import flatl2o
from flatl2o import distributed

GLOBAL_BATCH = 64


def build(mode: str, device: torch.device) -> tuple[nn.Module, flatl2o.L2O]:
    """The model wrapped for ``mode`` ("ddp" or "fsdp2") and its ``L2O`` optimizer."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    model = model.to(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, flatl2o.L2O(model.parameters())  # the default shipped rule


def batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of global batch ``step`` (the same data whether or not we resumed)."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    rows = slice(dist.get_rank() * per_rank, (dist.get_rank() + 1) * per_rank)
    return x[rows].to(device), y[rows].to(device)


def save_checkpoint(model: nn.Module, opt: flatl2o.L2O, folder: Path, step: int) -> None:
    """Save model and optimizer (sharded under FSDP2) with DCP as ``folder/step-N``."""
    state = {
        "model": get_model_state_dict(model),
        "optim": distributed.get_optimizer_state_dict(model, opt),
        "step": step,
    }
    dcp.save(state, checkpoint_id=folder / f"step-{step}")
    dist.barrier()
    if dist.get_rank() == 0:  # mark it complete only once every rank has written
        (folder / "latest.tmp").write_text(f"step-{step}")
        os.replace(folder / "latest.tmp", folder / "latest")


def load_checkpoint(model: nn.Module, opt: flatl2o.L2O, folder: Path) -> int:
    """Load the newest complete checkpoint in ``folder``; return its step (0 if none)."""
    if not (folder / "latest").is_file():
        return 0
    state = {
        "model": get_model_state_dict(model),
        "optim": distributed.get_optimizer_state_dict(model, opt),
        "step": 0,
    }
    dcp.load(state, checkpoint_id=folder / (folder / "latest").read_text())
    set_model_state_dict(model, state["model"])
    distributed.set_optimizer_state_dict(model, opt, state["optim"])
    return int(state["step"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train ``--steps`` steps in total (resuming from ``--ckpt``); return losses and weights."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp2"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=200, help="total steps, including resumed")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--ckpt", default="runs/dist", help="checkpoint folder")
    args = parser.parse_args(argv)
    if not distributed.init_from_env():
        raise SystemExit("launch with torchrun --nproc-per-node N (N >= 2), see the docstring")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    folder = Path(args.ckpt)
    folder.mkdir(parents=True, exist_ok=True)
    model, opt = build(args.mode, device)
    start = load_checkpoint(model, opt, folder)
    losses = []
    for step in range(start, args.steps):
        x, y = batch(step, device)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(model, opt, folder, step + 1)
        if dist.get_rank() == 0 and (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss on rank 0's slice {losses[-1]:.4f}")
    params = {
        name: (p.full_tensor() if distributed.is_dtensor(p) else p).detach().cpu()
        for name, p in model.named_parameters()
    }
    return {"start": start, "losses": losses, "params": params}


if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():
            dist.barrier()  # no rank tears the process group down while another still uses it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
