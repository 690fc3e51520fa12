"""The optimizees of meta-training and evaluation, by name: the public module that gathers them.

- :class:`Task` (``flatl2o/meta/task.py``): a module's loss as a differentiable function of ONE
  flat parameter vector; THE project initializer (:meth:`Task.init_params`, :func:`lecun_init_`);
  the registry :data:`TASKS` and :func:`register_task`.
- The built-in tasks (``flatl2o/meta/builtin_tasks.py``), registered when this module is
  imported. Adding an optimizee is one small factory ``(dataset=None, batch_size=128) -> Task``
  decorated with :func:`register_task`.
- :class:`TaskDistribution` (``flatl2o/meta/task_distribution.py``): the tasks, batch sizes and
  reparameterizations a meta-training run draws from.
- :func:`make_task` (here): a registered task by name.
"""

from __future__ import annotations

from flatl2o.meta import builtin_tasks  # noqa: F401  (registers the built-in tasks)
from flatl2o.meta.task import TASKS, Task, lecun_init_, register_task
from flatl2o.meta.task_distribution import TaskDistribution

__all__ = [
    "TASKS",
    "Task",
    "TaskDistribution",
    "lecun_init_",
    "make_task",
    "register_task",
]


def make_task(name: str, **kwargs) -> Task:
    """Build the registered task ``name``; kwargs (dataset=, batch_size=) go to its factory."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None
    return factory(**kwargs)
