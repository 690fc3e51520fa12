"""Is a regularizer's effect larger than meta-training's own seed noise?

    python benchmarks/meta_seeds.py --rule dm --meta-seeds 1 2 --jobs 2     # ~1 h on 2 cores
    python benchmarks/meta_seeds.py --rule dm --meta-seeds 1 --quick        # smoke (minutes)
    python benchmarks/meta_seeds.py --rule dm --meta-seeds 1 2 --rng own --regularizers entropy \
        --tag lr1-a10 --set regularizer.alpha=10 --set regularizer.options.lr=1.0 --jobs 1 \
        --out benchmarks/results/meta_seeds_dm_entropy_lr1_a10.json     # another setting
    python benchmarks/meta_seeds.py --recipes PLAIN.toml REGULARIZED.toml --suite realistic \
        --meta-seeds 0 1 2 --horizons 1000 --seeds 3 --jobs 2   # any pair, realistic workloads

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

``--recipes PLAIN REGULARIZED`` studies any pair of recipe files on the realistic workloads
instead (``--suite realistic``). The two must be the same recipe outside ``[regularizer]``
(and ``name`` / ``description``), PLAIN unregularized: anything else is refused, naming the
differing keys. Both are meta-trained at every meta-seed (default 0 1 2) under
``<root>/<PLAIN's name>/``, the regularized one always with ``[regularizer].rng = "own"``
whatever its file says (the report names the file's value): forcing it, as ``--rng own`` does,
keeps the two files the one description of the siblings and pairs them on the same minibatches
without editing a recipe that may already have been meta-trained as written. Every rule folder
is then evaluated with ``normprop_candidates.py``'s plan and runner (its workloads, seeds and
horizons, at the rule's default lr, next to Adam at 1e-3 and tuned AdamW measured once, all
paired by evaluation seed; one pass on one thread, not resumed: only the meta-training is
reused). The report gives, per workload and horizon, the difference regularized − plain of
the test metric per meta-seed and across meta-seeds (mean, std, sign agreement, a t-test),
the plain rule's own spread across meta-seeds, each sibling against the two baselines, and
the train loss and parameter norm differences. ``--quick`` meta-trains 2 iterations of
20-step trajectories and evaluates the regression workload, 1 seed, 1,000 steps (the
shortest horizon with a tuned AdamW) under ``<root>/<PLAIN's name>-quick/``, in about a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._results import write_result  # noqa: E402
from benchmarks.normprop_candidates import (  # noqa: E402
    TUNED,
    WORKLOADS,
    adam_checks_lines,
    better,
    measure,
    plan,
)
from flatl2o.evaluation import EvalConfig, evaluate  # noqa: E402
from flatl2o.evaluation.stats import Stats, paired, paired_metric, per_seed  # noqa: E402
from flatl2o.evaluation.workloads import make_workload  # noqa: E402
from flatl2o.meta.recipe import Recipe, load_recipe  # noqa: E402

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


#: Recipe overrides of ``--quick``: 2 meta-iterations and a tiny card evaluation.
QUICK = (
    "train.iterations=2",
    "curriculum.validate_every=1",
    "evaluation.seeds=1",
    "evaluation.horizons=[20]",
    "train.checkpoint_every=1",
)
#: ``--quick`` of a recipe pair also shortens the trajectories (any recipe's may be long) and
#: validates on one run.
QUICK_SIBLINGS = (
    *QUICK,
    "train.unroll=10",
    "train.trajectory=20",
    "curriculum.lengths=[]",
    "curriculum.validation_runs=1",
)


def meta_train(study: Study, variant: str, meta_seed: int, root: Path, quick: bool) -> Path:
    """Meta-train (or finish, or reuse) one run; return its checkpoint folder."""
    extra = ['regularizer.rng="own"'] if variant and study.rng == "own" else []
    extra += study.overrides if variant else ()
    recipe = ROOT / "recipes" / f"{study.rule}{variant}.toml"
    name = study.name(variant, meta_seed)
    return meta_train_run(recipe, name, meta_seed, extra, root, QUICK if quick else ())


def meta_train_run(
    recipe: Path,
    name: str,
    meta_seed: int,
    overrides: list[str],
    root: Path,
    quick: tuple[str, ...] = (),
) -> Path:
    """Meta-train ``recipe`` at ``train.seed = meta_seed`` with ``overrides`` into
    ``root/name`` as a subprocess on one thread (logged to ``root/name.log``); a finished run
    is reused, an interrupted one resumed. Returns the checkpoint folder."""
    out = root / name
    if (out / "metrics.json").is_file():
        return out
    cmd = [
        sys.executable,
        "-m",
        "flatl2o",
        "meta-train",
        "--recipe",
        str(recipe),
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
    ]
    if out.exists():
        cmd.append("--resume")
    cmd += [f"train.seed={meta_seed}", f"name={name}", *overrides, *quick]
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
    if "recipes" in result:
        return siblings_markdown(result)
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


# ---------------------------------------------------------------- any pair of recipe files


def _repo_path(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (results stay portable), else as is."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def recipe_differences(a: Recipe, b: Recipe) -> list[str]:
    """The ``section.key`` settings in which two recipes differ outside ``[regularizer]``,
    ``name`` and ``description`` (unset keys compared at their defaults)."""

    def flat(recipe: Recipe) -> dict:
        out = {}
        for section, values in recipe.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
        return out

    fa, fb = flat(a), flat(b)
    return sorted(
        k
        for k in fa.keys() | fb.keys()
        if not k.startswith("regularizer.") and fa.get(k) != fb.get(k)
    )


@dataclass(frozen=True)
class Siblings:
    """An unregularized recipe file and a regularized one that is the same recipe outside
    ``[regularizer]``: the study meta-trains both at every meta-seed, the regularized one with
    ``[regularizer].rng = "own"`` whatever its file says (``file_rng``), so that the two
    siblings of a meta-seed see the same minibatches and only the regularizer differs."""

    plain: str  # recipe paths, relative to the repository when inside it
    regularized: str
    plain_name: str  # the recipes' names, which name the runs
    regularized_name: str
    file_rng: str = "minibatch"

    @classmethod
    def load(cls, plain: str, regularized: str) -> Siblings:
        """Read both recipes; a ``ValueError`` naming the keys when they are not siblings."""
        a, b = load_recipe(plain), load_recipe(regularized)
        if a.regularizer.name != "none":
            raise ValueError(
                f"{plain} is regularized ([regularizer].name = {a.regularizer.name!r}); "
                "--recipes takes the unregularized recipe first, then the regularized one"
            )
        if b.regularizer.name == "none":
            raise ValueError(
                f"{regularized} has no regularizer ([regularizer].name = 'none'); --recipes "
                "takes the unregularized recipe first, then the regularized one"
            )
        differing = recipe_differences(a, b)
        if differing:
            raise ValueError(
                f"{plain} and {regularized} differ outside [regularizer] in "
                f"{', '.join(differing)}; make them equal there, so that the regularizer is "
                "the only difference between the siblings"
            )
        if a.name == b.name:
            raise ValueError(
                f"both recipes are named {a.name!r}, which names their runs; rename one"
            )
        return cls(_repo_path(plain), _repo_path(regularized), a.name, b.name, b.regularizer.rng)

    @classmethod
    def of(cls, result: dict) -> Siblings:
        """The pair a results JSON describes."""
        return cls(**result["recipes"])

    def name(self, regularized: bool, meta_seed: int) -> str:
        """A run's name: ``<plain name>-m<seed>``, ``<regularized name>-own-m<seed>``."""
        if regularized:
            return f"{self.regularized_name}-own-m{meta_seed}"
        return f"{self.plain_name}-m{meta_seed}"

    def runs(self, meta_seeds: list[int]) -> list[tuple[Path, str, int, list[str]]]:
        """``(recipe, run name, meta-seed, overrides)`` of every meta-training run."""
        out = []
        for m in meta_seeds:
            out.append((ROOT / self.plain, self.name(False, m), m, []))
            out.append((ROOT / self.regularized, self.name(True, m), m, ['regularizer.rng="own"']))
        return out


