"""Model cards of meta-training runs: the "How it was made" and accuracy sections.

:func:`card_body` writes them for a new run (:meth:`flatl2o.meta.trainer.MetaTrainer.finish`)
and :func:`render_checkpoint_card` / :func:`refresh_model_card` re-render a checkpoint folder's
card from its own files, so every card shows the numbers of its ``metrics.json`` in one
layout; :func:`remeasure_checkpoint` measures those numbers again with
:func:`flatl2o.meta.optimizee.evaluate_rule` (the loop behind the results pages too). The
card's front matter, title and usage lines come from
:func:`flatl2o.hub.render_model_card`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from flatl2o.checkpoint import MODEL_CARD_NAME, atomic_write_text
from flatl2o.hub import (
    checkpoint_location,
    load_rule,
    portable_command,
    render_model_card,
    split_front_matter,
)
from flatl2o.meta.optimizee import evaluate_rule
from flatl2o.meta.recipe import Recipe, load_recipe
from flatl2o.meta.run_state import strict_json
from flatl2o.meta.tasks import Task, make_task


def user_task_line(task: Task) -> str:
    """The card's task line for a task passed to ``meta_train(task=...)`` instead of the
    recipe's ``[task]`` (which the card must then not claim)."""
    batches = f"batch {task.batch_size}" if task.dataset is not None else "batches from its sampler"
    return (
        f"a user-defined task `{task.name}` ({task.num_params} parameters, "
        f"{batches}; passed to `meta_train(task=...)`, so the recipe's `[task]` "
        "section was not used)"
    )


