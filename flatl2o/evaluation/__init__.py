"""Evaluation suite: do flatness-aware learned optimizers generalize better than their siblings
and than tuned Adam / SGD / SAM / Entropy-SGD? (docs/method.md §5; docs/evaluation.md)

```python
from flatl2o.evaluation import EvalConfig, evaluate, write_report

data = evaluate(EvalConfig(seeds=5), out="results/eval", jobs=2)   # runs + results/eval/eval.json
write_report(data, "results/eval", docs="results/eval/page.md")   # PNGs, report.md, a page
```

Names are imported lazily, so that ``flatl2o.evaluation.command`` (used by the command-line
parser) loads without the rest of the suite.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BASELINES": "baselines",
    "SAM": "baselines",
    "EntropySGD": "baselines",
    "hutchinson_trace": "flatness",
    "measure_flatness": "flatness",
    "top_eigenvalue": "flatness",
    "available_optimizers": "optimizers",
    "resolve_optimizers": "optimizers",
    "render_markdown": "report",
    "write_plots": "plots",
    "write_report": "report",
    "RunSpec": "runner",
    "train_run": "runner",
    "STANDARD_TASKS": "suite",
    "EvalConfig": "suite",
    "evaluate": "suite",
    "load_results": "suite",
    "tune": "tuning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flatl2o.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flatl2o.evaluation.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
