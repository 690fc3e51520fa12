"""The meta-trainer: truncated backprop through optimizee trajectories (docs/method.md §3-§4).

One meta-iteration = one trajectory from a fresh optimizee initialization, split into
unrolls of ``unroll`` steps; after each unroll the rule takes one meta-step (Adam) and the
optimizee parameters and rule state are detached. The meta-objective of an unroll is
``mean_t f(theta_t) + alpha * mean_t R(theta_t)``; R's gradient reaches the rule through
the iterates ``theta_t``. All randomness comes from one seeded ``torch.Generator`` whose
state is checkpointed, so a killed run resumed with ``resume=True`` ends bit-for-bit where
an uninterrupted run ends.

A meta-step can unroll several optimizees ("slots") at once: ``meta_batch`` per process, and
under torchrun ``meta_batch`` on each of N processes. Slot ``j`` has its own generator
(:func:`slot_seed`; slot 0's is the single-process run's generator), the objective is the mean
over slots, and DDP averages the rule's meta-gradient over processes, so N processes with
``meta_batch=B`` compute what one process with ``meta_batch=N*B`` computes (up to float
rounding). Only rank 0 validates, logs and writes files; decisions are broadcast from it.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatl2o import distributed
from flatl2o.checkpoint import (
    CheckpointError,
    atomic_write_text,
    save_rule,
)
from flatl2o.hub import (
    checkpoint_location,
    load_rule,
    render_model_card,
)
from flatl2o.meta.card import (
    card_body,
    git_commit,
    refresh_model_card,
    render_checkpoint_card,
    user_task_line,
)
from flatl2o.meta.export import EXPORTED_FILES, export_name, export_run
from flatl2o.meta.objective import MetaObjective, adam_teacher_step
from flatl2o.meta.optimizee import (
    evaluate_rule,
    learned_optimizer,
    split_metrics,
    train_optimizee,
)
from flatl2o.meta.plots import plot_log
from flatl2o.meta.recipe import (
    REGULARIZER_SEED_OFFSET,
    SLOT_SEED_STRIDE,
    VAL_SEED_OFFSET,
    Recipe,
    RecipeError,
)
from flatl2o.meta.regularizers import make_regularizer, regularized_unroll
from flatl2o.meta.run_state import (
    LOG_NAME,
    TRAINER_DIR,
    InexactResumeWarning,
    ResumeError,
    append_log,
    apply_state,
    check_fresh_folder,
    read_state,
    rule_from_config,
    strict_json,
    write_state,
)
from flatl2o.meta.tasks import Task, TaskDistribution, make_task
from flatl2o.rules import State, UpdateRule, make_rule

__all__ = [
    "EXPORTED_FILES",
    "LOG_NAME",
    "TRAINER_DIR",
    "InexactResumeWarning",
    "MetaTrainer",
    "ResumeError",
    "adam_teacher_step",
    "card_body",
    "export_name",
    "meta_train",
    "plot_log",
    "refresh_model_card",
    "regularized_unroll",
    "render_checkpoint_card",
    "slot_seed",
    "strict_json",
]


def slot_seed(seed: int, slot: int) -> int:
    """Seed of optimizee slot ``slot``'s generator: ``seed + slot * 2**32`` (slot 0: ``seed``)."""
    return seed + slot * SLOT_SEED_STRIDE


