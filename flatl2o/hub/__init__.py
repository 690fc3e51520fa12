"""Finding, loading and publishing update-rule checkpoints (the persistence layer's face).

One module per job, all re-exported here so that ``flatl2o.hub.<name>`` is the public path:

- :mod:`flatl2o.hub.names`: shipped checkpoints, the default one, Hub repo ids;
- :mod:`flatl2o.hub.download`: :func:`load_rule` (a local folder, a shipped name, or a Hub
  repo downloaded with ``huggingface_hub.hf_hub_download``);
- :mod:`flatl2o.hub.upload`: :func:`push_to_hub`, :func:`push_folder_to_hub`;
- :mod:`flatl2o.hub.model_card`: :func:`render_model_card`, :func:`retarget_model_card`,
  :func:`split_front_matter`;
- :mod:`flatl2o.hub.paths`: how published files name paths (:func:`portable_path`,
  :func:`portable_command`, :func:`checkpoint_location`).

Importing it gives every rule its ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``
(:func:`flatl2o.rules.base.provide_persistence`).
"""

from __future__ import annotations

from flatl2o.checkpoint import save_rule
from flatl2o.hub.download import load_rule
from flatl2o.hub.model_card import (
    UNKNOWN_LOCATION,
    render_model_card,
    retarget_model_card,
    split_front_matter,
)
from flatl2o.hub.names import (
    DEFAULT_PRETRAINED,
    LIBRARY_NAME,
    SHIPPED_DIRS,
    CheckpointNotFoundError,
    default_pretrained_name,
    is_hub_repo_id,
    list_pretrained,
    pretrained_info,
    shipped_dir,
)
from flatl2o.hub.paths import checkpoint_location, portable_command, portable_path
from flatl2o.hub.upload import FOLDER_FILES, push_folder_to_hub, push_to_hub
from flatl2o.rules.base import provide_persistence

#: The name callers used before the split (flatl2o.evaluation, tests); :func:`shipped_dir`.
_shipped_dir = shipped_dir

__all__ = [
    "DEFAULT_PRETRAINED",
    "FOLDER_FILES",
    "LIBRARY_NAME",
    "SHIPPED_DIRS",
    "UNKNOWN_LOCATION",
    "CheckpointNotFoundError",
    "checkpoint_location",
    "default_pretrained_name",
    "is_hub_repo_id",
    "list_pretrained",
    "load_rule",
    "portable_command",
    "portable_path",
    "pretrained_info",
    "push_folder_to_hub",
    "push_to_hub",
    "render_model_card",
    "retarget_model_card",
    "shipped_dir",
    "split_front_matter",
]

# UpdateRule.save_pretrained / from_pretrained / push_to_hub run these functions; the rules are
# the bottom layer and cannot import this package (see flatl2o.rules.base.provide_persistence).
provide_persistence(save=save_rule, load=load_rule, push=push_to_hub)
