"""The optimizee as a function of ONE flat vector: :class:`Task`, the project initializer
(:meth:`Task.init_params`, :func:`lecun_init_`) and the registry the named tasks go into
(:data:`TASKS`, :func:`register_task`).

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
gradients of scale ``s_T``. :class:`flatl2o.meta.task_distribution.TaskDistribution` draws a
task, a batch size and the scales per meta-training trajectory.

THE project initializer (:meth:`Task.init_params`), used for meta-training and evaluation alike
(docs/method.md §3): LeCun normal, i.e. every weight of a Linear or Conv layer is drawn
from N(0, 1/fan_in) with fan_in = in_features (Linear) or in_channels/groups * prod(kernel_size)
(Conv), and every bias is zero. Recurrent layers (RNN, LSTM, GRU) get the same LeCun normal
weights per gate matrix (fan_in = its input width) and zero biases; embeddings N(0, 1) (torch's
own choice). Normalization layers get weight 1 and bias 0. Any other trainable parameter keeps
the value the module currently holds (so user modules with custom parameters keep their own
initialization). Draws follow ``named_parameters()`` order from the
given ``torch.Generator``, so the result is deterministic given the generator's state.

The registry is declared here and filled by :mod:`flatl2o.meta.builtin_tasks` (as ``RULES`` is
declared in ``flatl2o.rules.base`` and filled by ``flatl2o.rules``); import the names from
:mod:`flatl2o.meta.tasks`, which registers the built-in tasks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flatl2o.meta import data as _data
from flatl2o.meta.data import Dataset

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
