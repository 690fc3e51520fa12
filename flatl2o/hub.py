"""Finding, loading and publishing update-rule checkpoints.

``load_rule(name_or_path)`` resolves, in order: an existing local folder; a checkpoint
shipped with the package (the top-level ``pretrained/`` folder, packaged into the wheel
as ``flatl2o/pretrained``); a Hugging Face Hub repo id, downloaded with
``huggingface_hub.hf_hub_download`` (so revision, cache, token and offline mode behave
exactly as everywhere else in the Hugging Face ecosystem). Only a well-formed ``owner/name``
id is sent to the Hub: any other name fails at once, with close matches and the shipped names.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from flatl2o._version import __version__
from flatl2o.checkpoint import (
    CHECKPOINT_FILES,
    CONFIG_NAME,
    MODEL_CARD_NAME,
    REDOWNLOAD_ADVICE,
    WEIGHTS_NAME,
    CheckpointError,
    load_rule_from_dir,
    save_rule,
)
from flatl2o.rules import UpdateRule
from flatl2o.rules.base import provide_persistence

_PACKAGE_DIR = Path(__file__).resolve().parent
#: Where shipped checkpoints live: inside an installed wheel, or the source checkout.
SHIPPED_DIRS = (_PACKAGE_DIR / "pretrained", _PACKAGE_DIR.parent / "pretrained")
LIBRARY_NAME = "flatl2o"


#: The checkpoint ``L2O(params)`` uses: an RNNprop rule, the family that is within seed noise
#: of tuned baselines. Mean test accuracy over the 8 (task, horizon) cells of docs/results.md
#: (5 seeds each): rnnprop-hessian 0.9023, rnnprop-entropy 0.9014, rnnprop 0.9013,
#: dm-entropy 0.8923, dm-hessian 0.8856, dm 0.8375 (tuned SGD 0.9043, tuned Adam 0.9017).
#: It was chosen when an earlier evaluation ranked it first; the three RNNprop rules are
#: within seed noise of each other, so it was kept (a default, not a result).
DEFAULT_PRETRAINED = "rnnprop-entropy"


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


_SHIPPED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def _download(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool,
    force_download: bool,
) -> Path:
    """Download (or find in the cache) config and weights of one commit; return the folder.

    ``revision`` (a branch or tag) is resolved once, by the first download; the second file is
    then fetched at that exact commit, so a push landing between the two downloads cannot
    pair the config of one commit with the weights of another.
    """
    from huggingface_hub import hf_hub_download

    def fetch(filename: str, rev: str | None) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=rev,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
                library_name=LIBRARY_NAME,
                library_version=__version__,
            )
        )

    _probe(repo_id, revision=revision, cache_dir=cache_dir, token=token, force=force_download)
    config = fetch(CONFIG_NAME, revision)
    folder = config.parent  # .../snapshots/<commit sha>/
    commit = folder.name if _COMMIT_SHA.fullmatch(folder.name) else revision
    weights = fetch(WEIGHTS_NAME, commit)
    if weights.parent != folder:  # not the standard cache layout: keep the files together
        raise CheckpointError(
            f"{repo_id}: {CONFIG_NAME} ({config}) and {WEIGHTS_NAME} ({weights}) were resolved "
            "to different folders; clear the cache entry and retry with force_download=True"
        )
    return folder


def _probe(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    force: bool,
) -> None:
    """One metadata request for the config, without retries, before a download that the cache
    cannot serve.

    ``hf_hub_download`` retries an unreachable Hub five times with backoff (about 23 s of
    "Retrying in ..." warnings) when the file is not in the cache; this request fails in one
    attempt instead, raising the Hub's typed HTTP error (404, 401, 5xx) or, for a network
    error, ``LocalEntryNotFoundError`` from it, as ``hf_hub_download`` would after its retries.
    Nothing is sent offline, nor when the cache holds the config (then ``hf_hub_download``
    falls back to the cache at once on a network error, with no retry).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    cached = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str) and not force:
        return
    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, CONFIG_NAME, revision=revision),
            token=token,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
            library_name=LIBRARY_NAME,
            library_version=__version__,
        )
    except HfHubHTTPError:
        raise
    except Exception as e:  # refused, no route, DNS, timeout, TLS: the Hub cannot be reached
        raise LocalEntryNotFoundError(
            f"could not reach {constants.ENDPOINT} and {repo_id}/{CONFIG_NAME} is not cached"
        ) from e


