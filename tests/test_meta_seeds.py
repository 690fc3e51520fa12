"""benchmarks/meta_seeds.py: which recipe pairs a sibling study accepts, what it reports across
meta-seeds, and that the committed results still redraw from their JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from benchmarks.meta_seeds import Siblings, analyse_siblings, main, markdown

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "benchmarks" / "recipes" / "normprop-wide-plain.toml"
HESSIAN = ROOT / "benchmarks" / "recipes" / "normprop-wide-hessian.toml"


def test_the_wide_normprop_recipes_are_siblings_and_run_with_their_own_regularizer_rng():
    sib = Siblings.load(str(PLAIN), str(HESSIAN))
    assert (sib.plain, sib.regularized) == (
        "benchmarks/recipes/normprop-wide-plain.toml",
        "benchmarks/recipes/normprop-wide-hessian.toml",
    )
    assert sib.file_rng == "minibatch"  # the file sets none; the study forces "own"
    runs = sib.runs([0, 1])
    assert [(name, m, extra) for _, name, m, extra in runs] == [
        ("normprop-wide-plain-m0", 0, []),
        ("normprop-wide-hessian-own-m0", 0, ['regularizer.rng="own"']),
        ("normprop-wide-plain-m1", 1, []),
        ("normprop-wide-hessian-own-m1", 1, ['regularizer.rng="own"']),
    ]


def test_recipes_that_differ_outside_the_regularizer_are_refused_naming_the_keys(tmp_path):
    text = HESSIAN.read_text(encoding="utf-8")
    other = tmp_path / "other.toml"
    other.write_text(
        text.replace("iterations = 160", "iterations = 80").replace(
            "meta_lr = 0.001", "meta_lr = 0.002"
        ),
        encoding="utf-8",
    )
    with pytest.raises(
        ValueError,
        match=r"outside \[regularizer\] in train\.iterations, "
        r"train\.meta_lr;",
    ):
        Siblings.load(str(PLAIN), str(other))


def test_the_plain_recipe_comes_first_and_the_regularized_one_second():
    with pytest.raises(ValueError, match="is regularized"):
        Siblings.load(str(HESSIAN), str(PLAIN))
    with pytest.raises(ValueError, match="has no regularizer"):
        Siblings.load(str(PLAIN), str(PLAIN))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipes", str(PLAIN), str(HESSIAN), "--rng", "own"], "--recipes takes no --rng"),
        (["--recipes", str(PLAIN), str(HESSIAN), "--suite", "mnist"], "--suite realistic"),
        (["--rule", "dm", "--seeds", "3"], "--seeds is for --recipes"),
        (["--recipes", str(HESSIAN), str(PLAIN)], "is regularized"),
        (
            ["--recipes", str(PLAIN), str(HESSIAN), "--horizons", "1000", "2000"],
            "has no tuned AdamW for lm at 2000 steps (it has 1000, 5000); pick --horizons",
        ),
    ],
)
def test_the_cli_refuses_mixed_studies_before_training_anything(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--root", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing meta-trained


def _measured(values: dict) -> dict:
    """Per-seed run records shaped as ``normprop_candidates.measure`` returns them, from
    ``{(workload, arm): [(metric, train loss, param norm) per seed]}`` (a NaN metric: diverged)."""
    cells: dict = {}
    for (w, arm), runs in values.items():
        metric = "test_loss" if w == "regression" else "test_accuracy"
        cells.setdefault(w, {})[arm] = {
            "1000": {
                str(s): {metric: v, "train_loss": tl, "param_norm": pn, "diverged": v != v}
                for s, (v, tl, pn) in enumerate(runs)
            }
        }
    return {"cells": cells, "adam_checks": []}


def test_the_sibling_analysis_pairs_by_meta_seed_and_knows_which_direction_is_better():
    sib = Siblings("p.toml", "r.toml", "p", "r")
    plain = {0: [0.50, 0.52, 0.54], 1: [0.60, 0.61, 0.65], 2: [0.40, 0.43, 0.44]}
    shift = {0: -0.10, 1: -0.05, 2: -0.02}  # the regularized rule's test loss, lower each time
    values = {("regression", "adam"): [(0.55, 0.1, 9.0)] * 3}
    values[("regression", "adamw")] = [(0.38, 0.3, 7.0)] * 3
    for m in plain:
        values[("regression", sib.name(False, m))] = [(v, 0.05, 12.0) for v in plain[m]]
        values[("regression", sib.name(True, m))] = [(v + shift[m], 0.2, 8.0) for v in plain[m]]
        # on a classifier a higher accuracy is better: the same shift is worse there
        values[("cnn", sib.name(False, m))] = [(0.98, 0.01, 20.0)] * 3
        values[("cnn", sib.name(True, m))] = [(0.98 + shift[m], 0.02, 19.0)] * 3
    values[("cnn", "adam")] = values[("cnn", "adamw")] = [(0.99, 0.01, 13.0)] * 3
    values[("cnn", sib.name(True, 2))][2] = (math.nan,) * 3  # a diverged run: left out
    result = {
        "recipes": vars(sib),
        "meta_seeds": [0, 1, 2],
        "metric": {"regression": "test_loss", "cnn": "test_accuracy"},
        "measured": _measured(values),
    }
    cells = {c["workload"]: c for c in analyse_siblings(result)["cells"]}
    reg = cells["regression"]
    assert [p["d"] for p in reg["per_meta_seed"]] == pytest.approx([-0.10, -0.05, -0.02])
    assert (reg["better"], reg["worse"]) == (3, 0)
    assert (cells["cnn"]["better"], cells["cnn"]["worse"]) == (0, 3)
    assert [(p["seeds"], p["diverged"]) for p in cells["cnn"]["per_meta_seed"]] == [
        (3, 0),
        (3, 0),
        (2, 1),
    ]
    ds = [-0.10, -0.05, -0.02]
    t = stats.ttest_1samp(ds, 0.0)
    assert reg["across"]["mean"] == pytest.approx(sum(ds) / 3)
    assert reg["across"]["t"] == pytest.approx(t.statistic)
    assert reg["across"]["p"] == pytest.approx(t.pvalue)
    means = [sum(v) / 3 for v in plain.values()]
    assert reg["plain"]["std"] == pytest.approx(stats.tstd(means))
    assert reg["d_param_norm"]["mean"] == pytest.approx(-4.0)
    assert reg["smaller_param_norm"] == 3
    assert reg["d_train_loss"]["mean"] == pytest.approx(0.15)
    assert reg["plain_vs_adamw"]["mean"] == pytest.approx(sum(means) / 3 - 0.38)
    assert reg["plain_vs_adamw_better"] == 0
    assert reg["regularized_vs_adam_better"] == 2  # at meta-seed 1 its mean is above Adam's
    # the report renders from the JSON alone
    result.update(
        command="python benchmarks/meta_seeds.py --recipes p.toml r.toml",
        quick=False,
        eval_seeds=3,
        tuned="docs/realistic/eval.json",
        git="abc",
        torch="x",
        meta_train_seconds=60.0,
        meta_train_runs=6,
        meta_train_reused=0,
        eval_seconds=60.0,
        total_seconds=120.0,
        analysis=analyse_siblings(result),
    )
    page = markdown(json.loads(json.dumps(result)))
    assert "| `regression` | 1000 | test loss | -0.1000* | -0.0500* | -0.0200* |" in page
    assert "3 / 0 of 3" in page and "0 / 3 of 3" in page
    assert "-0.0200* (1 diverged, 1 seeds n/a) |" in page
    assert math.isfinite(reg["across"]["p"]) and f"p = {t.pvalue:.3f}" in page


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("meta_seeds*.json")))
def test_the_committed_meta_seed_results_redraw_from_their_json(path):
    result = json.loads(path.read_text(encoding="utf-8"))
    assert markdown(result) == path.with_suffix(".md").read_text(encoding="utf-8")
