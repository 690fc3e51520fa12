"""Export: copy a finished run's shippable files to a folder (``--export``, ``pretrained/``).

The copy's model card is pointed at the copy, so its usage line loads what sits next to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from flatl2o.checkpoint import CHECKPOINT_FILES, MODEL_CARD_NAME, write_checkpoint_files
from flatl2o.hub import checkpoint_location, retarget_model_card

#: What a shipped checkpoint folder holds (see ``pretrained/``).
EXPORTED_FILES = CHECKPOINT_FILES


def export_name(folder: str | os.PathLike[str]) -> str:
    """How to load an exported folder: its shipped name if it is ``pretrained/<name>`` of this
    flatl2o (source checkout or wheel), else its path, relative where it can be
    (:func:`flatl2o.hub.checkpoint_location`)."""
    return checkpoint_location(folder)


def export_run(run: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Copy the shippable files (checkpoint, card, recipe, metrics, log, plot) of the run
    folder ``run`` to ``folder``; return ``folder``.

    The folder then holds this run's set and nothing of an earlier checkpoint: a file of
    :data:`EXPORTED_FILES` that the run does not have is removed from it
    (:func:`flatl2o.checkpoint.write_checkpoint_files`); other files are left alone.
    """
    run, folder = Path(run), Path(folder)
    files: dict[str, str | bytes] = {
        name: (run / name).read_bytes() for name in EXPORTED_FILES if (run / name).is_file()
    }
    if MODEL_CARD_NAME in files:  # the card's usage line loads the exported copy
        card = bytes(files[MODEL_CARD_NAME]).decode("utf-8")
        files[MODEL_CARD_NAME] = retarget_model_card(card, export_name(folder))
    write_checkpoint_files(folder, files)
    return folder