def _hub_reason(
    error: Exception,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
) -> str:
    """Why the Hub attempt failed, in one line (plus the server's own message if any)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    server = getattr(error, "server_message", None) or ""
    server = f" (server said: {server.strip()})" if server.strip() else ""
    if isinstance(error, LocalEntryNotFoundError):
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            return f"offline ({why}) and not in the local cache {cache}"
        cause = error.__cause__ or error.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
        return f"could not reach {constants.ENDPOINT} ({detail}) and not in the local cache {cache}"
    if isinstance(error, RevisionNotFoundError):
        return f"the repo exists but has no revision {revision!r}{server}"
    if isinstance(error, GatedRepoError):
        return f"the repo is gated: accept its terms on the Hub and pass token=...{server}"
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"no such repo on {constants.ENDPOINT} (or it is private: pass token=... or log in "
            f"with `hf auth login`){server}"
        )
    if isinstance(error, HfHubHTTPError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {first}{server}"
    return f"{type(error).__name__}: {error}"


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

    Resolution order: an existing local folder; a checkpoint shipped with flatl2o (see
    :func:`list_pretrained`); a Hugging Face Hub repo id, through ``hf_hub_download`` (so
    ``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``force_download``,
    ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` behave as everywhere else in the
    Hugging Face ecosystem). The rule is returned in eval mode, on ``device`` (default CPU).

    ``revision`` and ``force_download`` select Hub content: given for a name that resolves to
    a local folder or a shipped checkpoint they raise ``ValueError`` (the folder cannot be
    at that revision, nor be downloaded again); ``cache_dir`` is ignored there with a
    ``UserWarning``; ``token`` and ``local_files_only`` are simply satisfied.

    Only a well-formed ``owner/name`` id (:func:`is_hub_repo_id`) is sent to the Hub; any other
    name that is no folder and no shipped name fails at once, in one line, with close matches
    ("did you mean") and the shipped names. A download the cache cannot serve is preceded by
    one metadata request without retries, so an unreachable Hub fails in one attempt instead
    of huggingface_hub's five backed-off retries.

    Raises :class:`CheckpointNotFoundError` listing every place that was tried, with a fix,
    when nothing matches, and :class:`flatl2o.checkpoint.CheckpointError` when a checkpoint
    was found but a file is missing, corrupted or does not match its config (for a damaged
    file in the Hugging Face cache, the message says to retry with ``force_download=True``).
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    text = os.fspath(name_or_path)
    tried: list[str] = []

    def done(rule: UpdateRule) -> UpdateRule:
        return rule.to(device) if device is not None else rule

    def not_hub(source: str) -> None:
        _check_hub_only_options(
            text, source, revision=revision, cache_dir=cache_dir, force_download=force_download
        )

    local = Path(text).expanduser()
    if local.is_dir():
        not_hub(f"the local folder {str(local.resolve())!r}")
        return done(load_rule_from_dir(local))
    if local.exists():
        tried.append(
            f"local folder {str(local.resolve())!r}: is a file; pass the folder that holds "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    else:
        tried.append(f"local folder {str(local.resolve())!r}: does not exist")
    shipped = _shipped_dir(text) if _SHIPPED_NAME.fullmatch(text) else None
    if shipped is not None:
        not_hub(f"the checkpoint shipped with flatl2o ({shipped})")
        return done(load_rule_from_dir(shipped))
    tried.append(
        f"shipped checkpoints: no {text!r} (shipped: {', '.join(list_pretrained()) or 'none'})"
    )
    if not is_hub_repo_id(text):
        raise CheckpointNotFoundError(_not_a_checkpoint_message(text, local))
    where = f"revision {revision!r}" if revision else "the default revision"
    try:
        folder = _download(
            text,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
        )
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):
            reason = _hub_reason(
                e, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
            tried.append(f"Hugging Face Hub repo {text!r} at {where}: {reason}")
        else:  # the repo exists but lacks a file: a broken checkpoint, not a missing one
            missing = _missing_filename(e)
            raise CheckpointError(
                f"Hugging Face Hub repo {text!r} at {where} ({constants.ENDPOINT}) has no "
                f"{missing}: it is not a flatl2o checkpoint (one needs {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}). Check the repo id and revision, or re-upload it with "
                "flatl2o.push_to_hub()."
            ) from None
    except CheckpointError:
        raise
    except Exception as e:  # HTTP errors, connection errors, offline mode, bad arguments
        reason = _hub_reason(
            e, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        tried.append(f"Hugging Face Hub repo {text!r} at {where}: {reason}")
    else:
        try:
            return done(load_rule_from_dir(folder))
        except CheckpointError as e:
            raise CheckpointError(_cached_copy_advice(str(e), text, folder, revision)) from None
    close = _close_matches(text, local)
    raise CheckpointNotFoundError(
        f"Could not find the update rule {text!r}. Tried, in order:\n  - "
        + "\n  - ".join(tried)
        + (f"\nDid you mean {_quoted(close)}?" if close else "")
        + "\nFix: pass an existing checkpoint folder, one of flatl2o.list_pretrained(), or a Hub "
        "repo id ('owner/name', with revision=... for another branch); for a private repo pass "
        "token=...; for a Hub repo while offline, download it once online (or copy the cache) "
        "and set HF_HUB_CACHE / cache_dir to that cache."
    )


def is_hub_repo_id(name: str) -> bool:
    """Whether ``name`` is a well-formed Hub model id ``owner/name`` (huggingface_hub's own
    check, plus exactly one ``/``): the only names :func:`load_rule` sends to the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _close_matches(name: str, local: Path) -> list[str]:
    """Shipped names, and folders next to where ``local`` would be, that look like ``name``."""
    path_like = any(sep in name for sep in ("/", "\\")) or name.startswith((".", "~"))
    candidates = [] if path_like else list_pretrained()
    parent = local.parent
    try:
        if local.name and parent.is_dir():
            prefix = "" if parent == Path(".") else os.path.dirname(name.rstrip("/\\"))
            candidates += [
                os.path.join(prefix, p.name) if prefix else p.name
                for p in parent.iterdir()
                if p.is_dir() and not p.name.startswith(".")
            ]
    except OSError:
        pass
    return difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)