def _by_seed(by_arm: dict, arm: str, h: str, key: str) -> dict[int, float]:
    """``{evaluation seed: value}`` of ``key`` for ``arm`` at horizon ``h``."""
    return {int(s): r.get(key, math.nan) for s, r in by_arm.get(arm, {}).get(h, {}).items()}


def _spread(xs: list[float]) -> dict:
    """Mean, sample std and count of per-meta-seed values."""
    return {"mean": _mean(xs), "std": _std(xs), "n": len(xs)}


def _across(ds: list[float]) -> dict:
    """Per-meta-seed differences summarized: :func:`_spread` and a two-sided t-test of their
    mean against zero at 95% (:func:`~flatl2o.evaluation.stats.paired`; ``p`` from scipy)."""
    from scipy import stats

    p = paired(dict(enumerate(ds)), dict.fromkeys(range(len(ds)), 0.0))
    p_value = 2 * float(stats.t.sf(abs(p.t), p.n - 1)) if p.n >= 2 else math.nan
    return {**_spread(ds), "t": p.t, "p": p_value, "significant": p.significant}


def analyse_siblings(result: dict) -> dict:
    """Per (workload, horizon): for every meta-seed, the difference regularized − plain of the
    same meta-seed paired over evaluation seeds (the workload's test metric, train loss,
    parameter norm) and each sibling against Adam at 1e-3 and tuned AdamW; then across
    meta-seeds the mean, spread, sign agreement and a t-test, next to the plain rule's own
    spread across meta-seeds."""
    sib, cells = Siblings.of(result), result["measured"]["cells"]
    out = []
    for w, by_arm in cells.items():
        metric = result["metric"][w]
        for h in sorted(by_arm["adam"], key=int):

            def diff(a: str, b: str, key: str = metric, h: str = h, by_arm: dict = by_arm):
                return paired(_by_seed(by_arm, a, h, key), _by_seed(by_arm, b, h, key))

            def mean(arm: str, key: str = metric, h: str = h, by_arm: dict = by_arm) -> float:
                return Stats.of(list(_by_seed(by_arm, arm, h, key).values())).mean

            per_meta = []
            for m in result["meta_seeds"]:
                reg, plain = sib.name(True, m), sib.name(False, m)
                d = diff(reg, plain)
                up, down = ("worse", "better") if metric == "test_loss" else ("better", "worse")
                per_meta.append(
                    {
                        "meta_seed": m,
                        "d": d.mean,
                        "verdict": d.verdict(up, down),
                        "seeds": d.n,
                        "seeds_left_out": d.missing,
                        "diverged": sum(
                            r.get("diverged", False)
                            for arm in (reg, plain)
                            for r in by_arm.get(arm, {}).get(h, {}).values()
                        ),
                        "d_train_loss": diff(reg, plain, "train_loss").mean,
                        "d_param_norm": diff(reg, plain, "param_norm").mean,
                        "plain": mean(plain),
                        "regularized": mean(reg),
                        "plain_param_norm": mean(plain, "param_norm"),
                        **{
                            f"{who}_vs_{base}": diff(arm, base).mean
                            for who, arm in (("plain", plain), ("regularized", reg))
                            for base in ("adam", "adamw")
                        },
                    }
                )

            def finite(key: str, per_meta: list = per_meta) -> list[float]:
                return [p[key] for p in per_meta if math.isfinite(p[key])]

            ds = finite("d")
            out.append(
                {
                    "workload": w,
                    "horizon": int(h),
                    "metric": metric,
                    "per_meta_seed": per_meta,
                    "across": _across(ds),
                    "better": sum(better(d, metric) for d in ds if d != 0),
                    "worse": sum(not better(d, metric) for d in ds if d != 0),
                    "adam": mean("adam"),
                    "adamw": mean("adamw"),
                    "plain": _spread(finite("plain")),
                    "regularized": _spread(finite("regularized")),
                    **{
                        k: _across(finite(k))
                        for k in (
                            "d_train_loss",
                            "d_param_norm",
                            "plain_vs_adam",
                            "plain_vs_adamw",
                            "regularized_vs_adam",
                            "regularized_vs_adamw",
                        )
                    },
                    **{
                        f"{k}_better": sum(better(v, metric) for v in finite(k) if v != 0)
                        for k in (
                            "plain_vs_adam",
                            "plain_vs_adamw",
                            "regularized_vs_adam",
                            "regularized_vs_adamw",
                        )
                    },
                    "smaller_param_norm": sum(v < 0 for v in finite("d_param_norm")),
                }
            )
    return {"cells": out}


