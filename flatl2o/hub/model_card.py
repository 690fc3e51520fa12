"""Model cards: the ``README.md`` that the Hub shows for a rule, rendered and retargeted."""

from __future__ import annotations

import json
import re

from flatl2o.hub.names import LIBRARY_NAME
from flatl2o.rules import UpdateRule

#: The usage line of a model card rendered without a known location (shown as written).
UNKNOWN_LOCATION = "path/to/this/folder"
# The card's own lines that retarget_model_card edits. huggingface_hub models a card's YAML
# metadata (ModelCardData) but keeps its Markdown body as one string, so the body's usage
# line and title are found by pattern, in the body only (split_front_matter).
_USAGE = re.compile(r'(L2O\.from_pretrained\(model\.parameters\(\), )"[^"\n]*"(\))')
_LEGACY_TITLE = re.compile(r"^# PATH_OR_REPO_ID$", re.MULTILINE)


def split_front_matter(card: str) -> tuple[str, str]:
    """``card`` as (its YAML front matter, ``---`` lines included, or ``""``; its Markdown
    body), split where huggingface_hub's ``ModelCard`` splits it, so that edits of the body
    never touch the metadata (which is not parsed: a card is split as it is)."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(card)
    end = match.end() if match is not None else 0
    return card[:end], card[end:]


def retarget_model_card(card: str, load_from: str) -> str:
    """``card`` with the usage snippet of :func:`render_model_card` loading ``load_from`` (a
    folder, shipped name or Hub repo id) instead; cards written by older versions also get
    their ``# PATH_OR_REPO_ID`` title replaced. Only the Markdown body is edited, never the
    YAML metadata; a card without that snippet is returned as is.
    """
    front, body = split_front_matter(card)
    body = _USAGE.sub(lambda m: f"{m.group(1)}{json.dumps(load_from)}{m.group(2)}", body, 1)
    return front + _LEGACY_TITLE.sub(lambda _: f"# {load_from}", body, 1)


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