def _quoted(names: list[str]) -> str:
    return " or ".join(repr(n) for n in names)


def _not_a_checkpoint_message(name: str, local: Path) -> str:
    """One line: ``name`` is no local folder, no shipped name and no Hub id, so nothing was
    downloaded; close matches and the shipped names follow."""
    close = _close_matches(name, local)
    where = f"{str(local.resolve())!r} " + (
        f"is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        if local.exists()
        else "does not exist"
    )
    return (
        f"Could not find the update rule {name!r}: it is not a local checkpoint folder ({where}), "
        "not a checkpoint shipped with flatl2o, and not a Hugging Face Hub repo id "
        "('owner/name'), so the Hub was not asked."
        + (f" Did you mean {_quoted(close)}?" if close else "")
        + f" Shipped checkpoints: {', '.join(list_pretrained()) or 'none'}."
    )


def _check_hub_only_options(
    name: str,
    source: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    force_download: bool,
) -> None:
    """Refuse (or warn about) Hub download options that a local source cannot honor."""
    selecting = [
        f"{k}={v!r}" for k, v in (("revision", revision), ("force_download", force_download)) if v
    ]
    if selecting:
        raise ValueError(
            f"{name!r} resolved to {source}, but {' and '.join(selecting)} "
            f"{'apply' if len(selecting) > 1 else 'applies'} only to Hugging Face Hub repos "
            "(a local folder or shipped checkpoint comes first in the lookup). Drop the option "
            "to load it; to load a Hub repo instead, pass its full 'owner/name' id from a "
            "folder where no local folder has that name."
        )
    if cache_dir is not None:
        warnings.warn(
            f"{name!r} resolved to {source}; cache_dir={os.fspath(cache_dir)!r} only applies "
            "to Hugging Face Hub repos and was ignored",
            UserWarning,
            stacklevel=4,
        )


def _cached_copy_advice(message: str, repo_id: str, folder: Path, revision: str | None) -> str:
    """``message`` about a Hub checkpoint in the local cache, with advice that works there.

    ``hf_hub_download`` re-links a deleted snapshot file to the same (damaged) blob, so
    "delete it and download" does not help; ``force_download=True`` replaces the blob.
    """
    if REDOWNLOAD_ADVICE not in message:
        return message
    again = f"flatl2o.load_rule({repo_id!r}"
    again += f", revision={revision!r}" if revision else ""
    again += ", force_download=True)"
    blobs = ""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if str(folder / name) in message:
            blob = (folder / name).resolve()
            blobs = f" (or delete {blob} too: deleting only the snapshot link re-links that blob)"
    return message.replace(
        REDOWNLOAD_ADVICE,
        f"It is the Hugging Face cache's copy of Hub repo {repo_id!r} (commit {folder.name}); "
        f"download it again with {again}{blobs}.",
    )


def _missing_filename(error: Exception) -> str:
    """Which checkpoint file a Hub "entry not found" error is about."""
    url = str(getattr(getattr(error, "response", None), "url", "") or "")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if url.endswith("/" + name) or name in str(error):
            return name
    return f"{CONFIG_NAME} or {WEIGHTS_NAME}"


