"""Small model architectures shared by the meta-training tasks and the evaluation workloads.

They sit in the meta-training layer because the evaluation layer may import it and not the
other way round (docs/architecture.md): a workload and a meta-training task that train the same
kind of model use one definition. Only architectures live here (no data, no initialization):
:class:`flatl2o.meta.tasks.Task` initializes the tasks' models, torch initializes the
workloads'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNet", "RowLSTM", "TinyGPT"]


class _Block(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """nanoGPT's architecture at toy size: byte embeddings + learned positions, pre-LN blocks,
    final LayerNorm, an untied linear head over the 256 byte values."""

    def __init__(self, d: int, blocks: int, heads: int, context: int, vocab: int = 256) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class _ResBlock(nn.Module):
    def __init__(self, c: int, track_running_stats: bool) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c, track_running_stats=track_running_stats)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c, track_running_stats=track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    """Stem conv + BatchNorm, residual blocks, global average pooling, linear head.

    ``track_running_stats=False`` makes every BatchNorm normalize with the batch's own
    statistics in training and evaluation alike and hold no buffers (what the meta-training
    task uses: the loss is then a pure function of the parameters and the batch).
    """

    def __init__(
        self, channels: int, blocks: int, classes: int = 10, *, track_running_stats: bool = True
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels, track_running_stats=track_running_stats)
        self.blocks = nn.Sequential(
            *(_ResBlock(channels, track_running_stats) for _ in range(blocks))
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


class RowLSTM(nn.Module):
    """An LSTM reading an image row by row; the last hidden state feeds a linear head."""

    def __init__(self, features: int, hidden: int, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])
