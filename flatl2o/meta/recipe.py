"""Meta-training recipes: a TOML file that fully determines a run (and so a checkpoint).

Every key is checked before any work starts: unknown sections or keys, wrong types, and
unknown tasks, rules or regularizers are errors that name the key and list what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
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
    """The optimizee task(s) meta-trained on (names from ``flatl2o.meta.tasks.TASKS``).

    ``name`` is the task that validation and the final evaluation use, and the one meta-trained
    on when ``families`` is empty; a non-empty ``families`` is the distribution drawn from per
    trajectory (:class:`flatl2o.meta.tasks.TaskDistribution`), each family at its own default
    batch size. ``batch_scales`` and ``scale_range`` (task augmentation) apply either way.
    """

    name: str = "mnist-mlp-sigmoid"
    batch_size: int = 128
    families: list[str] = dataclasses.field(default_factory=list)  # [] = name only
    weights: list[float] = dataclasses.field(default_factory=list)  # [] = equal weights
    batch_scales: list[float] = dataclasses.field(default_factory=list)  # [] = own batch size
    scale_range: list[float] = dataclasses.field(default_factory=list)  # [] = no rescaling


@dataclasses.dataclass
class TrainSection:
    """Truncated-BPTT settings (docs/method.md §3)."""

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
    """The flatness term alpha * R(theta_t) added to the meta-objective (docs/method.md §4)."""

    name: str = "none"  # none | hessian-trace | hessian-eig | hessian-esd | entropy
    alpha: float = 0.0
    schedule: str = "all"  # all | posterior (later half of a trajectory) | prior (earlier half)
    every: int = 1  # compute R every k optimizee steps
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # where R's probes / Langevin noise come from: "minibatch" = the optimizee slot's generator
    # (as the shipped checkpoints were made; R's draws then shift the minibatch stream), "own" =
    # a separate generator, so a regularized run sees exactly its unregularized sibling's data
    rng: str = "minibatch"


@dataclasses.dataclass
class EvalSection:
    """What the model card reports (test accuracy on the seen task, docs/method.md §5)."""

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
        """Serialize back to TOML that :func:`load_recipe` reads to an equal recipe (UTF-8)."""
        lines = [f"name = {toml_value(self.name)}", f"description = {toml_value(self.description)}"]
        for section, values in self.to_dict().items():
            if not isinstance(values, dict):
                continue
            lines.append(f"\n[{section}]")
            lines.extend(f"{toml_key(key)} = {toml_value(value)}" for key, value in values.items())
        return "\n".join(lines) + "\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A TOML key: bare when TOML allows it, else a quoted basic string."""
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """A TOML literal for a recipe value (str, bool, int, float, list, dict).

    Strings are TOML basic strings with every character TOML does not allow raw escaped
    (``"``, ``\\``, control characters, DEL); all other characters, including those outside
    the Basic Multilingual Plane, are written as themselves (the file is UTF-8), because
    JSON's surrogate-pair escapes are not valid TOML.
    """
    if isinstance(value, str):
        out = []
        for ch in value:
            if ch in _TOML_ESCAPES:
                out.append(_TOML_ESCAPES[ch])
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04X}")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


_TOML_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


#: The item type of each list key that is not a list of positive ints.
_LIST_ITEMS: dict[tuple[str, str], type] = {
    ("task", "families"): str,
    ("task", "weights"): float,
    ("task", "batch_scales"): float,
    ("task", "scale_range"): float,
}


