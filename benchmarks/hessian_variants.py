"""Which Hessian measure to meta-train with: hessian-trace vs hessian-eig vs hessian-esd vs none.

    python benchmarks/hessian_variants.py --threads 1        # ~25 min on 2 busy CPU cores
    python benchmarks/hessian_variants.py --iterations 2 --seeds 1 --horizons 20 40   # smoke

For one rule (default rnnprop) this meta-trains four short runs from the shipped
``recipes/<rule>-hessian.toml``, identical except for the regularizer: none, ``hessian-trace``
(1 probe), ``hessian-eig`` (10 power iterations) and ``hessian-esd`` (10 Lanczos steps), all
with the recipe's seed, so every run starts from the same rule and sees the same first
optimizee initialization. Each run keeps the trainer's best validated rule, which is then
evaluated with ``flatl2o.meta.optimizee.evaluate_rule`` on the seen task (test accuracy, test
loss and train loss after each horizon, evaluation seeds 10,000 + i as in the model cards),
plus a flatness readout at the same iterates: the Hessian trace of the full-train-split loss
(Hutchinson, 20 probes) and its top-magnitude eigenvalue (30 power iterations).

**Alpha.** The three measures differ in size by an order of magnitude at the same point
(Hutchinson estimates ``tr H``, a sum over all 15,910 eigenvalues; ``hessian-eig`` is one
eigenvalue; ``hessian-esd`` is the trace on a 10-dimensional Krylov subspace), so one alpha
for all would compare strengths, not measures. The script therefore calibrates: along Adam
trajectories (the recipe's imitation teacher, lr 0.01; the iterates of a rule that trains)
of the recipe's trajectory length, at every unroll boundary, it averages each measure
(trace with 16 probes, i.e. its expectation) and sets ``alpha_m = alpha * mean(trace) /
mean(m)``, so ``alpha_m * R_m`` has the size of the shipped trace recipe's term
(``--alpha``, default its 0.001) on those iterates. The untrained rule's values are recorded
too. Matching the term's value, not its meta-gradient, is the simple, checkable choice.

Cost per meta-iteration here is the median over non-validation iterations of the log's
``seconds`` increments (runs are sequential, so machine load is not shared alike; see
``benchmarks/meta_iteration.py`` for the interleaved cost comparison). Results are printed as
a markdown table and written to ``--out`` (JSON) and the same path with ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _results import write_result  # noqa: E402

from flatl2o.hessian import hessian_eig, hessian_trace  # noqa: E402
from flatl2o.meta.optimizee import (  # noqa: E402
    OptimizeeRun,
    evaluate_rule,
    learned_optimizer,
    loss_and_grad,
    train_optimizee,
)
from flatl2o.meta.recipe import Recipe, load_recipe  # noqa: E402
from flatl2o.meta.regularizers import make_regularizer  # noqa: E402
from flatl2o.meta.tasks import Task  # noqa: E402
from flatl2o.meta.trainer import MetaTrainer, adam_teacher_step  # noqa: E402
from flatl2o.rules import UpdateRule  # noqa: E402

VARIANTS = {  # name -> regularizer options (the recipes' values; defaults for eig / esd)
    "none": {},
    "hessian-trace": {"probes": 1},
    "hessian-eig": {"iters": 10},
    "hessian-esd": {"steps": 10},
}
MEASURES = [v for v in VARIANTS if v != "none"]
CALIBRATION_SEED = 2_000_000  # generators for calibration; disjoint from training and eval
FLATNESS_SEED = 3_000_000


def recipe_for(rule: str, variant: str, alpha: float, args: argparse.Namespace) -> Recipe:
    """The shipped hessian recipe, shortened, with ``variant`` as its regularizer."""
    options = "{" + ", ".join(f"{k} = {v}" for k, v in VARIANTS[variant].items()) + "}"
    overrides = [
        f"name=variant-{variant}",
        f"regularizer.name={variant}",
        f"regularizer.alpha={alpha if variant != 'none' else 0.0}",
        f"regularizer.options={options}",
        f"train.iterations={args.iterations}",
        f"train.checkpoint_every={args.iterations}",
        f"curriculum.validate_every={args.validate_every}",
        f"evaluation.seeds={args.seeds}",
        f"evaluation.horizons={list(args.horizons)}",
    ]
    return load_recipe(ROOT / "recipes" / f"{rule}-hessian.toml", overrides)


def calibration_points(task: Task, rule: UpdateRule, length: int, unroll: int) -> dict:
    """Iterates at unroll boundaries of Adam (lr 0.01) and of the untrained rule, 2 seeds each."""
    points: dict[str, list[torch.Tensor]] = {"adam": [], "untrained rule": []}
    for i in range(2):
        gen = torch.Generator().manual_seed(CALIBRATION_SEED + i)
        theta = task.init_params(gen)
        m, v = torch.zeros_like(theta), torch.zeros_like(theta)
        for t in range(1, length + 1):
            if (t - 1) % unroll == 0:
                points["adam"].append(theta.clone())
            _, grad = loss_and_grad(task, theta, gen)
            step, m, v = adam_teacher_step(grad, m, v, t, 0.01)
            theta = theta - step
        points["adam"].append(theta)

        def keep(run: OptimizeeRun, t: int) -> dict[str, float]:
            points["untrained rule"].append(run.theta())
            return {}

        train_optimizee(
            task,
            learned_optimizer(rule.eval()),
            seed=CALIBRATION_SEED + 100 + i,
            horizons=range(unroll, length + 1, unroll),
            measure=keep,
        )
    return points


def calibrate(recipe: Recipe, base_alpha: float) -> dict:
    """Mean of each measure on the calibration iterates, and the alphas that match the trace."""
    trainer = MetaTrainer(recipe, tempfile.mkdtemp(prefix="calib-"), progress=False)
    task = trainer.task
    points = calibration_points(task, trainer.rule, recipe.train.trajectory, recipe.train.unroll)
    gen = torch.Generator().manual_seed(CALIBRATION_SEED + 1000)
    regs = {
        "hessian-trace": make_regularizer("hessian-trace", probes=16),  # its expectation
        "hessian-eig": make_regularizer("hessian-eig", **VARIANTS["hessian-eig"]),
        "hessian-esd": make_regularizer("hessian-esd", **VARIANTS["hessian-esd"]),
    }
    means: dict[str, dict[str, float]] = {}
    for where, thetas in points.items():
        sums = dict.fromkeys(regs, 0.0)
        for theta in thetas:
            x, y = task.sample_batch(gen)  # R is computed on the step's minibatch in training

            def batch_loss(th, x=x, y=y):
                return task.loss(th, x, y)

            for name, reg in regs.items():
                sums[name] += float(reg(batch_loss, theta, generator=gen))
        means[where] = {k: s / len(thetas) for k, s in sums.items()}
    ref = means["adam"]
    alphas = {
        name: float(f"{base_alpha * ref['hessian-trace'] / ref[name]:.2g}") for name in MEASURES
    }
    return {"means": means, "alphas": alphas, "points": {k: len(v) for k, v in points.items()}}


def flatness_readout(task: Task):
    """``extra`` for evaluate_rule: tr H (Hutchinson, 20 probes) and |λ|max (30 iterations) of
    the full-train-split loss, from a fixed generator so every rule gets the same probes."""
    split = task.dataset.split("train")

    def loss(th):
        return task.loss(th, split.x, split.y)

    def readout(theta: torch.Tensor) -> dict[str, float]:
        gen = torch.Generator().manual_seed(FLATNESS_SEED)
        return {
            "train_hessian_trace": float(hessian_trace(loss, theta, probes=20, generator=gen)),
            "train_hessian_top_eig": float(hessian_eig(loss, theta, iters=30, generator=gen)),
        }

    return readout


class _Trainer(MetaTrainer):
    """The meta-trainer, whose final evaluation is done by :func:`run_variant` instead (the
    same ``evaluate_rule`` call plus the flatness readout, so the rollouts run once)."""

    def finish(self, evaluate: bool = True) -> Path:
        return super().finish(evaluate=False)


def run_variant(recipe: Recipe, out: Path) -> dict:
    """Meta-train one variant, then evaluate its best validated rule with the readout."""
    trainer = _Trainer(recipe, out, progress=False, command="benchmarks/hessian_variants.py")
    start = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - start
    rule = trainer.final_rule().eval()
    ev = recipe.evaluation
    t0 = time.perf_counter()
    metrics = evaluate_rule(
        rule,
        trainer.task,
        horizons=ev.horizons,
        seeds=ev.seeds,
        extra=flatness_readout(trainer.task),
    )
    eval_seconds = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    deltas = [
        b["seconds"] - a["seconds"] for a, b in itertools.pairwise(records) if "val_loss" not in a
    ]
    regs = [r["regularizer"] for r in records if r.get("regularizer") is not None]
    k = min(3, len(regs))
    return {
        "metrics": metrics,
        "seconds_per_iteration": statistics.median(deltas) if deltas else records[0]["seconds"],
        "regularizer_first": statistics.fmean(regs[:k]) if regs else None,
        "regularizer_last": statistics.fmean(regs[-k:]) if regs else None,
        "best_val_loss": min(
            (r["best_val_loss"] for r in records if r.get("best_val_loss") is not None),
            default=None,
        ),
        "meta_train_seconds": wall,
        "readout_eval_seconds": eval_seconds,
    }


def fmt(value, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(result: dict) -> str:
    hs = result["horizons"]
    head = ["variant", "alpha"]
    for h in hs:
        head.append(f"test acc @{h}")
    head += [
        f"test loss @{hs[-1]}",
        f"train loss @{hs[-1]}",
        f"tr H @{hs[-1]}",
        f"abs top eig @{hs[-1]}",
        "R first→last its",
        "best val loss",
        "s / iteration",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["variants"].items():
        m = r["metrics"]
        h = hs[-1]
        row = [name, fmt(r["alpha"], "g")]
        for t in hs:
            row.append(f"{m[f'test_accuracy@{t}']:.4f} ± {m[f'test_accuracy_std@{t}']:.4f}")
        row += [
            f"{m[f'test_loss@{h}']:.4f}",
            f"{m[f'train_loss@{h}']:.4f}",
            f"{m[f'train_hessian_trace@{h}']:.2f} ± {m[f'train_hessian_trace_std@{h}']:.2f}",
            f"{m[f'train_hessian_top_eig@{h}']:.3f}",
            f"{fmt(r['regularizer_first'], '.3g')} → {fmt(r['regularizer_last'], '.3g')}",
            fmt(r["best_val_loss"]),
            f"{r['seconds_per_iteration']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _without_keep(argv: list[str] | None) -> list[str]:
    """The command-line arguments minus ``--keep DIR`` (where this machine kept the run
    folders, which changes no number and means nothing on another machine)."""
    args, out = list(argv or sys.argv[1:]), []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--keep":
            skip = True
        elif not a.startswith("--keep="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="rnnprop", choices=["rnnprop", "dm"])
    p.add_argument("--iterations", type=int, default=15, help="meta-iterations per run")
    p.add_argument("--validate-every", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds")
    p.add_argument("--horizons", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--alpha", type=float, default=0.001, help="alpha of hessian-trace")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", default="", help="keep the run folders here (default: temporary)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/hessian_variants.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = recipe_for(args.rule, "hessian-trace", args.alpha, args)
    calib = calibrate(base, args.alpha)
    alphas = {
        "none": 0.0,
        "hessian-trace": args.alpha,
        **{k: v for k, v in calib["alphas"].items() if k != "hessian-trace"},
    }
    print(
        "calibration (means over iterates):",
        json.dumps(calib["means"], indent=1),
        "alphas:",
        alphas,
        flush=True,
    )
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hessian-variants-"))
    variants = {}
    for name in VARIANTS:
        recipe = recipe_for(args.rule, name, alphas[name], args)
        print(f"meta-training {name} (alpha {alphas[name]:g}) ...", flush=True)
        variants[name] = {"alpha": alphas[name], **run_variant(recipe, root / name)}
        print(json.dumps(variants[name], indent=1), flush=True)
    result = {
        "command": "python benchmarks/hessian_variants.py " + " ".join(_without_keep(argv)),
        "rule": args.rule,
        "recipe": f"recipes/{args.rule}-hessian.toml",
        "iterations": args.iterations,
        "validate_every": args.validate_every,
        "seeds": args.seeds,
        "horizons": args.horizons,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "calibration": calib,
        "variants": variants,
        "total_seconds": time.perf_counter() - started,
    }
    print(table(result))
    write_result(args.out, result, markdown(result))
    return 0


def markdown(result: dict) -> str:
    """The report written next to the JSON (also: ``markdown(json.load(...))`` redraws it)."""
    means = {k: round(v, 3) for k, v in result["calibration"]["means"]["adam"].items()}
    return (
        f"# Hessian measures compared ({result['rule']}, {result['iterations']} "
        f"meta-iterations)\n\n`{result['command']}` ({result['total_seconds'] / 60:.0f} min). "
        f"Same recipe ({result['recipe']}) and seed for every variant; alphas calibrated so "
        f"alpha·R equals hessian-trace's on Adam iterates (means there: {json.dumps(means)}). "
        f"Test accuracy: mean ± std over {result['seeds']} evaluation seeds of the best "
        "validated rule; tr H and |λ|max: full-train-split Hessian at the same iterates (20 "
        "Hutchinson probes, 30 power iterations). The std covers optimizee seeds only, not "
        "meta-training seeds. s / iteration comes from runs made one after the other while "
        "the machine's load from other jobs varied, so it is not a cost comparison (that is "
        "benchmarks/meta_iteration.py, interleaved).\n\n"
        f"{table(result)}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
