"""Where a benchmark's results go: ``<out>.json`` (everything measured) and ``<out>.md`` (the
report redrawn from it), written together so the two never disagree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(out: str | Path, result: dict[str, Any], markdown: str) -> Path:
    """Write ``result`` as JSON to ``out`` and ``markdown`` next to it (``.md``); return ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    return out
