"""Functional optimizees: a model's loss as a differentiable function of ONE flat vector.

The meta-trainer holds all trainable parameters of an optimizee in one flat float32 vector
``theta`` of shape ``(num_params,)``, applies the learned update rule to it, and needs the loss
to be differentiable in ``theta`` (meta-gradients flow through the trajectory; the Hessian
regularizers need double backward). :class:`Task` provides that on top of an ordinary
``nn.Module``: ``theta`` is cut into views shaped like the module's trainable parameters (in
``module.named_parameters()`` order) and the module is run with
``torch.func.functional_call``. The module only supplies the architecture; its own parameter
values are never read by :meth:`Task.logits` / :meth:`Task.loss`.

Buffers (e.g. BatchNorm running statistics) and frozen parameters (``requires_grad=False``)
are not part of ``theta``: the module's own tensors are used. The module runs in whatever mode
(train / eval) it is in; :meth:`Task.evaluate` switches it to eval mode for the evaluation and
restores the previous mode. A BatchNorm that tracks running statistics updates them in place
in train mode (torch does that inside ``functional_call``), which is state outside ``theta``
that a checkpoint of a meta-training run does not hold; the built-in BatchNorm task therefore
uses ``track_running_stats=False`` (batch statistics in training and evaluation, no buffers),
so its loss is a pure function of ``theta`` and the batch.

Task augmentation (Celo): :meth:`Task.variant` gives the same task in reparameterized
coordinates ``phi`` with ``theta_T = s_T * phi_T`` per trainable tensor ``T``: the loss as a
function of ``theta`` is unchanged, while the optimizer sees parameters of scale ``1/s_T`` and
gradients of scale ``s_T``. :class:`TaskDistribution` draws a task, a batch size and the scales
per meta-training trajectory.

THE project initializer (:meth:`Task.init_params`), used for meta-training and evaluation alike
(docs/method.md §3): LeCun normal, i.e. every weight of a Linear or Conv layer is drawn
from N(0, 1/fan_in) with fan_in = in_features (Linear) or in_channels/groups * prod(kernel_size)
(Conv), and every bias is zero. Recurrent layers (RNN, LSTM, GRU) get the same LeCun normal
weights per gate matrix (fan_in = its input width) and zero biases; embeddings N(0, 1) (torch's
own choice). Normalization layers get weight 1 and bias 0. Any other trainable parameter keeps
the value the module currently holds (so user modules with custom parameters keep their own
initialization). Draws follow ``named_parameters()`` order from the
given ``torch.Generator``, so the result is deterministic given the generator's state.

Built-in optimizees are registered with :func:`register_task`; :func:`make_task` builds one by
name. Adding an optimizee is one small factory ``(dataset=None, batch_size=128) -> Task``.
Built-in tasks cover MLPs of several widths, depths and activations (MNIST-5k, 8x8 digits), a
plain and a residual BatchNorm CNN, an LSTM, byte-level transformer language models and an MLP
regression (docs/meta-training.md lists them with their cost).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flatl2o.meta import data as _data
from flatl2o.meta.data import Dataset
from flatl2o.meta.models import ResNet, RowLSTM, TinyGPT

__all__ = [
    "TASKS",
    "Task",
    "TaskDistribution",
    "lecun_init_",
    "make_task",
    "register_task",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Sampler = Callable[[torch.Generator], tuple[Tensor, Tensor]]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_WEIGHT_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


class Task:
    """An optimizee: a module's loss on some data as a function of a flat parameter vector."""

    name: str
    dataset: Dataset | None
    batch_size: int
    num_params: int
    param_shapes: dict[str, torch.Size]
    #: The per-tensor scales ``s_T`` of the reparameterization ``theta_T = s_T * phi_T``
    #: (:meth:`variant`), one per trainable tensor; None: the module's own coordinates.
    tensor_scales: tuple[float, ...] | None = None
    _scales: Tensor | None = None  # s_T repeated over each tensor's coordinates

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn | None = None,
        data: Dataset | Sampler | None = None,
        *,
        batch_size: int = 128,
        name: str = "custom",
    ) -> None:
        """Wrap ``module`` (architecture), ``loss_fn(output, y)`` (default: mean cross-entropy)
        and ``data``: a :class:`Dataset`, or a callable ``sample(generator) -> (x, y)``."""
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.name = name
        self.module = module
        self.loss_fn: LossFn = F.cross_entropy if loss_fn is None else loss_fn
        self.batch_size = int(batch_size)
        if data is None or isinstance(data, Dataset):
            self.dataset = data
            self._sampler: Sampler | None = None
        elif callable(data):
            self.dataset = None
            self._sampler = data
        else:
            raise TypeError(
                "data must be a flatl2o Dataset or a callable sample(generator) -> (x, y), "
                f"got {type(data).__name__}"
            )
        self.param_shapes = {n: p.shape for n, p in module.named_parameters() if p.requires_grad}
        if not self.param_shapes:
            raise ValueError("the module has no trainable parameters")
        self._numels = [math.prod(s) for s in self.param_shapes.values()]
        self.num_params = int(sum(self._numels))

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        dataset: Dataset | None = None,
        sampler: Sampler | None = None,
        batch_size: int = 128,
        name: str = "custom",
    ) -> Task:
        """Wrap a user's own module + loss + data (a Dataset or a ``sampler(generator)``)."""
        if (dataset is None) == (sampler is None):
            raise ValueError("pass exactly one of dataset= or sampler=")
        return cls(
            module,
            loss_fn,
            dataset if dataset is not None else sampler,
            batch_size=batch_size,
            name=name,
        )

    def __repr__(self) -> str:
        data = self.dataset.name if self.dataset is not None else "sampler"
        scaled = "" if self.tensor_scales is None else ", reparameterized"
        return (
            f"Task(name={self.name!r}, num_params={self.num_params}, data={data}, "
            f"batch_size={self.batch_size}{scaled})"
        )

    @property
    def segment_sizes(self) -> list[int]:
        """Sizes of the trainable tensors, in ``named_parameters()`` order: how ``theta`` is
        cut into tensors (a rule that normalizes its update per tensor needs them)."""
        return list(self._numels)

    def variant(
        self,
        *,
        batch_size: int | None = None,
        scales: Sequence[float] | Tensor | None = None,
    ) -> Task:
        """This task with another minibatch size and/or in reparameterized coordinates.

        ``scales`` (one positive number ``s_T`` per trainable tensor) makes the new task's flat
        vector ``phi`` with ``theta_T = s_T * phi_T``: :meth:`loss` of ``phi`` is the original
        loss of ``theta``, :meth:`init_params` returns the original initialization divided by
        ``s``, and the loss gradient in ``phi`` is ``s`` times the one in ``theta``. Scales
        compose with this task's own. The module and data are shared, not copied.
        """
        new = copy.copy(self)
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            new.batch_size = batch_size
        if scales is not None:
            s = torch.as_tensor(scales, dtype=torch.float64).reshape(-1)
            if s.numel() != len(self._numels):
                raise ValueError(
                    f"scales must give one number per trainable tensor ({len(self._numels)}), "
                    f"got {s.numel()}"
                )
            if not bool(torch.all(torch.isfinite(s) & (s > 0))):
                raise ValueError(f"scales must be finite and > 0, got {s.tolist()}")
            own = self.tensor_scales or (1.0,) * len(self._numels)
            new.tensor_scales = tuple(a * b for a, b in zip(own, s.tolist(), strict=True))
            per_tensor = torch.tensor(new.tensor_scales, dtype=torch.float32)
            new._scales = torch.repeat_interleave(per_tensor, torch.tensor(self._numels)).to(
                self.device
            )
        return new

    # ------------------------------------------------------------------ flat <-> named params

    @property
    def device(self) -> torch.device:
        """Device of the module's (first trainable) parameter: where theta lives."""
        return next(p for p in self.module.parameters() if p.requires_grad).device

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split flat ``theta`` into named views shaped like the trainable parameters (no
        scaling: a reparameterized task's :meth:`logits` scales before it splits)."""
        if theta.ndim != 1 or theta.numel() != self.num_params:
            raise ValueError(
                f"theta must be a flat vector of {self.num_params} entries, got shape "
                f"{tuple(theta.shape)}"
            )
        chunks = torch.split(theta, self._numels)
        return {n: c.view(s) for (n, s), c in zip(self.param_shapes.items(), chunks, strict=True)}

    def flatten(self, params: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
        """Concatenate parameters (a name->tensor mapping, or tensors in order) into theta
        (in this task's coordinates: divided by the scales of a reparameterized task)."""
        if isinstance(params, Mapping):
            missing = [n for n in self.param_shapes if n not in params]
            if missing:
                raise KeyError(f"parameters missing from the mapping: {missing}")
            tensors = [params[n] for n in self.param_shapes]
        else:
            tensors = list(params)
            if len(tensors) != len(self.param_shapes):
                raise ValueError(f"expected {len(self.param_shapes)} tensors, got {len(tensors)}")
        for (n, s), t in zip(self.param_shapes.items(), tensors, strict=True):
            if t.shape != s:
                raise ValueError(
                    f"parameter {n!r}: expected shape {tuple(s)}, got {tuple(t.shape)}"
                )
        theta = torch.cat([t.reshape(-1) for t in tensors]).to(torch.float32)
        return theta if self._scales is None else theta / self._scales.to(theta.device)

    def load_params(self, theta: Tensor) -> None:
        """Copy ``theta`` into the module's own parameters (e.g. to use the trained model)."""
        with torch.no_grad():
            named = dict(self.module.named_parameters())
            for n, v in self.unflatten(self._model_theta(theta.detach())).items():
                named[n].copy_(v)

    def init_params(self, generator: torch.Generator) -> Tensor:
        """THE project initializer: LeCun normal weights, zero biases (see module docstring);
        a reparameterized task (:meth:`variant`) returns it divided by its scales."""
        owner: dict[int, nn.Module] = {}
        for m in self.module.modules():
            for p in m.parameters(recurse=False):
                owner.setdefault(id(p), m)
        named = dict(self.module.named_parameters())
        out = []
        for n, shape in self.param_shapes.items():
            p = named[n]
            m = owner.get(id(p))
            leaf = n.rsplit(".", 1)[-1]
            if isinstance(m, _WEIGHT_TYPES) and leaf == "weight":
                fan_in = nn.init._calculate_fan_in_and_fan_out(p)[0]
                v = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(fan_in)
            elif isinstance(m, nn.RNNBase) and leaf.startswith("weight_"):
                v = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(
                    shape[1]
                )
            elif isinstance(m, nn.RNNBase) and leaf.startswith("bias_"):
                v = torch.zeros(shape, dtype=torch.float32)
            elif isinstance(m, nn.Embedding) and leaf == "weight":
                v = torch.randn(shape, generator=generator, dtype=torch.float32)
            elif isinstance(m, _WEIGHT_TYPES + _NORM_TYPES) and leaf == "bias":
                v = torch.zeros(shape, dtype=torch.float32)
            elif isinstance(m, _NORM_TYPES) and leaf == "weight":
                v = torch.ones(shape, dtype=torch.float32)
            else:
                v = p.detach().to("cpu", torch.float32).clone()
            out.append(v.reshape(-1))
        theta = torch.cat(out).to(self.device)
        return theta if self._scales is None else theta / self._scales

    def _model_theta(self, theta: Tensor) -> Tensor:
        """The module's parameters (flat) for this task's vector ``theta``."""
        return theta if self._scales is None else theta * self._scales.to(theta.device)

    # ---------------------------------------------------------------------- loss and data

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        """Model output for inputs ``x`` with parameters ``theta`` (differentiable in theta)."""
        params = self.unflatten(self._model_theta(theta))
        return functional_call(self.module, params, (x.to(theta.device),))

    def loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Loss ``loss_fn(logits(theta, x), y)`` (mean cross-entropy by default)."""
        return self.loss_fn(self.logits(theta, x), y.to(theta.device))

    def sample_batch(
        self, generator: torch.Generator, split: str = "train"
    ) -> tuple[Tensor, Tensor]:
        """A minibatch of ``batch_size`` examples (uniform, with replacement) from ``split``."""
        if self.dataset is not None:
            return _data.sample_batch(self.dataset.split(split), self.batch_size, generator)
        if self._sampler is not None:
            if split != "train":
                raise ValueError(
                    f"task {self.name!r} samples its data with a callable, which only provides "
                    f"training batches; split={split!r} needs a Dataset"
                )
            return self._sampler(generator)
        raise ValueError(f"task {self.name!r} has no data (neither a Dataset nor a sampler)")

    def evaluate(
        self, theta: Tensor, split: str = "test", *, max_batch: int = 2000
    ) -> dict[str, float]:
        """Loss and accuracy over a whole split, computed in chunks under ``torch.no_grad``.

        The loss is the example-weighted mean of the chunk losses (exact for a mean-reduced
        ``loss_fn``). "accuracy" (argmax of the output vs. integer labels) is reported when the
        output is ``(N, classes)`` and the labels are integers.
        """
        if self.dataset is None:
            raise ValueError(
                f"task {self.name!r} has no Dataset (it samples batches with a callable), so it "
                "cannot be evaluated on a split; build it with a flatl2o Dataset to evaluate"
            )
        part = self.dataset.split(split)
        n = len(part)
        if n == 0:
            raise ValueError(f"split {split!r} is empty")
        total_loss, correct, classify = 0.0, 0, True
        theta = theta.detach()
        with torch.no_grad(), _eval_mode(self.module):
            for start in range(0, n, max_batch):
                x = part.x[start : start + max_batch]
                y = part.y[start : start + max_batch].to(theta.device)
                out = self.logits(theta, x)
                total_loss += float(self.loss_fn(out, y)) * y.shape[0]
                if classify and out.ndim == 2 and not y.is_floating_point() and y.ndim == 1:
                    correct += int((out.argmax(dim=1) == y).sum())
                else:
                    classify = False
        result = {"loss": total_loss / n}
        if classify:
            result["accuracy"] = correct / n
        return result


@contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def lecun_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Write THE project initialization (:meth:`Task.init_params`) into ``module`` in place."""
    task = Task(module)
    task.load_params(task.init_params(generator))
    return module


# -------------------------------------------------------------------------------- registry

#: Task factories by name; each takes ``(dataset=None, batch_size=DEFAULT)`` and returns a Task
#: (DEFAULT is 128 examples, 16 sequences for the language models).
TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator registering a task factory under ``name`` (duplicate names are refused)."""

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in TASKS:
            raise ValueError(f"a task named {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return deco


def make_task(name: str, **kwargs) -> Task:
    """Build the registered task ``name``; kwargs (dataset=, batch_size=) go to its factory."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None
    return factory(**kwargs)


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
    statistics in training and evaluation (``track_running_stats=False``, module docstring)."""
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


# ------------------------------------------------------------------------- the distribution


class TaskDistribution:
    """The optimizees of meta-training: tasks with sampling weights, minibatch-size factors and
    the range of the per-tensor reparameterization scales, one draw per trajectory.

    :meth:`sample` draws, in this order and only what is configured, from the given generator:
    the task (when there are several: ``torch.multinomial`` over ``weights``), a factor of
    ``batch_scales`` (``torch.randint``; the batch is ``max(1, round(factor * the task's own
    batch size))``), the scales (``torch.rand``, one per trainable
    tensor, mapped log-uniformly onto ``scale_range``). One task and nothing else configured
    draws nothing, so such a run's random stream is what it was before distributions existed.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        weights: Sequence[float] = (),
        *,
        batch_scales: Sequence[float] = (),
        scale_range: Sequence[float] = (),
    ) -> None:
        if not tasks:
            raise ValueError("a task distribution needs at least one task")
        if weights and len(weights) != len(tasks):
            raise ValueError(f"got {len(weights)} weights for {len(tasks)} tasks")
        w = torch.tensor(list(weights) or [1.0] * len(tasks), dtype=torch.float64)
        if not bool(torch.all(torch.isfinite(w) & (w > 0))):
            raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
        if not all(math.isfinite(b) and b > 0 for b in batch_scales):
            raise ValueError(f"batch scales must be finite and > 0, got {list(batch_scales)}")
        if scale_range and not (
            len(scale_range) == 2
            and all(math.isfinite(v) for v in scale_range)
            and 0 < scale_range[0] <= scale_range[1]
        ):
            raise ValueError(
                f"scale_range must be [low, high] with 0 < low <= high, got {scale_range}"
            )
        self.tasks = list(tasks)
        self.weights = w
        self.batch_scales = [float(b) for b in batch_scales]
        self.scale_range = tuple(float(v) for v in scale_range)

    def sample(self, generator: torch.Generator) -> Task:
        """One trajectory's optimizee (see the class docstring for what is drawn)."""
        task = self.tasks[0]
        if len(self.tasks) > 1:
            task = self.tasks[int(torch.multinomial(self.weights, 1, generator=generator))]
        batch_size = None
        if self.batch_scales:
            pick = int(torch.randint(len(self.batch_scales), (), generator=generator))
            batch_size = max(1, round(self.batch_scales[pick] * task.batch_size))
        scales = None
        if self.scale_range:
            low, high = (math.log(v) for v in self.scale_range)
            u = torch.rand(len(task.segment_sizes), generator=generator, dtype=torch.float64)
            scales = torch.exp(low + (high - low) * u)
        if batch_size is None and scales is None:
            return task
        return task.variant(batch_size=batch_size, scales=scales)
