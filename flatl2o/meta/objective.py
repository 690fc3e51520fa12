"""The meta-objective of one truncated unroll (docs/method.md §3-§4), and the imitation one.

:class:`MetaObjective` runs an unroll of ``[train].unroll`` steps differentiably from
``(theta, state)``: the mean (log-)loss of the iterates plus, on regularized unrolls, the mean
flatness regularizer R at them, whose gradient reaches the rule through the iterates; or,
on imitation unrolls, the rule's squared distance to Adam's steps along Adam's trajectory.
The rule is its only submodule, so under torchrun DDP wraps it and averages the rule's
meta-gradient over ranks in the objective's backward. The loop that takes the meta-steps is
:class:`flatl2o.meta.trainer.MetaTrainer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from flatl2o.meta.recipe import Recipe
from flatl2o.meta.tasks import Task
from flatl2o.rules import State, UpdateRule


def adam_teacher_step(
    grad: Tensor, m: Tensor, v: Tensor, t: int, lr: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the analytic teacher (Adam, betas 0.9/0.999): ``(step, m, v)``."""
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad * grad
    step = lr * (m / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return step, m, v


class MetaObjective(nn.Module):
    """The meta-objectives of this process's ``meta_batch`` optimizees ("slots").

    ``generators[j]`` draws slot ``j``'s minibatches (and, without ``reg_generators``, its
    regularizer's probes); ``theta`` holds the slots' parameters one after the other, and
    every objective is a mean over them.
    """

    def __init__(
        self,
        rule: UpdateRule,
        task: Task,
        recipe: Recipe,
        *,
        regularizer: Callable[..., Tensor] | None,
        generators: list[torch.Generator],
        reg_generators: list[torch.Generator] | None,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.task = task
        self.recipe = recipe
        self.regularizer = regularizer
        self.generators = generators
        self.reg_generators = reg_generators
        #: ``theta - lr * delta``: the optimizee lr that L2O uses by default with this rule
        self.lr = float(rule.default_lr)

    def forward(self, kind: str, *args: Any) -> Any:
        """``unroll_objective(*args)`` (``kind="unroll"``) or ``imitation_objective(*args)``
        (``kind="imitation"``): DDP's entry point."""
        if kind == "unroll":
            return self.unroll_objective(*args)
        if kind == "imitation":
            return self.imitation_objective(*args)
        raise ValueError(f"unknown objective {kind!r}; use 'unroll' or 'imitation'")

    def meta_loss_term(self, loss: Tensor) -> Tensor:
        """One optimizee loss as it enters the meta-objective (plain or log)."""
        return torch.log(loss) if self.recipe.train.meta_loss == "log" else loss

    def _slots(self, theta: Tensor) -> tuple[Tensor, ...]:
        """The optimizees of this process in the concatenated parameter vector."""
        return (theta,) if len(self.generators) == 1 else theta.split(self.task.num_params)

    def _segments(self) -> list[int]:
        """The optimizees' tensors, slot after slot (read from ``self.task`` at every unroll,
        so a trainer that changes the task between unrolls stays right)."""
        return list(self.task.segment_sizes) * len(self.generators)

    def _step(self, delta: Tensor) -> Tensor:
        """The optimizee step of the rule's update ``delta``: ``lr * delta`` at the rule's default
        lr, as ``L2O`` takes it (``delta`` itself for a rule whose lr is 1)."""
        return delta if self.lr == 1.0 else self.lr * delta

    def _slot_grads(self, losses: list[Tensor], parts: tuple[Tensor, ...], **kw: Any) -> Tensor:
        """Each optimizee's loss gradient, concatenated like ``theta``."""
        grads = torch.autograd.grad(losses, parts, **kw)
        return grads[0] if len(grads) == 1 else torch.cat(grads)

    def unroll_objective(
        self, theta: Tensor, state: State, step: int, regularize: bool
    ) -> tuple[Tensor, Tensor | None, Tensor, State]:
        """Run one unroll differentiably: ``(mean meta-loss, mean R or None, theta, state)``.

        ``theta`` holds this process's ``meta_batch`` optimizees one after the other; the
        meta-loss and R are means over all of them.
        """
        train, reg = self.recipe.train, self.recipe.regularizer
        theta = theta.detach().requires_grad_(True)
        state = {k: v.detach() for k, v in state.items()}
        terms: list[Tensor] = []
        regs: list[Tensor] = []
        segments = self._segments()
        for t in range(train.unroll + 1):
            parts = self._slots(theta)
            losses = []
            for j, (part, gen) in enumerate(zip(parts, self.generators, strict=True)):
                x, y = self.task.sample_batch(gen)
                loss = self.task.loss(part, x, y)
                losses.append(loss)
                if t > 0:  # theta_0 of an unroll does not depend on the rule
                    terms.append(self.meta_loss_term(loss))
                    if regularize and (step + t) % reg.every == 0:

                        def batch_loss(th: Tensor, x: Tensor = x, y: Tensor = y) -> Tensor:
                            return self.task.loss(th, x, y)

                        draws = gen if self.reg_generators is None else self.reg_generators[j]
                        regs.append(self.regularizer(batch_loss, part, generator=draws))
            if t == train.unroll:
                break
            grad = self._slot_grads(
                losses, parts, create_graph=train.second_order, retain_graph=True
            )
            if not train.second_order:
                grad = grad.detach()
            delta, state = self.rule(grad, state, step + t + 1, segments)
            theta = theta - self._step(delta)
        meta = torch.stack(terms).mean()
        reg_value = torch.stack(regs).mean() if regs else None
        return meta, reg_value, theta, state

    def imitation_objective(
        self, theta: Tensor, state: State, step: int
    ) -> tuple[Tensor, Tensor, State]:
        """The imitation unroll's objective, ``theta`` moved by the teacher, and the rule state."""
        train = self.recipe.train
        theta = theta.detach()
        state = {k: v.detach() for k, v in state.items()}
        m = torch.zeros_like(theta)
        v = torch.zeros_like(theta)
        terms: list[Tensor] = []
        segments = self._segments()
        for t in range(train.unroll):
            with torch.enable_grad():
                th = theta.clone().requires_grad_(True)
                parts = self._slots(th)
                losses = []
                for part, gen in zip(parts, self.generators, strict=True):
                    x, y = self.task.sample_batch(gen)
                    losses.append(self.task.loss(part, x, y))
                grad = self._slot_grads(losses, parts)
            teacher, m, v = adam_teacher_step(grad, m, v, t + 1, train.imitation_lr)
            delta, state = self.rule(grad, state, step + t + 1, segments)
            # the rule's step as the other unrolls take it, so the teacher sets the step size to
            # learn: taken at imitation_lr, it would only pull the gain towards 1 / output_scale
            terms.append(torch.mean((self._step(delta) - teacher) ** 2) / train.imitation_lr**2)
            theta = theta - teacher
        return torch.stack(terms).mean(), theta, state
