"""An untrained NormProp next to Adam at lr 1e-3: does the per-tensor magnitude control hold
before any meta-training (no divergence, a parameter norm that grows like Adam's)?

    nice python benchmarks/normprop_untrained.py --tasks digits-mlp,mnist-mlp-relu  # ~3 min
    nice python benchmarks/normprop_untrained.py --quick    # smoke (seconds)

NormProp (``flatl2o.make_rule("normprop", **options)``, weights drawn under
``torch.manual_seed(rule_seed)``) runs in two forms: the default (``adam_skip=1``: the
direction is ``tanh(adam_skip * adam_step + readout(h))``, its readout drawn near zero, so an
untrained rule starts out close to Adam) and ``adam_skip=0`` (the direction is the randomly
initialized LSTM's alone: what the normalization alone guarantees). Each runs through the
project's one optimizee loop (``flatl2o.meta.optimizee.train_optimizee``: ``flatl2o.L2O`` at
the rule's own ``lr``, 1e-3, on the task's tensors); Adam (torch.optim.Adam, lr 1e-3) runs
through the same loop with the same minibatches. Each run: ``steps`` steps from
the task's initialization of that seed. Reported per optimizer, mean and sample std over seeds: the
final training loss (mean of the last 100 minibatch losses), test loss and accuracy, and the
parameter norm at several steps.
Writes benchmarks/results/normprop_untrained.json and .md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_result
from flatl2o import make_rule
from flatl2o.meta.optimizee import (
    EVAL_SEED_OFFSET,
    learned_optimizer,
    mean_std,
    split_metrics,
    train_optimizee,
)
from flatl2o.meta.tasks import make_task

NORM_AT = (0, 100, 300, 1000)


def adam_factory(params: list[torch.nn.Parameter], groups: list) -> torch.optim.Optimizer:
    """torch.optim.Adam at lr 1e-3 (the user's start)."""
    return torch.optim.Adam(params, lr=1e-3)


def measure(task_name: str, steps: int, seeds: int, rule_seed: int) -> dict[str, dict]:
    task = make_task(task_name)
    out: dict[str, dict] = {}
    arms = {
        "adam@1e-3": None,
        f"normprop untrained (default, seed {rule_seed})": {},
        f"normprop untrained (adam_skip=0, seed {rule_seed})": {"adam_skip": 0.0},
    }
    for name, options in arms.items():
        runs = []
        for seed in range(seeds):
            if options is None:
                factory = adam_factory
            else:
                torch.manual_seed(rule_seed)
                factory = learned_optimizer(make_rule("normprop", **options))
            traj = train_optimizee(
                task,
                factory,
                seed=EVAL_SEED_OFFSET + seed,
                horizons=[steps],
                measure=lambda run, h: split_metrics(run, ["test"]),
                record_norms=True,
            )
            init = task.init_params(torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed))
            norms = {
                t: float(init.norm()) if t == 0 else traj.norms[t - 1]
                for t in NORM_AT
                if t <= steps
            }
            test = traj.metrics[steps]
            runs.append(
                {
                    "train_loss_last100": statistics.fmean(traj.losses[-100:]),
                    "test_loss": test["test_loss"],
                    "test_accuracy": test["test_accuracy"],
                    "finite": all(math.isfinite(v) for v in traj.losses),
                    "norm": norms,
                }
            )
        out[name] = {"runs": runs}
    return out


def markdown(result: dict) -> str:
    lines = [
        "# Untrained NormProp vs Adam at lr 1e-3",
        "",
        f"Command: `{result['command']}`. torch {result['torch']}, {result['threads']} thread(s).",
        "",
    ]
    for task, arms in result["tasks"].items():
        lines += [
            f"## {task}, {result['steps']} steps, {result['seeds']} seeds (mean ± std)",
            "",
            "| optimizer | train loss (last 100) | test loss | test accuracy | all finite | "
            + " | ".join(f"‖θ‖ @{t}" for t in NORM_AT if t <= result["steps"])
            + " |",
            "|---|---|---|---|---|" + "---|" * sum(t <= result["steps"] for t in NORM_AT),
        ]
        for name, arm in arms.items():
            runs = arm["runs"]

            def ms(key: str, runs=runs) -> str:
                mean, std = mean_std([r[key] for r in runs])
                return f"{mean:.4f} ± {std:.4f}"

            norms = [
                f"{statistics.fmean(r['norm'][t] for r in runs):.3f}"
                for t in NORM_AT
                if t <= result["steps"]
            ]
            finite = all(r["finite"] for r in runs)
            lines.append(
                f"| {name} | {ms('train_loss_last100')} | {ms('test_loss')} | "
                f"{ms('test_accuracy')} | {finite} | " + " | ".join(norms) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", default="digits-mlp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rule-seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/normprop_untrained.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps, seeds = (50, 1) if args.quick else (args.steps, args.seeds)
    start = time.time()
    result = {
        "command": "python benchmarks/normprop_untrained.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "seeds": seeds,
        "tasks": {
            name: measure(name, steps, seeds, args.rule_seed) for name in args.tasks.split(",")
        },
    }
    result["seconds"] = round(time.time() - start, 1)
    md = markdown(result)
    write_result(args.out, result, md)
    print(md)


if __name__ == "__main__":
    main()
