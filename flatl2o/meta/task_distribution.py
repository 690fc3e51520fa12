"""The optimizees of a meta-training run: :class:`TaskDistribution` draws one task, minibatch size
and reparameterization (:meth:`flatl2o.meta.task.Task.variant`) per trajectory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flatl2o.meta.task import Task


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
