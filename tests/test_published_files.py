"""Files that ship to users carry no build-machine path and link to no address that does not
exist (issue 19); the shipped model cards are exactly what the package's renderer writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import flatl2o
from flatl2o.checkpoint import MODEL_CARD_NAME
from flatl2o.hub import checkpoint_location, portable_command, portable_path, render_model_card

ROOT = Path(__file__).resolve().parents[1]

#: Absolute folders of a build machine: home folders, temporary and work folders, on Linux,
#: macOS and Windows. Written without their leading separator so that this file, which is
#: tracked too, does not match itself.
_MACHINE_PATH = re.compile(
    r"(?<![\w.~/-])/(?:root|home/[\w.-]+|tmp|var/tmp|var/folders|private/(?:tmp|var)"
    r"|work|Users/[\w.-]+)(?![\w.-])"
    r"|\b[A-Za-z]:[\\/]+Users[\\/]"
)


def machine_paths(text: str, extra: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """(line number, line) of every line of ``text`` that names a build machine's folder:
    one of :data:`_MACHINE_PATH`, or one of the ``extra`` absolute folders."""
    folders = [re.compile(rf"(?<![\w.~/-]){re.escape(f)}(?![\w.-])") for f in extra]
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if _MACHINE_PATH.search(line) or any(folder.search(line) for folder in folders):
            found.append((number, line.strip()[:200]))
    return found


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to scan")
    return [ROOT / name for name in out.decode().split("\0") if name]


def _this_machine() -> tuple[str, ...]:
    """This machine's checkout, home and temporary folders (when not the file-system root)."""
    folders = {str(ROOT), str(Path.home()), tempfile.gettempdir()}
    return tuple(sorted(f for f in folders if f.strip("/\\") and len(f) > 3))


def test_no_tracked_file_holds_a_build_machine_path():
    """Cards, results JSON, docs and benchmark results held absolute paths of the machine
    that built them (e.g. ``--out <checkout>/runs/NAME``); a user cannot run or open them."""
    offenders = []
    for path in _tracked_files():
        if not path.is_file():
            continue  # deleted in the work tree
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (weights, PNGs)
        text = data.decode("utf-8", errors="replace")
        for number, line in machine_paths(text, _this_machine()):
            offenders.append(f"{path.relative_to(ROOT)}:{number}: {line}")
    assert not offenders, "absolute paths of a build machine in tracked files:\n" + "\n".join(
        offenders
    )


# "@" stands for "/" and "^" for "\\" in these lines, so that this tracked file passes the scan
@pytest.mark.parametrize(
    "line, flagged",
    [
        ("- Command: `flatl2o meta-train --out @work@main@runs@dm --threads 1`", True),
        ('   "path": "@work@main@pretrained@dm",', True),
        ("python benchmarks@hessian_variants.py --keep @tmp@hv_runs", True),
        ("flatl2o evaluate --quick --out @tmp@eval-quick", True),
        ("cache in @home@alice@.cache@huggingface", True),
        ("@root@.cache@huggingface@hub", True),
        ("@Users@bob@runs and @var@folders@xy@T@tmp1", True),
        ("C:^Users^carol^runs", True),
        ("- Command: `flatl2o meta-train --out runs@dm --export pretrained@dm`", False),
        ("see https:@@example.org@tmp@work@home@x and docs@tmp@x", False),
        ("~@runs@dm and .@tmp@x", False),
    ],
)
def test_the_scan_flags_machine_paths_only(line, flagged):
    line = line.replace("@", "/").replace("^", "\\")
    assert bool(machine_paths(line)) is flagged


@pytest.mark.parametrize("name", flatl2o.list_pretrained())
def test_shipped_model_cards_are_what_the_renderer_writes(name):
    """A shipped card is rendered by the package's own code from the folder's files (so it
    has today's layout, portable commands and the same numbers as metrics.json)."""
    from flatl2o.meta.trainer import render_checkpoint_card

    folder = flatl2o.hub._shipped_dir(name)
    card = (folder / MODEL_CARD_NAME).read_text(encoding="utf-8")
    assert render_checkpoint_card(folder) == card
    assert f'L2O.from_pretrained(model.parameters(), "{name}")' in card


@pytest.mark.parametrize("name", flatl2o.list_pretrained())
def test_shipped_model_cards_show_the_results_pages_numbers(name):
    """A shipped card's metrics are the results page's runs of the same rule on its seen task
    (docs/results/eval.json), summarized the same way: one loop and one mean ± std behind
    both. They disagreed (e.g. rnnprop-entropy at 1,000 steps: 0.8944 ± 0.0057 on the card,
    0.8950 ± 0.0062 on the page): the card came from a second loop and a population std."""
    from flatl2o.evaluation.suite import load_results
    from flatl2o.meta.optimizee import mean_std
    from flatl2o.meta.recipe import load_recipe

    folder = flatl2o.hub._shipped_dir(name)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    recipe = load_recipe(folder / "recipe.toml")
    data = load_results(ROOT / "docs" / "results")
    info = data["optimizers"].get(name)
    if info is None or info["fingerprint"] != flatl2o.load_rule(folder).fingerprint():
        pytest.skip(f"the results page does not hold the shipped {name}")
    config = data["config"]
    assert recipe.task.name in config["tasks"] and recipe.task.batch_size == config["batch_size"]
    assert recipe.evaluation.seeds == config["seeds"]
    assert set(recipe.evaluation.horizons) <= {int(h) for h in config["horizons"]}
    runs = [
        r
        for r in data["runs"]
        if r["spec"]["task"] == recipe.task.name and r["spec"]["optimizer"] == name
    ]
    assert sorted(r["spec"]["seed"] for r in runs) == list(range(recipe.evaluation.seeds))
    for h in recipe.evaluation.horizons:
        assert all(r["diverged_at"] is None or r["diverged_at"] > h for r in runs)
        for key in ("test_accuracy", "test_loss", "train_loss"):
            page = mean_std([r["metrics"][str(h)][key] for r in runs])
            assert (metrics[f"{key}@{h}"], metrics[f"{key}_std@{h}"]) == page, (key, h)


