"""The ``flatl2o`` command line: ``demo``, ``list``, ``meta-train``, ``push``, ``evaluate``."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """An expected user error found by the CLI itself: printed as one line, exit code 2."""


def _cmd_list(args: argparse.Namespace) -> int:
    from flatl2o.hub import DEFAULT_PRETRAINED, list_pretrained, pretrained_info

    names = list_pretrained()
    if not names:
        print("no checkpoints are shipped with this installation")
        return 0
    for name in names:
        info = pretrained_info(name)
        acc = info.get("test_accuracy@1000")
        score = f"test acc@1000 {acc:.3f}" if isinstance(acc, float) else ""
        mark = " (default)" if name == DEFAULT_PRETRAINED else ""
        print(f"{name}{mark}  {score}")
    return 0


def _cmd_meta_train(args: argparse.Namespace) -> int:
    import torch

    from flatl2o import distributed
    from flatl2o.meta.recipe import load_recipe
    from flatl2o.meta.trainer import MetaTrainer

    for flag, value in (("--out", args.out), ("--export", args.export)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise UsageError(f"{flag} {value} is a file; pass a folder (new or existing)")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.init_from:  # the same as the override rule.init_from=... (given last, so it wins)
        overrides.append(f"rule.init_from={json.dumps(args.init_from)}")
    recipe = load_recipe(args.recipe, overrides)  # validated before any work starts
    command = "flatl2o " + " ".join(
        shlex.quote(a) for a in args.argv if a not in ("--resume", "--allow-inexact-resume")
    )
    # under torchrun (WORLD_SIZE > 1) join the process group: one rank per process
    joined = distributed.init_from_env()
    try:
        if joined:
            command = f"torchrun --nproc-per-node {_procs_per_node()} -m {command}"
        trainer = MetaTrainer(
            recipe,
            args.out,
            resume=args.resume,
            progress=not args.no_progress,
            command=command,
            meta_batch=args.meta_batch,
            exact_resume=not args.allow_inexact_resume,
        )
        out = trainer.run()
        if distributed.rank() == 0:
            print(f"wrote {out} (load it with flatl2o.load_rule({str(out)!r}))")
            if args.export:
                print(f"exported the checkpoint files to {trainer.export(args.export)}")
        if joined:  # rank 0 finishes (evaluates, writes) alone: the ranks leave together, or
            torch.distributed.barrier()  # an early rank's teardown can hang the other's
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    return 0


def _procs_per_node() -> str:
    """torchrun's ``--nproc-per-node`` (and ``--nnodes`` when more than one) for the card."""
    import os

    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if local and world != local:
        return f"{local} --nnodes {world // local}"
    return str(world)


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    from flatl2o.hub import push_folder_to_hub

    if not Path(args.folder).expanduser().is_dir():
        raise UsageError(f"{args.folder} is not a folder; pass a checkpoint folder")
    try:
        url = push_folder_to_hub(
            args.folder,
            args.repo_id,
            commit_message=args.commit_message,
            private=True if args.private else None,
            token=args.token or None,
            revision=args.revision or None,
        )
    except (HfHubHTTPError, HFValidationError) as e:  # bad token, no access, bad repo id
        raise UsageError(
            f"the Hub refused the upload to {args.repo_id!r}: {_first_line(e)}"
        ) from None
    except OfflineModeIsEnabled:
        raise UsageError(
            f"cannot upload to {args.repo_id!r}: HF_HUB_OFFLINE is set (offline mode); unset it "
            "to push (the folder was checked and loads)"
        ) from None
    except _network_errors() as e:  # refused, unreachable, timed out (after the retries)
        raise UsageError(
            f"cannot reach the Hub at {constants.ENDPOINT} to upload to {args.repo_id!r} "
            f"({type(e).__name__}: {_first_line(e)}); check the network, proxy and HF_ENDPOINT, "
            "then run the same command again"
        ) from None
    print(url)
    return 0


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the Hub could not be reached", for the HTTP client in use."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):  # huggingface_hub's client, by version
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(found, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _cmd_demo(args: argparse.Namespace) -> int:
    from flatl2o.demo import run_demo

    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a folder; pass a file name such as plot.png")
    run_demo(rule=args.rule, steps=args.steps, seed=args.seed, seeds=args.seeds, plot=args.out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flatl2o.evaluation.command import run

    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:  # unknown names, bad options, missing JSON
        print(f"flatl2o evaluate: error: {e}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


_MARKUP = re.compile(r":[a-z]+:`~?([^`]+)`|``([^`]+)``|`([^`]+)`")


def plain_text(text: str) -> str:
    """``text`` without reStructuredText markup (``` ``x`` ```, ``:func:`x```, `` `x` ``):
    docstrings are written for Sphinx, ``--help`` is read in a terminal."""
    return _MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), text)


class _PlainHelpFormatter(argparse.HelpFormatter):
    """Every description and argument help of the CLI, with markup stripped in one place."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from flatl2o import __version__
    from flatl2o.demo import DEFAULT_PLOT

    parser = argparse.ArgumentParser(
        prog="flatl2o", description=__doc__, formatter_class=_PlainHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=description or summary[0].upper() + summary[1:] + ".",
            formatter_class=_PlainHelpFormatter,
        )

    p = command(
        "demo",
        "train a small MNIST model with a flatl2o optimizer and with Adam",
        "Train the same small MNIST model (784-20-10 sigmoid MLP, offline MNIST-5k) with a "
        "shipped flatl2o optimizer and with Adam over a few seeds, print the numbers and a "
        "short verdict, and save a PNG of the loss curves and the flatness readout.",
    )
    p.add_argument(
        "--rule",
        default=None,
        metavar="NAME_OR_REPO",
        help="the flatl2o checkpoint: shipped name, folder or Hub repo id (default: the default "
        "shipped checkpoint, see flatl2o list)",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=300, help="training steps per run (default 300)"
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="runs per optimizer, on seeds SEED, SEED+1, ... (default 3; the verdict needs 2 "
        "or more to tell a difference from seed noise)",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="the first seed (default 0)")
    p.add_argument(
        "--out",
        default=DEFAULT_PLOT,
        metavar="PNG",
        help="where to save the plot of the loss curves and flatness readout (default: "
        f"{DEFAULT_PLOT} in the current folder)",
    )
    p.set_defaults(func=_cmd_demo)

    p = command("list", "list the checkpoints shipped with the package")
    p.set_defaults(func=_cmd_list)

    p = command(
        "meta-train",
        "meta-train an update rule from a recipe",
        "Meta-train an update rule from a recipe into a Hub-ready checkpoint folder "
        "(docs/meta-training.md).",
    )
    p.add_argument("--recipe", required=True, help="recipe TOML file")
    p.add_argument("--out", required=True, help="output folder (Hub-ready checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument(
        "--allow-inexact-resume",
        action="store_true",
        help="with --resume: continue even if the thread count or torch version differs from "
        "the saved run's (a warning; the result is then not bit-for-bit an uninterrupted run's)",
    )
    p.add_argument(
        "--threads", type=_non_negative_int, default=0, help="torch threads (0: torch default)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--export", default="", help="also copy the shippable files to this folder")
    p.add_argument(
        "--init-from",
        default="",
        metavar="NAME_OR_REPO",
        help="start from this checkpoint (folder, shipped name or Hub repo id) instead of a "
        "random rule: the same as the override rule.init_from=...; its architecture must be "
        "the recipe's [rule].architecture",
    )
    p.add_argument(
        "--meta-batch",
        type=_positive_int,
        default=1,
        help="optimizees unrolled per process in each meta-step (default 1); under torchrun, "
        "N processes x B equal one process with N*B",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="recipe overrides (TOML values)"
    )
    p.set_defaults(func=_cmd_meta_train)

    p = command(
        "push",
        "upload a checkpoint folder to the Hugging Face Hub",
        "Upload a checkpoint folder to the Hugging Face Hub. The folder is checked to load "
        "first; only the checkpoint files are sent (never a run's trainer_state/ or best/), "
        "and the uploaded model card's usage line loads the repo id.",
    )
    p.add_argument(
        "folder",
        help="the checkpoint folder: a meta-train --out or --export folder, or one written by "
        "save_pretrained",
    )
    p.add_argument(
        "--repo-id",
        required=True,
        metavar="OWNER/NAME",
        help="the Hub model repo to upload to (created if it does not exist)",
    )
    p.add_argument("--private", action="store_true", help="create the repo private if it is new")
    p.add_argument(
        "--token",
        default="",
        help="Hub token with write access (default: HF_TOKEN or the token of hf auth login)",
    )
    p.add_argument(
        "--revision", default="", help="branch to commit to (created from main if missing)"
    )
    p.add_argument(
        "--commit-message",
        default="Upload flatl2o update rule",
        metavar="TEXT",
        help="the Hub commit's message (default: %(default)s)",
    )
    p.set_defaults(func=_cmd_push)

    from flatl2o.evaluation.command import add_arguments as _evaluate_arguments

    p = command(
        "evaluate",
        "evaluate optimizers vs tuned baselines",
        "Evaluate learned optimizers against tuned baselines on the MNIST tasks and write the "
        "results JSON, plots and report (docs/evaluation.md).",
    )
    _evaluate_arguments(p)
    p.set_defaults(func=_cmd_evaluate)
    return parser


def _one_line_warnings(command: str, fallback: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints flatl2o's warnings as one ``flatl2o COMMAND:
    warning: ...`` line on stderr and passes every other warning to ``fallback``."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if category.__module__.split(".")[0] == "flatl2o":
            print(f"flatl2o {command}: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, *args, **kwargs)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flatl2o`` console script."""
    from flatl2o.checkpoint import CheckpointError
    from flatl2o.hub import CheckpointNotFoundError
    from flatl2o.meta.data import DatasetUnavailableError
    from flatl2o.meta.recipe import RecipeError
    from flatl2o.meta.trainer import ResumeError
    from flatl2o.rules import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    expected = (
        UsageError,
        RecipeError,
        ResumeError,
        CheckpointError,
        CheckpointNotFoundError,
        ConfigError,
        DatasetUnavailableError,
        PermissionError,
    )
    try:
        with warnings.catch_warnings():  # flatl2o's own warnings: one line, like its errors
            warnings.showwarning = _one_line_warnings(args.command, warnings.showwarning)
            return int(args.func(args) or 0)
    except expected as e:
        print(f"flatl2o {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ""
        if args.command == "meta-train":
            hint = (
                "; to continue from the last checkpoint saved in --out (every "
                "[train].checkpoint_every trajectories), run the same command with --resume"
            )
        print(f"flatl2o {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