def card_body(
    recipe: Recipe,
    metrics: dict[str, Any],
    *,
    command: str,
    git_commit: str,
    optimizees: int = 1,
    processes: int = 1,
    task: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> str:
    """The model card's "How it was made" and accuracy sections for a run of ``recipe``.

    ``command`` is shown with its absolute paths made portable, relative to ``root`` (the
    folder it ran in; default the current one, see :func:`flatl2o.hub.portable_command`);
    ``task`` replaces the recipe's ``[task]`` line for a task passed to
    ``meta_train(task=...)``.
    """
    r = recipe
    reg = r.regularizer
    regline = (
        f"`{reg.name}` with alpha={reg.alpha}, schedule={reg.schedule}, every={reg.every}, "
        f"options={reg.options}"
        + (", rng=own (its own generator: the sibling's minibatches)" if reg.rng == "own" else "")
        if reg.name != "none" and reg.alpha > 0
        else "none (plain meta-training)"
    )
    task = task or (
        f"`{r.task.name}` (batch {r.task.batch_size})"
        if not r.task.families
        else f"a distribution of {len(r.task.families)} tasks "
        f"({', '.join(f'`{f}`' for f in r.task.families)}; weights {r.task.weights or 'equal'}, "
        f"batch factors {r.task.batch_scales or [1.0]}, per-tensor scales "
        f"{r.task.scale_range or 'none'}), validated and evaluated on `{r.task.name}`"
    )
    lengths = r.curriculum.lengths or [r.train.trajectory]
    lines = [
        "## How it was made",
        "",
        r.description.strip() or "Meta-trained with flatl2o.",
        "",
        f"- Task: {task}, "
        f"{r.train.iterations} trajectories, unroll {r.train.unroll}, "
        f"curriculum {lengths}, meta-lr {r.train.meta_lr}, "
        f"imitation probability {r.train.imitation_prob}.",
        *(
            [
                f"- Optimizees per meta-step: {optimizees} "
                f"({processes} processes x meta_batch {optimizees // processes})."
            ]
            if optimizees > 1
            else []
        ),
        f"- Regularizer: {regline}.",
        f"- Command: `{portable_command(command, root=root)}`",
        # a commit id in backticks; a note about the commit (older cards) as it was written
        f"- Git commit: {git_commit if ' ' in git_commit.strip() else f'`{git_commit}`'}",
        "- Recipe: `recipe.toml` in this folder; the log is `log.jsonl`.",
    ]
    if metrics:
        ev = r.evaluation
        val = all(f"val_accuracy@{h}" in metrics for h in ev.horizons)
        lines += [
            "",
            f"## Accuracy on the seen task ({ev.seeds} seeds, mean ± sample std)",
            "",
            *(
                [
                    "Compare or choose hyper-parameters (e.g. the regularizer's strength) on "
                    "the validation columns; the test columns are for reporting only.",
                    "",
                    "| steps | val accuracy | val loss | test accuracy | test loss | train loss |",
                    "|---|---|---|---|---|---|",
                ]
                if val
                else ["| steps | test accuracy | test loss | train loss |", "|---|---|---|---|"]
            ),
        ]
        for h in ev.horizons:
            cells = [
                f"{_num(metrics[f'test_accuracy@{h}'])} ± "
                f"{_num(metrics[f'test_accuracy_std@{h}'])}",
                _num(metrics[f"test_loss@{h}"]),
                _num(metrics[f"train_loss@{h}"]),
            ]
            if val:
                cells[:0] = [
                    f"{_num(metrics[f'val_accuracy@{h}'])} ± "
                    f"{_num(metrics.get(f'val_accuracy_std@{h}'))}",
                    _num(metrics[f"val_loss@{h}"]),
                ]
            lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Sections of a model card that :func:`card_body` and :func:`flatl2o.hub.render_model_card`
#: write (older flatl2o titled the accuracy section "Test accuracy on the seen task ...").
#: These and the fields below are lines of the card's Markdown body, which huggingface_hub
#: keeps as one string (it models only the YAML metadata), so they are found by pattern.
_RENDERED_SECTIONS = re.compile(
    r"^## (Metrics|How it was made|(Test a|A)ccuracy on the seen task\b.*)$"
)
_CARD_FIELD = re.compile(r"^- (?P<key>Command|Git commit|Optimizees per meta-step): (?P<value>.*)$")


def refresh_model_card(
    folder: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> str:
    """Rewrite ``README.md`` of a meta-training checkpoint folder with
    :func:`render_checkpoint_card`; return the new card."""
    card = render_checkpoint_card(folder, root=root)
    atomic_write_text(Path(folder) / MODEL_CARD_NAME, card)
    return card


def remeasure_checkpoint(
    folder: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Measure a meta-training checkpoint folder's rule again on its recipe's task and
    ``[evaluation]`` (:func:`flatl2o.meta.optimizee.evaluate_rule`, as
    :meth:`~flatl2o.meta.trainer.MetaTrainer.finish` does), write ``metrics.json`` and re-render
    the card (:func:`refresh_model_card`); return the metrics. The weights are only read.

    For a card measured by an older loop: the numbers become the ones the evaluation suite
    reports for the same rule, task, seeds and horizons.
    """
    folder = Path(folder)
    recipe = load_recipe(folder / "recipe.toml")
    task = make_task(recipe.task.name, batch_size=recipe.task.batch_size)
    ev = recipe.evaluation
    metrics = evaluate_rule(load_rule(folder).eval(), task, horizons=ev.horizons, seeds=ev.seeds)
    atomic_write_text(folder / "metrics.json", strict_json(metrics, indent=2) + "\n")
    refresh_model_card(folder, root=root)
    return metrics


def render_checkpoint_card(
    folder: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> str:
    """The model card of a meta-training checkpoint folder, rendered again (nothing written).

    The card is made from the folder's own files (rule, ``recipe.toml``, ``metrics.json``) by
    the renderer every new run uses, so it shows today's layout and never a build machine's
    path; the command, git commit and optimizee count are read from the old card (the only
    place that records them; its absolute paths are made relative to ``root``, the folder it
    was run in, default the current one), and sections the renderer does not write (notes
    added to a shipped card) are kept, in their place.
    """
    folder = Path(folder)
    old = (folder / MODEL_CARD_NAME).read_text(encoding="utf-8")
    rule = load_rule(folder)
    recipe = load_recipe(folder / "recipe.toml")
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    fields: dict[str, str] = {}
    notes: list[str] = []
    keep = False
    for line in split_front_matter(old)[1].split("\n"):  # the body; the metadata is re-made
        if line.startswith("## "):
            keep = _RENDERED_SECTIONS.match(line) is None
        if keep:
            notes.append(line)
        match = _CARD_FIELD.match(line)
        if match is not None:
            fields[match["key"]] = match["value"]
    optimizees = processes = 1
    counts = re.match(r"(\d+) \((\d+) processes", fields.get("Optimizees per meta-step", ""))
    if counts is not None:
        optimizees, processes = int(counts[1]), int(counts[2])

    def unquoted(value: str) -> str:
        match = re.fullmatch(r"`([^`]*)`", value)
        return match[1] if match is not None else value

    body = card_body(
        recipe,
        metrics,
        command=unquoted(fields.get("Command", "`unknown`")),
        git_commit=unquoted(fields.get("Git commit", "`unknown`")),
        optimizees=optimizees,
        processes=processes,
        root=root,
    )
    extra = "\n".join(notes).strip()
    return render_model_card(
        rule,
        title=recipe.name,
        load_from=checkpoint_location(folder),
        metrics=metrics,
        body=f"{extra}\n\n{body}" if extra else body,
    )


def _num(value: Any) -> str:
    """A model-card table number: 4 decimals (``inf``/``nan`` as such), ``n/a`` when missing."""
    return f"{value:.4f}" if isinstance(value, float | int) else "n/a"


def git_commit() -> str:
    """The short id of the commit of the flatl2o checkout that runs (``"unknown"`` outside
    a git checkout), recorded on the card of the run it trains."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
