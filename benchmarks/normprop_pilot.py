"""A meta-trained NormProp pilot next to its untrained (Adam-like) start and Adam at lr 1e-3 on
the realistic suite's workloads: does meta-training on the task distribution move the rule in
the right direction on models it never saw?

    flatl2o meta-train --recipe benchmarks/recipes/normprop-distribution-pilot.toml \\
        --out runs/normprop-pilot --threads 1          # stopped after iteration 312 here
    nice python benchmarks/normprop_pilot.py runs/normprop-pilot/best --steps 1000 --seeds 2

Every run goes through the evaluation's own runner (``flatl2o.evaluation.runner.train_run``,
the one optimizee loop), so the numbers are comparable with ``docs/realistic.md``'s; all
three arms run at lr 1e-3 (NormProp's lr is Adam's). The untrained rule is
``make_rule("normprop")`` under ``torch.manual_seed(0)``. A pilot, not a result: one
meta-training seed, a short meta-training, 2 evaluation seeds.
Writes benchmarks/results/normprop_pilot.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_result
from benchmarks.normprop_candidates import WORKLOADS, _folder, _spec
from flatl2o.evaluation.runner import train_run
from flatl2o.evaluation.workloads import make_workload
from flatl2o.meta.optimizee import mean_std

KEYS = ("test_loss", "test_accuracy", "train_loss", "param_norm")


def measure(pilot: str, steps: int, seeds: int, workloads: tuple[str, ...]) -> dict:
    untrained = _folder("init:normprop")
    arms = {"adam@1e-3": None, "normprop untrained": untrained, "normprop pilot": pilot}
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for w in workloads:
        workload = make_workload(w)
        out[w] = {}
        for arm, folder in arms.items():
            runs = []
            for seed in range(seeds):
                name = "adam" if folder is None else arm
                spec = _spec(w, name, seed, (steps,), hparams={"lr": 1e-3}, checkpoint=folder)
                metrics = train_run(spec, workload)["metrics"][str(steps)]
                runs.append({k: float(metrics[k]) for k in KEYS if k in metrics})
            out[w][arm] = runs
    return out


def markdown(result: dict) -> str:
    lines = [
        "# NormProp pilot vs its untrained start vs Adam at lr 1e-3 (realistic workloads)",
        "",
        f"Command: `{result['command']}`. {result['steps']} steps, {result['seeds']} seeds "
        "(mean ± sample std), every arm at lr 1e-3, through the evaluation's runner.",
        "",
        "| workload | arm | test loss | test accuracy | train loss | param norm |",
        "|---|---|---|---|---|---|",
    ]
    for w, arms in result["workloads"].items():
        for arm, runs in arms.items():
            cells = []
            for k in KEYS:
                mean, std = mean_std([r.get(k, float("nan")) for r in runs])
                cells.append("–" if mean != mean else f"{mean:.4f} ± {std:.4f}")
            lines.append(f"| `{w}` | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pilot", help="the meta-trained NormProp checkpoint folder")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    workloads = tuple(args.workloads.split(","))
    result = {
        "command": "python benchmarks/normprop_pilot.py PILOT "
        f"--steps {args.steps} --seeds {args.seeds}",
        "steps": args.steps,
        "seeds": args.seeds,
        "torch": torch.__version__,
        "workloads": measure(args.pilot, args.steps, args.seeds, workloads),
    }
    out = Path(__file__).resolve().parent / "results" / "normprop_pilot.json"
    write_result(out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
