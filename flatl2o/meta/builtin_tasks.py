"""The built-in optimizees: one small factory ``(dataset=None, batch_size=128) -> Task`` per
name, each registered with :func:`flatl2o.meta.task.register_task` when this module is imported
(importing :mod:`flatl2o.meta.tasks` does that).

They cover the paper's MLPs and CNN on MNIST-5k and, for the meta-training distribution, MLPs
of several widths, depths and activations (MNIST-5k, 8x8 digits), a residual BatchNorm CNN, an
LSTM, byte-level transformer language models and an MLP regression (docs/meta-training.md lists
them with their cost). Every one is built without touching the global RNG and given the project
initialization (seed 0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatl2o.meta import data as _data
from flatl2o.meta.data import Dataset
from flatl2o.meta.models import ResNet, RowLSTM, TinyGPT
from flatl2o.meta.task import LossFn, Task, register_task


def _build_task(
    name: str,
    build: Callable[[], nn.Module],
    dataset: Dataset,
    batch_size: int,
    loss_fn: LossFn = F.cross_entropy,
) -> Task:
    """Build the module without touching the global RNG, then give it the project init (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        module = build()
    task = Task(module, loss_fn, dataset, batch_size=batch_size, name=name)
    task.load_params(task.init_params(torch.Generator().manual_seed(0)))
    return task


def _mlp(sizes: list[int], act: type[nn.Module] | Callable[[], nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _mlp_task(
    name: str,
    hidden: list[int],
    act: type[nn.Module] | Callable[[], nn.Module],
    dataset: Dataset,
    batch_size: int,
    loss_fn: LossFn = F.cross_entropy,
) -> Task:
    sizes = [math.prod(dataset.input_shape), *hidden, dataset.num_classes]
    return _build_task(name, lambda: _mlp(sizes, act), dataset, batch_size, loss_fn)


@register_task("mnist-mlp-sigmoid")
def mnist_mlp_sigmoid(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """MLP 784-20-10, sigmoid, cross-entropy: the meta-training optimizee (docs/method.md §3)."""
    ds = dataset if dataset is not None else _data.load_mnist5k()
    return _mlp_task("mnist-mlp-sigmoid", [20], nn.Sigmoid, ds, batch_size)


@register_task("mnist-mlp-relu")
def mnist_mlp_relu(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """MLP 784-20-10 with ReLU (unseen optimizee)."""
    ds = dataset if dataset is not None else _data.load_mnist5k()
    return _mlp_task("mnist-mlp-relu", [20], nn.ReLU, ds, batch_size)


@register_task("mnist-mlp-deep")
def mnist_mlp_deep(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """MLP 784-20-20-10 with sigmoid (unseen optimizee)."""
    ds = dataset if dataset is not None else _data.load_mnist5k()
    return _mlp_task("mnist-mlp-deep", [20, 20], nn.Sigmoid, ds, batch_size)


@register_task("mnist-conv")
def mnist_conv(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """Conv(1->8, 3, stride 2)+ReLU, Conv(8->16, 3, stride 2)+ReLU, Linear->10 (unseen optimizee).

    Inputs are flattened and reshaped to (C, H, W) inside the module; flat square inputs such as
    (784,) become (1, 28, 28).
    """
    ds = dataset if dataset is not None else _data.load_mnist5k()
    shape = tuple(ds.input_shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise ValueError(f"mnist-conv needs square images, got input_shape {shape}")
        shape = (1, side, side)
    if len(shape) != 3:
        raise ValueError(f"mnist-conv needs (C, H, W) or flat square inputs, got {shape}")

    def build() -> nn.Module:
        features = nn.Sequential(
            nn.Flatten(),
            nn.Unflatten(1, shape),
            nn.Conv2d(shape[0], 8, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_feat = features(torch.zeros(1, math.prod(shape))).shape[1]
        return nn.Sequential(*features, nn.Linear(n_feat, ds.num_classes))

    return _build_task("mnist-conv", build, ds, batch_size)


@register_task("digits-mlp")
def digits_mlp(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """MLP 64-16-10 with sigmoid on scikit-learn's 8x8 digits: tiny, for fast tests."""
    ds = dataset if dataset is not None else _data.load_digits()
    return _mlp_task("digits-mlp", [16], nn.Sigmoid, ds, batch_size)


# ------------------------------------------------------- the meta-training distribution's tasks
# Small and cheap (a few ms per optimizee step on one thread, docs/meta-training.md), varied in
# width, depth, activation, architecture, data and loss. Names: DATA-MODEL[-ACTIVATION-WIDTHS].

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
_MLP_FAMILY = {  # name -> (dataset loader, activation, hidden widths)
    "mnist-mlp-gelu-32": (_data.load_mnist5k, "gelu", [32]),
    "mnist-mlp-tanh-32x32": (_data.load_mnist5k, "tanh", [32, 32]),
    "digits-mlp-relu-32x32x32": (_data.load_digits, "relu", [32, 32, 32]),
    "digits-mlp-gelu-128": (_data.load_digits, "gelu", [128]),
    "digits-mlp-tanh-64x64": (_data.load_digits, "tanh", [64, 64]),
    "digits-mlp-sigmoid-32x32": (_data.load_digits, "sigmoid", [32, 32]),
}


def _register_mlp(name: str, load: Callable[[], Dataset], act: str, hidden: list[int]) -> None:
    def factory(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
        ds = dataset if dataset is not None else load()
        return _mlp_task(name, hidden, _ACTIVATIONS[act], ds, batch_size)

    widths = "-".join(map(str, hidden))
    factory.__doc__ = f"MLP in-{widths}-out with {act} on {load.__name__[5:]}, cross-entropy."
    register_task(name)(factory)


for _name, (_load, _act, _hidden) in _MLP_FAMILY.items():
    _register_mlp(_name, _load, _act, _hidden)


def _images(dataset: Dataset, what: str) -> tuple[int, int]:
    """(side, side) of a dataset of flat square grey images, checked."""
    side = math.isqrt(math.prod(dataset.input_shape))
    if side * side != math.prod(dataset.input_shape):
        raise ValueError(f"{what} needs square images, got input_shape {dataset.input_shape}")
    return side, side


@register_task("digits-cnn-bn")
def digits_cnn_bn(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """Residual CNN with BatchNorm on the 8x8 digits: stem conv 1->8 + BN, one residual block
    (conv-BN-ReLU-conv-BN + skip), global average pooling, linear head. BatchNorm uses batch
    statistics in training and evaluation (``track_running_stats=False``: its loss is a pure
    function of ``theta`` and the batch, :mod:`flatl2o.meta.task`)."""
    ds = dataset if dataset is not None else _data.load_digits()
    shape = (1, *_images(ds, "digits-cnn-bn"))

    def build() -> nn.Module:
        net = ResNet(8, 1, ds.num_classes, track_running_stats=False)
        return nn.Sequential(nn.Unflatten(1, shape), net)

    return _build_task("digits-cnn-bn", build, ds, batch_size)


@register_task("digits-lstm")
def digits_lstm(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """LSTM (hidden 32) reading the 8x8 digits row by row (8 steps of 8 pixels), linear head
    on the last hidden state."""
    ds = dataset if dataset is not None else _data.load_digits()
    rows, cols = _images(ds, "digits-lstm")

    def build() -> nn.Module:
        return nn.Sequential(nn.Unflatten(1, (rows, cols)), RowLSTM(cols, 32, ds.num_classes))

    return _build_task("digits-lstm", build, ds, batch_size)


def _sequence_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean next-byte cross-entropy over every position of every sequence (nats per byte)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _lm_task(name: str, d: int, blocks: int, dataset: Dataset | None, batch_size: int) -> Task:
    ds = dataset if dataset is not None else _data.load_text()
    context = ds.input_shape[0]
    return _build_task(
        name,
        lambda: TinyGPT(d, blocks, 2, context, ds.num_classes),
        ds,
        batch_size,
        _sequence_cross_entropy,
    )


@register_task("text-transformer-32")
def text_transformer_32(dataset: Dataset | None = None, batch_size: int = 16) -> Task:
    """Byte-level transformer LM (1 pre-LN block, d_model 32, 2 heads, context 32) on Python
    sources of torch (:func:`flatl2o.meta.data.load_text`); loss in nats per byte. Default batch:
    16 sequences (512 predicted bytes), as costly per step as the image tasks' 128 examples."""
    return _lm_task("text-transformer-32", 32, 1, dataset, batch_size)


@register_task("text-transformer-16x2")
def text_transformer_16x2(dataset: Dataset | None = None, batch_size: int = 16) -> Task:
    """Byte-level transformer LM (2 pre-LN blocks, d_model 16, 2 heads, context 32) on Python
    sources of torch (:func:`flatl2o.meta.data.load_text`); loss in nats per byte. Default batch:
    16 sequences (512 predicted bytes), as costly per step as the image tasks' 128 examples."""
    return _lm_task("text-transformer-16x2", 16, 2, dataset, batch_size)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of a one-output regression model."""
    return F.mse_loss(out.squeeze(-1), y)


@register_task("friedman-mlp")
def friedman_mlp(dataset: Dataset | None = None, batch_size: int = 128) -> Task:
    """MLP regression 10-32-32-1 with ReLU, MSE on the standardized target, on scikit-learn's
    Friedman #1 problem (:func:`flatl2o.meta.data.load_friedman`)."""
    ds = dataset if dataset is not None else _data.load_friedman()
    return _mlp_task("friedman-mlp", [32, 32], nn.ReLU, ds, batch_size, _mse)
