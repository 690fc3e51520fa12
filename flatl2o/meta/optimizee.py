"""Train one optimizee with one optimizer and measure it: the loop behind every published number.

:func:`train_optimizee` is the only loop that trains an optimizee without meta-gradients. The
evaluation suite (:func:`flatl2o.evaluation.runner.train_run`), meta-training validation
(:meth:`flatl2o.meta.trainer.MetaTrainer.validate`) and the model cards' metrics
(:func:`evaluate_rule`) all call it, so a number measured for the same rule, task, seed and
horizon is the same number wherever it is published. Protocol (docs/method.md §5):

- the run draws everything from ``torch.Generator().manual_seed(seed)``: first the
  initialization (``Task.init_params``, the project's initializer, or ``Workload.build``), then
  one training minibatch per closure call (an optimizer whose ``fresh_batch_per_closure`` is set,
  Entropy-SGD, gets a new one per call after the first);
- the optimizer sees the optimizee's parameters per tensor, as a user's
  ``opt = X(model.parameters())`` does: a :class:`~flatl2o.meta.tasks.Task`'s flat vector is cut
  into one ``nn.Parameter`` per module parameter (the loss is computed on their concatenation,
  so the loss and every gradient coordinate are the flat vector's, bit for bit), a
  :class:`Workload`'s module is trained through its own parameters and buffers; every step is
  ``optimizer.step(closure)``, learned rules through :class:`flatl2o.L2O`;
- the minibatch loss before each step is recorded;
- a run whose minibatch loss or parameters become non-finite (or whose optimizer raises
  ``FloatingPointError``, e.g. ``L2O(nonfinite="raise")``) is stopped: its parameters (and
  buffers) are reset to the iterate before the failing step, ``diverged_at`` records the step,
  and later horizons are measured at that iterate;
- at each horizon ``measure(run, horizon)`` returns that iterate's numbers.

Summaries over seeds use :func:`mean_std`: the mean and the SAMPLE standard deviation (ddof 1)
of the finite values, the convention of the results pages.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatl2o.meta.recipe import EVAL_SEED_OFFSET as _EVAL_SEED_OFFSET
from flatl2o.meta.tasks import Task
from flatl2o.rules import UpdateRule

__all__ = [
    "EVAL_SEED_OFFSET",
    "OptimizeeRun",
    "Trajectory",
    "Workload",
    "evaluate_rule",
    "learned_optimizer",
    "loss_and_grad",
    "mean_std",
    "split_metrics",
    "train_optimizee",
]

#: Optimizee runs for reporting use generators seeded ``EVAL_SEED_OFFSET + seed`` (10,000 +
#: seed) so they never share a random stream with meta-training: recipe validation refuses a
#: ``[train].seed`` that is one of them.
EVAL_SEED_OFFSET = _EVAL_SEED_OFFSET


class Workload(Protocol):
    """A realistic optimizee: a real ``nn.Module`` trained per tensor, with its buffers.

    ``build`` draws the model's initialization from ``generator`` (deterministic given its
    state); ``param_groups`` tags the model's trainable tensors with a ``role``: ``"hidden"``
    (2-D hidden weight matrices: Muon's), ``"matrix"`` (other weights of 2 or more dimensions:
    embeddings, convolutions, the output layer) or ``"vector"`` (biases and normalization
    parameters: no weight decay). ``evaluate`` runs the model in eval mode on a whole split and
    returns at least ``{"loss": ...}``.
    """

    name: str
    batch_size: int

    def build(self, generator: torch.Generator) -> nn.Module: ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]: ...

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...


def _sha(tensors: Sequence[Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class OptimizeeRun:
    """The optimizee being trained: its parameters per tensor, its loss and its evaluation.

    ``params`` are what the optimizer steps; ``groups`` are the same tensors tagged with their
    ``role`` (see :class:`Workload`; a Task's are all ``"matrix"``). ``init_sha`` identifies the
    initial parameters (the same for every optimizer of a seed).
    """

    def __init__(self, task: Task | Workload, generator: torch.Generator) -> None:
        self.task = task
        self.model: nn.Module | None = None
        if isinstance(task, Task):
            theta0 = task.init_params(generator)
            self.init_sha = _sha([theta0])
            self.params = [nn.Parameter(v.clone()) for v in task.unflatten(theta0).values()]
            self.groups: list[dict[str, Any]] = [{"params": self.params, "role": "matrix"}]
        else:
            self.model = task.build(generator)
            self.groups = task.param_groups(self.model)
            self.params = [p for g in self.groups for p in g["params"]]
            if len({id(p) for p in self.params}) != len(list(self.model.parameters())):
                raise ValueError(f"{task.name}: param_groups must hold every parameter once")
            self.init_sha = _sha(self.params)

    @property
    def is_module(self) -> bool:
        """Whether this is a :class:`Workload`'s module (else a Task's flat vector)."""
        return self.model is not None

    def theta(self) -> Tensor:
        """A Task's parameters as its flat vector (detached)."""
        if self.model is not None:
            raise TypeError(f"{self.task.name} is a module workload: it has no flat vector")
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The minibatch loss, differentiable in :attr:`params`."""
        if self.model is None:
            return self.task.loss(torch.cat([p.reshape(-1) for p in self.params]), x, y)
        self.model.train()
        return self.task.loss(self.model, x, y)

    def evaluate(self, split: str) -> dict[str, float]:
        """Loss (and accuracy) over a whole split at the current iterate, in eval mode."""
        if self.model is None:
            return self.task.evaluate(self.theta(), split)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.task.evaluate(self.model, split)
        finally:
            self.model.train(was)

    def param_norm(self) -> float:
        """‖params‖₂, in float64 (a diverging run's float32 sum of squares overflows)."""
        with torch.no_grad():
            return math.sqrt(math.fsum(float(p.double().square().sum()) for p in self.params))

    def _tensors(self) -> list[Tensor]:
        if self.model is None:
            return list(self.params)
        return [*self.model.parameters(), *self.model.buffers()]

    def snapshot(self) -> list[Tensor]:
        """Copies of the parameters (and buffers) to :meth:`restore` after a failing step."""
        return [t.detach().clone() for t in self._tensors()]

    def restore(self, saved: list[Tensor]) -> None:
        """Put back a :meth:`snapshot`."""
        with torch.no_grad():
            for t, v in zip(self._tensors(), saved, strict=True):
                t.copy_(v)


@dataclass
class Trajectory:
    """What :func:`train_optimizee` returns.

    ``losses``: the minibatch loss before each step taken (NaN for a failing step, the last);
    ``metrics``: ``{horizon: measure(...)}``; ``elapsed``: training seconds (measuring excluded)
    at the end of each step; ``norms``: the parameter norm after each step (with
    ``record_norms``); ``optimizer`` and ``run``: as they are at the end.
    """

    run: OptimizeeRun
    optimizer: Optimizer
    losses: list[float] = field(default_factory=list)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    grad_evals: int = 0
    diverged_at: int | None = None
    elapsed: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    measure_seconds: float = 0.0
    measure_cpu_seconds: float = 0.0


OptimizerFactory = Callable[[list[nn.Parameter], list[dict[str, Any]]], Optimizer]
Measure = Callable[[OptimizeeRun, int], dict[str, float]]


def train_optimizee(
    task: Task | Workload,
    make_optimizer: OptimizerFactory,
    *,
    seed: int,
    horizons: Sequence[int],
    measure: Measure | None = None,
    schedule: Callable[[int], float] | None = None,
    record_norms: bool = False,
) -> Trajectory:
    """Train ``task`` for ``max(horizons)`` steps with ``make_optimizer(params, groups)`` from
    the generator seeded ``seed``, calling ``measure(run, h)`` at each horizon ``h`` (see the
    module docstring for the protocol).

    ``schedule``, if given, multiplies every group's lr by ``schedule(t)`` (``LambdaLR``, ``t``
    0-based); ``record_norms`` records the parameter norm after every step.
    """
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be positive step counts, got {list(horizons)}")
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    run = OptimizeeRun(task, gen)
    opt = make_optimizer(run.params, run.groups)
    out = Trajectory(run=run, optimizer=opt)
    fresh = bool(getattr(opt, "fresh_batch_per_closure", False))
    wanted = sorted(set(horizons))
    sched = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batch: tuple[Tensor, Tensor] | None = None
    calls = 0

    def closure() -> Tensor:
        nonlocal batch, calls
        if batch is None or (fresh and calls > 0):
            batch = task.sample_batch(gen)
        calls += 1
        out.grad_evals += 1
        opt.zero_grad(set_to_none=True)
        loss = run.loss(*batch)
        loss.backward()
        return loss.detach()

    for t in range(1, wanted[-1] + 1):
        if out.diverged_at is None:
            batch, calls = None, 0
            before = run.snapshot()
            try:
                loss = float(opt.step(closure))
            except FloatingPointError:  # L2O(nonfinite="raise") on a NaN/inf gradient
                loss = math.nan
            if not math.isfinite(loss) or not all(
                bool(torch.isfinite(q).all()) for q in run.params
            ):
                run.restore(before)
                out.diverged_at = t
            elif sched is not None:
                sched.step()
            out.losses.append(loss)
            if record_norms:
                out.norms.append(run.param_norm())
            out.elapsed.append(time.perf_counter() - t_start - out.measure_seconds)
        if t in wanted and measure is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            out.metrics[t] = measure(run, t)
            out.measure_seconds += time.perf_counter() - t0
            out.measure_cpu_seconds += time.process_time() - c0
    return out


def learned_optimizer(rule: UpdateRule) -> OptimizerFactory:
    """The optimizer factory of a learned rule: ``flatl2o.L2O(params, rule)`` at the rule's own
    ``lr`` (``rule.default_lr``: 1.0 for the paper's rules, 1e-3 for NormProp), stopping the run
    on a non-finite gradient (``nonfinite="raise"``) as every evaluation does."""

    def make(params: list[nn.Parameter], groups: list[dict[str, Any]]) -> Optimizer:
        from flatl2o.optimizer import L2O

        return L2O(params, rule=rule, lr=float(rule.default_lr), nonfinite="raise")

    return make


def split_metrics(run: OptimizeeRun, splits: Sequence[str]) -> dict[str, float]:
    """``{split}_loss`` and ``{split}_accuracy`` (NaN without one) on each whole split."""
    out: dict[str, float] = {}
    for split in splits:
        result = run.evaluate(split)
        out[f"{split}_loss"] = result["loss"]
        out[f"{split}_accuracy"] = result.get("accuracy", math.nan)
    return out


def evaluate_rule(
    rule: UpdateRule,
    task: Task,
    *,
    horizons: Sequence[int],
    seeds: int,
    extra: Callable[[Tensor], dict[str, float]] | None = None,
) -> dict[str, float]:
    """A rule's metrics on ``task`` as model cards report them: test accuracy / test loss /
    train loss, and validation accuracy / loss, after each horizon: :func:`mean_std` over the
    runs of seeds ``0 .. seeds - 1`` (generators ``EVAL_SEED_OFFSET + seed``).

    Each run is :func:`train_optimizee` with :func:`learned_optimizer`, the run the evaluation
    suite makes of the same rule, task and seed, so the numbers are the results page's.
    The validation metrics (``val_accuracy@h``, ``val_loss@h``, on the dataset's validation
    split when it is not empty) are the ones to choose hyper-parameters on, e.g. a regularizer's
    strength; the test metrics are for reporting only (docs/method.md §5).
    ``extra(theta)``, if given, is called at each horizon with that run's flat parameters; each
    ``name: value`` it returns is summarized like the built-in metrics (``name@h`` and
    ``name_std@h``), e.g. a flatness readout at the iterates the accuracies are measured at.
    A metric that is not finite on some seeds is summarized over the others and
    ``name_nonfinite@h`` counts the seeds left out; ``diverged@h`` counts the runs stopped by
    step ``h`` (measured at their last finite iterate, as the results pages do). Both keys are
    present only when not 0.
    """
    splits = ["test", "train"]
    if task.dataset is not None and len(task.dataset.split("val")) > 0:
        splits.append("val")

    def measure(run: OptimizeeRun, horizon: int) -> dict[str, float]:
        m = split_metrics(run, splits)
        found = {"test_accuracy": m["test_accuracy"], "test_loss": m["test_loss"]}
        found["train_loss"] = m["train_loss"]
        if "val" in splits:
            found |= {"val_accuracy": m["val_accuracy"], "val_loss": m["val_loss"]}
        return found | (extra(run.theta()) if extra is not None else {})

    results: dict[str, list[float]] = {}
    diverged: dict[int, int] = {}
    for seed in range(seeds):
        traj = train_optimizee(
            task,
            learned_optimizer(rule),
            seed=EVAL_SEED_OFFSET + seed,
            horizons=horizons,
            measure=measure,
        )
        for h in sorted(set(horizons)):
            for name, value in traj.metrics[h].items():
                results.setdefault(f"{name}@{h}", []).append(value)
            if traj.diverged_at is not None and traj.diverged_at <= h:
                diverged[h] = diverged.get(h, 0) + 1
    summary: dict[str, float] = {}
    for key, values in results.items():
        summary[key], summary[key.replace("@", "_std@")] = mean_std(values)
        left_out = sum(not math.isfinite(v) for v in values)
        if left_out:
            summary[key.replace("@", "_nonfinite@")] = left_out
    summary |= {f"diverged@{h}": n for h, n in diverged.items()}
    return summary


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and SAMPLE standard deviation (ddof 1) of the finite values: the convention of
    every published number (the results pages' too). One finite value has deviation 0; none
    give NaN for both. Callers say how many values were left out."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = math.fsum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def loss_and_grad(task: Task, theta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Minibatch loss at a Task's flat ``theta`` and its gradient (both detached)."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        x, y = task.sample_batch(generator)
        loss = task.loss(th, x, y)
        (grad,) = torch.autograd.grad(loss, th)
    return loss.detach(), grad
