"""The checkpoint folder format: ``config.json`` + ``model.safetensors`` (+ ``README.md``).

Safetensors only, never pickle: ``torch.load`` is never called, and pickle files found next
to a checkpoint (``pytorch_model.bin``, ``*.pt``, ...) are ignored and only mentioned in the
error message when ``model.safetensors`` is missing. Loading is strict: every expected tensor
present with the right shape, dtype float32 and finite values, nothing unexpected, a config
with a known ``format_version``, architecture and keys; every error names the file and the
tensor or key, and says how to fix it. Each file is written atomically (temporary file in the
same folder, fsync, ``os.replace``), so a killed process never leaves a half-written file
behind: a reader sees either the previous file or the new one.
"""

from __future__ import annotations

import json
import os
import struct
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


#: Files that hold pickled tensors: never loaded (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` in one step.

    The temporary file lives in the same folder (so ``os.replace`` is atomic), is fsynced
    before the move, and is removed if ``write`` fails; ``path`` then keeps its previous
    content. The new file keeps the permissions of the file it replaces (0644 if new), not
    the 0600 of ``mkstemp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (best effort: not every platform can fsync a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a binary file atomically."""
    atomic_write(path, lambda p: p.write_bytes(data))


def save_rule(
    rule: UpdateRule, directory: str | os.PathLike[str], *, model_card: str | None = None
) -> Path:
    """Save a rule as a Hub-ready folder; returns the folder path.

    Everything is serialized in memory first, then each file is replaced atomically (weights,
    then config, then model card): a failure leaves every file either old or new, never
    half-written, and leaves no temporary file behind.
    """
    from flatl2o import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rule.state_dict().items()
    }
    metadata = {"format": "pt", "architecture": rule.architecture, "flatl2o_version": __version__}
    weights = _canonical_safetensors(safetensors_bytes(tensors, metadata=metadata))
    config = {**rule.config.to_dict(), "flatl2o_version": __version__}
    try:
        config_text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: the rule config has a NaN or infinite value "
            f"({rule.config}); JSON cannot store it and the checkpoint could not be loaded"
        ) from None
    atomic_write_bytes(directory / WEIGHTS_NAME, weights)
    atomic_write_text(directory / CONFIG_NAME, config_text)
    if model_card is not None:
        atomic_write_text(directory / MODEL_CARD_NAME, model_card)
    return directory


def _canonical_safetensors(data: bytes) -> bytes:
    """The same file with a deterministic header (sorted metadata, tensors by offset).

    ``safetensors`` keeps the metadata in a hash map, so its key order, and hence the file's
    bytes, change from one process to the next. Checkpoints must be byte-identical for the
    same rule: reproducible hashes, and no new Hub commit when nothing changed.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    ordered: dict[str, object] = {}
    if metadata is not None:
        ordered["__metadata__"] = dict(sorted(metadata.items()))
    for name in sorted(header, key=lambda k: (header[k]["data_offsets"], k)):
        ordered[name] = header[name]
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def read_config(path: str | os.PathLike[str]) -> RuleConfig:
    """Parse and validate a ``config.json``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"{path}: missing; a flatl2o checkpoint folder needs {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}{_pickle_hint(path.parent)}"
        ) from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, expected the JSON rule config") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: not valid UTF-8 JSON ({e}); the file is corrupted. "
            "Re-download or re-save the checkpoint."
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); the file is corrupted. "
            "Re-download or re-save the checkpoint."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object with format_version and architecture, "
            f"got {type(data).__name__}"
        )
    try:
        return RuleConfig.from_dict(data, source=str(path))
    except (ConfigError, TypeError) as e:
        message = str(e)
        # Errors raised while building the config (e.g. hidden_size < 1) do not name the file.
        raise CheckpointError(message if str(path) in message else f"{path}: {message}") from None


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} is not allowed in a rule config")


def _pickle_hint(directory: Path) -> str:
    """A note about pickle files in ``directory`` (which are never loaded), or ``""``."""
    try:
        found = sorted(
            p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
        )
    except OSError:
        return ""
    if not found:
        return ""
    return (
        f". Found {', '.join(found)}: pickle files are never loaded by flatl2o (unpickling can "
        "run arbitrary code); convert the weights to safetensors with "
        "UpdateRule.save_pretrained() in a trusted environment"
    )


def load_weights_strict(rule: UpdateRule, path: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` into ``rule``: all tensors present, right shapes and dtypes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a flatl2o checkpoint folder needs {WEIGHTS_NAME} next to "
            f"{CONFIG_NAME}{_pickle_hint(path.parent)}"
        )
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
            f"{path}: tensors do not match architecture {rule.architecture!r} and the config "
            f"in {CONFIG_NAME}"
            + (f"; missing: {missing}" if missing else "")
            + (f"; unexpected: {unexpected}" if unexpected else "")
            + ". The weights and the config come from different checkpoints; re-save both."
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
                f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected torch.float32; "
                "re-save the checkpoint with flatl2o (it always writes float32)"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path}: tensor {name!r} contains NaN or infinite values; the checkpoint "
                "comes from a diverged run and cannot be used"
            )
    rule.load_state_dict(loaded, strict=True)


def load_rule_from_dir(directory: str | os.PathLike[str]) -> UpdateRule:
    """Load a rule (on the CPU) from a checkpoint folder (strict; see :func:`load_weights_strict`).

    Building the module runs the random initialization of its layers before the weights
    are loaded; that happens on a forked CPU generator on the CPU device, so loading a
    checkpoint leaves the global RNG state (and hence the caller's reproducibility) untouched,
    whatever ``torch.set_default_device`` says.
    """
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        try:
            rule = build_rule(config)
        except ConfigError as e:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from None
    load_weights_strict(rule, directory / WEIGHTS_NAME)
    return rule.eval()
