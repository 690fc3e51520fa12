"""Which optimizers the evaluation can run, and how regularized checkpoints pair with siblings.

An optimizer name is either a baseline of :data:`flatl2o.evaluation.baselines.BASELINES` or a
learned rule: a checkpoint shipped in ``pretrained/`` (:func:`flatl2o.hub.list_pretrained`) or
a local checkpoint folder. A learned rule runs through :class:`flatl2o.L2O` at its lr as
shipped (:func:`shipped_lr`: 1.0 for the paper's rules, 1e-3 for NormProp); it is never tuned.

A checkpoint folder made by ``flatl2o meta-train`` holds the ``recipe.toml`` that trained it.
A checkpoint is *regularized* when its recipe's ``[regularizer]`` has a name other than
``none`` and ``alpha > 0``. Its *sibling* is the unregularized checkpoint whose recipe is
identical apart from ``name``, ``description`` and ``[regularizer]`` (same architecture, task,
training budget, seed, ...). Without recipes the name decides: ``X-hessian`` and
``X-entropy`` pair with ``X``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatl2o.evaluation.baselines import BASELINES

__all__ = [
    "OptimizerInfo",
    "available_optimizers",
    "default_optimizers",
    "resolve_optimizers",
]

_RECIPE_IGNORED = ("name", "description", "regularizer")
_SUFFIX = re.compile(r"^(?P<base>.+)-(?P<reg>hessian|entropy|eig|esd|trace)$")


@dataclass
class OptimizerInfo:
    """What the suite knows about one optimizer (JSON-ready through :meth:`to_dict`)."""

    name: str
    kind: str  # "learned" or "baseline"
    description: str
    path: str | None = None  # checkpoint folder (learned)
    architecture: str | None = None
    fingerprint: str | None = None
    regularizer: str = "none"
    alpha: float = 0.0
    sibling: str | None = None  # unregularized sibling's name (regularized learned rules)
    sibling_basis: str | None = None  # "recipe" or "name"
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def regularized(self) -> bool:
        """Whether this learned rule was meta-trained with a flatness regularizer."""
        return self.kind == "learned" and self.regularizer != "none" and self.alpha != 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the full recipe, which is kept in ``recipe``)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "path": self.path,
            "architecture": self.architecture,
            "fingerprint": self.fingerprint,
            "regularizer": self.regularizer,
            "alpha": self.alpha,
            "sibling": self.sibling,
            "sibling_basis": self.sibling_basis,
            "recipe": self.recipe,
        }


def shipped_lr(architecture: str | None) -> float:
    """The ``lr`` a learned rule of ``architecture`` runs at as shipped, ``flatl2o.L2O``'s
    default for it (the rule's ``default_lr``: 1.0 for the paper's rules, whose output is the
    step, 1e-3 for NormProp, whose lr is Adam's); 1.0 when the architecture is unknown."""
    from flatl2o.rules.base import RULES

    return float(RULES[architecture].default_lr) if architecture in RULES else 1.0


def _shipped_folder(name: str) -> Path | None:
    from flatl2o.hub import _shipped_dir

    return _shipped_dir(name)


def _learned_info(name: str, folder: Path) -> OptimizerInfo:
    from flatl2o.checkpoint import load_rule_from_dir

    rule = load_rule_from_dir(folder)
    recipe: dict[str, Any] = {}
    if (folder / "recipe.toml").is_file():
        from flatl2o.meta.recipe import load_recipe

        recipe = load_recipe(folder / "recipe.toml").to_dict()
    reg = recipe.get("regularizer", {})
    reg_name, alpha = str(reg.get("name", "none")), float(reg.get("alpha", 0.0))
    if not recipe:  # no recipe: infer from the name, and say so
        m = _SUFFIX.match(name)
        reg_name, alpha = (m.group("reg"), float("nan")) if m else ("none", 0.0)
    from flatl2o.hub import checkpoint_location

    desc = recipe.get("description") or (
        f"learned rule ({rule.architecture}) from {checkpoint_location(folder)}"
    )
    return OptimizerInfo(
        name=name,
        kind="learned",
        description=str(desc),
        path=str(folder),
        architecture=rule.architecture,
        fingerprint=rule.fingerprint(),
        regularizer=reg_name,
        alpha=alpha,
        recipe=recipe,
    )


def _strip(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in _RECIPE_IGNORED}


def _pair_siblings(infos: list[OptimizerInfo], pool: list[OptimizerInfo]) -> None:
    """Set ``sibling`` of each regularized learned rule in ``infos`` from the ``pool``."""
    plain = [p for p in pool if p.kind == "learned" and p.regularizer == "none"]
    for info in infos:
        if not info.regularized:
            continue
        if info.recipe:
            match = [p for p in plain if p.recipe and _strip(p.recipe) == _strip(info.recipe)]
            if match:
                info.sibling, info.sibling_basis = match[0].name, "recipe"
                continue
        m = _SUFFIX.match(info.name)
        if m and any(p.name == m.group("base") for p in plain):
            info.sibling, info.sibling_basis = m.group("base"), "name"


def available_optimizers() -> list[str]:
    """Every name the suite accepts without a path: shipped checkpoints, then baselines."""
    from flatl2o.hub import list_pretrained

    return [*list_pretrained(), *BASELINES]


def default_optimizers() -> list[str]:
    """The default selection of the MNIST suite: every shipped checkpoint found now, plus
    every baseline that trains a flat parameter vector (not AdamW/Muon: they need a real
    module's tensors by role, see :mod:`flatl2o.evaluation.realistic`)."""
    return [n for n in available_optimizers() if n not in BASELINES or not BASELINES[n].uses_roles]


def resolve_optimizers(names: list[str] | tuple[str, ...]) -> dict[str, OptimizerInfo]:
    """Resolve names (baselines, shipped checkpoints or checkpoint folders) to their info.

    Siblings are looked up among the selected rules and all shipped checkpoints, so a
    regularized rule's sibling is known even when only the regularized rule is evaluated.
    Raises ``ValueError`` naming the unknown entries and the valid choices; AdamW and Muon are
    not choices here (they need a real module's tensors: ``flatl2o evaluate --suite realistic``
    runs them).
    """
    from flatl2o.hub import list_pretrained

    flat = [n for n, b in BASELINES.items() if not b.uses_roles]
    out: dict[str, OptimizerInfo] = {}
    unknown: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name or name in out:
            continue
        if name in flat:
            b = BASELINES[name]
            out[name] = OptimizerInfo(name=name, kind="baseline", description=b.description)
            continue
        folder = _shipped_folder(name) if "/" not in name else None
        if folder is None and Path(name).expanduser().is_dir():
            folder = Path(name).expanduser().resolve()
            name = folder.name
        if folder is None:
            unknown.append(raw)
            continue
        out[name] = _learned_info(name, folder)
    if unknown:
        raise ValueError(
            f"unknown optimizer(s) {unknown}; choose from the shipped checkpoints "
            f"{list_pretrained() or '(none shipped)'}, the baselines {flat}, "
            "or pass a checkpoint folder"
            + (
                f" ({', '.join(n for n in BASELINES if n not in flat)} train a real module's "
                "tensors: flatl2o evaluate --suite realistic)"
                if any(n.strip() in BASELINES for n in unknown)
                else ""
            )
        )
    pool = list(out.values())
    for other in list_pretrained():
        if other not in out:
            folder = _shipped_folder(other)
            if folder is not None:
                pool.append(_learned_info(other, folder))
    _pair_siblings(list(out.values()), pool)
    return out
