"""Run a learned rule (or Adam) on a functional task without meta-gradients.

Used for validation during meta-training and for the metrics written into model cards.
The rule is the same module the optimizer uses, applied to the task's flat parameter
vector under ``torch.no_grad`` (a test checks this matches :class:`flatl2o.L2O`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from flatl2o.meta.recipe import EVAL_SEED_OFFSET as _EVAL_SEED_OFFSET
from flatl2o.meta.tasks import Task
from flatl2o.rules import UpdateRule

#: Optimizee runs for reporting use generators seeded ``EVAL_SEED_OFFSET + seed`` (10,000 +
#: seed) so they never share a random stream with meta-training: recipe validation refuses a
#: ``[train].seed`` that is one of them.
EVAL_SEED_OFFSET = _EVAL_SEED_OFFSET


def segment_sizes(task: Task, slots: int = 1) -> list[int]:
    """The sizes of the task's parameter tensors in its flat vector (``named_parameters()``
    order), repeated for ``slots`` optimizees laid one after the other: a rule's ``segments``."""
    return [math.prod(shape) for shape in task.param_shapes.values()] * slots


def loss_and_grad(task: Task, theta: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Minibatch loss at ``theta`` and its gradient (both detached)."""
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        x, y = task.sample_batch(generator)
        loss = task.loss(th, x, y)
        (grad,) = torch.autograd.grad(loss, th)
    return loss.detach(), grad


@torch.no_grad()
def rollout(
    rule: UpdateRule,
    task: Task,
    steps: int,
    generator: torch.Generator,
    *,
    theta: Tensor | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, list[float]]:
    """Train ``task`` for ``steps`` steps with ``rule``; return final params and minibatch losses.

    Each step is ``theta - rule.default_lr * rule(grad)``, as :class:`flatl2o.L2O` with its
    default ``lr``; the rule sees the task's tensors as ``segments``.

    ``on_step(t, theta)`` is called after every step ``t`` (1-based) with the new parameters.
    """
    theta = task.init_params(generator) if theta is None else theta.detach().clone()
    state = rule.init_state(theta.numel(), device=theta.device)
    segments, lr = segment_sizes(task), float(rule.default_lr)
    losses: list[float] = []
    for t in range(1, steps + 1):
        loss, grad = loss_and_grad(task, theta, generator)
        losses.append(float(loss))
        if torch.isfinite(grad).all():  # a diverged run keeps its last finite iterate
            step, state = rule(grad, state, t, segments)
            theta = theta - (step if lr == 1.0 else lr * step)
        if on_step is not None:
            on_step(t, theta)
    return theta, losses


def evaluate_rule(
    rule: UpdateRule,
    task: Task,
    *,
    horizons: Sequence[int],
    seeds: int,
    extra: Callable[[Tensor], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Test accuracy / test loss / train loss, and validation accuracy / loss, after each
    horizon: mean and std over seeds.

    The validation metrics (``val_accuracy@h``, ``val_loss@h``, on the dataset's validation
    split when it is not empty) are the ones to choose hyper-parameters on, e.g. a regularizer's
    strength; the test metrics are for reporting only (docs/method.md §5).
    ``extra(theta)``, if given, is called at each horizon with that run's parameters; each
    ``name: value`` it returns is summarized like the built-in metrics (``name@h`` and
    ``name_std@h``), e.g. a flatness readout at the iterates the accuracies are measured at.
    """
    results: dict[str, list[float]] = {}
    has_val = task.dataset is not None and len(task.dataset.split("val")) > 0

    def record(t: int, theta: Tensor) -> None:
        if t not in horizons:
            return
        test = task.evaluate(theta, "test")
        train = task.evaluate(theta, "train")
        pairs = [
            (f"test_accuracy@{t}", test.get("accuracy", float("nan"))),
            (f"test_loss@{t}", test["loss"]),
            (f"train_loss@{t}", train["loss"]),
        ]
        if has_val:
            val = task.evaluate(theta, "val")
            pairs += [
                (f"val_accuracy@{t}", val.get("accuracy", float("nan"))),
                (f"val_loss@{t}", val["loss"]),
            ]
        for key, value in pairs:
            results.setdefault(key, []).append(value)
        for name, value in (extra(theta) if extra is not None else {}).items():
            results.setdefault(f"{name}@{t}", []).append(value)

    for seed in range(seeds):
        gen = torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed)
        rollout(rule, task, max(horizons), gen, on_step=record)
    summary: dict[str, float] = {}
    for key, values in results.items():
        summary[key], summary[key.replace("@", "_std@")] = mean_std(values)
    return summary


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation; NaN for both when a value is NaN, and an
    infinite mean with a NaN deviation when one is infinite (a diverged run is reported as such
    instead of crashing ``statistics.pstdev``)."""
    values = [float(v) for v in values]
    if all(math.isfinite(v) for v in values):
        return statistics.fmean(values), statistics.pstdev(values)
    if any(math.isnan(v) for v in values) or (math.inf in values and -math.inf in values):
        return math.nan, math.nan
    return (math.inf if math.inf in values else -math.inf), math.nan
