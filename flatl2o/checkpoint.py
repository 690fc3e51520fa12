"""The checkpoint folder format: ``config.json`` + ``model.safetensors`` (+ ``README.md``).

Safetensors only, never pickle: ``torch.load`` is never called, and pickle files found next
to a checkpoint (``pytorch_model.bin``, ``*.pt``, ...) are ignored and only mentioned in the
error message when ``model.safetensors`` is missing. Loading is strict: every expected tensor
present with the right shape, dtype float32 and finite values, nothing unexpected, a config
with a known ``format_version``, architecture and keys; every error names the file and the
tensor or key, and says how to fix it. Each file is written atomically (temporary file in the
same folder, fsync, ``os.replace``), so a killed process never leaves a half-written file
behind: a reader sees either the previous file or the new one. A save killed between two
files is detected on load: ``model.safetensors`` records a hash of the config it was saved
with. The weights header (names, shapes, dtypes) is checked against the config before the
rule is built, so a wrong config cannot make the loader allocate more than the file holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from flatl2o._version import __version__
from flatl2o.rules import ConfigError, RuleConfig, UpdateRule, build_rule

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"


#: The files flatl2o writes into a checkpoint folder besides the config and the weights. Each
#: describes the weights next to it, so a save removes the ones it does not write (see
#: :func:`write_checkpoint_files`); no other file of the folder is ever touched.
DESCRIPTION_FILES = (
    MODEL_CARD_NAME,
    "recipe.toml",
    "metrics.json",
    "log.jsonl",
    "meta_training.png",
)
#: Every file of a checkpoint folder that flatl2o writes, exports and publishes (top level only).
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, *DESCRIPTION_FILES)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupted, or does not match its config."""


#: Files that hold pickled tensors: never loaded (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

#: The ``model.safetensors`` metadata entry holding :func:`config_digest` of the config it was
#: saved with; files without it (older saves, the shipped checkpoints) skip that check.
CONFIG_DIGEST_KEY = "config_sha256"

#: How errors about a damaged file end; :func:`flatl2o.load_rule` replaces it for a file in
#: the Hugging Face cache, where deleting the file does not help.
REDOWNLOAD_ADVICE = "Delete it and download or re-save the checkpoint."

#: Temporary files of :func:`atomic_write` are ``.<name>.<host>-<pid>-<random>.tmp``; one whose
#: process is gone (killed mid-write) is removed by the next atomic write of the same file.
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMP_TAIL = re.compile(r"(?:(?P<host>[A-Za-z0-9]+)-(?P<pid>[0-9]+)-)?[a-z0-9_]{8}")
#: A temporary file named by an older flatl2o (no host and pid) counts as stale after this.
_LEGACY_TEMP_AGE_S = 3600.0


