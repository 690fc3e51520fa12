"""Does bf16 recurrent state change what a learned optimizer achieves?

    python benchmarks/state_dtype_quality.py            # ~3 minutes on 2 cores

The evaluation protocol of docs/results.md (same seeds, seed offsets, batch 128, full-split
metrics) for the default checkpoint with ``state_dtype=torch.float32`` and
``torch.bfloat16``, on the seen task and an unseen one, at 100 and 1000 steps; prints mean ±
std test accuracy and the paired difference, and writes benchmarks/results/state_dtype.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import L2O, load_rule
from flatl2o.hub import DEFAULT_PRETRAINED
from flatl2o.meta.optimizee import EVAL_SEED_OFFSET, train_optimizee
from flatl2o.meta.tasks import make_task

TASKS = ["mnist-mlp-sigmoid", "mnist-mlp-relu"]
HORIZONS = [100, 1000]
SEEDS = range(5)


def run(task, rule, state_dtype: torch.dtype, seed: int) -> dict[int, float]:
    """Test accuracy at each horizon of the suite's run of ``seed`` (``train_optimizee``)."""
    traj = train_optimizee(
        task,
        lambda params, groups: L2O(params, rule, state_dtype=state_dtype),
        seed=EVAL_SEED_OFFSET + seed,
        horizons=HORIZONS,
        measure=lambda run, h: {"accuracy": run.evaluate("test")["accuracy"]},
    )
    return {h: m["accuracy"] for h, m in traj.metrics.items()}


def main() -> None:
    torch.set_num_threads(1)  # as the suite's runs (--threads 1): the same bits as its page
    rule = load_rule(DEFAULT_PRETRAINED)
    rows = []
    print(f"checkpoint {DEFAULT_PRETRAINED}; test accuracy, 5 seeds")
    print("| task | steps | fp32 state | bf16 state | bf16 − fp32 (paired) |")
    print("|---|---|---|---|---|")
    for name in TASKS:
        task = make_task(name)
        res = {
            dt: [run(task, rule, dt, s) for s in SEEDS] for dt in (torch.float32, torch.bfloat16)
        }
        for h in HORIZONS:
            a = [r[h] for r in res[torch.float32]]
            b = [r[h] for r in res[torch.bfloat16]]
            d = [y - x for x, y in zip(a, b, strict=True)]
            rows.append(dict(task=name, steps=h, fp32=a, bf16=b))
            print(
                f"| {name} | {h} | {statistics.mean(a):.4f} ± {statistics.stdev(a):.4f} "
                f"| {statistics.mean(b):.4f} ± {statistics.stdev(b):.4f} "
                f"| {statistics.mean(d) * 100:+.2f} pp ± {statistics.stdev(d) * 100:.2f} |",
                flush=True,
            )
    out = Path("benchmarks/results/state_dtype.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(checkpoint=DEFAULT_PRETRAINED, rows=rows), indent=1))


if __name__ == "__main__":
    main()
