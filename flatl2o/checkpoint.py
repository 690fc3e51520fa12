"""The checkpoint folder format: ``config.json`` + ``model.safetensors`` (+ ``README.md``).

Safetensors only, never pickle. Loading is strict: every expected tensor present with the
right shape and dtype, nothing unexpected, and every error names the file and the tensor.
Writes are atomic (temporary file + ``os.replace``) so a killed process never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from flatl2o.rules import RuleConfig, UpdateRule, build_rule
from flatl2o.rules.base import ConfigError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupted, or does not match its config."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a binary file atomically."""
    atomic_write(path, lambda p: p.write_bytes(data))


def save_rule(
    rule: UpdateRule, directory: str | os.PathLike[str], *, model_card: str | None = None
) -> Path:
    """Save a rule as a Hub-ready folder; returns the folder path."""
    from flatl2o import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rule.state_dict().items()
    }
    metadata = {"format": "pt", "architecture": rule.architecture, "flatl2o_version": __version__}
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    config = {**rule.config.to_dict(), "flatl2o_version": __version__}
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if model_card is not None:
        atomic_write_text(directory / MODEL_CARD_NAME, model_card)
    return directory


def read_config(path: str | os.PathLike[str]) -> RuleConfig:
    """Parse and validate a ``config.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; a flatl2o checkpoint needs {CONFIG_NAME}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return RuleConfig.from_dict(data, source=str(path))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(str(e)) from None


def load_weights_strict(rule: UpdateRule, path: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` into ``rule``: all tensors present, right shapes and dtypes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a flatl2o checkpoint needs {WEIGHTS_NAME}")
    expected = rule.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for name in names & set(expected):
                loaded[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot be read as safetensors ({e}); the file is truncated or corrupted. "
            "Delete it and download or re-save the checkpoint."
        ) from None
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match architecture {rule.architecture!r}"
            + (f"; missing: {missing}" if missing else "")
            + (f"; unexpected: {unexpected}" if unexpected else "")
        )
    for name, tensor in loaded.items():
        want = expected[name]
        if tensor.shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(want.shape)} for the config in {CONFIG_NAME}"
            )
        if tensor.dtype != torch.float32:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected torch.float32"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {name!r} contains NaN or infinite values")
    rule.load_state_dict(loaded, strict=True)


def load_rule_from_dir(directory: str | os.PathLike[str]) -> UpdateRule:
    """Load a rule from a checkpoint folder (strict; see :func:`load_weights_strict`)."""
    directory = Path(directory)
    rule = build_rule(read_config(directory / CONFIG_NAME))
    load_weights_strict(rule, directory / WEIGHTS_NAME)
    return rule.eval()
