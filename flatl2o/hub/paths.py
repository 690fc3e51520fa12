"""How published files (model cards, results, recipes) name paths: never the build machine's.

A card or results file records where a checkpoint is and which command made it; an absolute
path of the machine that wrote it means nothing to a reader, so these functions record a
shipped name, a path relative to the folder the command ran in, or ``~/...``.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from flatl2o.hub.names import SHIPPED_DIRS


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