def _num(x: float, spec: str) -> str:
    return f"{x:{spec}}" if math.isfinite(x) else "n/a"


def _ms(s: dict, spec: str = "+.4f") -> str:
    """``mean ± std`` of a :func:`_spread`."""
    return f"{_num(s['mean'], spec)} ± {_num(s['std'], spec.lstrip('+'))}"


def siblings_markdown(result: dict) -> str:
    """The report of a recipe pair's study on the realistic workloads."""
    sib, ms = Siblings.of(result), result["meta_seeds"]
    n, cells = len(ms), result["analysis"]["cells"]
    seeds = ", ".join(str(m) for m in ms)
    lines = [
        f"# Regularizer effect vs meta-training seed on the realistic workloads "
        f"(`{sib.regularized_name}` against `{sib.plain_name}`)",
        "",
        f"`{result['command']}` ({result['total_seconds'] / 60:.0f} min; meta-training "
        f"{result['meta_train_seconds'] / 60:.0f} min"
        + (
            f" ({result['meta_train_reused']} of {result['meta_train_runs']} runs reused from "
            "an earlier invocation, not timed here)"
            if result["meta_train_reused"]
            else ""
        )
        + f", evaluation {result['eval_seconds'] / 60:.0f} min; git {result['git']}, torch "
        f"{result['torch']}).",
        "",
        f"Siblings: `{sib.plain}` and `{sib.regularized}`, the same recipe outside "
        f"`[regularizer]`, each meta-trained by this script at meta-seeds {seeds} "
        '(`train.seed`), the regularized one with `[regularizer].rng = "own"` (its file: '
        f'`"{sib.file_rng}"`), so that both siblings of a meta-seed see the same minibatches '
        "and imitation choices and only the regularizer differs"
        + (" (`--quick`: tiny meta-training, a smoke test only)" if result["quick"] else "")
        + ". Every rule is evaluated untuned at its rule's default lr with "
        "`benchmarks/normprop_candidates.py`'s plan and runner on the realistic workloads, next "
        "to Adam at 1e-3 and AdamW at the lr and weight decay selected in "
        f"`{result['tuned']}` (warmup + cosine), all measured in this invocation and paired by "
        f"evaluation seed ({result['eval_seeds']} seeds).",
        "",
        *adam_checks_lines(result["measured"]["adam_checks"]),
        "## Regularized − plain, per meta-seed and across meta-seeds",
        "",
        "Δ = the workload's test metric (test loss for the LM and the regression: lower is "
        "better; test accuracy for the classifiers) of the regularized rule − the plain rule of "
        f"the same meta-seed, mean over the {result['eval_seeds']} evaluation seeds (paired; "
        "`*`: beyond evaluation-seed noise by a paired t-test at 95%). Across meta-seeds: the "
        "mean ± std of the per-meta-seed Δ, in how many meta-seeds the regularized rule is "
        "better / worse, a two-sided t-test of the mean Δ against zero over the meta-seeds, "
        "and the plain rule's own standard deviation across meta-seeds (of its mean test "
        "metric): what a different meta-training draw alone moves.",
        "",
    ]
    head = ["workload", "steps", "metric", *(f"Δ, meta-seed {m}" for m in ms)]
    head += [
        "mean Δ ± std over meta-seeds",
        "regularized better / worse",
        "t-test over meta-seeds",
        "plain std over meta-seeds",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [f"`{c['workload']}`", str(c["horizon"]), c["metric"].replace("_", " ")]
        for p in c["per_meta_seed"]:
            mark = "*" if p["verdict"].endswith("beyond seed noise") else ""
            notes = [f"{p['diverged']} diverged"] if p["diverged"] else []
            notes += [f"{p['seeds_left_out']} seeds n/a"] if p["seeds_left_out"] else []
            row.append(_num(p["d"], "+.4f") + mark + (f" ({', '.join(notes)})" if notes else ""))
        a = c["across"]
        verdict = (
            "n/a (fewer than 2 meta-seeds)"
            if a["n"] < 2
            else f"t = {a['t']:+.2f}, p = {a['p']:.3f}"
            + (" (beyond meta-seed noise)" if a["significant"] else "")
        )
        row += [
            _ms(a),
            f"{c['better']} / {c['worse']} of {n}",
            verdict,
            _num(c["plain"]["std"], ".4f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Each sibling against Adam at 1e-3 and tuned AdamW",
        "",
        "Each rule's mean test metric over the evaluation seeds, and its difference with each "
        "baseline paired by evaluation seed, as mean ± std over the meta-seeds (in brackets: "
        "the meta-seeds in which the rule is better); the baselines' means are over the "
        "evaluation seeds.",
        "",
    ]
    pairs = [(w, b) for w in ("plain", "regularized") for b in ("adam", "adamw")]
    head = ["workload", "steps", "metric", "Adam 1e-3", "tuned AdamW", "plain", "regularized"]
    head += [f"{w} − {'Adam' if b == 'adam' else 'AdamW'}" for w, b in pairs]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [f"`{c['workload']}`", str(c["horizon"]), c["metric"].replace("_", " ")]
        row += [_num(c["adam"], ".4f"), _num(c["adamw"], ".4f")]
        row += [_ms(c["plain"], ".4f"), _ms(c["regularized"], ".4f")]
        row += [f"{_ms(c[f'{w}_vs_{b}'])} ({c[f'{w}_vs_{b}_better']} of {n})" for w, b in pairs]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Train loss and parameter norm",
        "",
        "Regularized − plain of the same meta-seed, paired over evaluation seeds, per meta-seed "
        "and as mean ± std over the meta-seeds, at each horizon (a smaller parameter norm: "
        "smaller steps taken overall).",
        "",
    ]
    head = ["workload", "steps", *(f"Δ train loss, meta-seed {m}" for m in ms)]
    head += ["mean Δ train loss", *(f"Δ param norm, meta-seed {m}" for m in ms)]
    head += ["mean Δ param norm", "smaller norm in", "plain param norm"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        per = c["per_meta_seed"]
        row = [f"`{c['workload']}`", str(c["horizon"])]
        row += [_num(p["d_train_loss"], "+.4f") for p in per] + [_ms(c["d_train_loss"])]
        row += [_num(p["d_param_norm"], "+.2f") for p in per] + [_ms(c["d_param_norm"], "+.2f")]
        plain_norm = _spread([p["plain_param_norm"] for p in per])
        row += [f"{c['smaller_param_norm']} of {n}", _ms(plain_norm, ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    every_better = sum(c["better"] == n for c in cells)
    every_worse = sum(c["worse"] == n for c in cells)
    beyond = sum(c["across"]["significant"] for c in cells)
    beyond_spread = sum(
        math.isfinite(c["across"]["mean"])
        and math.isfinite(c["plain"]["std"])
        and abs(c["across"]["mean"]) > c["plain"]["std"]
        for c in cells
    )
    smaller = sum(c["smaller_param_norm"] == n for c in cells)
    lines += [
        "",
        "Summary:",
        "",
        f"- `{sib.regularized_name}` against `{sib.plain_name}` over {n} meta-seeds: better "
        f"test metric in every meta-seed in {every_better} of {len(cells)} (workload, horizon) "
        f"cells, worse in every one in {every_worse}; the mean difference beyond meta-seed "
        f"noise (t-test over the meta-seeds) in {beyond} of {len(cells)}, and larger than the "
        f"plain rule's standard deviation across meta-seeds in {beyond_spread}; a smaller "
        f"parameter norm in every meta-seed in {smaller} of {len(cells)}.",
        "",
    ]
    return "\n".join(lines)


def tuned_selection(path: Path, workloads: tuple[str, ...], horizons: list[int]) -> dict:
    """The realistic results JSON whose AdamW selection the study uses, checked before any
    meta-training: a ``ValueError`` naming what it lacks."""
    try:
        tuned = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the tuned results {path}: {e}") from None
    for w in workloads:
        selected = tuned.get("tuning", {}).get(w, {}).get("adamw", {}).get("selected", {})
        missing = [h for h in horizons if str(h) not in selected]
        if missing:
            raise ValueError(
                f"{path} has no tuned AdamW for {w} at {', '.join(map(str, missing))} steps "
                f"(it has {', '.join(selected) or 'none'}); pick --horizons among those"
            )
    return tuned


def run_siblings(args: argparse.Namespace, command: str, sib: Siblings, tuned: dict) -> int:
    """The study of a recipe pair (``--recipes``) on the realistic workloads: meta-train,
    measure, report."""
    started = time.perf_counter()
    meta_seeds = sorted(set(args.meta_seeds if args.meta_seeds is not None else [0, 1, 2]))
    root = Path(args.root) / (sib.plain_name + ("-quick" if args.quick else ""))
    root.mkdir(parents=True, exist_ok=True)
    out = Path(
        args.out
        or (
            root / f"{sib.regularized_name}.json"
            if args.quick
            else ROOT / "benchmarks" / "results" / f"meta_seeds_{sib.regularized_name}.json"
        )
    )
    runs = sib.runs(meta_seeds)
    reused = sum((root / name / "metrics.json").is_file() for _, name, _, _ in runs)
    quick = QUICK_SIBLINGS if args.quick else ()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        folders = list(
            pool.map(lambda r: meta_train_run(r[0], r[1], r[2], r[3], root, quick), runs)
        )
    meta_train_seconds = time.perf_counter() - started
    workloads, horizons, seeds = tuple(args.workloads), args.horizons, args.seeds
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # as normprop_candidates measures: its runs are comparable
    candidates = {name: str(folder) for (_, name, _, _), folder in zip(runs, folders, strict=True)}
    measured = measure(plan(candidates, tuned, workloads, horizons, seeds), tuned)
    eval_seconds = time.perf_counter() - t0
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    result = {
        "command": command,
        "recipes": vars(sib),
        "quick": args.quick,
        "meta_seeds": meta_seeds,
        "workloads": list(workloads),
        "horizons": horizons,
        "eval_seeds": seeds,
        "tuned": _repo_path(args.tuned),
        "metric": {w: make_workload(w).metric for w in workloads},
        "runs": {name: _repo_path(folder) for name, folder in candidates.items()},
        "git": git,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "meta_train_seconds": meta_train_seconds,
        "meta_train_runs": len(runs),
        "meta_train_reused": reused,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "measured": measured,
    }
    result["analysis"] = analyse_siblings(result)
    write_result(out, result, markdown(result))
    print(markdown(result))
    return 0


def _given(*options: tuple[str, object]) -> list[str]:
    """The flags among ``(flag, value)`` pairs that the command line set: a value other than
    the parser's "not given" (None, "" or [])."""
    return [flag for flag, value in options if value is not None and value != "" and value != []]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", choices=["dm", "rnnprop"], help="the shipped recipes' rule (dm)")
    p.add_argument(
        "--recipes",
        nargs=2,
        metavar=("PLAIN", "REGULARIZED"),
        help="instead of --rule: an unregularized recipe file and a regularized one that "
        "differs from it only in [regularizer], studied on the realistic workloads",
    )
    p.add_argument(
        "--suite",
        choices=["mnist", "realistic"],
        help="the evaluation: the MNIST suite (--rule) or the realistic workloads (--recipes)",
    )
    p.add_argument(
        "--meta-seeds",
        type=int,
        nargs="+",
        help="train.seed values to meta-train (--rule: default 1 2, and 0, the shipped "
        "checkpoint, is always included without --rng own; --recipes: default 0 1 2)",
    )
    p.add_argument("--jobs", type=int, default=2, help="parallel meta-training / eval workers")
    p.add_argument("--root", default=str(ROOT / "runs" / "meta-seeds"), help="run folders")
    p.add_argument("--tasks", nargs="+", help="evaluation tasks (default: the suite's four)")
    p.add_argument(
        "--workloads", nargs="+", choices=WORKLOADS, help="--recipes: realistic workloads (all)"
    )
    p.add_argument("--horizons", type=int, nargs="+", help="--recipes: steps measured (1000)")
    p.add_argument("--seeds", type=int, help="--recipes: evaluation seeds (3)")
    p.add_argument(
        "--tuned", help="--recipes: the realistic results JSON whose AdamW selection is used"
    )
    p.add_argument(
        "--rng",
        choices=["minibatch", "own"],
        help="[regularizer].rng of the regularized runs (minibatch); 'own' meta-trains every "
        "meta-seed (no shipped checkpoint was made that way), so siblings share their "
        "minibatches (--recipes always uses 'own')",
    )
    p.add_argument(
        "--regularizers",
        nargs="+",
        choices=REGULARIZERS,
        help="which regularized recipes to compare with the unregularized one (all)",
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
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 meta-iterations, tiny evaluation (--recipes: 20-step trajectories, the "
        "regression workload, 1 seed)",
    )
    p.add_argument(
        "--out",
        help="results JSON (--rule: benchmarks/results/meta_seeds.json; --recipes: "
        "benchmarks/results/meta_seeds_<regularized name>.json, with --quick in the run folder)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train and run nothing: recompute the analysis of --out (--rule: from "
        "<root>/<rule>/eval; --recipes: from the measurements in --out)",
    )
    args = p.parse_args(argv)
    command = "python benchmarks/meta_seeds.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.recipes:
        given = _given(
            ("--rule", args.rule),
            ("--rng", args.rng),
            ("--regularizers", args.regularizers),
            ("--set", args.overrides),
            ("--tag", args.tag),
            ("--tasks", args.tasks),
        )
        if given:
            p.error(
                f"--recipes takes no {', '.join(given)}: those options belong to --rule's study "
                "of the shipped recipes (--recipes always meta-trains the regularized recipe "
                'with [regularizer].rng = "own"; put any other setting in its file)'
            )
        if args.suite == "mnist":
            p.error("--recipes is studied on the realistic workloads: --suite realistic")
        if args.report_only:
            out = Path(args.out) if args.out else None
            if out is None:
                p.error("--report-only with --recipes needs --out (the results JSON to redraw)")
            result = json.loads(out.read_text())
            result["analysis"] = analyse_siblings(result)
            write_result(out, result, markdown(result))
            print(markdown(result))
            return 0
        args.workloads = args.workloads or (["regression"] if args.quick else list(WORKLOADS))
        args.horizons = args.horizons or [1000]
        args.seeds = args.seeds or (1 if args.quick else 3)
        args.tuned = Path(args.tuned or TUNED)
        if args.seeds < 1 or min(args.horizons) < 1:
            p.error("--seeds and --horizons must be at least 1")
        try:  # everything checked before hours of meta-training
            sib = Siblings.load(*args.recipes)
            tuned = tuned_selection(args.tuned, tuple(args.workloads), args.horizons)
        except ValueError as e:  # the recipes are unreadable or not siblings; no tuned AdamW
            p.error(str(e))
        return run_siblings(args, command, sib, tuned)
    given = _given(
        ("--workloads", args.workloads),
        ("--horizons", args.horizons),
        ("--seeds", args.seeds),
        ("--tuned", args.tuned),
    )
    if given or args.suite == "realistic":
        p.error(
            f"{', '.join(given) or '--suite realistic'} is for --recipes (the realistic "
            "workloads); --rule studies the shipped recipes on the MNIST suite"
        )
    args.rule = args.rule or "dm"
    args.rng = args.rng or "minibatch"
    args.regularizers = args.regularizers or list(REGULARIZERS)
    args.meta_seeds = args.meta_seeds if args.meta_seeds is not None else [1, 2]
    args.out = args.out or str(ROOT / "benchmarks/results/meta_seeds.json")
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
    # a --quick study's 2-iteration runs and evaluation live apart from a real study's, which
    # would otherwise reuse them as finished
    base = Path(args.root) / "quick" if args.quick else Path(args.root)
    root = base / args.rule
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
        out=study.eval_dir(base),
        jobs=args.jobs,
        progress=False,
        resume=study.eval_dir(base).exists(),
        command=command,
    )
    eval_seconds = time.perf_counter() - t0
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    result = {
        "command": command,
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
