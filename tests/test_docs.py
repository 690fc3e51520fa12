"""The documentation is true, runs as written and stands alone (issue 15 items 11-14).

Every ```python block of README.md and docs/*.md runs as a script in a fresh process, as a
user who pastes it into a file would run it (``__name__ == "__main__"``, so worker processes
started by the snippet import it again); the working directory is a temporary folder that holds
a link to the checkout's ``recipes/`` (the docs' commands run from a checkout), and the Hugging
Face Hub is the loopback emulation of ``tests/hub_server.py``. A block that is a fragment by
design (a line of a user's DDP script, a method of a LightningModule) is marked by an HTML
comment ``<!-- fragment: why -->`` on the line before it; it must still compile.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

import flatl2o
from flatl2o.hub import DEFAULT_PRETRAINED, list_pretrained

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: Pages written from the results JSON (research/results_page.py on top of
#: flatl2o.evaluation.report), not by hand.
GENERATED = {REPO / "docs" / "results.md", REPO / "docs" / "results" / "report.md"}
MARKER = re.compile(r"<!--\s*fragment\b(?::\s*(?P<why>.*?))?\s*-->")
SNIPPET_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One ```python block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    fragment: str | None  # the reason given by a ``<!-- fragment: ... -->`` marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of ``page`` in order, with the fragment marker before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"{page.relative_to(REPO)}:{i + 1}: unclosed ```python block"
            before = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
            marker = MARKER.fullmatch(before)
            why = None if marker is None else (marker["why"] or "")
            code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            blocks.append(Block(page, i + 1, code, why))
            i = end
        i += 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in python_blocks(page)]
RUNNABLE_PAGES = sorted({b.page for b in ALL_BLOCKS if b.fragment is None})


def _run(block: Block, cwd: Path, env: dict[str, str]) -> None:
    script = cwd / f"snippet_{block.page.stem}_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, script.name],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"the snippet at {block.where} fails when run as a script (exit {proc.returncode}):\n"
        f"{block.code}\n--- stderr (end) ---\n{proc.stderr[-3000:]}"
    )


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_snippet_runs_as_a_script(page: Path, tmp_path: Path, fake_hub) -> None:
    """Each unmarked block of the page runs, in page order (a later block may use what an
    earlier one saved or pushed), in its own process."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "recipes").symlink_to(REPO / "recipes")
    env = dict(os.environ)  # fake_hub put HF_ENDPOINT, HF_HOME, HF_HUB_CACHE here
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env["HF_TOKEN"] = "hf_docs_snippets"  # the loopback Hub only checks that one is sent
    env.setdefault("OMP_NUM_THREADS", "1")
    for block in python_blocks(page):
        if block.fragment is None:
            _run(block, cwd, env)


def test_fragments_say_why_and_compile() -> None:
    """A marked block must give its reason and be valid Python; few blocks may be marked."""
    fragments = [b for b in ALL_BLOCKS if b.fragment is not None]
    for block in fragments:
        assert block.fragment.strip(), f"{block.where}: write <!-- fragment: <why> -->"
        compile(block.code, block.where, "exec")
    assert len(fragments) <= len(ALL_BLOCKS) // 3, [b.where for b in fragments]


def test_the_evaluation_snippet_starts_workers_under_the_main_guard() -> None:
    """Item 13: spawned workers import the script again; without the guard they re-run it."""
    (block,) = [b for b in ALL_BLOCKS if "evaluate(" in b.code and "jobs=" in b.code]
    tree = ast.parse(block.code)
    guarded = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
    ]
    assert guarded and "evaluate(" in ast.unparse(guarded[0]), block.where
    assert block.fragment is None


def _lines_matching(pattern: re.Pattern[str], files: list[Path]) -> list[str]:
    """Every line of ``files`` that ``pattern`` finds something in, as ``path:line: text``."""
    return [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]


# ----------------------------------------------------------------- item 11: which checkpoint
_DOC_FILES = [
    *PAGES,
    *sorted((REPO / "flatl2o").rglob("*.py")),
]
_BEST_CLAIM = re.compile(
    r"best (shipped|pretrained) (checkpoint|rule)|\(default: best\)|the best checkpoint", re.I
)


