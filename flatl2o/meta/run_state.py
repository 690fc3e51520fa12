"""Run state: the resumable checkpoint of a meta-training run and the checks on its folder.

A run folder holds ``trainer_state/state.safetensors``: the rule's and the meta-optimizer's
tensors and every generator's state, with the counters, recipe and rule config in its
metadata, so one atomic file is the whole checkpoint (``state.json`` next to it is a
human-readable copy that is never read). :func:`read_state` checks a checkpoint is complete
and fits the run (recipe, optimizees per meta-step, arithmetic) before any work starts;
:func:`apply_state` loads it; :func:`write_state` writes it. Any problem is a
:class:`ResumeError` that names the file and the fix.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from flatl2o.checkpoint import (
    CHECKPOINT_FILES,
    atomic_write_bytes,
    atomic_write_text,
    safetensors_header,
)
from flatl2o.meta.recipe import Recipe, RecipeError, recipe_from_dict
from flatl2o.rules import ConfigError, RuleConfig, UpdateRule, build_rule

TRAINER_DIR = "trainer_state"
#: The resumable checkpoint: tensors, with every counter in its metadata (one atomic file).
STATE_FILE = "state.safetensors"
STATE_METADATA_KEY = "flatl2o_trainer_state"
#: Counters a checkpoint must hold to be resumed.
_STATE_KEYS = (
    "iteration",
    "stage",
    "best_val",
    "bad_validations",
    "log_lines",
    "param_groups",
    "recipe",
)
LOG_NAME = "log.jsonl"


class InexactResumeWarning(UserWarning):
    """A resume allowed to continue with other arithmetic (thread count, torch version)."""


#: What a checkpoint records of the arithmetic that produced it (see :func:`arithmetic`).
ARITHMETIC_NAMES = {"threads": "torch intra-op threads", "torch": "torch version"}


def arithmetic() -> dict[str, Any]:
    """The settings, besides the recipe, that change a run's bits: torch's intra-op thread
    count (it splits float reductions differently) and the torch version."""
    return {"threads": torch.get_num_threads(), "torch": torch.__version__}


class ResumeError(RuntimeError):
    """A run folder that cannot be used as asked: nothing (or a damaged or different
    checkpoint) to resume, or an earlier run in the way of a new one."""


def run_files(folder: Path) -> list[str]:
    """The files and folders of a run or checkpoint that ``folder`` already holds."""
    names = (*CHECKPOINT_FILES, "best", TRAINER_DIR)
    return [name for name in names if (folder / name).exists()]


def check_fresh_folder(out: Path) -> None:
    """Refuse to start a new run in a folder that holds an earlier run or checkpoint: its
    log would be appended to and its files overwritten."""
    if (out / TRAINER_DIR).exists():
        raise ResumeError(
            f"{out} already holds a run; pass resume=True (--resume) to continue it, "
            f"or choose another --out (or delete {out} to start over)"
        )
    found = run_files(out)
    if found:
        raise ResumeError(
            f"{out} already holds files of an earlier run or checkpoint "
            f"({', '.join(found)}) and no checkpoint to resume, so a new run would append to "
            f"its log and overwrite its files; choose another --out, or delete {out} "
            "to start over"
        )


def read_state(
    out: Path, recipe: Recipe, *, world_size: int, meta_batch: int, exact_resume: bool
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The counters and tensors saved in run folder ``out``, after checking they are complete
    and fit a run of ``recipe`` on ``world_size`` processes x ``meta_batch`` optimizees;
    drops log records written after the checkpoint. Any problem is a :class:`ResumeError`."""
    folder = out / TRAINER_DIR
    path = folder / STATE_FILE
    if not path.is_file():
        if not (folder / "state.json").is_file():
            again = (
                f"delete {out} (or choose another --out) and start again"
                if run_files(out)
                else "start it again"
            )
            raise ResumeError(
                f"nothing to resume in {out}: no {TRAINER_DIR}/{STATE_FILE} (the run "
                f"saved no checkpoint yet); {again} without --resume"
            )
        raise _damaged(out, path, "it is missing (only state.json is there)")
    try:
        data = path.read_bytes()
        meta = _state_metadata(data)
        tensors = safetensors_load(data)
    except (OSError, ValueError, SafetensorError) as e:
        raise _damaged(out, path, f"it cannot be read ({e})") from None
    missing = sorted(set(_STATE_KEYS) - set(meta))
    if missing:
        raise _damaged(out, path, f"its counters lack {missing}")
    saved_recipe = _with_defaults(meta["recipe"])
    if saved_recipe != recipe.to_dict():
        changed = _recipe_differences(saved_recipe, recipe.to_dict())
        raise ResumeError(
            f"{out} was started with a different recipe ({'; '.join(changed)}); resume "
            f"with the same recipe and overrides (saved copy: {out / 'recipe.toml'})"
        )
    slots = world_size * meta_batch
    if meta.get("slots", 1) != slots:
        raise ResumeError(
            f"{out} was meta-trained with {meta.get('slots', 1)} optimizees per meta-step "
            f"(processes x meta_batch: {meta.get('world_size', 1)} x "
            f"{meta.get('meta_batch', 1)}), this run has {slots} ({world_size} x "
            f"{meta_batch}); resume with the same product of --nproc-per-node and "
            "--meta-batch"
        )
    check_arithmetic(out, meta, exact_resume=exact_resume)
    log = out / LOG_NAME
    if log.is_file():  # drop records written after the checkpoint we resume from
        lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
        atomic_write_text(log, "".join(lines[: int(meta["log_lines"])]))
    return meta, tensors


