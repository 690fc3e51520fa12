"""Is a regularizer's effect larger than meta-training's own seed noise?

    python benchmarks/meta_seeds.py --rule dm --meta-seeds 1 2 --jobs 2     # ~1 h on 2 cores
    python benchmarks/meta_seeds.py --rule dm --meta-seeds 1 --quick        # smoke (minutes)
    python benchmarks/meta_seeds.py --rule dm --meta-seeds 1 2 --rng own --regularizers entropy \
        --tag lr1-a10 --set regularizer.alpha=10 --set regularizer.options.lr=1.0 --jobs 1 \
        --out benchmarks/results/meta_seeds_dm_entropy_lr1_a10.json     # another setting

docs/results.md compares each regularized checkpoint with its unregularized sibling over
evaluation seeds (optimizee initializations and minibatches), but every shipped rule is ONE
meta-training run (``train.seed = 0``). Meta-training is chaotic: any change to the
meta-gradient, however small, sends the rule's weights along a different path, so a
"regularized beats sibling" cell can be the regularizer or just a different meta-training
draw. This script separates the two. For one architecture it meta-trains the shipped recipes
``recipes/<rule>.toml``, ``<rule>-entropy.toml`` and ``<rule>-hessian.toml`` again with other
``train.seed`` values (everything else as shipped), then evaluates them together with the
shipped checkpoints (meta-seed 0) through the evaluation suite (``flatl2o evaluate``'s runs:
same tasks, horizons, evaluation seeds and metrics as docs/results.md). For every meta-seed
the regularized rule is compared with the unregularized rule of the SAME meta-seed (paired
over evaluation seeds), and across meta-seeds the per-seed mean differences are summarized:
their mean, their spread, and in how many meta-seeds the sign agrees. The spread of the
unregularized rule's own accuracy across meta-seeds is reported next to them: a regularizer
effect smaller than that spread is not separable from meta-training noise with this many
meta-seeds.

Meta-training runs as ``python -m flatl2o meta-train`` subprocesses (``--jobs`` at a time, one
torch thread each; each writes its log next to its run folder). Everything is resumable: a
finished run (its ``metrics.json`` exists) is reused, a killed one is continued with
``--resume``, and the evaluation reuses finished runs of the same code. Results go to
``--out`` (JSON) and the same path with ``.md``; ``markdown(json.load(...))`` redraws it.

``--set`` meta-trains the regularized recipes with overrides (another alpha or regularizer
options) under ``--tag``, which names those runs; it needs ``--rng own``, so that each one is
compared with the unregularized rule that saw the same minibatches (those plain runs are
shared by every study of the rule).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _results import write_result  # noqa: E402

from flatl2o.evaluation import EvalConfig, evaluate  # noqa: E402
from flatl2o.evaluation.stats import Stats, paired, paired_metric, per_seed  # noqa: E402

REGULARIZERS = ("entropy", "hessian")  # recipes/<rule>-<regularizer>.toml


@dataclass(frozen=True)
class Study:
    """What is compared: ``rule``'s unregularized recipe against its ``regularizers``' recipes,
    those meta-trained with ``[regularizer].rng = rng`` and the recipe ``overrides`` (named by
    ``tag``)."""

    rule: str
    rng: str = "minibatch"
    regularizers: tuple[str, ...] = REGULARIZERS
    tag: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def suffix(self) -> str:
        """``-<tag>`` when the study has one: it names the study's own runs and evaluation."""
        return f"-{self.tag}" if self.tag else ""

    @property
    def variants(self) -> tuple[str, ...]:
        """Recipe suffixes: "" (the unregularized rule), then ``-<regularizer>`` each."""
        return ("", *(f"-{r}" for r in self.regularizers))

    def name(self, variant: str, meta_seed: int) -> str:
        """A rule's name: the shipped name for meta-seed 0, else ``<name>-m<seed>``; regularized
        runs with ``[regularizer].rng = "own"`` are ``<name>[-<tag>]-own-m<seed>`` (never
        shipped)."""
        if variant and self.rng == "own":
            return f"{self.rule}{variant}{self.suffix}-own-m{meta_seed}"
        if meta_seed == 0 and self.rng != "own":
            return f"{self.rule}{variant}"
        return f"{self.rule}{variant}-m{meta_seed}"

    def eval_dir(self, root: Path) -> Path:
        """Where the study's evaluation runs go (a rule's studies share its run folders)."""
        return (
            root
            / self.rule
            / ("eval" if self.rng == "minibatch" else f"eval-{self.rng}{self.suffix}")
        )

    @classmethod
    def of(cls, result: dict) -> Study:
        """The study a results JSON describes (files written before tags had none)."""
        return cls(
            result["rule"],
            result.get("rng", "minibatch"),
            tuple(result.get("regularizers", REGULARIZERS)),
            result.get("tag", ""),
            tuple(result.get("overrides", ())),
        )


