"""Candidate default rules against Adam at 1e-3 and tuned AdamW on the realistic workloads.

    python benchmarks/normprop_candidates.py NAME=FOLDER[@LR] [NAME=FOLDER[@LR] ...] \\
        --horizons 1000 5000 --seeds 3 --out benchmarks/results/normprop_candidates

Every run goes through the evaluation's runner (``flatl2o.evaluation.runner.train_run``, the
one optimizee loop) with the realistic suite's seeds, so each candidate is paired by seed (same
initialization, same minibatches) with the baselines measured in the same invocation:

- ``adam``: Adam at lr 1e-3, one run measured at every horizon;
- ``adamw``: AdamW with linear warmup + cosine decay ending at each horizon, at the lr and
  weight decay that ``docs/realistic/eval.json`` selected on the validation split (the realistic
  suite's tuning, not redone here; ``--tuned`` points at another results JSON);
- each candidate: ``flatl2o.L2O(model.parameters(), FOLDER)`` untuned, at its rule's default lr,
  or at ``LR`` when the argument ends in ``@LR`` (to ask what the default lr should be);
  ``FOLDER`` may be ``init:ARCH``, the untrained rule ``make_rule(ARCH)`` under
  ``torch.manual_seed(0)`` (an untrained NormProp steps like Adam).

The ``adam`` runs are also checked against the results JSON's: the same seed gives the same
initial parameters (``init_sha``) and, on the same code and machine, the same metrics; the
report says where it does not (the pairing with the tuned selection holds either way).
A study, not a shipped result: it answers "is this candidate a better default?" cheaply.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_result
from flatl2o import load_rule, make_rule
from flatl2o.checkpoint import save_rule
from flatl2o.evaluation.optimizers import shipped_lr
from flatl2o.evaluation.runner import RunSpec, train_run
from flatl2o.evaluation.stats import paired
from flatl2o.evaluation.workloads import make_workload
from flatl2o.meta.optimizee import mean_std

WORKLOADS = ("lm", "cnn", "regression", "lstm", "finetune")
TUNED = Path(__file__).resolve().parents[1] / "docs" / "realistic" / "eval.json"
KEYS = ("test_loss", "test_accuracy", "train_loss", "param_norm")


def _spec(workload: str, arm: str, seed: int, horizons: tuple[int, ...], **kw) -> RunSpec:
    return RunSpec(
        task=workload,
        optimizer=arm,
        seed=seed,
        horizons=horizons,
        batch_size=make_workload(workload).batch_size,
        trace_probes=0,
        eig_iters=0,
        curve_points=0,
        **kw,
    )


def _folder(arg: str) -> str:
    """``arg``, or for ``init:ARCH`` a temporary folder holding the untrained rule."""
    if not arg.startswith("init:"):
        return arg
    folder = Path(tempfile.mkdtemp()) / arg[len("init:") :]
    torch.manual_seed(0)
    save_rule(make_rule(arg[len("init:") :]), folder)
    return str(folder)


def plan(
    candidates: dict[str, str], tuned: dict, workloads: tuple[str, ...], horizons, seeds: int
) -> list[tuple[str, str, RunSpec]]:
    """``(workload, arm, spec)`` for every run; AdamW is one run per horizon (its schedule
    ends there), the others one run measured at every horizon."""
    out = []
    folders: dict[str, str] = {}  # one untrained rule saved per init:ARCH, however often named
    arms: list[tuple[str, str, float]] = []  # (name, folder, lr), each rule read once
    for name, arg in candidates.items():
        given_folder, _, given = arg.partition("@")
        if given_folder not in folders:
            folders[given_folder] = _folder(given_folder)
        folder = folders[given_folder]
        lr = float(given) if given else shipped_lr(load_rule(folder).architecture)
        arms.append((name, folder, lr))
    hs = tuple(horizons)
    for w in workloads:
        selected = tuned["tuning"][w]["adamw"]["selected"]
        for seed in range(seeds):
            out.append((w, "adam", _spec(w, "adam", seed, hs, hparams={"lr": 1e-3})))
            for h in hs:
                hp = selected[str(h)]
                spec = _spec(w, "adamw", seed, (h,), hparams=hp, schedule="warmup-cosine")
                out.append((w, "adamw", spec))
            for name, folder, lr in arms:
                spec = _spec(w, name, seed, hs, hparams={"lr": lr}, checkpoint=folder)
                out.append((w, name, spec))
    return out


def _same(a: float, b: float) -> bool:
    """Equal floats, NaN equal to NaN (a regression's accuracy)."""
    return a == b or (math.isnan(a) and math.isnan(b))


def measure(specs: list[tuple[str, str, RunSpec]], tuned: dict) -> dict:
    """Run every spec; per workload and arm, per horizon, the per-seed metrics."""
    reference = {
        (r["spec"]["task"], r["spec"]["seed"]): r
        for r in tuned["runs"]
        if r["spec"]["optimizer"] == "adam"
    }
    results: dict = {}
    checks = []
    workloads = {}
    for w, arm, spec in tqdm(specs, desc="runs", unit="run"):
        workload = workloads.setdefault(w, make_workload(w))
        rec = train_run(spec, workload)
        for h, m in rec["metrics"].items():
            cell = results.setdefault(w, {}).setdefault(arm, {}).setdefault(h, {})
            cell[str(spec.seed)] = {k: float(m[k]) for k in KEYS if k in m}
            cell[str(spec.seed)]["diverged"] = rec["diverged_at"] is not None
            cell[str(spec.seed)]["seconds_per_step"] = rec["seconds_per_step"]
        if arm == "adam" and (w, spec.seed) in reference:
            ref = reference[(w, spec.seed)]
            same = all(
                _same(v, rec["metrics"][h][k])
                for h in rec["metrics"]
                if h in ref["metrics"]
                for k, v in ref["metrics"][h].items()
            )
            checks.append(
                {
                    "workload": w,
                    "seed": spec.seed,
                    "same_init": ref["init_sha"] == rec["init_sha"],
                    "same_metrics": same,
                }
            )
    return {"cells": results, "adam_checks": checks}


def better(diff: float, metric: str) -> bool:
    """Whether a difference A − B of ``metric`` favours A: a lower test loss, a higher
    accuracy."""
    return (diff < 0) == (metric == "test_loss")


def adam_checks_lines(checks: list[dict]) -> list[str]:
    """The report's paragraph on whether Adam at 1e-3 reproduced the tuned results' Adam runs
    (nothing when none was compared)."""
    if not checks:
        return []
    bad = [c for c in checks if not (c["same_init"] and c["same_metrics"])]
    return [
        f"Adam at 1e-3 reproduces the tuned results' Adam runs (same initialization and "
        f"metrics) on {len(checks) - len(bad)} of {len(checks)} (workload, seed) pairs"
        + (
            "; not on "
            + ", ".join(
                f"{c['workload']} seed {c['seed']}"
                + ("" if c["same_init"] else " (different initialization)")
                for c in bad
            )
            if bad
            else ""
        )
        + ".",
        "",
    ]


def markdown(result: dict) -> str:
    """Per workload and horizon: the held-out metric per arm and each candidate's paired
    difference with Adam at 1e-3 and with tuned AdamW."""
    cells = result["cells"]
    arms = ["adam", "adamw", *result["candidates"]]
    lines = [
        "# Candidate default rules vs Adam 1e-3 and tuned AdamW (realistic workloads)",
        "",
        f"Command: `{result['command']}`. {result['seeds']} seeds (mean ± sample std; paired "
        "differences with a paired t-test at 95%), every candidate untuned at its rule's default "
        f"lr; AdamW at the lr and weight decay selected in `{result['tuned']}`, warmup + cosine. "
        f"Ran in {result['wall_seconds'] / 60:.1f} min, torch {result['torch']}.",
        "",
        "Candidates: " + ", ".join(f"`{n}` = `{f}`" for n, f in result["candidates"].items()),
        "",
    ]
    lines += adam_checks_lines(result["adam_checks"])
    header = "| workload | steps | metric | " + " | ".join(f"`{a}`" for a in arms)
    header += " | " + " | ".join(f"`{c}` − Adam | `{c}` − AdamW" for c in result["candidates"])
    lines += [header + " |", "|" + "---|" * (3 + len(arms) + 2 * len(result["candidates"]))]
    for w, by_arm in cells.items():
        metric = make_workload(w).metric
        for h in sorted(by_arm["adam"], key=int):
            values = {
                a: {int(s): r.get(metric, math.nan) for s, r in by_arm[a][h].items()}
                for a in arms
                if h in by_arm.get(a, {})
            }
            row = [f"`{w}`", h, metric.replace("_", " ")]
            for a in arms:
                mean, std = mean_std(list(values.get(a, {}).values()))
                div = sum(r.get("diverged", False) for r in by_arm.get(a, {}).get(h, {}).values())
                row.append(f"{mean:.4f} ± {std:.4f}" + (f" ({div} diverged)" if div else ""))
            for c in result["candidates"]:
                for base in ("adam", "adamw"):
                    p = paired(values[c], values[base])
                    side = "better" if better(p.mean, metric) else "worse"
                    verdict = side if p.significant else "noise" if p.n >= 2 else "untestable"
                    row.append(f"{p.fmt_mean('+.4f')} ({verdict})")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Train loss and parameter norm at the last horizon (mean over seeds):", ""]
    lines += ["| workload | " + " | ".join(f"`{a}`" for a in arms) + " |"]
    lines += ["|---|" + "---|" * len(arms)]
    for w, by_arm in cells.items():
        h = max(by_arm["adam"], key=int)
        row = [f"`{w}`"]
        for a in arms:
            runs = list(by_arm.get(a, {}).get(h, {}).values())
            tl, _ = mean_std([r.get("train_loss", math.nan) for r in runs])
            pn, _ = mean_std([r.get("param_norm", math.nan) for r in runs])
            row.append(f"{tl:.4f} / {pn:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("candidates", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--horizons", type=int, nargs="+", default=[1000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--tuned", default=str(TUNED), help="realistic results JSON (AdamW)")
    parser.add_argument("--out", default="benchmarks/results/normprop_candidates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    candidates = dict(c.split("=", 1) for c in args.candidates)
    tuned = json.loads(Path(args.tuned).read_text())
    start = time.perf_counter()
    specs = plan(candidates, tuned, tuple(args.workloads), args.horizons, args.seeds)
    measured = measure(specs, tuned)
    root = Path(__file__).resolve().parents[1]
    tuned_path = Path(args.tuned).resolve()
    result = {
        "command": "python benchmarks/normprop_candidates.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "candidates": candidates,
        "seeds": args.seeds,
        "horizons": args.horizons,
        "tuned": str(
            tuned_path.relative_to(root) if tuned_path.is_relative_to(root) else tuned_path
        ),
        "torch": torch.__version__,
        "wall_seconds": time.perf_counter() - start,
        **measured,
    }
    print(markdown(result))
    write_result(Path(args.out).with_suffix(".json"), result, markdown(result))


if __name__ == "__main__":
    main()
