"""Finding, loading and publishing update-rule checkpoints.

``load_rule(name_or_path)`` resolves, in order: an existing local folder; a checkpoint
shipped with the package (the top-level ``pretrained/`` folder, packaged into the wheel
as ``flatl2o/pretrained``); a Hugging Face Hub repo id, downloaded with
``huggingface_hub.hf_hub_download`` (so revision, cache, token and offline mode behave
exactly as everywhere else in the Hugging Face ecosystem).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from flatl2o.checkpoint import (
    CONFIG_NAME,
    MODEL_CARD_NAME,
    WEIGHTS_NAME,
    load_rule_from_dir,
    save_rule,
)
from flatl2o.rules import UpdateRule

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Where shipped checkpoints live: inside an installed wheel, or the source checkout.
SHIPPED_DIRS = (_PACKAGE_DIR / "pretrained", _PACKAGE_DIR.parent / "pretrained")
LIBRARY_NAME = "flatl2o"


#: The shipped checkpoint that ``L2O(params)`` uses when no rule is given: the best one by
#: the evaluation protocol (see docs/results.md).
DEFAULT_PRETRAINED = "rnnprop"


class CheckpointNotFoundError(FileNotFoundError):
    """No local folder, shipped checkpoint or reachable Hub repo matches a name."""


def default_pretrained_name() -> str:
    """The name of the default shipped checkpoint (errors clearly if it is not installed)."""
    if _shipped_dir(DEFAULT_PRETRAINED) is None:
        raise CheckpointNotFoundError(
            f"the default checkpoint {DEFAULT_PRETRAINED!r} is not installed with this copy of "
            f"flatl2o (looked in {', '.join(map(str, SHIPPED_DIRS))}); pass rule=... explicitly"
        )
    return DEFAULT_PRETRAINED


def _shipped_dir(name: str) -> Path | None:
    for root in SHIPPED_DIRS:
        candidate = root / name
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def list_pretrained() -> list[str]:
    """Names of the checkpoints shipped with the package (usable as ``load_rule(name)``)."""
    names: set[str] = set()
    for root in SHIPPED_DIRS:
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())
    return sorted(names)


def pretrained_info(name: str) -> dict[str, Any]:
    """The ``metrics.json`` recorded next to a shipped checkpoint (empty dict if none)."""
    path = _shipped_dir(name)
    if path is None:
        raise CheckpointNotFoundError(
            f"{name!r} is not a shipped checkpoint; "
            f"shipped: {', '.join(list_pretrained()) or 'none'}"
        )
    metrics = path / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def _download(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool,
    force_download: bool,
) -> Path:
    from huggingface_hub import hf_hub_download

    from flatl2o import __version__

    paths = [
        hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
        for filename in (CONFIG_NAME, WEIGHTS_NAME)
    ]
    return Path(paths[0]).parent


def load_rule(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    device: torch.device | str | None = None,
) -> UpdateRule:
    """Load a learned update rule from a folder, a shipped name, or a Hub repo id.

    Raises :class:`CheckpointNotFoundError` with every place that was tried when nothing
    matches, and :class:`flatl2o.checkpoint.CheckpointError` when a file is corrupted or
    does not match its config.
    """
    text = os.fspath(name_or_path)
    tried: list[str] = []
    local = Path(text).expanduser()
    if local.is_dir():
        rule = load_rule_from_dir(local)
        return rule.to(device) if device is not None else rule
    tried.append(f"local folder {str(local.resolve())!r}: does not exist")
    shipped = _shipped_dir(text) if "/" not in text and "\\" not in text else None
    if shipped is not None:
        rule = load_rule_from_dir(shipped)
        return rule.to(device) if device is not None else rule
    tried.append(
        f"shipped checkpoints: no {text!r} (shipped: {', '.join(list_pretrained()) or 'none'})"
    )
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    try:
        folder = _download(
            text,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
        )
    except HFValidationError as e:
        tried.append(f"Hugging Face Hub: {text!r} is not a valid repo id ({e})")
    except Exception as e:
        offline = local_files_only or constants.HF_HUB_OFFLINE
        where = f"revision {revision!r}" if revision else "the default revision"
        reason = (
            "offline (HF_HUB_OFFLINE or local_files_only) and not in the local cache "
            f"{cache_dir or constants.HF_HUB_CACHE}"
            if offline or "LocalEntryNotFound" in type(e).__name__
            else f"{type(e).__name__}: {e}"
        )
        tried.append(f"Hugging Face Hub repo {text!r} at {where}: {reason}")
    else:
        rule = load_rule_from_dir(folder)
        return rule.to(device) if device is not None else rule
    raise CheckpointNotFoundError(
        f"Could not find the update rule {text!r}. Tried, in order:\n  - "
        + "\n  - ".join(tried)
        + "\nFix: pass an existing checkpoint folder, one of flatl2o.list_pretrained(), or a Hub "
        "repo id; for a Hub repo while offline, download it once online (or copy the cache) "
        "and set HF_HUB_CACHE / cache_dir to that cache."
    )


def push_to_hub(
    rule: UpdateRule,
    repo_id: str,
    *,
    model_card: str | None = None,
    metrics: dict[str, float] | None = None,
    commit_message: str = "Upload flatl2o update rule",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool | None = None,
) -> str:
    """Upload ``config.json``, ``model.safetensors`` and a model card; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        card = model_card or render_model_card(rule, repo_id=repo_id, metrics=metrics)
        save_rule(rule, tmp, model_card=card)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    return str(getattr(info, "commit_url", info))


def push_folder_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str = "Upload flatl2o update rule",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> str:
    """Upload a checkpoint folder (after checking that it loads); return the commit URL."""
    from huggingface_hub import HfApi

    load_rule_from_dir(folder)  # refuse to publish something that does not load
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME, "*.json", "*.toml", "*.png"],
    )
    return str(getattr(info, "commit_url", info))


def render_model_card(
    rule: UpdateRule,
    *,
    repo_id: str | None = None,
    metrics: dict[str, float] | None = None,
    body: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """A Hub model card: YAML metadata (library, tags, license, metrics) and a usage section."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        tags=["flatl2o", "learned-optimizer", "l2o", "pytorch", rule.architecture],
    )
    if metrics:
        data.metrics = sorted(metrics)
    name = repo_id or "PATH_OR_REPO_ID"
    metric_lines = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted((metrics or {}).items()))
    text = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {name}\n\nA learned update rule (`{rule.architecture}`) for "
        "[flatl2o](https://github.com/flatl2o/flatl2o).\n\n"
        "```python\nimport flatl2o\n"
        f'opt = flatl2o.L2O.from_pretrained(model.parameters(), "{name}")\n```\n\n'
        f"Config: `{json.dumps(rule.config.to_dict())}`\n"
    )
    if metric_lines:
        text += f"\n## Metrics\n\n| metric | value |\n|---|---|\n{metric_lines}\n"
    if body:
        text += "\n" + body.strip() + "\n"
    return str(ModelCard(text).content)