def push_to_hub(
    rule: UpdateRule,
    repo_id: str,
    *,
    model_card: str | None = None,
    metrics: dict[str, float | None] | None = None,
    commit_message: str = "Upload flatl2o update rule",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool | None = None,
) -> str:
    """Upload ``config.json``, ``model.safetensors`` and a model card; return the commit URL.

    The folder is written and loaded back (strictly) before anything is sent, so a rule that
    could not be loaded (e.g. NaN weights) is never published. The repo is created if needed
    (``HfApi.create_repo(exist_ok=True)``), and so is the branch ``revision``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        card = model_card or render_model_card(rule, repo_id=repo_id, metrics=metrics)
        save_rule(rule, tmp, model_card=card)
        return _upload(
            tmp,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def push_folder_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str = "Upload flatl2o update rule",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> str:
    """Upload a checkpoint folder (after checking that it loads); return the commit URL.

    The folder itself is checked first, so errors name its files; only the checkpoint files
    (:data:`FOLDER_FILES`) are sent (never a run's ``trainer_state/`` or ``best/``), and the
    model card's usage snippet is pointed at ``repo_id`` (:func:`retarget_model_card`) in the
    uploaded copy; the folder itself is not changed.
    """
    folder = Path(folder).expanduser()
    load_rule_from_dir(folder)  # errors name the user's folder (and its pickle files)
    files = {
        name: (folder / name).read_bytes() for name in FOLDER_FILES if (folder / name).is_file()
    }
    if MODEL_CARD_NAME in files:
        try:
            card = files[MODEL_CARD_NAME].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"{folder / MODEL_CARD_NAME}: not UTF-8 text ({e}); the Hub reads model cards "
                "as UTF-8 Markdown. Save it as UTF-8 (or delete it: a folder without a model "
                "card uploads without one)"
            ) from None
        files[MODEL_CARD_NAME] = retarget_model_card(card, repo_id).encode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return _upload(
            tmp,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
        )


#: The files of a checkpoint folder that are published (top level only).
FOLDER_FILES = CHECKPOINT_FILES


def _upload(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str,
    private: bool | None,
    token: str | bool | None,
    revision: str | None,
    create_pr: bool | None = None,
) -> str:
    """Check that ``folder`` loads, then commit its checkpoint files (nothing else) to the repo.

    One commit adds the folder's :data:`FOLDER_FILES` and deletes the repo's copies of those it
    lacks (e.g. a model card or metrics of earlier weights), so the repo never shows files that
    describe other weights; other files of the repo are left alone.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    load_rule_from_dir(folder)  # refuse to publish something that does not load
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if (
        revision is not None
        and revision != constants.DEFAULT_REVISION
        and not create_pr
        and not revision.startswith("refs/")  # e.g. an open pull request, refs/pr/1
    ):
        # Committing to a branch that does not exist fails on the Hub: create it from main.
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    folder = Path(folder)
    present = [name for name in FOLDER_FILES if (folder / name).is_file()]  # never a *.tmp
    remote = api.model_info(repo_id, revision=revision or constants.DEFAULT_REVISION).siblings
    remote_names = {sibling.rfilename for sibling in remote or []}
    operations: list[CommitOperationAdd | CommitOperationDelete] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=(folder / name).read_bytes())
        for name in present
    ]
    operations += [
        CommitOperationDelete(path_in_repo=name)
        for name in FOLDER_FILES
        if name in remote_names and name not in present
    ]
    info = api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
    )
    return str(getattr(info, "commit_url", info))