def check_arithmetic(out: Path, meta: dict[str, Any], *, exact_resume: bool) -> None:
    """Refuse (or, with ``exact_resume=False``, warn about) a resume whose thread count or
    torch version differs from the saved run's: float sums are then grouped differently, so
    the run would not end bit-for-bit where an uninterrupted one ends. A checkpoint written
    before these were recorded is resumed unchecked."""
    now = arithmetic()
    changed = {k: (meta[k], now[k]) for k in now if k in meta and meta[k] != now[k]}
    if not changed:
        return
    what = "; ".join(f"{ARITHMETIC_NAMES[k]}: saved {a}, now {b}" for k, (a, b) in changed.items())
    fixes = []
    if "threads" in changed:
        n = meta["threads"]
        fixes.append(
            f"--threads {n} (torch.set_num_threads({n}) in Python; OMP_NUM_THREADS={n} "
            "sets the default)"
        )
    if "torch" in changed:
        fixes.append(f"torch {meta['torch']}")
    fix = "run with " + " and ".join(fixes)
    if exact_resume:
        raise ResumeError(
            f"{out} was checkpointed with other arithmetic ({what}), so the resumed run "
            f"would not be bit-for-bit the uninterrupted one; {fix}, or pass "
            "--allow-inexact-resume (exact_resume=False) to continue anyway"
        )
    warnings.warn(
        f"resuming {out} with other arithmetic ({what}): the run continues, but its "
        "result will not be bit-for-bit that of an uninterrupted run",
        InexactResumeWarning,
        stacklevel=4,
    )


def apply_state(
    out: Path,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    rule: UpdateRule,
    meta_opt: torch.optim.Optimizer,
    generators: list[torch.Generator],
    reg_generators: list[torch.Generator],
    first_slot: int,
) -> dict[str, Any]:
    """Load a checkpoint read by :func:`read_state` into the rule, meta-optimizer and the
    generators of slots ``first_slot, first_slot + 1, ...``; return its counters
    (``iteration``, ``stage``, ``best_val``, ``bad_validations``, ``log_lines``)."""
    try:
        rule.load_state_dict(
            {k[5:]: v for k, v in tensors.items() if k.startswith("rule.")}, strict=True
        )
        opt_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        meta_opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        for j, gen in enumerate(generators, start=first_slot):
            gen.set_state(tensors["rng" if j == 0 else f"rng.{j}"])
        for j, gen in enumerate(reg_generators, start=first_slot):
            gen.set_state(tensors[f"reg_rng.{j}"])
        return {
            "iteration": int(meta["iteration"]),
            "stage": int(meta["stage"]),
            "best_val": float(meta["best_val"]),
            "bad_validations": int(meta["bad_validations"]),
            "log_lines": int(meta["log_lines"]),
        }
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
        raise _damaged(
            out,
            out / TRAINER_DIR / STATE_FILE,
            f"it does not fit this run ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})",
        ) from None


