"""Train a Hugging Face ``transformers`` model with flatl2o through ``transformers.Trainer``,
checkpoint it, and resume from the checkpoint.

    pip install "torch==2.13.0" -e ".[integrations]"
    python examples/hf_trainer.py --out runs/hf --steps 40
    python examples/hf_trainer.py --out runs/hf --steps 40 --resume runs/hf/checkpoint-20

The model is a tiny, randomly initialized GPT-2 learning sequences that count upward (nothing
is downloaded). ``L2O`` goes in as ``optimizers=(optimizer, scheduler)``; the Trainer saves its
state dict in ``checkpoint-N/optimizer.pt`` and loads it back with ``torch.load(...,
weights_only=True)`` on resume (the state dict holds only tensors, numbers, strings and dicts).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

import flatl2o

VOCAB = 64


class CountingDataset(Dataset):
    """Sequences ``s, s+1, s+2, ...`` (mod ``VOCAB``) from a random start ``s``."""

    def __init__(self, size: int = 512, length: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (size, 1), generator=gen)
        self.ids = (starts + torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model(seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialized 2-layer GPT-2 with a 32-wide residual stream (about 40k params)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def make_trainer(
    out: str,
    steps: int,
    *,
    save_steps: int | None = None,
    rule: flatl2o.UpdateRule | str | None = None,
    batch_size: int = 16,
) -> Trainer:
    """A ``Trainer`` that optimizes with ``L2O`` (``rule``: default shipped checkpoint) under
    a linear warm-up/decay schedule, saving a checkpoint every ``save_steps`` steps."""
    model = make_model()
    optimizer = flatl2o.L2O(model.parameters(), rule)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=min(5, steps // 4), num_training_steps=steps
    )
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        save_strategy="steps",
        save_steps=save_steps or steps,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=CountingDataset(),
        optimizers=(optimizer, scheduler),
    )


def main(argv: Sequence[str] | None = None) -> Trainer:
    """Train (or resume with ``--resume CHECKPOINT``) and print the first and last loss."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/hf")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=None, help="default: steps // 2")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder to resume from")
    args = parser.parse_args(argv)
    trainer = make_trainer(args.out, args.steps, save_steps=args.save_steps or args.steps // 2)
    trainer.train(resume_from_checkpoint=args.resume)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} after {trainer.state.global_step} steps")
    return trainer


if __name__ == "__main__":
    main()