def _coerce(where: str, section: str, key: str, value: Any, default: Any) -> Any:
    name = f"[{section}].{key}" if section else key
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise RecipeError(f"{where}: {name} must be {expected.__name__}, got {value!r}")
    if expected is not list:
        return value
    item = _LIST_ITEMS.get((section, key), int)
    if item is str:
        if not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{where}: {name} must be a list of strings, got {value!r}")
        return value
    if item is float:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise RecipeError(f"{where}: {name} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise RecipeError(f"{where}: {name} must be a list of positive ints, got {value!r}")
    return value


def _blame(source: str, origins: Mapping[str, str], keys: Sequence[str]) -> str:
    """Where the value(s) of recipe ``keys`` (``"section.key"``) came from: the recipe file
    ``source``, the command-line override(s) that set them (named as typed), or both."""
    typed = list(dict.fromkeys(origins[k] for k in keys if k in origins))
    if not typed:
        return source
    named = f"override{'s' if len(typed) > 1 else ''} " + ", ".join(repr(t) for t in typed)
    if all(k in origins for k in keys):
        return f"command-line {named}"
    return f"{source} with command-line {named}"


def recipe_from_dict(
    data: dict[str, Any], *, source: str = "recipe", origins: Mapping[str, str] | None = None
) -> Recipe:
    """Build and validate a :class:`Recipe` from parsed TOML/JSON data.

    ``origins`` maps the keys (``"section"``, ``"section.key"``) that command-line overrides
    set to the override as typed, so that an error names the override instead of ``source``.
    """
    origins = origins or {}
    recipe = Recipe()
    for key, value in data.items():
        field = getattr(recipe, key, None) if not key.startswith("_") else None
        if dataclasses.is_dataclass(field):
            if not isinstance(value, dict):
                raise RecipeError(f"{_blame(source, origins, [key])}: [{key}] must be a table")
            names = {f.name for f in dataclasses.fields(field)}
            for sub, subvalue in value.items():
                where = _blame(source, origins, [f"{key}.{sub}"])
                if sub not in names:
                    raise RecipeError(
                        f"{where}: unknown key [{key}].{sub}; accepted: {sorted(names)}"
                    )
                setattr(field, sub, _coerce(where, key, sub, subvalue, getattr(field, sub)))
        elif key in ("name", "description"):
            setattr(recipe, key, _coerce(_blame(source, origins, [key]), "", key, value, ""))
        else:
            fields = [f.name for f in dataclasses.fields(recipe)]
            raise RecipeError(
                f"{_blame(source, origins, [key])}: unknown key {key!r}; accepted: {fields}"
            )
    validate(recipe, source=source, origins=origins)
    return recipe


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed recipe file; every way it can be unreadable is a one-line :class:`RecipeError`."""
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; pass a recipe TOML file inside it")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"recipe file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}); a recipe is a TOML file, which must be saved as UTF-8"
        ) from None
    except OSError as e:  # permissions, a device, ...
        raise RecipeError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe and apply ``section.key=value`` overrides (values in TOML syntax).

    An error in a key an override set names that override (as typed), not the file.
    """
    path = Path(path)
    data = _read_toml(path)
    origins: dict[str, str] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare strings need no quotes on the command line
        parts = [part.strip() for part in key.strip().split(".")]
        if not all(parts):
            raise RecipeError(f"override {item!r}: empty key in {key.strip()!r}")
        *sections, leaf = parts
        created = parts[0] not in data
        target = data
        for depth, part in enumerate(sections):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                prefix = ".".join(parts[: depth + 1])
                raise RecipeError(
                    f"override {item!r}: {prefix} is a value ({target!r}), not a table, so "
                    f"it has no key {parts[depth + 1]!r}; override {prefix}=... itself"
                )
        target[leaf] = value
        if len(parts) == 1 or created:  # the override set the whole key or made its table
            origins[parts[0]] = item
        if len(parts) > 1:
            origins[".".join(parts[:2])] = item
    return recipe_from_dict(data, source=str(path), origins=origins)


#: Seeds of the optimizee runs that report a rule (``EVAL_SEED_OFFSET + i``, see
#: ``flatl2o.meta.optimizee``) and that validate it during meta-training (``VAL_SEED_OFFSET + i``).
EVAL_SEED_OFFSET = 10_000
VAL_SEED_OFFSET = 1_000_000
#: Seed spacing of the optimizee slots' generators (``seed + slot * SLOT_SEED_STRIDE``).
SLOT_SEED_STRIDE = 2**32
#: ``[regularizer].rng = "own"``: slot j's regularizer generator is seeded with
#: ``slot_seed(seed, j) + REGULARIZER_SEED_OFFSET`` (disjoint from every other stream).
REGULARIZER_SEED_OFFSET = 2**62
#: Accepted values of ``[regularizer].rng``.
RNG_SOURCES = ("minibatch", "own")


def validate(
    recipe: Recipe, *, source: str = "recipe", origins: Mapping[str, str] | None = None
) -> None:
    """Check names and ranges against the registries, before any work starts.

    Each error names where the keys it is about came from (``source``, or the command-line
    overrides in ``origins``, see :func:`recipe_from_dict`).
    """
    from flatl2o.meta.regularizers import (
        REGULARIZERS,
        SCHEDULES,
        make_regularizer,
        regularized_steps,
    )
    from flatl2o.meta.tasks import TASKS
    from flatl2o.rules import RULES, ConfigError, make_rule

    def fail(msg: str, *keys: str) -> None:
        raise RecipeError(f"{_blame(source, origins or {}, keys)}: {msg}")

    def at_least(section: str, key: str, low: int) -> None:
        value = getattr(getattr(recipe, section), key)
        if value < low:
            fail(f"[{section}].{key} must be an int >= {low}, got {value!r}", f"{section}.{key}")

    def positive_float(section: str, key: str, *, zero_ok: bool = False, hint: str = "") -> None:
        value = getattr(getattr(recipe, section), key)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            bound = ">= 0" if zero_ok else "> 0"
            fail(
                f"[{section}].{key} must be a finite number {bound}, got {value!r}{hint}",
                f"{section}.{key}",
            )

    # [rule]
    if recipe.rule.architecture not in RULES:
        fail(
            f"unknown rule architecture {recipe.rule.architecture!r}; known: {sorted(RULES)}",
            "rule.architecture",
        )
    _check_finite_options("rule", recipe.rule.options, lambda msg: fail(msg, "rule.options"))
    try:
        make_rule(recipe.rule.architecture, **recipe.rule.options)
    except ConfigError as e:
        fail(f"[rule].options: {e}", "rule.options", "rule.architecture")
    # [task]
    task = recipe.task
    if task.name not in TASKS:
        fail(f"unknown task {task.name!r}; known: {sorted(TASKS)}", "task.name")
    at_least("task", "batch_size", 1)
    for family in task.families:
        if family not in TASKS:
            fail(
                f"[task].families: unknown task {family!r}; known: {sorted(TASKS)}", "task.families"
            )
    if len(set(task.families)) != len(task.families):
        fail(
            f"[task].families lists a task twice: {task.families}; weigh it with [task].weights",
            "task.families",
        )
    if task.weights and len(task.weights) != len(task.families):
        fail(
            f"[task].weights has {len(task.weights)} entries but [task].families has "
            f"{len(task.families)}; give one weight per family, or [] for equal weights",
            "task.weights",
            "task.families",
        )
    for key in ("weights", "batch_scales", "scale_range"):
        values = getattr(task, key)
        if not all(math.isfinite(v) and v > 0 for v in values):
            fail(f"[task].{key} must hold finite numbers > 0, got {values}", f"task.{key}")
    if task.scale_range and (
        len(task.scale_range) != 2 or task.scale_range[0] > task.scale_range[1]
    ):
        fail(
            f"[task].scale_range must be [low, high] with low <= high (per-tensor scales are "
            f"drawn log-uniformly between them), or [] for none; got {task.scale_range}",
            "task.scale_range",
        )
    # [train]
    t = recipe.train
    if not 0 <= t.seed < SLOT_SEED_STRIDE:
        fail(f"[train].seed must be an int in [0, 2**32), got {t.seed}", "train.seed")
    for key in ("iterations", "trajectory", "unroll", "checkpoint_every"):
        at_least("train", key, 1)
    positive_float("train", "meta_lr")
    positive_float("train", "grad_clip", zero_ok=True, hint=" (0 disables clipping)")
    if t.meta_loss not in ("mean", "log"):
        fail(f"[train].meta_loss must be 'mean' or 'log', got {t.meta_loss!r}", "train.meta_loss")
    if not 0.0 <= t.imitation_prob <= 1.0:  # also refuses nan
        fail(
            f"[train].imitation_prob must be in [0, 1], got {t.imitation_prob!r}",
            "train.imitation_prob",
        )
    positive_float(
        "train", "imitation_lr", hint=" (the Adam teacher's learning rate; the default is 0.01)"
    )
    if t.trajectory % t.unroll:
        fail(
            f"[train].trajectory ({t.trajectory}) must be a multiple of unroll ({t.unroll})",
            "train.trajectory",
            "train.unroll",
        )
    # [curriculum]
    cur = recipe.curriculum
    for length in cur.lengths:
        if length % t.unroll:
            fail(
                f"[curriculum].lengths: {length} is not a multiple of unroll ({t.unroll})",
                "curriculum.lengths",
                "train.unroll",
            )
    at_least("curriculum", "validate_every", 1)
    at_least("curriculum", "validation_runs", 1)
    at_least("curriculum", "patience", 0)
    # [evaluation]
    ev = recipe.evaluation
    at_least("evaluation", "seeds", 1)
    if not ev.horizons:
        fail(
            "[evaluation].horizons must list at least one step count, e.g. [100, 1000]",
            "evaluation.horizons",
        )
    if len(set(ev.horizons)) != len(ev.horizons):
        fail(f"[evaluation].horizons has a step count twice: {ev.horizons}", "evaluation.horizons")
    # seeds: meta-training must never replay an evaluation or validation optimizee run
    for offset, count, what in (
        (EVAL_SEED_OFFSET, ev.seeds, "[evaluation].seeds"),
        (VAL_SEED_OFFSET, cur.validation_runs, "[curriculum].validation_runs"),
    ):
        if offset <= t.seed < offset + count:
            fail(
                f"[train].seed {t.seed} is the seed of one of the {count} runs of {what} "
                f"(seeds {offset} .. {offset + count - 1}), so meta-training would train on "
                f"that run's initialization and batches; choose a seed below {EVAL_SEED_OFFSET}",
                "train.seed",
            )
    # [regularizer]
    reg = recipe.regularizer
    if reg.name != "none" and reg.name not in REGULARIZERS:
        fail(
            f"unknown regularizer {reg.name!r}; known: {['none', *sorted(REGULARIZERS)]}",
            "regularizer.name",
        )
    if reg.schedule not in SCHEDULES:
        fail(
            f"[regularizer].schedule must be all, posterior or prior, got {reg.schedule!r}",
            "regularizer.schedule",
        )
    if reg.rng not in RNG_SOURCES:
        fail(
            f"[regularizer].rng must be one of {list(RNG_SOURCES)}, got {reg.rng!r}",
            "regularizer.rng",
        )
    positive_float("regularizer", "alpha", zero_ok=True)
    at_least("regularizer", "every", 1)
    if reg.name == "none":  # plain meta-training: alpha and options would be silently unused
        if reg.alpha != 0 or reg.options:
            fail(
                f'[regularizer].name is "none" but alpha is {reg.alpha:g} and options are '
                f"{reg.options}, which would silently train without a regularizer; set name to "
                f"one of {sorted(REGULARIZERS)}, or alpha = 0 and options = {{}} for plain "
                "meta-training",
                "regularizer.name",
                *(["regularizer.alpha"] if reg.alpha != 0 else []),
                *(["regularizer.options"] if reg.options else []),
            )
        return
    try:
        make_regularizer(reg.name, **reg.options)
    except (TypeError, ValueError) as e:
        fail(f"[regularizer].options: {e}", "regularizer.options", "regularizer.name")
    if reg.alpha == 0:  # the public code's silent no-op (docs/method.md §6)
        fail(
            f"[regularizer].name is {reg.name!r} but alpha is 0, which would silently train "
            'without it; set alpha > 0, or name = "none" for plain meta-training',
            "regularizer.name",
            "regularizer.alpha",
        )
    if t.imitation_prob >= 1.0:
        fail(
            f"[regularizer].name is {reg.name!r} but [train].imitation_prob is 1, so every "
            "unroll imitates Adam and the regularizer never runs; lower imitation_prob, or "
            'set name = "none"',
            "regularizer.name",
            "train.imitation_prob",
        )
    stages = cur.lengths or [t.trajectory]
    for length in stages:
        if regularized_steps(reg.schedule, reg.every, length, t.unroll) == 0:
            where = (
                f"[curriculum].lengths stage of {length} steps"
                if cur.lengths
                else f"trajectory of {length} steps"
            )
            fail(
                f"[regularizer] {reg.name!r} would never be computed in a {where} "
                f"({length // t.unroll} unroll(s) of {t.unroll}) with schedule = "
                f"{reg.schedule!r} and every = {reg.every}, which would silently train "
                "without it; lower every (to at most the steps of the regularized unrolls), "
                'use schedule = "all", or make trajectories longer',
                "regularizer.every",
                "regularizer.schedule",
                "train.trajectory",
                "train.unroll",
                "curriculum.lengths",
            )


def _check_finite_options(
    section: str, options: dict[str, Any], fail: Callable[[str], None]
) -> None:
    """Refuse NaN / infinite numbers in an options table (no range check can catch NaN)."""
    for key, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"[{section}].options: {key} must be a finite number, got {value!r}")
