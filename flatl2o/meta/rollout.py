"""Former home of :func:`evaluate_rule` and its helpers, kept so that documented imports work.

The loop that was here (``rollout``: the rule module applied to a task's flat vector) is gone:
every optimizee run is :func:`flatl2o.meta.optimizee.train_optimizee`, where these names now
live.
"""

from __future__ import annotations

from flatl2o.meta.optimizee import EVAL_SEED_OFFSET, evaluate_rule, loss_and_grad, mean_std

__all__ = ["EVAL_SEED_OFFSET", "evaluate_rule", "loss_and_grad", "mean_std"]