def test_the_readme_table_of_checkpoints_shows_their_model_cards():
    """README's "What ships" table is each card's test accuracy (mean ± std, 3 decimals) at
    100 and 1,000 steps: the same figures as metrics.json, so as the results page."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.compile(r"^\| `([\w-]+)` \|.*\| ([^|]+ ± [^|]+) \| ([^|]+ ± [^|]+) \|$", re.M)
    rows = {name: (a.strip(), b.strip()) for name, a, b in row.findall(text)}
    assert set(rows) == set(flatl2o.list_pretrained())
    for name, cells in rows.items():
        metrics = json.loads((flatl2o.hub._shipped_dir(name) / "metrics.json").read_text())
        want = tuple(
            f"{metrics[f'test_accuracy@{h}']:.3f} ± {metrics[f'test_accuracy_std@{h}']:.3f}"
            for h in (100, 1000)
        )
        assert cells == want, name


def test_model_cards_link_to_no_address():
    """Cards linked to a repository address that does not exist; they name the package."""
    rule = flatl2o.make_rule("rnnprop", hidden_size=4, input_size=3)
    card = render_model_card(rule, repo_id="alice/rule", metrics={"test_loss": 0.5})
    assert not re.search(r"\]\(\s*https?://", card), card
    assert "flatl2o" in card and "`flatl2o.L2O`" in card


def test_portable_paths(tmp_path, monkeypatch):
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    inside, home = work / "runs" / "x", tmp_path / "home" / "ckpt"
    assert portable_path(inside) == "runs/x"
    assert portable_path(work) == "."
    assert portable_path("runs/x") == "runs/x"
    assert portable_path("/elsewhere/x") == "/elsewhere/x"  # nothing portable to say
    assert portable_path(inside, root=work / "runs") == "x"
    command = f'flatl2o meta-train --out {inside} --export={home} rule.init_from="{inside}"'
    assert portable_command(command) == (
        "flatl2o meta-train --out runs/x '--export=~/ckpt' rule.init_from=runs/x"
    )
    assert portable_command("flatl2o list") == "flatl2o list"
    shipped = flatl2o.hub._shipped_dir(flatl2o.list_pretrained()[0])
    assert checkpoint_location(shipped) == shipped.name


def test_meta_training_card_records_portable_paths(tmp_path, monkeypatch):
    """A run given absolute --out / --export paths (as the shipped ones were) writes a card
    and an exported card that name them relative to the folder the command ran in."""
    from test_meta_training import tiny

    from flatl2o.meta.recipe import recipe_from_dict
    from flatl2o.meta.trainer import MetaTrainer

    monkeypatch.chdir(tmp_path)
    out, export = tmp_path / "runs" / "tiny", tmp_path / "exported" / "tiny"
    command = f"flatl2o meta-train --recipe recipes/tiny.toml --out {out} --export {export}"
    recipe = recipe_from_dict(tiny(train={"iterations": 2}))
    trainer = MetaTrainer(recipe, out, progress=False, command=command)
    trainer.run()
    trainer.export(export)
    for folder, load in ((out, "runs/tiny"), (export, "exported/tiny")):
        card = (folder / MODEL_CARD_NAME).read_text()
        assert str(tmp_path) not in card, card
        assert "--out runs/tiny --export exported/tiny`" in card
        assert f"L2O.from_pretrained(model.parameters(), {json.dumps(load)})" in card


def test_results_json_names_checkpoints_portably(tmp_path, monkeypatch):
    """The results JSON recorded every learned rule's folder as an absolute path."""
    from flatl2o.evaluation.optimizers import resolve_optimizers
    from flatl2o.evaluation.suite import _published_info, _published_run

    name = flatl2o.list_pretrained()[0]
    info = resolve_optimizers([name])[name]
    assert Path(info.path).is_absolute()  # what the runs load from: unchanged
    assert _published_info(info.to_dict())["path"] == name
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "runs" / "mine"
    shutil.copytree(Path(info.path), own)
    info = resolve_optimizers([str(own)])["mine"]
    assert _published_info(info.to_dict())["path"] == "runs/mine"
    record = {"key": "k", "spec": {"optimizer": "mine", "checkpoint": str(own)}}
    assert _published_run(record)["spec"]["checkpoint"] == "runs/mine"
    assert _published_run({"spec": {"optimizer": "adam", "checkpoint": None}})["spec"] == {
        "optimizer": "adam",
        "checkpoint": None,
    }
