"""Meta-training recipes: a TOML file that fully determines a run (and so a checkpoint).

Every key is checked before any work starts: unknown sections or keys, wrong types, and
unknown tasks, rules or regularizers are errors that name the key and list what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class RecipeError(ValueError):
    """A recipe that cannot be run as written."""


@dataclasses.dataclass
class RuleSection:
    """The rule architecture to meta-train, its config overrides, or a checkpoint to start from."""

    architecture: str = "rnnprop"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""  # a checkpoint name / folder / Hub repo id to fine-tune from


@dataclasses.dataclass
class TaskSection:
    """The optimizee task meta-trained on (a name from ``flatl2o.meta.tasks.TASKS``)."""

    name: str = "mnist-mlp-sigmoid"
    batch_size: int = 128


@dataclasses.dataclass
class TrainSection:
    """Truncated-BPTT settings (spec §3)."""

    seed: int = 0
    iterations: int = 200  # trajectories (optimizee runs from a fresh init)
    trajectory: int = 100  # optimizee steps per trajectory (first curriculum stage)
    unroll: int = 20  # steps per truncated unroll = one meta-step
    meta_lr: float = 1e-3
    grad_clip: float = 1.0  # max norm of the meta-gradient (0 disables)
    second_order: bool = False  # backprop through the optimizee's gradient too
    meta_loss: str = "mean"  # "mean" of f(theta_t) or "log": mean of log f(theta_t)
    imitation_prob: float = 0.0  # probability that an unroll imitates Adam (mt_ratio)
    imitation_lr: float = 0.01  # the Adam teacher's learning rate
    checkpoint_every: int = 10  # trajectories between resumable checkpoints


@dataclasses.dataclass
class CurriculumSection:
    """Trajectory-length curriculum with validation gating (Chen et al. 2020)."""

    lengths: list[int] = dataclasses.field(default_factory=list)  # [] = no curriculum
    validate_every: int = 20  # trajectories between validations
    validation_runs: int = 3  # optimizee runs (fixed seeds) per validation
    patience: int = 2  # validations without improvement before the next stage


@dataclasses.dataclass
class RegularizerSection:
    """The flatness term alpha * R(theta_t) added to the meta-objective (spec §4)."""

    name: str = "none"  # none | hessian-trace | hessian-eig | hessian-esd | entropy
    alpha: float = 0.0
    schedule: str = "all"  # all | posterior (later half of a trajectory) | prior (earlier half)
    every: int = 1  # compute R every k optimizee steps
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalSection:
    """What the model card reports (test accuracy on the seen task, spec §5)."""

    seeds: int = 5
    horizons: list[int] = dataclasses.field(default_factory=lambda: [100, 1000])


@dataclasses.dataclass
class Recipe:
    """A complete meta-training recipe."""

    name: str = "custom"
    description: str = ""
    rule: RuleSection = dataclasses.field(default_factory=RuleSection)
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    curriculum: CurriculumSection = dataclasses.field(default_factory=CurriculumSection)
    regularizer: RegularizerSection = dataclasses.field(default_factory=RegularizerSection)
    evaluation: EvalSection = dataclasses.field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON/TOML ready)."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """Serialize back to TOML (values are JSON-compatible, so JSON literals are valid TOML)."""
        lines = [f"name = {json.dumps(self.name)}", f"description = {json.dumps(self.description)}"]
        for section, values in self.to_dict().items():
            if not isinstance(values, dict):
                continue
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                if isinstance(value, dict):
                    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                    lines.append(f"{key} = {{{inline}}}")
                else:
                    lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise RecipeError(
            f"recipe key [{section}].{key} must be {expected.__name__}, got {value!r}"
        )
    if expected is list and not all(isinstance(v, int) and v > 0 for v in value):
        raise RecipeError(f"recipe key [{section}].{key} must be a list of positive ints")
    return value


def recipe_from_dict(data: dict[str, Any], *, source: str = "recipe") -> Recipe:
    """Build and validate a :class:`Recipe` from parsed TOML/JSON data."""
    recipe = Recipe()
    for key, value in data.items():
        field = getattr(recipe, key, None) if not key.startswith("_") else None
        if dataclasses.is_dataclass(field):
            if not isinstance(value, dict):
                raise RecipeError(f"{source}: [{key}] must be a table")
            names = {f.name for f in dataclasses.fields(field)}
            for sub, subvalue in value.items():
                if sub not in names:
                    raise RecipeError(
                        f"{source}: unknown key [{key}].{sub}; accepted: {sorted(names)}"
                    )
                setattr(field, sub, _coerce(key, sub, subvalue, getattr(field, sub)))
        elif key in ("name", "description"):
            setattr(recipe, key, _coerce("", key, value, ""))
        else:
            fields = [f.name for f in dataclasses.fields(recipe)]
            raise RecipeError(f"{source}: unknown key {key!r}; accepted: {fields}")
    validate(recipe, source=source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe and apply ``section.key=value`` overrides (values in TOML syntax)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare strings need no quotes on the command line
        *sections, leaf = key.strip().split(".")
        target = data
        for s in sections:
            target = target.setdefault(s, {})
        target[leaf] = value
    return recipe_from_dict(data, source=str(path))


def validate(recipe: Recipe, *, source: str = "recipe") -> None:
    """Check names and ranges against the registries, before any work starts."""
    from flatl2o.meta.regularizers import REGULARIZERS, make_regularizer
    from flatl2o.meta.tasks import TASKS
    from flatl2o.rules import RULES, ConfigError, make_rule

    def fail(msg: str) -> None:
        raise RecipeError(f"{source}: {msg}")

    if recipe.rule.architecture not in RULES:
        fail(f"unknown rule architecture {recipe.rule.architecture!r}; known: {sorted(RULES)}")
    try:
        make_rule(recipe.rule.architecture, **recipe.rule.options)
    except ConfigError as e:
        fail(f"[rule].options: {e}")
    if recipe.task.name not in TASKS:
        fail(f"unknown task {recipe.task.name!r}; known: {sorted(TASKS)}")
    reg = recipe.regularizer
    if reg.name != "none":
        if reg.name not in REGULARIZERS:
            fail(f"unknown regularizer {reg.name!r}; known: {['none', *sorted(REGULARIZERS)]}")
        try:
            make_regularizer(reg.name, **reg.options)
        except (TypeError, ValueError) as e:
            fail(f"[regularizer].options: {e}")
    if reg.schedule not in ("all", "posterior", "prior"):
        fail(f"[regularizer].schedule must be all, posterior or prior, got {reg.schedule!r}")
    if reg.alpha < 0 or reg.every < 1:
        fail("[regularizer] needs alpha >= 0 and every >= 1")
    if reg.name != "none" and reg.alpha == 0:  # the public code's silent no-op (spec §3)
        fail(
            f"[regularizer].name is {reg.name!r} but alpha is 0, which would silently train "
            'without it; set alpha > 0, or name = "none" for plain meta-training'
        )
    t = recipe.train
    if t.meta_loss not in ("mean", "log"):
        fail(f"[train].meta_loss must be 'mean' or 'log', got {t.meta_loss!r}")
    if min(t.iterations, t.trajectory, t.unroll, t.checkpoint_every) < 1 or t.meta_lr <= 0:
        fail("[train] iterations, trajectory, unroll, checkpoint_every and meta_lr must be > 0")
    if t.trajectory % t.unroll:
        fail(f"[train].trajectory ({t.trajectory}) must be a multiple of unroll ({t.unroll})")
    if not 0.0 <= t.imitation_prob <= 1.0:
        fail("[train].imitation_prob must be in [0, 1]")
    for length in recipe.curriculum.lengths:
        if length % t.unroll:
            fail(f"[curriculum].lengths: {length} is not a multiple of unroll ({t.unroll})")
