"""How much of the meta-gradient does each shipped regularizer contribute?

    python benchmarks/regularizer_share.py                 # ~5 min on 2 CPU cores
    python benchmarks/regularizer_share.py --recipes dm-entropy --trajectories 1   # smoke
    python benchmarks/regularizer_share.py --recipes dm-entropy --threads 1 \
        --set regularizer.options.lr=1.0 \
        --out benchmarks/results/regularizer_share_variants/lr1.json    # another setting

A regularized recipe's meta-objective per unroll is ``meta_loss + alpha * R`` (docs/method.md
section 4). If ``alpha * R``'s gradient in the rule's weights is a tiny fraction of the loss
term's, the regularizer barely steers meta-training, and a "regularized vs unregularized"
difference is mostly a different meta-training draw (see ``benchmarks/meta_seeds.py``). This
script measures that fraction where it matters: for each regularized recipe (as shipped: its
alpha, options, task, unroll and trajectory length), with the rule's weights at their random
initialization (the recipe's seed: where meta-training starts) and at the shipped checkpoint
(where it ended), it runs the rule along its own trajectories (no meta-steps) and, at every
unroll, computes the two gradients separately with the trainer's own
``MetaTrainer.unroll_objective``: ``g_loss = d meta_loss / d phi`` and
``g_reg = d (alpha * R) / d phi``. Reported: the median (and range) over unrolls of
``|g_reg| / |g_loss|`` and of the cosine between them (negative: the regularizer pulls
against the loss), the median of ``|g_reg| sqrt(1 - cos^2) / |g_loss|`` (the part of g_reg
that is not a multiple of g_loss: what the regularizer adds beyond rescaling the loss term),
and ``alpha * R / meta_loss``. ``--set`` applies recipe overrides (``section.key=value``,
as ``flatl2o meta-train`` takes them) to every recipe, to ask whether another setting would
steer; the ``shipped`` rows still use the shipped weights, so only overrides that keep the
rule's architecture make sense. Gradients are taken before clipping (the trainer clips
their sum). Trajectories use their own seeds (4,000,000 + i), disjoint from
meta-training, validation and evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
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

from flatl2o.checkpoint import load_weights_strict  # noqa: E402
from flatl2o.meta.recipe import load_recipe  # noqa: E402
from flatl2o.meta.trainer import MetaTrainer  # noqa: E402

SHARE_SEED = 4_000_000
DEFAULT_RECIPES = ("dm-entropy", "dm-hessian", "rnnprop-entropy", "rnnprop-hessian")


def _flat(grads: tuple[torch.Tensor | None, ...], params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def shares(trainer: MetaTrainer, trajectories: int) -> list[dict[str, float]]:
    """Per unroll of ``trajectories`` rule-driven trajectories: the two gradient norms, their
    cosine and the two objective values."""
    recipe = trainer.recipe
    alpha, unroll = recipe.regularizer.alpha, recipe.train.unroll
    params = [p for p in trainer.rule.parameters() if p.requires_grad]
    rows = []
    for i in range(trajectories):
        for j, gen in enumerate(trainer.generators):
            gen.manual_seed(SHARE_SEED + 1000 * i + j)
        theta = trainer.task.init_params(trainer.generators[0])
        state = trainer.rule.init_state(theta.numel())
        for u in range(recipe.train.trajectory // unroll):
            meta, reg, theta_next, state_next = trainer.unroll_objective(
                theta, state, u * unroll, True
            )
            if reg is None:
                raise ValueError(f"{recipe.name}: the regularizer did not run in unroll {u}")
            g_loss = _flat(
                torch.autograd.grad(meta, params, retain_graph=True, allow_unused=True), params
            )
            g_reg = _flat(torch.autograd.grad(alpha * reg, params, allow_unused=True), params)
            nl, nr = float(g_loss.norm()), float(g_reg.norm())
            cos = float(g_loss @ g_reg) / (nl * nr) if nl > 0 and nr > 0 else math.nan
            rows.append(
                {
                    "trajectory": i,
                    "unroll": u,
                    "grad_loss_norm": nl,
                    "grad_reg_norm": nr,
                    "ratio": nr / nl if nl > 0 else math.nan,
                    "cosine": cos,
                    "meta_loss": float(meta),
                    "alpha_r": float(alpha * reg),
                }
            )
            rows[-1].update(theta_space(trainer, theta_next.detach(), SHARE_SEED + 7 * u + i))
            theta = theta_next.detach()
            state = {k: v.detach() for k, v in state_next.items()}
    return rows


def theta_space(trainer: MetaTrainer, theta: torch.Tensor, seed: int) -> dict[str, float]:
    """At ``theta``, on one minibatch: the cosine between R's gradient in the optimizee's
    parameters and the minibatch loss gradient, and the ratio of their norms (alpha included).
    For the entropy term this tests whether ``gamma * (theta - mu)`` is mostly a multiple of
    the loss gradient (a short SGLD chain's drift), which would make its meta-gradient a
    rescaled copy of the loss term's."""
    gen = torch.Generator().manual_seed(seed)
    x, y = trainer.task.sample_batch(gen)
    th = theta.detach().requires_grad_(True)
    (g_f,) = torch.autograd.grad(trainer.task.loss(th, x, y), th)
    th = theta.detach().requires_grad_(True)
    reg = trainer.regularizer(lambda t: trainer.task.loss(t, x, y), th, generator=gen)
    (g_r,) = torch.autograd.grad(trainer.recipe.regularizer.alpha * reg, th)
    nf, nr = float(g_f.norm()), float(g_r.norm())
    return {
        "theta_cosine": float(g_f @ g_r) / (nf * nr) if nf > 0 and nr > 0 else math.nan,
        "theta_ratio": nr / nf if nf > 0 else math.nan,
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    def finite(key: str) -> list[float]:
        return [r[key] for r in rows if math.isfinite(r[key])]

    ratio, cos = finite("ratio"), finite("cosine")
    # the part of g_reg orthogonal to g_loss, relative to |g_loss|
    ortho = [
        r["ratio"] * math.sqrt(max(0.0, 1 - r["cosine"] ** 2))
        for r in rows
        if math.isfinite(r["ratio"]) and math.isfinite(r["cosine"])
    ]
    values = [r["alpha_r"] / r["meta_loss"] for r in rows if r["meta_loss"] != 0]
    return {
        "unrolls": len(rows),
        "ratio_median": statistics.median(ratio) if ratio else math.nan,
        "ratio_min": min(ratio, default=math.nan),
        "ratio_max": max(ratio, default=math.nan),
        "cosine_median": statistics.median(cos) if cos else math.nan,
        "cosine_min": min(cos, default=math.nan),
        "cosine_max": max(cos, default=math.nan),
        "orthogonal_median": statistics.median(ortho) if ortho else math.nan,
        "value_ratio_median": statistics.median(values) if values else math.nan,
        "theta_cosine_median": statistics.median(finite("theta_cosine")),
        "theta_ratio_median": statistics.median(finite("theta_ratio")),
    }


def table(result: dict) -> str:
    lines = [
        "| recipe | alpha | rule weights | unrolls | \\|g_reg\\| / \\|g_loss\\| median (range) "
        "| cosine median (range) | orthogonal part / \\|g_loss\\| | alpha·R / meta-loss "
        "| in theta: cosine, norm ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["recipes"].items():
        for where in ("init", "shipped"):
            s = r[where]["summary"]
            lines.append(
                f"| `{name}` | {r['alpha']:g} | {where} | {s['unrolls']} | "
                f"{100 * s['ratio_median']:.2f}% ({100 * s['ratio_min']:.2f}–"
                f"{100 * s['ratio_max']:.2f}%) | {s['cosine_median']:+.2f} "
                f"({s['cosine_min']:+.2f} to {s['cosine_max']:+.2f}) | "
                f"{100 * s['orthogonal_median']:.2f}% | "
                f"{100 * s['value_ratio_median']:.2f}% | {s['theta_cosine_median']:+.2f}, "
                f"{100 * s['theta_ratio_median']:.2f}% |"
            )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The report written next to the JSON."""
    overrides = result.get("overrides") or []
    setting = (
        "Every recipe as shipped (alpha, regularizer options, unroll, trajectory length)"
        if not overrides
        else "Every recipe as shipped but for "
        + ", ".join(f"`{o}`" for o in overrides)
        + " (the `shipped` rows: the shipped weights under that objective)"
    )
    return (
        "# Share of the meta-gradient from the flatness regularizer\n\n"
        f"`{result['command']}` ({result['total_seconds'] / 60:.1f} min, torch "
        f"{result['torch']}, {result['trajectories']} trajectories per row). {setting}; "
        "gradients in the "
        "rule's weights of the two parts of one unroll's objective, before clipping; `init` = "
        "the rule's random initialization from the recipe's seed, `shipped` = the shipped "
        "checkpoint's weights. The last column compares, at the iterate after each unroll "
        "and on one minibatch, the gradient of alpha·R in the optimizee's parameters with the "
        "minibatch loss gradient (median cosine, median norm ratio). The orthogonal part is "
        "the median over unrolls of |g_reg|·sqrt(1 − cos²)/|g_loss|: what the regularizer "
        "adds to the meta-gradient beyond rescaling the loss term.\n\n"
        f"{table(result)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    p.add_argument("--trajectories", type=int, default=2, help="trajectories per row")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe override applied to every recipe (repeatable; TOML values)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/regularizer_share.json"))
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: re-summarize the rows stored in --out and redraw its report",
    )
    args = p.parse_args(argv)
    if args.report_only:
        result = json.loads(Path(args.out).read_text())
        for entry in result["recipes"].values():
            for where in ("init", "shipped"):
                entry[where]["summary"] = summarize(entry[where]["unrolls"])
        write_result(args.out, result, markdown(result))
        print(table(result))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipes = {}
    for name in args.recipes:
        recipe = load_recipe(ROOT / "pretrained" / name / "recipe.toml", args.overrides)
        entry: dict = {"alpha": recipe.regularizer.alpha, "regularizer": recipe.regularizer.name}
        for where in ("init", "shipped"):
            trainer = MetaTrainer(recipe, tempfile.mkdtemp(prefix="share-"), progress=False)
            if where == "shipped":
                load_weights_strict(trainer.rule, ROOT / "pretrained" / name / "model.safetensors")
            rows = shares(trainer, args.trajectories)
            entry[where] = {"summary": summarize(rows), "unrolls": rows}
            print(name, where, json.dumps(entry[where]["summary"]), flush=True)
        recipes[name] = entry
    result = {
        "command": "python benchmarks/regularizer_share.py " + " ".join(argv or sys.argv[1:]),
        "trajectories": args.trajectories,
        "overrides": args.overrides,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "total_seconds": time.perf_counter() - started,
        "recipes": recipes,
    }
    print(table(result))
    write_result(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