def meta_train(study: Study, variant: str, meta_seed: int, root: Path, quick: bool) -> Path:
    """Meta-train (or finish, or reuse) one run; return its checkpoint folder."""
    rule, rng = study.rule, study.rng
    name = study.name(variant, meta_seed)
    out = root / name
    if (out / "metrics.json").is_file():
        return out
    cmd = [
        sys.executable,
        "-m",
        "flatl2o",
        "meta-train",
        "--recipe",
        str(ROOT / "recipes" / f"{rule}{variant}.toml"),
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
    ]
    if out.exists():
        cmd.append("--resume")
    cmd += [f"train.seed={meta_seed}", f"name={name}"]
    if variant and rng == "own":
        cmd.append('regularizer.rng="own"')
    if variant:
        cmd += study.overrides
    if quick:
        cmd += ["train.iterations=2", "curriculum.validate_every=1", "evaluation.seeds=1"]
        cmd += ["evaluation.horizons=[20]", "train.checkpoint_every=1"]
    log = root / f"{name}.log"
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"meta-training {name} failed (exit {rc}); see {log}")
    print(f"meta-trained {name} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return out


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def analyse(data: dict, study: Study, meta_seeds: list[int]) -> dict:
    """Per (task, horizon, regularizer): the paired difference regularized − unregularized of
    the same meta-seed (test accuracy and train loss), then its summary across meta-seeds."""
    tasks, horizons = data["config"]["tasks"], data["config"]["horizons"]
    cells = []
    for task in tasks:
        for h in horizons:

            def accuracy_by_meta_seed(variant: str, task: str = task, h: int = h) -> dict:
                """Mean test accuracy over the evaluation seeds, per meta-seed."""
                return {
                    m: Stats.of(
                        list(
                            per_seed(
                                data, task, study.name(variant, m), h, "test_accuracy"
                            ).values()
                        )
                    ).mean
                    for m in meta_seeds
                }

            def median_trace(name: str, task: str = task, h: int = h) -> float:
                """Median Hessian trace of the full-train loss at the run's end (flatness)."""
                values = per_seed(data, task, name, h, "hessian_trace").values()
                finite = [v for v in values if math.isfinite(v)]
                return statistics.median(finite) if finite else math.nan

            plain_acc = accuracy_by_meta_seed("")
            for variant in study.variants[1:]:
                per_meta = []
                for m in meta_seeds:
                    reg, sib = study.name(variant, m), study.name("", m)
                    acc = paired_metric(data, task, reg, sib, h, "test_accuracy")
                    loss = paired_metric(data, task, reg, sib, h, "train_loss")
                    per_meta.append(
                        {
                            "meta_seed": m,
                            "d_test_accuracy": acc.mean,
                            "verdict": acc.verdict(),
                            "seeds": acc.n,
                            "seeds_left_out": acc.missing,
                            "d_train_loss": loss.mean,
                            "hessian_trace": median_trace(reg),
                            "sibling_hessian_trace": median_trace(sib),
                        }
                    )
                ds = [p["d_test_accuracy"] for p in per_meta if math.isfinite(p["d_test_accuracy"])]
                plain = [v for v in plain_acc.values() if math.isfinite(v)]
                # across meta-seeds: a paired t-test of the per-meta-seed mean accuracies
                across = paired(accuracy_by_meta_seed(variant), plain_acc)
                cells.append(
                    {
                        "task": task,
                        "horizon": h,
                        "regularizer": variant[1:],
                        "per_meta_seed": per_meta,
                        "mean_d": _mean(ds),
                        "std_d": _std(ds),
                        "higher": sum(d > 0 for d in ds),
                        "lower": sum(d < 0 for d in ds),
                        "higher_beyond_noise": sum(
                            p["verdict"].startswith("higher") for p in per_meta
                        ),
                        "lower_beyond_noise": sum(
                            p["verdict"].startswith("lower") for p in per_meta
                        ),
                        "across_meta_seeds": across.verdict(),
                        "plain_accuracy_by_meta_seed": plain_acc,
                        "plain_std_across_meta_seeds": _std(plain),
                    }
                )
    return {"cells": cells}


def _pp(x: float, sign: bool = True) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:{'+' if sign else ''}.1f}"


