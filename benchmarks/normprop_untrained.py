"""An untrained NormProp next to Adam at lr 1e-3: does the per-tensor magnitude control hold
before any meta-training (no divergence, a parameter norm that grows like Adam's)?

    nice python benchmarks/normprop_untrained.py --tasks digits-mlp,mnist-mlp-relu  # ~3 min
    nice python benchmarks/normprop_untrained.py --quick    # smoke (seconds)

NormProp (``flatl2o.make_rule("normprop", **options)``, weights drawn under
``torch.manual_seed(rule_seed)``) runs in two forms: the default (``adam_skip=1``: the
direction is ``tanh(adam_skip * adam_step + readout(h))``, its readout drawn near zero, so an
untrained rule starts out close to Adam) and ``adam_skip=0`` (the direction is the randomly
initialized LSTM's alone: what the normalization alone guarantees). Each runs through the
meta-training path (``flatl2o.meta.rollout.rollout``: the task's tensors as segments,
``lr = rule.default_lr = 1e-3``), which a test checks against ``flatl2o.L2O``; Adam
(torch.optim.Adam, lr 1e-3) runs on the same flat parameter vector with the same minibatches
(Adam is coordinatewise, so flat or per tensor is the same). Each run: ``steps`` steps from
the task's initialization of that seed. Reported per optimizer, mean and std over seeds: the
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
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_result
from flatl2o import make_rule
from flatl2o.meta.rollout import EVAL_SEED_OFFSET, loss_and_grad, rollout
from flatl2o.meta.tasks import Task, make_task

NORM_AT = (0, 100, 300, 1000)


def adam_run(task: Task, steps: int, gen: torch.Generator, on_step) -> list[float]:
    """torch.optim.Adam at lr 1e-3 on the flat parameter vector (the rollout's batches)."""
    theta = task.init_params(gen).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=1e-3)
    losses = []
    for t in range(1, steps + 1):
        loss, grad = loss_and_grad(task, theta.detach(), gen)
        losses.append(float(loss))
        theta.grad = grad
        opt.step()
        on_step(t, theta.detach())
    return losses


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
            norms: dict[int, float] = {}
            final: list[Tensor] = []

            def on_step(t: int, theta: Tensor, norms=norms, final=final) -> None:
                if t in NORM_AT:
                    norms[t] = float(theta.norm())
                if t == steps:
                    final.append(theta.clone())

            gen = torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed)
            norms[0] = float(
                task.init_params(torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed)).norm()
            )
            if options is None:
                losses = adam_run(task, steps, gen, on_step)
            else:
                torch.manual_seed(rule_seed)
                rule = make_rule("normprop", **options)
                _, losses = rollout(rule, task, steps, gen, on_step=on_step)
            test = task.evaluate(final[0], "test")
            runs.append(
                {
                    "train_loss_last100": statistics.fmean(losses[-100:]),
                    "test_loss": test["loss"],
                    "test_accuracy": test["accuracy"],
                    "finite": all(math.isfinite(v) for v in losses),
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
                vals = [r[key] for r in runs]
                return f"{statistics.fmean(vals):.4f} ± {statistics.pstdev(vals):.4f}"

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