def test_no_checkpoint_is_called_the_best(capsys: pytest.CaptureFixture[str]) -> None:
    """No measured figure makes one shipped checkpoint the best, so no text may say so."""
    found = _lines_matching(_BEST_CLAIM, _DOC_FILES)
    assert not found, found
    from flatl2o.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    assert not _BEST_CLAIM.search(" ".join(capsys.readouterr().out.split()))


_NAMED = re.compile(
    r"""(?:from_pretrained\((?:[^()]|\([^()]*\))*?|load_rule\()["']([\w./-]+)["']"""
)


def test_the_docs_recommend_the_default_checkpoint() -> None:
    """README, quickstart and the package docstring name one checkpoint: the default."""
    shipped = set(list_pretrained())
    assert DEFAULT_PRETRAINED in shipped
    texts = {
        "README.md": (REPO / "README.md").read_text(encoding="utf-8"),
        "docs/quickstart.md": (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8"),
        "flatl2o.__doc__": flatl2o.__doc__ or "",
    }
    for where, text in texts.items():
        named = {m for m in _NAMED.findall(text) if m in shipped}
        assert named == {DEFAULT_PRETRAINED}, (where, named)


def _mean_test_accuracy_over_cells() -> dict[str, float]:
    """Mean over the (task, horizon) cells of the mean over seeds, from the results JSON."""
    data = json.loads((REPO / "docs" / "results" / "eval.json").read_text(encoding="utf-8"))
    cells: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in data["runs"]:
        spec = run["spec"]
        if spec["purpose"] == "eval":
            for horizon, metrics in run["metrics"].items():
                cells[(spec["optimizer"], spec["task"], horizon)].append(metrics["test_accuracy"])
    per_optimizer: dict[str, list[float]] = defaultdict(list)
    for (name, _, _), values in cells.items():
        per_optimizer[name].append(statistics.fmean(values))
    return {name: statistics.fmean(v) for name, v in per_optimizer.items()}


def test_which_checkpoint_quotes_the_results() -> None:
    """Every "`name` 0.xyz" of the quickstart's "Which checkpoint" is the results' figure, and
    the default is within 0.002 of the best shipped checkpoint on it."""
    text = (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8")
    section = text.split("## Which checkpoint", 1)[1].split("\n## ", 1)[0]
    assert f"`{DEFAULT_PRETRAINED}`" in section
    means = _mean_test_accuracy_over_cells()
    quoted = re.findall(r"`([\w-]+)` (0\.\d{3})\b", section)
    assert len(quoted) >= len(list_pretrained()), quoted
    for name, value in quoted:
        assert f"{means[name]:.3f}" == value, (name, value, means[name])
    learned = {name: means[name] for name in list_pretrained()}
    assert learned[DEFAULT_PRETRAINED] >= max(learned.values()) - 0.002, learned


# ----------------------------------------------------------------- item 12: docs stand alone
_OUTSIDE = re.compile(
    r"shared/spec|\.\./shared|method spec|\bspec (§|section)|\bthe spec('s| \()", re.I
)


def test_docs_and_docstrings_cite_nothing_outside_the_repository() -> None:
    files = [
        *(p for p in PAGES if p not in GENERATED),
        *sorted((REPO / "flatl2o").rglob("*.py")),
        *sorted((REPO / "benchmarks").rglob("*.py")),
        *sorted((REPO / "research").rglob("*.py")),
        *(p for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name),
    ]
    found = _lines_matching(_OUTSIDE, files)
    assert not found, found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = defaultdict(int)
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            slug = _slug(m[1])
            anchors.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return anchors


def test_every_relative_link_resolves() -> None:
    """Links between the pages (and to files) point at files and headings that exist."""
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_method_page_states_the_codes_constants() -> None:
    """docs/method.md describes what the code does: rule sizes, defaults, regularizer options
    and the shipped recipes' settings."""
    from flatl2o.meta.recipe import load_recipe
    from flatl2o.meta.regularizers import REGULARIZERS
    from flatl2o.rules import DMConfig, RNNpropConfig, make_rule

    text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    dm, rnnprop = DMConfig(), RNNpropConfig()
    assert f"`k = {dm.k:g}`" in text and f"`output_scale = {dm.output_scale:g}`" in text
    assert f"`beta1 = beta2 = {rnnprop.beta1:g}`" in text and rnnprop.beta1 == rnnprop.beta2
    assert (
        float(re.search(r"x2 = g / \(sqrt\(v_hat\) \+ eps\),  eps = (\S+)", text)[1]) == rnnprop.eps
    )
    for arch in ("l2o-dm", "rnnprop"):
        rule = make_rule(arch)
        assert f"{rule.state_floats_per_coordinate()} floats" in text, arch
        assert f"{sum(p.numel() for p in rule.parameters()):,} weights" in text, arch
    for name, fn in REGULARIZERS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "generator"
        }
        documented = re.findall(r"`(\w+)` \(([^)]+)\)", row.rsplit("|", 2)[1])
        assert {k: float(v) for k, v in documented} == defaults, (name, documented)
    recipes = [load_recipe(p) for p in sorted((REPO / "recipes").glob("*.toml"))]
    shared = {
        "trajectory": {r.train.trajectory for r in recipes},
        "unroll": {r.train.unroll for r in recipes},
        "imitation_prob": {r.train.imitation_prob for r in recipes},
        "validate_every": {r.curriculum.validate_every for r in recipes},
        "validation_runs": {r.curriculum.validation_runs for r in recipes},
        "iterations": {r.train.iterations for r in recipes},
    }
    assert all(len(v) == 1 for v in shared.values()), shared
    value = {k: f"{next(iter(v)):g}" for k, v in shared.items()}
    assert f"`trajectory` steps ({value['trajectory']})" in text
    assert f"`unroll` steps ({value['unroll']})" in text
    assert f"`imitation_prob` ({value['imitation_prob']})" in text
    assert f"`validate_every` trajectories ({value['validate_every']})" in text
    assert f"`validation_runs` ({value['validation_runs']})" in text
    assert f"run {value['iterations']} trajectories" in text
    assert {r.train.meta_lr for r in recipes} == {1e-3}  # "learning rate 1e-3"
    assert {r.train.grad_clip for r in recipes} == {1.0}  # "clipped to norm 1.0"


# ----------------------------------------------------------------- item 14: the set-up commands
DEMO_COMMAND = 'pip install "torch==2.13.0" -e ".[demo]" && python -m flatl2o demo'
TEST_COMMAND = 'pip install "torch==2.13.0" -e ".[dev]" && python -m pytest'
#: What the developer stack adds and the optimizer and its demo must not need.
DEV_ONLY = ("triton", "transformers", "accelerate", "lightning", "pytest", "ruff")


def _extras() -> dict[str, list[str]]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _resolve(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """The distribution names an extra installs (self-references expanded)."""
    names: set[str] = set()
    for req in extras[extra]:
        name = re.match(r"[A-Za-z0-9_.-]+", req)[0].lower()
        if name == "flatl2o":
            for sub in re.search(r"\[(.*)\]", req)[1].split(","):
                names |= _resolve(sub.strip(), extras)
        else:
            names.add(name)
    return names


def test_the_readme_set_up_is_two_commands_and_ci_runs_the_second() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, re.S)[1]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert commands == [DEMO_COMMAND, TEST_COMMAND]
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert TEST_COMMAND in ci


def test_the_demo_extra_is_the_demo_s_needs_and_no_developer_stack() -> None:
    extras = _extras()
    demo = _resolve("demo", extras)
    assert {"mlxtend", "scikit-learn", "matplotlib"} <= demo
    assert not demo & set(DEV_ONLY), demo & set(DEV_ONLY)
    assert demo <= _resolve("dev", extras)  # the test install is a superset


def test_the_version_is_declared_once() -> None:
    """pyproject.toml declares no version of its own: the build reads ``flatl2o/_version.py``
    (hatch's version source), the one place the package, its checkpoints and the Hub client
    read it from, so a release bumps one line."""
    with open(REPO / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    source = REPO / pyproject["tool"]["hatch"]["version"]["path"]
    assert source == Path(flatl2o._version.__file__)
    # hatch's default pattern for a version file
    found = re.findall(r"""(?m)^__version__ *= *(['"])v?(.+?)\1""", source.read_text("utf-8"))
    assert [version for _, version in found] == [flatl2o.__version__]


def test_the_demo_runs_without_the_developer_stack(tmp_path: Path) -> None:
    """``flatl2o demo`` with every dev-only package made unimportable (as in the first
    command's install)."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({DEV_ONLY!r}))\n"
        "from flatl2o.cli import main\n"
        "sys.exit(main(['demo', '--steps', '3']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert DEFAULT_PRETRAINED in proc.stdout


# ----------------------------------------------------------------- docs/api.md against the code
API_PAGE = REPO / "docs" / "api.md"


def _api_object(dotted: str) -> object:
    """The object a dotted name of the page names: the longest importable module prefix, then
    attributes (``flatl2o.L2O.from_pretrained``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _page_parameters(signature: str) -> list[str] | None:
    """Parameter names of a signature as the page writes it (``f(a, b=1, *, c=None) -> T``),
    ``*args``/``**kwargs`` as written; ``None`` when it is not a call signature."""
    text = " ".join(signature.split())
    if re.match(r"[\w.]+\(", text) is None:
        return None
    names, depth, current = [], 0, ""
    for char in text[text.index("(") + 1 :]:
        depth += char in "([{"
        depth -= char in ")]}"
        if depth < 0:  # the closing parenthesis: what follows is the return type
            break
        if char == "," and depth == 0:
            name = current.strip().split("=")[0].split(":")[0].strip()
            if name and name != "*" and name != "...":
                names.append(name)
            current = ""
        else:
            current += char
    name = current.strip().split("=")[0].split(":")[0].strip()
    return [*names, name] if name and name not in {"*", "..."} else names


def _code_parameters(obj: object) -> list[str]:
    """Parameter names of ``obj``'s signature, ``*args``/``**kwargs`` marked as on the page."""
    star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        star.get(p.kind, "") + name
        for name, p in inspect.signature(obj).parameters.items()
        if name not in {"self", "cls"}
    ]


def _api_entries() -> list[tuple[str, str, str | None]]:
    """(where, dotted name, signature as written or None) for every entry of the page: each
    ``flatl2o.x.y`` it mentions, each top-level bullet ``- `name...` `` under a module's
    heading, and each heading's signature block."""
    text = API_PAGE.read_text(encoding="utf-8")
    entries = [(m, m, None) for m in sorted(set(re.findall(r"\bflatl2o(?:\.[A-Za-z_]\w*)+", text)))]
    module = heading = None
    for match in re.finditer(r"(?m)^(#{2,4} .*|- `[^`]*`|```\n[^`]*?```)", text):
        item = match[1]
        line = text.count("\n", 0, match.start()) + 1
        if item.startswith("#"):
            named = re.fullmatch(r"#+ `(flatl2o[\w.]*)(?:\(.*)?`(?: .*)?", item)
            heading = named[1] if named else None
            module = heading if heading and inspect.ismodule(_api_object(heading)) else None
        elif item.startswith("```") and heading and module is None:
            entries.append((f"api.md:{line}", heading, item.strip("`\n")))
            heading = None
        elif item.startswith("- `") and module:
            span = item[3:-1]
            name = re.match(r"[A-Za-z_]\w*(?![\w./:])", span)
            if name is not None:
                entries.append((f"api.md:{line}", f"{module}.{name[0]}", span))
    return entries


def test_every_name_on_the_api_page_exists_with_the_signature_it_shows() -> None:
    """docs/api.md is checked against the code: every name it lists exists, is documented
    (a docstring) and, where the page shows a signature, takes the parameters it shows."""
    problems = []
    for where, dotted, signature in _api_entries():
        try:
            obj = _api_object(dotted)
        except (ImportError, AttributeError) as e:
            problems.append(f"{where}: {dotted} does not exist ({e})")
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
            problems.append(f"{where}: {dotted} has no docstring")
        shown = _page_parameters(signature) if signature else None
        if shown is not None and callable(obj) and shown != _code_parameters(obj):
            problems.append(f"{where}: {dotted} shows {shown}, takes {_code_parameters(obj)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", ["flatl2o", "flatl2o.hub"])
def test_every_public_name_is_on_the_api_page(module: str) -> None:
    """Each name of ``flatl2o.__all__`` and ``flatl2o.hub.__all__`` is described on the page."""
    text = API_PAGE.read_text(encoding="utf-8")
    names = importlib.import_module(module).__all__
    missing = [n for n in names if not re.search(rf"(`|\.){re.escape(n)}\b", text)]
    assert not missing, f"docs/api.md does not describe {module}.{missing}"
