"""Publishing a rule on the Hugging Face Hub: a rule object, or a checkpoint folder as it is."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flatl2o._version import __version__
from flatl2o.checkpoint import (
    CHECKPOINT_FILES,
    MODEL_CARD_NAME,
    CheckpointError,
    load_rule_from_dir,
    save_rule,
)
from flatl2o.hub.model_card import render_model_card, retarget_model_card
from flatl2o.hub.names import LIBRARY_NAME
from flatl2o.rules import UpdateRule

#: The files of a checkpoint folder that are published (top level only).
FOLDER_FILES = CHECKPOINT_FILES


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
