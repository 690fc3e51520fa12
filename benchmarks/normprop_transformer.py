"""An untrained NormProp on the character-level transformer of ``benchmarks/weight_decay.py``,
next to Adam at lr 1e-3: the magnitude control on a model unlike the MLPs a rule is
meta-trained on (issue 17: the shipped rules' untuned step is ~9x Adam's there).

    nice python benchmarks/normprop_transformer.py --steps 2000   # ~8 minutes on 1 busy core
    nice python benchmarks/normprop_transformer.py --quick        # smoke (50 steps)

The model, data (the installed torch's ``torch/optim`` sources), batches, seeds and measurements
are ``weight_decay.py``'s (``train``): parameter norm along the run, final training loss (mean of
the last 100 steps), held-out loss, mean step RMS. NormProp is ``make_rule("normprop")`` drawn
under ``torch.manual_seed(0)`` (its default ``lr``, 1e-3), untrained: it starts out as Adam
(docs/method.md, NormProp), so this shows whether the per-tensor normalization holds at the
default lr on a transformer, not what meta-training gives.
Writes benchmarks/results/normprop_transformer.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_result
from benchmarks.weight_decay import CharTransformer, corpus, train
from flatl2o import make_rule


def runs() -> dict[str, tuple[str, dict]]:
    """Optimizer name -> (kind, options) for ``weight_decay.train``."""
    torch.manual_seed(0)
    fresh = make_rule("normprop")
    torch.manual_seed(0)
    no_skip = make_rule("normprop", adam_skip=0.0)
    return {
        "Adam lr 1e-3": ("adam", {"lr": 1e-3}),
        "NormProp untrained (default lr 1e-3)": ("l2o", {"rule": fresh, "backend": "reference"}),
        "NormProp untrained adam_skip=0": ("l2o", {"rule": no_skip, "backend": "reference"}),
    }


def markdown(result: dict) -> str:
    rows = result["runs"]
    steps = list(rows[0]["param_norm"])
    lines = [
        f"# Untrained NormProp on a character transformer, {result['steps']} steps",
        "",
        f"Command: `{result['command']}`; torch {result['torch']}, 1 thread.",
        "",
        "| optimizer | train loss (last 100) | held-out loss | mean step RMS | "
        + " | ".join(f"‖θ‖ @{s}" for s in steps)
        + " |",
        "|---|---|---|---|" + "---|" * len(steps),
    ]
    for r in rows:
        norms = " | ".join(f"{r['param_norm'][s]:.1f}" for s in steps)
        lines.append(
            f"| {r['optimizer']} | {r['train_loss_last100']:.4f} | {r['held_out_loss']:.4f} | "
            f"{r['step_rms_mean']:.3g} | {norms} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 steps")
    ap.add_argument("--out", default="benchmarks/results/normprop_transformer.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps = 50 if args.quick else args.steps
    data, _ = corpus()
    cut = int(0.9 * data.numel())
    table = runs()
    result = {
        "command": "python benchmarks/normprop_transformer.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "steps": steps,
        "runs": [
            train(CharTransformer, name, steps, data[:cut], data[cut:], runs=table)
            for name in table
        ],
    }
    for r in result["runs"]:
        r["param_norm"] = {str(k): v for k, v in r["param_norm"].items()}
    md = markdown(result)
    write_result(args.out, result, md)
    print(md)


if __name__ == "__main__":
    main()