class MetaTrainer:
    """Meta-trains an update rule from a :class:`Recipe` into a Hub-ready folder."""

    def __init__(
        self,
        recipe: Recipe,
        out_dir: str | os.PathLike[str],
        *,
        task: Task | None = None,
        resume: bool = False,
        progress: bool = True,
        command: str | None = None,
        meta_batch: int = 1,
        exact_resume: bool = True,
    ) -> None:
        if not isinstance(meta_batch, int) or isinstance(meta_batch, bool) or meta_batch < 1:
            raise ValueError(f"meta_batch must be a positive int (optimizees), got {meta_batch!r}")
        self.recipe = recipe
        self.out = Path(out_dir)
        self.meta_batch = meta_batch
        # False: resume even where the arithmetic differs from the saved run's (thread count,
        # torch version), so the run no longer ends bit-for-bit where an uninterrupted one ends
        self.exact_resume = exact_resume
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        # the folder is checked (and a checkpoint read) before any work: a bad --out fails fast
        payload: Any = None
        if self.rank == 0:
            try:
                payload = (
                    read_state(
                        self.out,
                        recipe,
                        world_size=self.world_size,
                        meta_batch=meta_batch,
                        exact_resume=exact_resume,
                    )
                    if resume
                    else check_fresh_folder(self.out)
                )
            except ResumeError as e:
                payload = e
        payload = distributed.broadcast_object(payload)
        if isinstance(payload, ResumeError):
            raise payload
        self.custom_task = task is not None  # the model card must not claim [task].name then
        # the task validated and evaluated; the trajectories' optimizees come from distribution
        self.task = (
            task
            if task is not None
            else make_task(recipe.task.name, batch_size=recipe.task.batch_size)
        )
        self.distribution = self._task_distribution()
        self.progress = progress
        self.command = command or " ".join(shlex.quote(a) for a in sys.argv)
        self.git_commit = git_commit()  # the code that trains, not the code at the end
        train = recipe.train
        first = self.rank * meta_batch  # this process unrolls slots first .. first+meta_batch-1
        self.generators = [
            torch.Generator().manual_seed(slot_seed(train.seed, j))
            for j in range(first, first + meta_batch)
        ]
        self.generator = self.generators[0]
        # [regularizer].rng = "own": R draws from its own generators, so the minibatches and
        # imitation choices are those of the same recipe without a regularizer
        self.reg_generators = (
            [
                torch.Generator().manual_seed(slot_seed(train.seed, j) + REGULARIZER_SEED_OFFSET)
                for j in range(first, first + meta_batch)
            ]
            if recipe.regularizer.rng == "own"
            else None
        )
        saved_config = payload[0].get("rule_config") if resume else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train.seed)
            if saved_config is not None:  # the checkpoint has the weights: no init_from needed
                rule = rule_from_config(saved_config, self.out)
            elif recipe.rule.init_from:
                rule = load_rule(recipe.rule.init_from)
                if rule.architecture != recipe.rule.architecture:
                    raise RecipeError(
                        f"[rule].init_from {recipe.rule.init_from!r} is a "
                        f"{rule.architecture!r} rule but [rule].architecture is "
                        f"{recipe.rule.architecture!r}; make them agree (e.g. override "
                        f"rule.architecture={rule.architecture})"
                    )
            else:
                rule = make_rule(recipe.rule.architecture, **recipe.rule.options)
        rule.train()
        self.meta_opt = torch.optim.Adam(rule.parameters(), lr=train.meta_lr)
        #: meta-steps skipped in the current trajectory for a non-finite meta-gradient
        self.skipped_meta_steps = 0
        reg = recipe.regularizer
        self.regularizer = (
            make_regularizer(reg.name, **reg.options)
            if reg.name != "none" and reg.alpha > 0
            else None
        )
        self.objective = MetaObjective(
            rule,
            self.task,
            recipe,
            regularizer=self.regularizer,
            generators=self.generators,
            reg_generators=self.reg_generators,
        )
        self.lengths = recipe.curriculum.lengths or [train.trajectory]
        self.iteration = 0
        self.stage = 0
        self.best_val = math.inf
        self.bad_validations = 0
        self.log_lines = 0
        if resume:
            counters = apply_state(
                self.out,
                *payload,
                rule=self.rule,
                meta_opt=self.meta_opt,
                generators=self.generators,
                reg_generators=self.reg_generators or [],
                first_slot=first,
            )
            self.iteration = counters["iteration"]
            self.stage = counters["stage"]
            self.best_val = counters["best_val"]
            self.bad_validations = counters["bad_validations"]
            self.log_lines = counters["log_lines"]
        self._ddp: nn.Module | None = None
        if self.world_size > 1:  # after a resume: DDP starts from rank 0's (loaded) weights
            from torch.nn.parallel import DistributedDataParallel

            self._ddp = DistributedDataParallel(self.objective, broadcast_buffers=False)

    def _task_distribution(self) -> TaskDistribution:
        """The optimizees of the trajectories (``[task]``: families, weights, batch scales,
        scale range); without families, the task validated and evaluated."""
        spec = self.recipe.task
        if spec.families and self.custom_task:
            raise RecipeError(
                f"meta_train(task=...) trains on the task passed, but [task].families is "
                f"{spec.families}; set families = [] or do not pass task="
            )
        tasks = [make_task(name) for name in spec.families] or [self.task]
        return TaskDistribution(
            tasks, spec.weights, batch_scales=spec.batch_scales, scale_range=spec.scale_range
        )

    # ------------------------------------------------------------------ training
    @property
    def rule(self) -> UpdateRule:
        """The rule being meta-trained (held by :attr:`objective`, which DDP wraps)."""
        return self.objective.rule

    @rule.setter
    def rule(self, rule: UpdateRule) -> None:
        self.objective.rule = rule

    def meta_loss_term(self, loss: Tensor) -> Tensor:
        """One optimizee loss as it enters the meta-objective (plain or log)."""
        return self.objective.meta_loss_term(loss)

    def _objective(self, kind: str, *args: Any) -> Any:
        """The ``kind`` objective of :class:`MetaObjective`; under torchrun through DDP, whose
        backward averages the meta-gradient."""
        return self.objective(kind, *args) if self._ddp is None else self._ddp(kind, *args)

    def unroll(
        self, theta: Tensor, state: State, step: int, regularize: bool
    ) -> tuple[Tensor, State, dict[str, float]]:
        """One truncated unroll of ``unroll`` steps and its meta-step."""
        meta, reg_value, theta, state = self._objective("unroll", theta, state, step, regularize)
        alpha = self.recipe.regularizer.alpha
        self._meta_step(meta + alpha * reg_value if reg_value is not None else meta)
        metrics = {"meta_loss": float(meta.detach())}
        if reg_value is not None:
            metrics["regularizer"] = float(reg_value.detach())
        return theta.detach(), {k: v.detach() for k, v in state.items()}, metrics

    def unroll_objective(
        self, theta: Tensor, state: State, step: int, regularize: bool
    ) -> tuple[Tensor, Tensor | None, Tensor, State]:
        """Run one unroll differentiably (:meth:`MetaObjective.unroll_objective`)."""
        return self.objective.unroll_objective(theta, state, step, regularize)

    def imitation_unroll(
        self, theta: Tensor, state: State, step: int
    ) -> tuple[Tensor, State, dict[str, float]]:
        """An unroll that trains the rule to reproduce Adam's steps along Adam's trajectory."""
        objective, theta, state = self._objective("imitation", theta, state, step)
        self._meta_step(objective)
        return (
            theta,
            {k: v.detach() for k, v in state.items()},
            {"imitation": float(objective.detach())},
        )

    def imitation_objective(
        self, theta: Tensor, state: State, step: int
    ) -> tuple[Tensor, Tensor, State]:
        """The imitation unroll's objective (:meth:`MetaObjective.imitation_objective`)."""
        return self.objective.imitation_objective(theta, state, step)

    def _meta_step(self, objective: Tensor) -> None:
        """Backward and one meta-optimizer step, skipped (and counted in
        :attr:`skipped_meta_steps`) when the meta-gradient is not finite: one diverged
        unroll must not turn the rule's weights, and every later trajectory, into NaN."""
        self.meta_opt.zero_grad(set_to_none=True)
        objective.backward()
        clip = self.recipe.train.grad_clip
        params = [p for p in self.rule.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        if not torch.isfinite(norm):
            self.meta_opt.zero_grad(set_to_none=True)
            self.skipped_meta_steps += 1
            return
        self.meta_opt.step()

    def trajectory(self, length: int) -> dict[str, Any]:
        """One meta-iteration: a trajectory of ``length`` steps from a fresh initialization
        (the metrics' means; with several tasks, also the name of the task trained)."""
        train, reg = self.recipe.train, self.recipe.regularizer
        # this trajectory's optimizee, drawn from slot 0's generator (saved in checkpoints, so a
        # resumed run draws the same); a single task with nothing to vary draws nothing
        task = self.distribution.sample(self.generator)
        self.objective.task = task
        thetas = [task.init_params(gen) for gen in self.generators]
        theta = thetas[0] if len(thetas) == 1 else torch.cat(thetas)
        state = self.rule.init_state(theta.numel())
        num_unrolls = length // train.unroll
        self.skipped_meta_steps = 0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for u in range(num_unrolls):
            step = u * train.unroll
            imitate = train.imitation_prob > 0 and distributed.broadcast_object(
                # drawn from slot 0's generator, which rank 0 holds; the same on every rank
                self.rank == 0
                and float(torch.rand((), generator=self.generator)) < train.imitation_prob
            )
            if imitate:
                theta, state, metrics = self.imitation_unroll(theta, state, step)
            else:
                regularize = self.regularizer is not None and regularized_unroll(
                    reg.schedule, u, num_unrolls
                )
                theta, state, metrics = self.unroll(theta, state, step, regularize)
            for k, val in metrics.items():
                sums[k] = sums.get(k, 0.0) + val
                counts[k] = counts.get(k, 0) + 1
        result: dict[str, Any] = distributed.mean_over_ranks({k: sums[k] / counts[k] for k in sums})
        if self.skipped_meta_steps:  # the same on every rank: DDP averages the meta-gradient
            result["skipped_meta_steps"] = self.skipped_meta_steps
        if len(self.distribution.tasks) > 1:  # which task this (rank 0's) trajectory trained
            result["task"] = task.name
        return result

    def validate(self, length: int) -> float:
        """Mean validation-split loss after ``length`` steps over fixed-seed optimizee runs
        (:func:`flatl2o.meta.optimizee.train_optimizee` with the rule in ``L2O``, the loop the
        evaluation and the model cards use); a task with only a batch sampler is judged on its
        last 10 training-batch losses."""
        values = []
        self.rule.eval()
        for i in range(self.recipe.curriculum.validation_runs):
            traj = train_optimizee(
                self.task,
                learned_optimizer(self.rule),
                seed=VAL_SEED_OFFSET + i,
                horizons=[length],
                measure=(
                    (lambda run, _: split_metrics(run, ["val"]))
                    if self.task.dataset is not None
                    else None
                ),
            )
            if self.task.dataset is not None:
                values.append(traj.metrics[length]["val_loss"])
            else:  # a user task with only a batch sampler: late training-batch loss
                values.append(sum(traj.losses[-10:]) / len(traj.losses[-10:]))
        self.rule.train()
        value = sum(values) / len(values)
        return value if math.isfinite(value) else math.inf

    def run(self) -> Path:
        """Meta-train to the end (resumable), then write the Hub-ready folder; return it."""
        from tqdm.auto import tqdm

        train, cur = self.recipe.train, self.recipe.curriculum
        main = self.rank == 0  # the only process that writes
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "recipe.toml", self.recipe.to_toml())
        bar = tqdm(
            total=train.iterations,
            initial=self.iteration,
            desc=f"meta-train {self.recipe.name}",
            disable=not (self.progress and main),
        )
        start = time.perf_counter()
        while self.iteration < train.iterations:
            length = self.lengths[self.stage]
            metrics = self.trajectory(length)
            self.iteration += 1
            record: dict[str, Any] = {
                "iteration": self.iteration,
                "stage": self.stage,
                "length": length,
                **metrics,
                "seconds": round(time.perf_counter() - start, 3),
            }
            if self.iteration % cur.validate_every == 0 or self.iteration == train.iterations:
                record.update(self._validation_step())
            self._log(record)
            bar.set_postfix(
                {
                    k: f"{v:.4g}"
                    for k, v in record.items()
                    if k in ("meta_loss", "regularizer", "val_loss")
                }
            )
            bar.update(1)
            if self.iteration % train.checkpoint_every == 0 or self.iteration == train.iterations:
                self._save_state()
        bar.close()
        return self.finish() if main else self.out

    def _validation_step(self) -> dict[str, Any]:
        cur = self.recipe.curriculum
        next_length = self.lengths[min(self.stage + 1, len(self.lengths) - 1)]
        val = distributed.broadcast_object(self.validate(next_length) if self.rank == 0 else None)
        improved = val < self.best_val
        if improved:
            self.best_val = val
            self.bad_validations = 0
            if self.rank == 0:
                save_rule(self.rule, self.out / "best")
        else:
            self.bad_validations += 1
            if self.bad_validations >= cur.patience and self.stage + 1 < len(self.lengths):
                self.stage += 1
                self.bad_validations = 0
                self.best_val = math.inf  # a new stage is judged on its own horizon
        return {"val_loss": val, "val_length": next_length, "best_val_loss": self.best_val}

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            append_log(self.out, record)
        self.log_lines += 1

    def _save_state(self) -> None:
        """Checkpoint everything needed to continue exactly (:func:`run_state.write_state`).

        Every rank's slot generators are gathered to rank 0, which writes; the ranks' rules
        are checked to be identical first (DDP keeps them so; this catches a broken setup).
        """
        gathered = distributed.all_gather_object(
            (
                self.rule.fingerprint() if self.world_size > 1 else "",
                [gen.get_state() for gen in self.generators],
                [gen.get_state() for gen in self.reg_generators or []],
            )
        )
        if len({fingerprint for fingerprint, _, _ in gathered}) != 1:
            raise RuntimeError(
                "the ranks' rules differ after the same meta-steps: "
                f"{[fingerprint for fingerprint, _, _ in gathered]}; every rank must run the "
                "same flatl2o, torch and recipe (launch all of them with the same command)"
            )
        if self.rank != 0:
            return
        write_state(
            self.out,
            rule=self.rule,
            meta_opt=self.meta_opt,
            slot_states=[state for _, states, _ in gathered for state in states],
            reg_states=[state for _, _, states in gathered for state in states],
            counters={
                "iteration": self.iteration,
                "stage": self.stage,
                "best_val": self.best_val,
                "bad_validations": self.bad_validations,
                "log_lines": self.log_lines,
            },
            recipe=self.recipe,
            world_size=self.world_size,
            meta_batch=self.meta_batch,
        )

    # ------------------------------------------------------------------ output
    def final_rule(self) -> UpdateRule:
        """The rule to ship: the best validated one if validation ran, else the last."""
        best = self.out / "best"
        if (best / "model.safetensors").is_file():
            return load_rule(best)
        return self.rule.eval()

    def finish(self, evaluate: bool = True) -> Path:
        """Evaluate the final rule and write config, weights, metrics, model card and plot."""
        rule = self.final_rule().eval()
        if not all(torch.isfinite(v).all() for v in rule.state_dict().values()):
            raise CheckpointError(
                f"meta-training diverged: the rule's weights contain NaN or infinite values and "
                f"no validated rule was saved in {self.out / 'best'}, so there is no rule to "
                f"ship (see {self.out / LOG_NAME}); start a new run with a lower "
                "[train].meta_lr or a [train].grad_clip > 0"
            )
        metrics: dict[str, Any] = {}
        if evaluate and self.task.dataset is not None:
            ev = self.recipe.evaluation
            metrics = evaluate_rule(rule, self.task, horizons=ev.horizons, seeds=ev.seeds)
        card = render_model_card(
            rule,
            title=self.recipe.name,
            load_from=checkpoint_location(self.out),
            metrics=metrics,
            body=self._card_body(metrics),
        )
        # the run's recipe and log (written while training) describe these weights; any other
        # description file in the folder (an old card, metrics or plot) is removed by the save
        save_rule(
            rule,
            self.out,
            model_card=card,
            files={"metrics.json": strict_json(metrics, indent=2) + "\n"},
            keep=("recipe.toml", LOG_NAME),
        )
        plot_log(self.out / LOG_NAME, self.out / "meta_training.png")
        return self.out

    def export(self, folder: str | os.PathLike[str]) -> Path:
        """Copy the shippable files to a folder (:func:`flatl2o.meta.export.export_run`)."""
        return export_run(self.out, folder)

    def _card_body(self, metrics: dict[str, Any]) -> str:
        """The card's sections for this run (:func:`flatl2o.meta.card.card_body`)."""
        return card_body(
            self.recipe,
            metrics,
            command=self.command,
            git_commit=self.git_commit,
            optimizees=self.world_size * self.meta_batch,
            processes=self.world_size,
            task=user_task_line(self.task) if self.custom_task else None,
        )


def meta_train(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    task: Task | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[MetaTrainer], None] | None = None,
    meta_batch: int = 1,
    exact_resume: bool = True,
) -> Path:
    """Run a recipe end to end; returns the Hub-ready output folder."""
    trainer = MetaTrainer(
        recipe,
        out_dir,
        task=task,
        resume=resume,
        progress=progress,
        meta_batch=meta_batch,
        exact_resume=exact_resume,
    )
    if callback is not None:
        callback(trainer)
    return trainer.run()
