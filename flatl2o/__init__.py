"""flatl2o: learned, flatness-aware optimizers for PyTorch.

Replace ``torch.optim.Adam(model.parameters())`` with
``flatl2o.L2O.from_pretrained(model.parameters(), "rnnprop-entropy")``, the default checkpoint
(``flatl2o.L2O(model.parameters())`` uses it; docs/quickstart.md, "Which checkpoint").
"""

from flatl2o._version import __version__ as __version__
from flatl2o.checkpoint import CheckpointError
from flatl2o.hub import (
    CheckpointNotFoundError,
    list_pretrained,
    load_rule,
    push_to_hub,
    render_model_card,
)
from flatl2o.optimizer import L2O
from flatl2o.rules import (
    L2ODM,
    RULES,
    ConfigError,
    DMConfig,
    NormProp,
    NormPropConfig,
    RNNprop,
    RNNpropConfig,
    RuleConfig,
    UpdateRule,
    make_rule,
)

__all__ = [
    "L2O",
    "L2ODM",
    "RULES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DMConfig",
    "NormProp",
    "NormPropConfig",
    "RNNprop",
    "RNNpropConfig",
    "RuleConfig",
    "UpdateRule",
    "list_pretrained",
    "load_rule",
    "make_rule",
    "push_to_hub",
    "render_model_card",
]