def portable_path(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> str:
    """``path`` as a file that others read should record it: relative to ``root`` (default:
    the current folder; commands are run from the repository root) when it lies inside it,
    ``~/...`` inside the home folder, else unchanged; a relative path is returned as given.
    Never this machine's absolute working or home folder, which mean nothing elsewhere."""
    text = os.fspath(path)
    if not Path(text).is_absolute():
        return text
    absolute = Path(os.path.abspath(text))
    for candidate in dict.fromkeys((absolute, absolute.resolve())):
        start = Path(os.path.abspath(root)) if root is not None else Path.cwd()
        for base, prefix in ((start, ""), (Path.home(), "~/")):
            if base == Path(base.anchor):  # "/" as the base would keep the absolute path
                continue
            try:
                relative = candidate.relative_to(base).as_posix()
            except ValueError:
                continue
            return prefix + relative if relative != "." else (prefix.rstrip("/") or ".")
    return text


def checkpoint_location(folder: str | os.PathLike[str]) -> str:
    """How a published file names a checkpoint folder: its shipped name when it is a checkpoint
    shipped with flatl2o (``load_rule(name)`` finds it from anywhere, wheel included), else
    :func:`portable_path`."""
    resolved = Path(folder).expanduser().resolve()
    if resolved.parent in {root.resolve() for root in SHIPPED_DIRS}:
        return resolved.name
    return portable_path(folder)


_ABSOLUTE_ARGUMENT = re.compile(r'^(?P<head>(?:[^=/]*=)?"?)(?P<path>/[^"]*)(?P<tail>"?)$')


def portable_command(command: str, *, root: str | os.PathLike[str] | None = None) -> str:
    """``command`` with every absolute path argument (``/x``, ``--flag=/x``, ``key="/x"``)
    made portable (:func:`portable_path` with ``root``); unchanged when there is none."""
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: not a command line this can rewrite
        return command
    changed = False
    for i, word in enumerate(words):
        match = _ABSOLUTE_ARGUMENT.match(word)
        if match is not None:
            path = portable_path(match["path"], root=root)
            if path != match["path"]:
                words[i] = match["head"] + path + match["tail"]
                changed = True
    return shlex.join(words) if changed else command


#: The usage line of a model card rendered without a known location (shown as written).
UNKNOWN_LOCATION = "path/to/this/folder"
_USAGE = re.compile(r'(L2O\.from_pretrained\(model\.parameters\(\), )"[^"\n]*"(\))')
_LEGACY_TITLE = re.compile(r"^# PATH_OR_REPO_ID$", re.MULTILINE)


def retarget_model_card(card: str, load_from: str) -> str:
    """``card`` with the usage snippet of :func:`render_model_card` loading ``load_from`` (a
    folder, shipped name or Hub repo id) instead; cards written by older versions also get
    their ``# PATH_OR_REPO_ID`` title replaced. A card without that snippet is returned as is.
    """
    card = _USAGE.sub(lambda m: f"{m.group(1)}{json.dumps(load_from)}{m.group(2)}", card, 1)
    return _LEGACY_TITLE.sub(lambda _: f"# {load_from}", card, 1)


def render_model_card(
    rule: UpdateRule,
    *,
    repo_id: str | None = None,
    metrics: dict[str, float | None] | None = None,
    body: str | None = None,
    license: str = "apache-2.0",
    title: str | None = None,
    load_from: str | None = None,
) -> str:
    """A Hub model card: YAML metadata (library, tags, license, metrics) and a usage section.

    The usage snippet loads ``repo_id`` or else ``load_from`` (a folder or shipped name); the
    title is ``title``, else that name. With neither, the title names the architecture and
    the snippet loads ``"path/to/this/folder"``. A metric that is ``None`` (``metrics.json``
    stores a non-finite value as ``null``) is shown as ``n/a``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=license,
        tags=["flatl2o", "learned-optimizer", "l2o", "pytorch", rule.architecture],
    )
    if metrics:
        data.metrics = sorted(metrics)
    name = repo_id or load_from or UNKNOWN_LOCATION
    heading = title or repo_id or load_from or f"flatl2o update rule ({rule.architecture})"
    metric_lines = "\n".join(
        f"| {k} | {_metric_text(v)} |" for k, v in sorted((metrics or {}).items())
    )
    text = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {heading}\n\nA learned update rule (`{rule.architecture}`) for flatl2o, the PyTorch "
        "package of learned optimizers: `flatl2o.L2O` is a `torch.optim.Optimizer` driven by "
        "this rule (see the package's README and `docs/`).\n\n"
        "```python\nimport flatl2o\n"
        f"opt = flatl2o.L2O.from_pretrained(model.parameters(), {json.dumps(name)})\n```\n\n"
        f"Config: `{json.dumps(rule.config.to_dict())}`\n"
    )
    if metric_lines:
        text += f"\n## Metrics\n\n| metric | value |\n|---|---|\n{metric_lines}\n"
    if body:
        text += "\n" + body.strip() + "\n"
    return str(ModelCard(text).content)


def _metric_text(value: object) -> str:
    """A metric for the model card table: 4 significant digits, ``n/a`` when not recorded."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4g}"
    return str(value)


# UpdateRule.save_pretrained / from_pretrained / push_to_hub run these functions; the rules are
# the bottom layer and cannot import this module (see flatl2o.rules.base.provide_persistence).
provide_persistence(save=save_rule, load=load_rule, push=push_to_hub)
