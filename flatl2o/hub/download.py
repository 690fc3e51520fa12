"""Loading a rule by name: a local folder, a shipped checkpoint or a Hugging Face Hub repo.

``load_rule(name_or_path)`` resolves, in order: an existing local folder; a checkpoint
shipped with the package (the top-level ``pretrained/`` folder, packaged into the wheel
as ``flatl2o/pretrained``); a Hugging Face Hub repo id, downloaded with
``huggingface_hub.hf_hub_download`` (so revision, cache, token and offline mode behave
exactly as everywhere else in the Hugging Face ecosystem). Only a well-formed ``owner/name``
id is sent to the Hub: any other name fails at once, with close matches and the shipped names.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from flatl2o._version import __version__
from flatl2o.checkpoint import (
    CONFIG_NAME,
    REDOWNLOAD_ADVICE,
    WEIGHTS_NAME,
    CheckpointError,
    load_rule_from_dir,
)
from flatl2o.hub.names import (
    LIBRARY_NAME,
    SHIPPED_NAME,
    CheckpointNotFoundError,
    close_matches,
    is_hub_repo_id,
    list_pretrained,
    not_a_checkpoint_message,
    quoted,
    shipped_dir,
)
from flatl2o.rules import UpdateRule

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
    shipped = shipped_dir(text) if SHIPPED_NAME.fullmatch(text) else None
    if shipped is not None:
        not_hub(f"the checkpoint shipped with flatl2o ({shipped})")
        return done(load_rule_from_dir(shipped))
    tried.append(
        f"shipped checkpoints: no {text!r} (shipped: {', '.join(list_pretrained()) or 'none'})"
    )
    if not is_hub_repo_id(text):
        raise CheckpointNotFoundError(not_a_checkpoint_message(text, local))
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
    close = close_matches(text, local)
    raise CheckpointNotFoundError(
        f"Could not find the update rule {text!r}. Tried, in order:\n  - "
        + "\n  - ".join(tried)
        + (f"\nDid you mean {quoted(close)}?" if close else "")
        + "\nFix: pass an existing checkpoint folder, one of flatl2o.list_pretrained(), or a Hub "
        "repo id ('owner/name', with revision=... for another branch); for a private repo pass "
        "token=...; for a Hub repo while offline, download it once online (or copy the cache) "
        "and set HF_HUB_CACHE / cache_dir to that cache."
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
