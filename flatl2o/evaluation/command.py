"""The ``flatl2o evaluate`` subcommand: its options and what it runs (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

DEFAULT_OUT = "results/eval"


class _Names(argparse.Action):
    """A list of names given as ``--x a b`` or ``--x a,b``: stored as one tuple, so that both
    halves of the subcommand (this one and :mod:`~flatl2o.evaluation.realistic_command`) read
    it as parsed."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        setattr(namespace, self.dest, tuple(n for v in values for n in v.split(",") if n.strip()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``flatl2o evaluate`` on parser ``p``."""
    p.add_argument(
        "--suite",
        choices=("mnist", "realistic"),
        default="mnist",
        help="mnist: the flat-vector MNIST table (default); realistic: transformer LM, "
        "BatchNorm ResNet, regression, LSTM and fine-tuning against tuned AdamW "
        "(docs/realistic.md; --seeds, --horizons, --long-horizon, --optimizers (checkpoints), "
        "--quick, --jobs, --resume apply)",
    )
    p.add_argument(
        "--optimizers",
        nargs="+",
        action=_Names,
        metavar="NAME",
        help="learned checkpoints (shipped names or folders) and baselines "
        "(adam, sgd, sam-sgd, sam-adam, entropy-sgd); default: every shipped checkpoint "
        "+ every baseline",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        action=_Names,
        metavar="TASK",
        help="optimizees (default: the four MNIST tasks)",
    )
    p.add_argument("--seeds", type=int, help="evaluation seeds per (task, optimizer); default 5")
    p.add_argument("--horizons", type=int, nargs="+", metavar="STEPS", help="default: 100 1000")
    p.add_argument(
        "--long-horizon",
        type=int,
        metavar="STEPS",
        help="also run this many steps (e.g. 10000) on --long-tasks; default 0 (off)",
    )
    p.add_argument(
        "--long-tasks",
        nargs="+",
        action=_Names,
        metavar="TASK",
        help="default: mnist-mlp-sigmoid",
    )
    p.add_argument("--long-seeds", type=int, help="seeds of the long runs (default 2)")
    p.add_argument("--tune-seeds", type=int, help="seeds per tuning trial (default 2)")
    p.add_argument("--trace-probes", type=int, help="Hutchinson probes (default 100)")
    p.add_argument("--eig-iters", type=int, help="power iterations (default 20)")
    p.add_argument(
        "--flatness",
        nargs="+",
        metavar="TASK=PROBES,ITERS",
        help="per-task flatness budget, e.g. mnist-conv=20,10 (0,0: skip); default: "
        "mnist-conv=0,0 (its full-split Hessian-vector products are ~100x an MLP's)",
    )
    p.add_argument(
        "--out", default=None, help=f"folder for eval.json, the PNGs and report.md ({DEFAULT_OUT})"
    )
    p.add_argument(
        "--docs", default=None, metavar="PAGE", help="also write the results page (docs/results.md)"
    )
    p.add_argument(
        "--report-only",
        metavar="JSON",
        default=None,
        help="run nothing: regenerate the PNGs, report.md (and --docs) from this results JSON",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run (8x8 digits) for smoke tests")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs found in --out")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (tuning baselines, final runs)",
    )


def _flatness(values: list[str] | None) -> dict[str, tuple[int, int]] | None:
    """Parse ``TASK=PROBES,ITERS`` entries."""
    if values is None:
        return None
    out = {}
    for v in values:
        try:
            task, budget = v.split("=")
            probes, iters = (int(x) for x in budget.split(","))
        except ValueError:
            raise ValueError(
                f"--flatness expects TASK=PROBES,ITERS (e.g. mnist-conv=20,10), got {v!r}"
            ) from None
        out[task] = (probes, iters)
    return out


def _config(args: argparse.Namespace) -> Any:
    from flatl2o.evaluation.suite import EvalConfig

    given: dict[str, Any] = {}
    for field, value in (
        ("optimizers", args.optimizers),
        ("tasks", args.tasks),
        ("seeds", args.seeds),
        ("horizons", tuple(args.horizons) if args.horizons else None),
        ("long_horizon", args.long_horizon),
        ("long_tasks", args.long_tasks),
        ("long_seeds", args.long_seeds),
        ("tune_seeds", args.tune_seeds),
        ("trace_probes", args.trace_probes),
        ("eig_iters", args.eig_iters),
    ):
        if value is not None:
            given[field] = value
    config = EvalConfig.quick(**given) if args.quick else EvalConfig(**given)
    config.flatness.update(_flatness(args.flatness) or {})  # on top of the defaults
    return config


def run(args: argparse.Namespace) -> int:
    """Execute ``flatl2o evaluate`` (or its ``--report-only`` form)."""
    from flatl2o.evaluation.report import rerender_target, write_report
    from flatl2o.evaluation.suite import evaluate, load_results
    from flatl2o.hub import portable_command

    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if getattr(args, "suite", "mnist") == "realistic":
        from flatl2o.evaluation.realistic_command import run_realistic

        return run_realistic(args, argv)
    if args.report_only:
        data = load_results(args.report_only)
        out, command = rerender_target(
            "flatl2o evaluate --report-only", args.report_only, args.out, args.docs
        )
        written = write_report(data, out, docs=args.docs, command=portable_command(command))
        print(f"wrote {len(written)} files to {out}" + (f" and {args.docs}" if args.docs else ""))
        return 0
    config = _config(args)
    out = Path(args.out or DEFAULT_OUT)
    data = evaluate(
        config,
        out=out,
        jobs=args.jobs,
        threads=args.threads,
        progress=not args.no_progress,
        resume=args.resume,
        command="flatl2o " + " ".join(shlex.quote(a) for a in argv if a != "--resume"),
    )
    regen = f"flatl2o evaluate --report-only {shlex.quote(str(out / 'eval.json'))}"
    if args.docs:
        regen += f" --docs {shlex.quote(args.docs)}"
    regen = portable_command(regen)  # the page is published: no absolute path of this machine
    written = write_report(data, out, docs=args.docs, command=regen)
    print(f"wrote {out / 'eval.json'} and {len(written)} report files")
    print(f"regenerate the report from the JSON with: {regen}")
    return 0