def write_state(
    out: Path,
    *,
    rule: UpdateRule,
    meta_opt: torch.optim.Optimizer,
    slot_states: list[Tensor],
    reg_states: list[Tensor],
    counters: dict[str, Any],
    recipe: Recipe,
    world_size: int,
    meta_batch: int,
) -> None:
    """Write the checkpoint of a run: rule, meta-optimizer, every slot's generator state
    (all processes', in slot order) and the ``counters`` (see :func:`apply_state`)."""
    tensors: dict[str, Tensor] = {
        f"rule.{k}": v.detach().clone().contiguous() for k, v in rule.state_dict().items()
    }
    opt = meta_opt.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = value.detach().clone().reshape(value.shape)
    tensors["rng"] = slot_states[0]  # slot 0: the run's generator in a single process
    for j, state in enumerate(slot_states[1:], start=1):
        tensors[f"rng.{j}"] = state
    for j, state in enumerate(reg_states):  # [regularizer].rng = "own" only
        tensors[f"reg_rng.{j}"] = state
    meta = {
        "iteration": counters["iteration"],
        "stage": counters["stage"],
        "best_val": counters["best_val"],
        "bad_validations": counters["bad_validations"],
        "log_lines": counters["log_lines"],
        "param_groups": opt["param_groups"],
        "recipe": recipe.to_dict(),
        "slots": len(slot_states),
        "world_size": world_size,
        "meta_batch": meta_batch,
        **arithmetic(),
    }
    meta["rule_config"] = rule.config.to_dict()
    text = json.dumps(meta, indent=1)
    folder = out / TRAINER_DIR
    # one atomic file holds everything a resume reads (counters in the metadata), so a
    # kill at any instant leaves either the previous checkpoint or this one, never a mix;
    # state.json is a human-readable copy of the counters, written after it
    data = safetensors_bytes(tensors, metadata={STATE_METADATA_KEY: text})
    atomic_write_bytes(folder / STATE_FILE, data)
    atomic_write_text(folder / "state.json", text)


def rule_from_config(config: Any, out: Path) -> UpdateRule:
    """A fresh rule of the architecture a checkpoint was saved with (weights loaded later)."""
    try:
        return build_rule(RuleConfig.from_dict(config, source="rule_config"))
    except ConfigError as e:
        raise _damaged(out, out / TRAINER_DIR / STATE_FILE, str(e)) from None


def append_log(out: Path, record: dict[str, Any]) -> None:
    """Append one record to the run's ``log.jsonl`` (strict JSON, one line)."""
    with open(out / LOG_NAME, "a", encoding="utf-8") as f:
        f.write(strict_json(record) + "\n")


def _damaged(out: Path, path: Path, why: str) -> ResumeError:
    """The error for a checkpoint file that cannot be resumed from."""
    return ResumeError(
        f"cannot resume {out}: the checkpoint {path} is damaged or incomplete: {why}; the run "
        f"cannot continue from it exactly: delete {out} (or choose another --out) and start again"
    )


def _state_metadata(data: bytes) -> dict[str, Any]:
    """The counters stored in a trainer checkpoint's safetensors metadata. Raises
    ``ValueError`` on a malformed header or when they are missing."""
    header, _ = safetensors_header(data)
    metadata = header.get("__metadata__")
    text = metadata.get(STATE_METADATA_KEY) if isinstance(metadata, dict) else None
    if text is None:
        raise ValueError(f"its metadata holds no counters ({STATE_METADATA_KEY})")
    meta = json.loads(text) if isinstance(text, str) else None
    if not isinstance(meta, dict):
        raise ValueError("its counters are not a JSON object")
    return meta


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (recipe keys as overrides spell them)."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _with_defaults(saved: Any) -> Any:
    """A saved recipe with the keys added to recipes since it was written filled in with
    their defaults (which reproduce the behaviour it was trained with), so a run started by
    an older flatl2o still resumes; anything unreadable is returned as it is."""
    try:
        return recipe_from_dict(saved).to_dict()
    except (RecipeError, TypeError, AttributeError, ValueError):
        return saved


def _recipe_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """The recipe keys whose values differ, as ``key: saved X, now Y``."""
    if not isinstance(saved, dict):
        return ["the saved recipe is not a table"]
    old, new = _flatten(saved), _flatten(current)

    def show(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "absent"

    return [
        f"{key}: saved {show(old, key)}, now {show(new, key)}"
        for key in sorted(set(old) | set(new))
        if key not in old or key not in new or old[key] != new[key]
    ]


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (inf, -inf, nan) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259): non-finite floats, which ``json.dumps`` would write as the
    non-standard ``Infinity`` / ``NaN`` tokens, are written as ``null``."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)
