"""Cost of a meta-iteration with each flatness regularizer, relative to plain meta-training.

    python benchmarks/meta_iteration.py                 # both rules, 3 repetitions (~4 min)
    python benchmarks/meta_iteration.py --reps 1 --rules rnnprop    # quick look

One meta-iteration is one trajectory of the shipped recipes (``recipes/<rule>*.toml``: the
MNIST-5k MLP 784-20-10 sigmoid task, batch 128, 100 steps in unrolls of 20, i.e. 5 unrolls
and 5 meta-steps), timed through ``MetaTrainer.trajectory`` itself. Configurations, per rule
(``rnnprop`` and ``l2o-dm``): no regularizer (``<rule>.toml``); ``hessian-trace`` with 1 probe
(``<rule>-hessian.toml``); ``hessian-eig`` (10 power iterations) and ``hessian-esd`` (10
Lanczos steps), the same recipe with only the regularizer name changed (their defaults, as
the recipes set no options for them); ``entropy`` (``<rule>-entropy.toml``: gamma 0.01, 10
Langevin steps). Every unroll is a normal (regularized) unroll here: the recipes' imitation
unrolls (probability 0.2) run no regularizer and cost the same in every configuration, so
they are timed separately and folded into the "recipe" columns as the expected cost
``(1 - p) * T + p * 5 * t_imitation``.

All configurations are measured in the same process, interleaved: each repetition times one
meta-iteration of every configuration in turn (the order rotates between repetitions), so
load from other jobs on the machine hits all of them alike. Reported: the median wall time
per meta-iteration, meta-iterations per second, the process CPU time, and the ratios to the
unregularized run of the same rule.

Where the time goes: the per-optimizee-step parts, timed in the same interleaved way (CPU
time, which a busy machine disturbs less than wall time): the
rule's forward and backward on the task's 15,910 coordinates, the optimizee's loss and
gradient, and each regularizer's call with its share of the meta-backward (double backward
through the Hessian-vector products for the Hessian measures).

Results are printed as markdown tables and written to ``--out`` (JSON) and the same path
with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flatl2o.meta.recipe import Recipe, load_recipe  # noqa: E402
from flatl2o.meta.regularizers import make_regularizer  # noqa: E402
from flatl2o.meta.trainer import MetaTrainer  # noqa: E402

RECIPE_PREFIX = {"rnnprop": "rnnprop", "l2o-dm": "dm"}
#: configuration -> (recipe suffix, overrides)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "none": ("", []),
    "hessian-trace": ("-hessian", []),
    "hessian-eig": (
        "-hessian",
        ["regularizer.name=hessian-eig", "regularizer.options={iters = 10}"],
    ),
    "hessian-esd": (
        "-hessian",
        ["regularizer.name=hessian-esd", "regularizer.options={steps = 10}"],
    ),
    "entropy": ("-entropy", []),
}


def recipe_for(rule: str, config: str) -> tuple[Recipe, float]:
    """The shipped recipe of ``rule`` / ``config`` without imitation, and its imitation prob."""
    suffix, overrides = CONFIGS[config]
    path = ROOT / "recipes" / f"{RECIPE_PREFIX[rule]}{suffix}.toml"
    shipped = load_recipe(path, overrides)
    return load_recipe(path, [*overrides, "train.imitation_prob=0"]), shipped.train.imitation_prob


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_iterations(rules: list[str], reps: int) -> dict:
    """Interleaved timings of whole meta-iterations, and of imitation unrolls."""
    trainers: dict[tuple[str, str], MetaTrainer] = {}
    results: dict[str, dict[str, dict]] = {}
    for rule in rules:
        for config in CONFIGS:
            recipe, prob = recipe_for(rule, config)
            trainer = MetaTrainer(recipe, tempfile.mkdtemp(prefix="metait-"), progress=False)
            trainers[rule, config] = trainer
            reg = recipe.regularizer
            results.setdefault(rule, {})[config] = {
                "recipe": f"recipes/{RECIPE_PREFIX[rule]}{CONFIGS[config][0]}.toml",
                "regularizer": reg.name if trainer.regularizer is not None else "none",
                "options": reg.options if trainer.regularizer is not None else {},
                "imitation_prob": prob,
                "trajectory": recipe.train.trajectory,
                "unroll": recipe.train.unroll,
                "wall": [],
                "cpu": [],
            }
    keys = list(trainers)

    def imitation(trainer: MetaTrainer) -> None:
        theta = trainer.task.init_params(trainer.generator)
        trainer.imitation_unroll(theta, trainer.rule.init_state(theta.numel()), 0)

    def unroll(trainer: MetaTrainer) -> None:
        theta = trainer.task.init_params(trainer.generator)
        state = trainer.rule.init_state(theta.numel())
        trainer.unroll(theta, state, 0, trainer.regularizer is not None)

    for key in keys:  # warm-up: one unroll of each configuration
        unroll(trainers[key])
    imitation_times: dict[str, list[tuple[float, float]]] = {rule: [] for rule in rules}
    for rep in range(reps):
        shift = rep % len(keys)
        for rule, config in keys[shift:] + keys[:shift]:
            trainer = trainers[rule, config]
            wall, cpu = timed(lambda t=trainer: t.trajectory(t.recipe.train.trajectory))
            results[rule][config]["wall"].append(wall)
            results[rule][config]["cpu"].append(cpu)
            if config == "none":
                imitation_times[rule].append(timed(lambda t=trainer: imitation(t)))
        print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    for rule in rules:
        t_imit = statistics.median(w for w, _ in imitation_times[rule])
        base = results[rule]["none"]
        base_wall, base_cpu = statistics.median(base["wall"]), statistics.median(base["cpu"])
        for r in results[rule].values():
            r["median_wall"] = statistics.median(r["wall"])
            r["median_cpu"] = statistics.median(r["cpu"])
            r["meta_iterations_per_second"] = 1 / r["median_wall"]
            r["ratio"] = r["median_wall"] / base_wall
            r["ratio_cpu"] = r["median_cpu"] / base_cpu
            r["seconds_per_unroll"] = r["median_wall"] * r["unroll"] / r["trajectory"]
            unrolls = r["trajectory"] // r["unroll"]
            p = r["imitation_prob"]
            r["recipe_seconds"] = (1 - p) * r["median_wall"] + p * unrolls * t_imit
        for r in results[rule].values():
            r["recipe_ratio"] = r["recipe_seconds"] / results[rule]["none"]["recipe_seconds"]
    return {
        rule: {
            "configs": results[rule],
            "imitation_unroll_seconds": statistics.median(w for w, _ in imitation_times[rule]),
        }
        for rule in rules
    }


def measure_parts(rules: list[str], reps: int) -> dict:
    """Per-optimizee-step parts (CPU milliseconds), interleaved, median of ``reps`` x 5 calls."""
    from flatl2o.rules import make_rule

    recipe, _ = recipe_for(rules[0], "none")
    trainer = MetaTrainer(recipe, tempfile.mkdtemp(prefix="metait-"), progress=False)
    task, gen = trainer.task, torch.Generator().manual_seed(0)
    theta0 = task.init_params(gen)
    x, y = task.sample_batch(gen)

    def batch_loss(th: torch.Tensor) -> torch.Tensor:
        return task.loss(th, x, y)

    def loss_and_grad() -> None:
        th = theta0.clone().requires_grad_(True)
        torch.autograd.grad(batch_loss(th), th)

    parts: dict[str, Callable[[], None]] = {"optimizee loss + gradient": loss_and_grad}
    for rule_name in rules:
        torch.manual_seed(0)
        rule = make_rule(rule_name)
        state = rule.init_state(theta0.numel())
        grad = torch.randn(theta0.shape, generator=gen) * 1e-2

        def rule_step(rule=rule, state=state, grad=grad) -> None:
            delta, _ = rule(grad, state, 1)
            delta.sum().backward()

        parts[f"{rule_name} rule forward + backward"] = rule_step
    for config in CONFIGS:
        if config == "none":
            continue
        r, _ = recipe_for(rules[0], config)
        reg = make_regularizer(r.regularizer.name, **r.regularizer.options)

        def call(reg=reg, backward=False) -> None:
            th = theta0.clone().requires_grad_(True)
            value = reg(batch_loss, th, generator=gen)
            if backward:
                torch.autograd.grad(value, th)

        parts[f"{config} forward"] = call
        parts[f"{config} forward + backward"] = lambda call=call: call(backward=True)
    times: dict[str, list[float]] = {k: [] for k in parts}
    for fn in parts.values():
        fn()
    for _ in range(reps * 5):
        for name, fn in parts.items():
            times[name].append(timed(fn)[1] * 1e3)  # CPU time: robust to a busy machine
    return {name: statistics.median(v) for name, v in times.items()}


def tables(result: dict) -> str:
    head = (
        "| rule | regularizer | options | s / meta-iteration | meta-it / s | × none | "
        "CPU s / meta-it | × none (CPU) | s / unroll | recipe s / meta-it | × none (recipe) |"
    )
    lines = [head, "|" + "---|" * 11]
    for rule, measured in result["iterations"].items():
        for config, r in measured["configs"].items():
            lines.append(
                f"| {rule} | {config} | {json.dumps(r['options']) if r['options'] else ''} | "
                f"{r['median_wall']:.2f} | {r['meta_iterations_per_second']:.3f} | "
                f"{r['ratio']:.2f} | {r['median_cpu']:.2f} | {r['ratio_cpu']:.2f} | "
                f"{r['seconds_per_unroll']:.2f} | {r['recipe_seconds']:.2f} | "
                f"{r['recipe_ratio']:.2f} |"
            )
    imit = ", ".join(
        f"{rule} {m['imitation_unroll_seconds']:.2f} s" for rule, m in result["iterations"].items()
    )
    lines += [
        "",
        f"Imitation unroll (no regularizer, same for every configuration): {imit}.",
        "",
        "Per optimizee step (process CPU milliseconds, median):",
        "",
        "| part | ms |",
        "|---|---|",
    ]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in result["parts_ms"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rules", nargs="+", default=["rnnprop", "l2o-dm"], choices=RECIPE_PREFIX)
    p.add_argument("--reps", type=int, default=3, help="meta-iterations timed per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/meta_iteration.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {
        "command": "python benchmarks/meta_iteration.py " + " ".join(argv or sys.argv[1:]),
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "iterations": measure_iterations(args.rules, args.reps),
        "parts_ms": measure_parts(args.rules, args.reps),
    }
    result["total_seconds"] = time.perf_counter() - started
    md = tables(result)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        f"# Meta-iteration cost per regularizer\n\n`{result['command']}` ({args.threads} "
        f"thread(s), {args.reps} interleaved repetitions, {result['total_seconds']:.0f} s)\n\n"
        f"{md}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