def config_digest(config: RuleConfig) -> str:
    """SHA-256 of the canonical JSON of a config: what ``model.safetensors`` records."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then move the temporary file onto ``path`` in one step.

    The temporary file lives in the same folder (so ``os.replace`` is atomic), is fsynced
    before the move, and is removed if ``write`` fails; ``path`` then keeps its previous
    content. The new file keeps the permissions of the file it replaces (0644 if new), not
    the 0600 of ``mkstemp``. Temporary files of ``path`` left by a killed writer are removed
    first (:func:`remove_stale_temporary_files`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporary_files(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
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


def remove_stale_temporary_files(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of ``path`` whose writer was killed; return them.

    Only files named as :func:`atomic_write` names them are touched, and only when their
    writer is certainly gone: its process id (on this host) no longer runs, or, for files
    named by older flatl2o versions (no host and process id), it is over an hour old. A
    write in progress, here or on another host sharing the folder, is never disturbed.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed: list[Path] = []
    try:
        entries = [e for e in path.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_TAIL.fullmatch(entry.name[len(prefix) :].removesuffix(".tmp"))
        if match is None or not entry.name.endswith(".tmp"):
            continue
        try:
            if match["pid"] is None:
                stale = time.time() - entry.lstat().st_mtime > _LEGACY_TEMP_AGE_S
            else:
                stale = match["host"] == _HOST and not _process_exists(int(match["pid"]))
            if stale and entry.is_file():
                entry.unlink()
                removed.append(entry)
        except OSError:  # removed meanwhile, or not ours to remove: leave it
            continue
    return removed


def _process_exists(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (``True`` when that cannot be told)."""
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would kill it on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it runs, as another user
        return True
    return True


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
    rule: UpdateRule,
    directory: str | os.PathLike[str],
    *,
    model_card: str | None = None,
    files: Mapping[str, str | bytes] | None = None,
    keep: Iterable[str] = (),
) -> Path:
    """Save a rule as a Hub-ready folder (``~`` expanded); returns the folder path.

    Everything is serialized in memory first, then written by :func:`write_checkpoint_files`:
    each file is replaced atomically (never half-written, no temporary file left behind), and
    the files of :data:`DESCRIPTION_FILES` that an earlier save left in the folder (model card,
    recipe, metrics, log, plot) are removed unless this save writes them (``model_card``,
    ``files``: more of :data:`DESCRIPTION_FILES` by name) or ``keep`` names them (files the
    caller already wrote for these weights, such as a run's own log), so no stale file ever
    describes the new weights. Other files in the folder are left alone. The weights record
    a hash of the config (:data:`CONFIG_DIGEST_KEY`), so a save killed between the two files
    is refused on load instead of pairing new weights with the old config.
    """
    directory = Path(directory).expanduser()
    config = {**rule.config.to_dict(), "flatl2o_version": __version__}
    try:
        config_text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: the rule config has a NaN or infinite value "
            f"({rule.config}); JSON cannot store it and the checkpoint could not be loaded"
        ) from None
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"{directory}: is a file, not a folder; a checkpoint is a folder of files. Pass the "
            "path of a new or existing folder (or move the file away)"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(
            f"{directory}: cannot create the folder, part of the path is a file (or a broken "
            "link); pass a path whose parent folders are folders"
        ) from None
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in rule.state_dict().items()
    }
    metadata = {
        "format": "pt",
        "architecture": rule.architecture,
        "flatl2o_version": __version__,
        CONFIG_DIGEST_KEY: config_digest(rule.config),
    }
    weights = _canonical_safetensors(safetensors_bytes(tensors, metadata=metadata))
    new: dict[str, str | bytes] = {WEIGHTS_NAME: weights, CONFIG_NAME: config_text}
    if model_card is not None:
        new[MODEL_CARD_NAME] = model_card
    for name, content in (files or {}).items():
        if name not in DESCRIPTION_FILES or name == MODEL_CARD_NAME:
            raise ValueError(
                f"files={{{name!r}: ...}}: a save writes only {', '.join(DESCRIPTION_FILES[1:])} "
                "besides the config and weights (the model card goes in model_card=...)"
            )
        new[name] = content
    write_checkpoint_files(directory, new, keep=keep)
    return directory


def write_checkpoint_files(
    directory: str | os.PathLike[str],
    files: Mapping[str, str | bytes],
    *,
    keep: Iterable[str] = (),
) -> list[str]:
    """Write one checkpoint's files into ``directory``; return the stale files removed.

    ``files`` maps names of :data:`CHECKPOINT_FILES` to their content (``str`` is written as
    UTF-8). Every file of :data:`DESCRIPTION_FILES` already in the folder and not named in
    ``keep`` is removed *first*, then the weights, the config and the new description files
    are written, each atomically: whenever a process is killed, no description file of the
    previous checkpoint sits beside the new weights (at worst one is missing until the save is
    run again). Only those file names are ever removed: the user's other files stay.
    """
    directory = Path(directory).expanduser()
    unknown = sorted(set(files) - set(CHECKPOINT_FILES))
    if unknown:
        raise ValueError(f"not checkpoint files: {unknown}; expected some of {CHECKPOINT_FILES}")
    keep = set(keep)
    removed = [
        name
        for name in DESCRIPTION_FILES
        if name not in keep and ((directory / name).is_file() or (directory / name).is_symlink())
    ]
    for name in removed:
        (directory / name).unlink()
    if removed:
        _fsync_dir(directory)
    order = (WEIGHTS_NAME, CONFIG_NAME, *DESCRIPTION_FILES)  # the config after its weights
    for name in sorted(files, key=order.index):
        content = files[name]
        data = content.encode("utf-8") if isinstance(content, str) else content
        atomic_write_bytes(directory / name, data)
    return [name for name in removed if name not in files]