def _traces(per_meta: list[dict]) -> str:
    """``reg / plain`` Hessian traces per meta-seed (results written before they were kept
    have none)."""
    pairs = [
        (p.get("hessian_trace", math.nan), p.get("sibling_hessian_trace", math.nan))
        for p in per_meta
    ]
    if not any(math.isfinite(a) or math.isfinite(b) for a, b in pairs):
        return "n/a"
    return "; ".join(f"{a:.3g} / {b:.3g}" for a, b in pairs)


def table(result: dict) -> str:
    seeds = result["meta_seeds"]
    head = ["regularizer", "task", "steps"]
    head += [f"Δ acc, meta-seed {m} (pp)" for m in seeds]
    head += [
        "mean Δ ± std over meta-seeds (pp)",
        "beyond eval-seed noise: higher / lower",
        "across meta-seeds (paired t-test)",
        "unregularized acc std over meta-seeds (pp)",
        "Hessian trace, regularized / unregularized (median), per meta-seed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["analysis"]["cells"]:
        row = [f"`{c['regularizer']}`", f"`{c['task']}`", str(c["horizon"])]
        for p in c["per_meta_seed"]:
            mark = "*" if p["verdict"].endswith("beyond seed noise") else ""
            row.append(_pp(p["d_test_accuracy"]) + mark)
        row += [
            f"{_pp(c['mean_d'])} ± {_pp(c['std_d'], sign=False)}",
            f"{c['higher_beyond_noise']} / {c['lower_beyond_noise']} of {len(seeds)}",
            c["across_meta_seeds"],
            _pp(c["plain_std_across_meta_seeds"], sign=False),
            _traces(c["per_meta_seed"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    """Per regularizer: cells where every meta-seed agrees on the sign, and cells where the mean
    difference exceeds the unregularized rule's own spread across meta-seeds."""
    n = len(result["meta_seeds"])
    out = []
    for reg in Study.of(result).regularizers:
        cells = [c for c in result["analysis"]["cells"] if c["regularizer"] == reg]
        agree_up = sum(c["higher"] == n for c in cells)
        agree_down = sum(c["lower"] == n for c in cells)
        beyond_meta = sum(
            math.isfinite(c["mean_d"])
            and math.isfinite(c["plain_std_across_meta_seeds"])
            and abs(c["mean_d"]) > c["plain_std_across_meta_seeds"]
            for c in cells
        )
        mean_all = _mean([c["mean_d"] for c in cells if math.isfinite(c["mean_d"])])
        beyond = sum(c["across_meta_seeds"].endswith("beyond seed noise") for c in cells)
        out.append(
            f"- `{result['rule']}-{reg}` vs `{result['rule']}`: higher test accuracy in every "
            f"one of the {n} meta-seeds in {agree_up} of {len(cells)} cells, lower in every one "
            f"in {agree_down}; mean difference over all cells {_pp(mean_all)} pp; in "
            f"{beyond_meta} of {len(cells)} cells the mean difference is larger than the "
            "unregularized rule's standard deviation across meta-seeds; different beyond "
            f"meta-seed noise (paired t-test over the {n} meta-seeds) in {beyond} of "
            f"{len(cells)} cells."
        )
    return "\n".join(out)


def markdown(result: dict) -> str:
    """The report written next to the JSON."""
    seeds = ", ".join(str(m) for m in result["meta_seeds"])
    return (
        f"# Regularizer effect vs meta-training seed ({result['rule']}, "
        f"regularizer rng: {result.get('rng', 'minibatch')}"
        + (f", {result['tag']}" if result.get("tag") else "")
        + ")\n\n"
        f"`{result['command']}` ({result['total_seconds'] / 60:.0f} min; meta-training "
        f"{result['meta_train_seconds'] / 60:.0f} min"
        + (
            f" ({result['meta_train_reused']} of {result['meta_train_runs']} runs reused from "
            "an earlier invocation, not timed here)"
            if result.get("meta_train_reused")
            else ""
        )
        + ", evaluation "
        f"{result['eval_seconds'] / 60:.0f} min; git {result['git']}, torch "
        f"{result['torch']}).\n\n"
        f"Meta-seeds {seeds}: "
        + (
            "meta-seed 0 is the shipped checkpoint (meta-trained at the commit on its model "
            "card), the others are the same recipe with `train.seed` changed, meta-trained by "
            "this script. "
            if result.get("rng", "minibatch") == "minibatch"
            else "every rule meta-trained by this script, the regularized ones with "
            '`[regularizer].rng = "own"`, so each meta-trained on exactly the minibatches '
            "and imitation choices of the unregularized rule of its meta-seed: only the "
            "regularizer differs. "
        )
        + (
            "The regularized recipes were meta-trained with the overrides "
            + ", ".join(f"`{o}`" for o in result["overrides"])
            + " (everything else as in `recipes/`). "
            if result.get("overrides")
            else ""
        )
        + "Δ acc = test accuracy of the regularized rule − the "
        "unregularized rule of the same meta-seed, mean over "
        f"{result['eval_seeds']} evaluation seeds (paired; `*`: beyond evaluation-seed noise "
        "by a paired t-test at 95%). The last column is the standard deviation, across "
        "meta-seeds, of the unregularized rule's mean test accuracy: what a different "
        "meta-training draw alone moves. 'Across meta-seeds' tests the regularized rule's "
        "per-meta-seed mean accuracy against the unregularized one's, paired by meta-seed "
        "(a paired t-test at 95% over the meta-seeds). The Hessian trace (the full training "
        "loss's, at the run's last iterate; the suite measures it on the MLPs) is the median "
        "over the evaluation seeds: lower is flatter.\n\n"
        f"{table(result)}\n\nSummary:\n\n{summary(result)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="dm", choices=["dm", "rnnprop"])
    p.add_argument(
        "--meta-seeds",
        type=int,
        nargs="+",
        default=[1, 2],
        help="train.seed values to meta-train (0, the shipped checkpoint, is always included)",
    )
    p.add_argument("--jobs", type=int, default=2, help="parallel meta-training / eval workers")
    p.add_argument("--root", default=str(ROOT / "runs" / "meta-seeds"), help="run folders")
    p.add_argument("--tasks", nargs="+", help="evaluation tasks (default: the suite's four)")
    p.add_argument(
        "--rng",
        choices=["minibatch", "own"],
        default="minibatch",
        help="[regularizer].rng of the regularized runs; 'own' meta-trains every meta-seed "
        "(no shipped checkpoint was made that way), so siblings share their minibatches",
    )
    p.add_argument(
        "--regularizers",
        nargs="+",
        choices=REGULARIZERS,
        default=list(REGULARIZERS),
        help="which regularized recipes to compare with the unregularized one",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe override for the regularized runs (repeatable; needs --rng own and --tag)",
    )
    p.add_argument("--tag", default="", help="names the regularized runs made with --set")
    p.add_argument("--quick", action="store_true", help="2 meta-iterations, tiny evaluation")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/meta_seeds.json"))
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train and run nothing: recompute the analysis of --out from <root>/<rule>/eval",
    )
    args = p.parse_args(argv)
    if args.overrides and (args.rng != "own" or not args.tag):
        p.error(
            "--set needs --rng own (each regularized run then shares the minibatches of the "
            "unregularized run it is compared with) and --tag NAME (names its runs)"
        )
    if args.tag and not args.overrides:
        p.error("--tag names the runs made with --set; give the overrides too")
    started = time.perf_counter()
    if args.report_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        study = Study.of(result)
        data = json.loads((study.eval_dir(Path(args.root)) / "eval.json").read_text())
        result["analysis"] = analyse(data, study, result["meta_seeds"])
        write_result(out, result, markdown(result))
        print(markdown(result))
        return 0
    study = Study(args.rule, args.rng, tuple(args.regularizers), args.tag, tuple(args.overrides))
    root = Path(args.root) / args.rule
    root.mkdir(parents=True, exist_ok=True)
    shipped = args.rng == "minibatch"  # meta-seed 0 is then the shipped checkpoints
    meta_seeds = sorted({0, *args.meta_seeds}) if shipped else sorted(set(args.meta_seeds))
    todo = [(v, m) for m in meta_seeds if m != 0 or not shipped for v in study.variants]
    reused = sum((root / study.name(v, m) / "metrics.json").is_file() for v, m in todo)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        folders = list(pool.map(lambda vm: meta_train(study, vm[0], vm[1], root, args.quick), todo))
    meta_train_seconds = time.perf_counter() - started
    optimizers = [f"{args.rule}{v}" for v in study.variants] if 0 in meta_seeds and shipped else []
    optimizers += [str(f) for f in folders]
    overrides = {"tasks": tuple(args.tasks)} if args.tasks else {}
    if args.quick:
        config = EvalConfig(
            optimizers=tuple(optimizers),
            tasks=tuple(args.tasks or ("mnist-mlp-sigmoid",)),
            seeds=2,
            horizons=(20,),
            trace_probes=2,
            eig_iters=2,
        )
    else:
        config = EvalConfig(optimizers=tuple(optimizers), **overrides)
    t0 = time.perf_counter()
    data = evaluate(
        config,
        out=study.eval_dir(Path(args.root)),
        jobs=args.jobs,
        progress=False,
        resume=study.eval_dir(Path(args.root)).exists(),
        command="python benchmarks/meta_seeds.py " + " ".join(argv or sys.argv[1:]),
    )
    eval_seconds = time.perf_counter() - t0
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    result = {
        "command": "python benchmarks/meta_seeds.py " + " ".join(argv or sys.argv[1:]),
        "rule": args.rule,
        "meta_seeds": meta_seeds,
        "eval_seeds": config.seeds,
        "git": git,
        "torch": data.get("environment", {}).get("torch"),
        "machine": platform.platform(),
        "meta_train_seconds": meta_train_seconds,
        "meta_train_runs": len(todo),
        "meta_train_reused": reused,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "rng": args.rng,
        "regularizers": list(study.regularizers),
        "tag": study.tag,
        "overrides": list(study.overrides),
        "analysis": analyse(data, study, meta_seeds),
    }
    print(table(result))
    print(summary(result))
    write_result(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
