"""Learned update rules: one ``nn.Module`` per rule, plus the registry of architectures."""

from __future__ import annotations

from flatl2o.rules.base import (
    FORMAT_VERSION,
    RULES,
    ConfigError,
    LSTMStack,
    RuleConfig,
    Segments,
    State,
    TensorwiseRule,
    UpdateRule,
)
from flatl2o.rules.dm import L2ODM, DMConfig
from flatl2o.rules.normprop import NormProp, NormPropConfig
from flatl2o.rules.rnnprop import RNNprop, RNNpropConfig

#: Architecture name (as written in ``config.json``) -> rule class: the registry declared in
#: ``flatl2o.rules.base`` (where ``RuleConfig.from_dict`` reads it) is filled here.
RULES.update(
    {
        DMConfig.architecture: L2ODM,
        RNNpropConfig.architecture: RNNprop,
        NormPropConfig.architecture: NormProp,
    }
)


def build_rule(config: RuleConfig) -> UpdateRule:
    """Instantiate the rule class that matches a config (fresh, randomly initialized weights)."""
    try:
        cls = RULES[config.architecture]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {config.architecture!r}; known: {', '.join(sorted(RULES))}"
        ) from None
    return cls(config)


def make_rule(architecture: str, **options: object) -> UpdateRule:
    """A fresh rule by architecture name, e.g. ``make_rule("rnnprop", hidden_size=20)``."""
    if architecture not in RULES:
        raise ConfigError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(RULES))}"
        )
    data = {"format_version": FORMAT_VERSION, "architecture": architecture, **options}
    return build_rule(RuleConfig.from_dict(data, source="make_rule"))


__all__ = [
    "FORMAT_VERSION",
    "L2ODM",
    "RULES",
    "ConfigError",
    "DMConfig",
    "LSTMStack",
    "NormProp",
    "NormPropConfig",
    "RNNprop",
    "RNNpropConfig",
    "RuleConfig",
    "Segments",
    "State",
    "TensorwiseRule",
    "UpdateRule",
    "build_rule",
    "make_rule",
]