def safetensors_header(data: bytes) -> tuple[dict, int]:
    """The JSON header of safetensors ``data`` and its length in bytes (``ValueError`` when
    it is truncated or not a JSON object), without reading any tensor."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("truncated (the header runs past the end of the file)")
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, length


def _canonical_safetensors(data: bytes) -> bytes:
    """The same file with a deterministic header (sorted metadata, tensors by offset).

    ``safetensors`` keeps the metadata in a hash map, so its key order, and hence the file's
    bytes, change from one process to the next. Checkpoints must be byte-identical for the
    same rule: reproducible hashes, and no new Hub commit when nothing changed.
    """
    header, length = safetensors_header(data)
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
            f"{path}: not valid UTF-8 JSON ({e}); the file is corrupted. {REDOWNLOAD_ADVICE}"
        ) from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); the file is corrupted. {REDOWNLOAD_ADVICE}"
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


#: safetensors dtype names -> torch's, for error messages.
_DTYPE_NAMES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot be read as safetensors ({error}); the file is truncated or corrupted. "
        f"{REDOWNLOAD_ADVICE}"
    )


def check_weights_header(
    path: str | os.PathLike[str], expected: dict[str, tuple[int, ...]], architecture: str
) -> dict[str, str]:
    """Check the tensor names, shapes and dtypes in a safetensors header; return its metadata.

    Only the header is read (no tensor data), so a config asking for huge tensors is refused
    before anything the size of those tensors is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a flatl2o checkpoint folder needs {WEIGHTS_NAME} next to "
            f"{CONFIG_NAME}{_pickle_hint(path.parent)}"
        )
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            names = set(f.keys())
            for name in names & set(expected):
                tensor = f.get_slice(name)
                found[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match architecture {architecture!r} and the config "
            f"in {CONFIG_NAME}"
            + (f"; missing: {missing}" if missing else "")
            + (f"; unexpected: {unexpected}" if unexpected else "")
            + ". The weights and the config come from different checkpoints; re-save both."
        )
    for name in sorted(found):
        shape, dtype = found[name]
        if shape != tuple(expected[name]):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {shape}, expected "
                f"{tuple(expected[name])} for the config in {CONFIG_NAME}"
            )
        if dtype != "F32":
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {_DTYPE_NAMES.get(dtype, dtype)}, expected "
                "torch.float32; re-save the checkpoint with flatl2o (it always writes float32)"
            )
    return metadata


def load_weights_strict(rule: UpdateRule, path: str | os.PathLike[str]) -> None:
    """Load ``model.safetensors`` into ``rule``: all tensors present, right shapes and dtypes.

    The header is checked first (:func:`check_weights_header`); ``rule`` is only changed
    when every tensor passed, finite values included.
    """
    path = Path(path)
    expected = {k: tuple(v.shape) for k, v in rule.state_dict().items()}
    check_weights_header(path, expected, rule.architecture)
    loaded: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(expected):
                loaded[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    for name, tensor in loaded.items():
        if tensor.shape != expected[name] or tensor.dtype != torch.float32:
            raise CheckpointError(  # the file changed since its header was checked
                f"{path}: changed while it was being read; load it again"
            )
        if not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path}: tensor {name!r} contains NaN or infinite values; the checkpoint "
                "comes from a diverged run and cannot be used"
            )
    rule.load_state_dict(loaded, strict=True)


def load_rule_from_dir(directory: str | os.PathLike[str]) -> UpdateRule:
    """Load a rule (on the CPU) from a checkpoint folder (strict; see :func:`load_weights_strict`).

    The config is checked first, then the weights header against the tensor shapes that
    config implies (computed on the ``meta`` device, which allocates nothing), then the config
    hash the weights recorded (a torn save is refused); only then is the rule built. Building
    runs the random initialization of its layers before the weights are loaded; that happens
    on a forked CPU generator on the CPU device, so loading a checkpoint leaves the global
    RNG state (and hence the caller's reproducibility) untouched, whatever
    ``torch.set_default_device`` says.
    """
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            skeleton = build_rule(config)
        except ConfigError as e:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    metadata = check_weights_header(directory / WEIGHTS_NAME, expected, config.architecture)
    recorded = metadata.get(CONFIG_DIGEST_KEY)
    if recorded is not None and recorded != config_digest(config):
        raise CheckpointError(
            f"{directory}: {WEIGHTS_NAME} was saved with another {CONFIG_NAME} (the config hash "
            f"in its metadata, {recorded[:12]}..., differs from this {CONFIG_NAME}'s, "
            f"{config_digest(config)[:12]}...): the folder holds a torn save (a save killed "
            f"between writing {WEIGHTS_NAME} and {CONFIG_NAME}) or a hand-edited "
            f"{CONFIG_NAME}. Save the rule into this folder again, or restore both files from "
            "the same save; to change a config on purpose, build the rule with make_rule(...), "
            "load the weights with flatl2o.checkpoint.load_weights_strict and save_pretrained it."
        )
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        rule = build_rule(config)
    load_weights_strict(rule, directory / WEIGHTS_NAME)
    return rule.eval()
