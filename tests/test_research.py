"""The study code outside the package (research/): the results page answers its questions from
the numbers and re-renders the committed docs/results.md; the statistics it rests on."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import pytest

from flatl2o.evaluation.stats import flatness_points, paired
from research.results_page import main, render_results_page, spearman

REPO = Path(__file__).resolve().parents[1]


def _synthetic(reg_acc: list[float], sib_acc: list[float]) -> dict:
    runs = []
    for name, accs, trace in (("r-hessian", reg_acc, 5.0), ("r", sib_acc, 9.0)):
        for s, acc in enumerate(accs):
            m = {
                "train_loss": 0.1,
                "test_loss": 0.3,
                "test_accuracy": acc,
                "gap": 0.2,
                "train_accuracy": 0.99,
                "hessian_trace": trace + 0.01 * s,
                "hessian_top_eig": 1.0,
            }
            runs.append(
                {
                    "spec": {
                        "task": "t",
                        "optimizer": name,
                        "seed": s,
                        "horizons": [10],
                        "hparams": {"lr": 1.0},
                    },
                    "metrics": {"10": m},
                    "curve": [1.0, 0.5],
                    "curve_every": 1,
                    "diverged_at": None,
                }
            )
    learned = dict(
        kind="learned", description="", architecture="rnnprop", alpha=0.1, sibling_basis="recipe"
    )
    return {
        "format": "flatl2o-evaluation/1",
        "config": {
            "tasks": ["t"],
            "horizons": [10],
            "seeds": len(reg_acc),
            "batch_size": 8,
            "tune_seeds": 1,
            "trace_probes": 3,
            "eig_iters": 3,
            "flatness": {},
            "long_horizon": 0,
            "long_tasks": [],
            "long_seeds": 1,
        },
        "tasks": {"t": {"num_params": 10, "seen": True, "description": "toy"}},
        "optimizers": {
            "r-hessian": {
                **learned,
                "name": "r-hessian",
                "regularizer": "hessian-trace",
                "sibling": "r",
            },
            "r": {**learned, "name": "r", "regularizer": "none", "alpha": 0.0, "sibling": None},
        },
        "runs": runs,
    }


def test_report_answers_are_computed_from_the_numbers():
    good = render_results_page(
        _synthetic([0.90, 0.91, 0.92, 0.905, 0.915], [0.85, 0.86, 0.87, 0.855, 0.865])
    )
    assert "The claim (regularized beats unregularized) is supported for this pair." in good
    bad = render_results_page(
        _synthetic([0.85, 0.86, 0.87, 0.855, 0.865], [0.90, 0.91, 0.92, 0.905, 0.915])
    )
    assert "**The claim is not supported for this pair.**" in bad
    noisy = render_results_page(
        _synthetic([0.90, 0.80, 0.92, 0.82, 0.91], [0.85, 0.88, 0.83, 0.90, 0.84])
    )
    assert "within seed noise in 1" in noisy and "not supported" in noisy
    assert "flatter (lower trace) beyond seed noise in 1 of 1" in good
    # a "win" over a sibling that does not train is no evidence for the regularizer
    hollow = render_results_page(
        _synthetic([0.90, 0.91, 0.92, 0.905, 0.915], [0.05, 0.06, 0.07, 0.055, 0.065])
    )
    assert "**Does not train**" in hollow and "`r` (`t`@10)" in hollow
    assert "1 of the wins are cells where `r` does not train" in hollow
    assert "**The claim is not supported for this pair.**" in hollow


def _set(data: dict, opt: str, **metrics: object) -> dict:
    """Set metrics of ``opt``'s runs: ``name=value`` for every seed or ``name={seed: value}``."""
    for r in data["runs"]:
        if r["spec"]["optimizer"] == opt:
            for name, value in metrics.items():
                v = value.get(r["spec"]["seed"]) if isinstance(value, dict) else value
                if v is not None:
                    r["metrics"]["10"][name] = v
    return data


def _row(page: str, start: str) -> str:
    (row,) = [line for line in page.splitlines() if line.startswith(start)]
    return row


def test_best_baseline_is_chosen_on_validation_not_test():
    """docs/method.md §5: select on the validation split, report test. `adam` tests better but
    `sgd`'s selected hyper-parameters validated better, so `sgd` is the reference."""
    data = _synthetic([0.90, 0.91, 0.92, 0.905, 0.915], [0.85, 0.86, 0.87, 0.855, 0.865])
    data["tuning"] = {"t": {}}
    for name, test_acc, val_acc in (("adam", 0.95, 0.80), ("sgd", 0.88, 0.90)):
        data["optimizers"][name] = {"name": name, "kind": "baseline", "description": name}
        data["tuning"]["t"][name] = {
            "selected": {"10": {"lr": 0.1}},
            "trials": [
                {"hparams": {"lr": 0.01}, "val": {"10": {"val_accuracy": 0.99, "val_loss": 0.1}}},
                {"hparams": {"lr": 0.1}, "val": {"10": {"val_accuracy": val_acc, "val_loss": 0.3}}},
            ],
        }
        for s in range(5):
            run = json.loads(json.dumps(data["runs"][0]))
            run["spec"].update(optimizer=name, seed=s, hparams={"lr": 0.1})
            run["metrics"]["10"]["test_accuracy"] = test_acc + 0.001 * s
            data["runs"].append(run)
    page = render_results_page(data)
    row = _row(page, "| `t` (seen) | 10 | `")
    assert row.startswith("| `t` (seen) | 10 | `sgd` (0.900): 0.882 ± 0.002 |"), row
    assert "chosen on the VALIDATION split" in page
    # without validation numbers there is no reference (never a fallback to test accuracy)
    del data["tuning"]
    page = render_results_page(data)
    assert "No reference baseline for `t`@10" in page and "`adam` (" not in page


def test_paired_differences_say_when_a_seed_is_left_out():
    """A diverged seed (non-finite train loss / gap) is not dropped silently from Q1's Δs."""
    data = _synthetic([0.90, 0.91, 0.92, 0.905, 0.915], [0.85, 0.86, 0.87, 0.855, 0.865])
    _set(data, "r", train_loss={0: math.inf}, test_loss={0: math.inf}, gap={0: math.nan})
    page = render_results_page(data)
    row = _row(page, "| `r-hessian` | `r` | `t` (seen) | 10 | 0.9")
    assert row.endswith("| +0.000 (1 of 5 seeds n/a) | +0.000 (1 of 5 seeds n/a) |"), row
    assert "In 1 cell(s) a seed has a non-finite value on one side" in page
    p = paired({0: 1.0, 1: 2.0, 2: math.nan}, {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.5})
    assert p.n == 2 and p.missing == 2 and p.note() == " (2 of 4 seeds n/a)"


def test_flatness_answer_skips_stalled_rules_and_non_positive_traces():
    good = [0.90, 0.91, 0.92, 0.905, 0.915]
    # a regularized rule that does not train sits near its init: tiny curvature, not "flatter"
    stalled = _synthetic([0.10, 0.10, 0.11, 0.10, 0.09], good)
    page = render_results_page(_set(stalled, "r-hessian", hessian_trace=1e-3))
    assert "flatter (lower trace) beyond seed noise in 0 of 0 cells" in page
    assert "Not counted: `t`@10, where one of the two rules does not train" in page
    assert "(`r-hessian` does not train: not counted)" in page
    # a sibling trace of exactly 0 (saturated iterate) used to raise ZeroDivisionError
    zero = _set(_synthetic(good, good), "r", hessian_trace=0.0)
    row = _row(render_results_page(zero), "| `r-hessian` | `r` | `t` (seen) | 10 | 5.0")
    assert "| n/a | not testable (fewer than 2 paired seeds) (5 of 5 seeds left out" in row
    # a non-positive trace on one seed is left out of the log-ratio test, visibly
    neg = _set(_synthetic(good, good), "r", hessian_trace={2: -0.5})
    row = _row(render_results_page(neg), "| `r-hessian` | `r` | `t` (seen) | 10 | 5.0")
    assert "flatter, beyond seed noise (1 of 5 seeds left out: trace ≤ 0 or n/a)" in row


def test_flatness_cells_without_a_finite_trace_are_shown_not_skipped():
    """A cell whose every trace is non-finite on one side cannot answer question 3: it gets a
    row and a mention in the summary (it used to vanish, like a cell never measured); the
    Spearman row counts the runs it leaves out."""
    good = [0.90, 0.91, 0.92, 0.905, 0.915]
    data = _set(_synthetic(good, good), "r", hessian_trace=math.inf)
    page = render_results_page(data)
    row = _row(page, "| `r-hessian` | `r` | `t` (seen) | 10 | 5.0")
    assert "| n/a | n/a | not testable (no finite trace on one side) |" in row, row
    assert "in 0 of 0 cells" in page and "**No cell can answer the question.**" in page
    assert "No finite trace on one side in `t`@10" in page
    assert "| `t` | 10 | 5 | 5 | +0.50 |" in page.splitlines()
    # the scatter figure (log axis) counts what it cannot show
    assert flatness_points(data, "t", "r", 10) == ([], 5)
    assert len(flatness_points(data, "t", "r-hessian", 10)[0]) == 5
    # a horizon the suite did not measure (no readout at all) stays out of the table
    q3_row = "| `r-hessian` | `r` | `t` (seen) | 10 | 5.0"
    assert q3_row in page
    for r in data["runs"]:
        for k in [k for k in r["metrics"]["10"] if k.startswith("hessian")]:
            del r["metrics"]["10"][k]
    page = render_results_page(data)
    assert q3_row not in page and "not testable (no finite trace" not in page
    assert flatness_points(data, "t", "r", 10) == ([], 0)  # not measured: nothing omitted
    assert "No finite trace" not in page and "Spearman rank correlation" not in page


def test_top_eigenvalue_is_absolute_and_only_where_power_iteration_converged():
    data = _synthetic([0.90, 0.91, 0.92, 0.905, 0.915], [0.85, 0.86, 0.87, 0.855, 0.865])
    _set(data, "r", hessian_top_eig={0: -4.0, 1: 2.0, 2: 2.0, 3: 2.0, 4: 2.0})
    _set(data, "r", hessian_top_eig_residual={0: 0.01, 1: 0.01, 2: 0.01, 3: 0.01, 4: 5.0})
    page = render_results_page(data)
    # |-4|, 2, 2, 2 (seed 4's residual 5.0 > 0.1: unconverged): mean 2.5, one left out
    assert "| 2.5 ± 1 (1 unconverged) |" in _row(
        page, "| `r-hessian` | `r` | `t` (seen) | 10 | 5.0"
    )
    assert "\\|λ_max\\|" in page and "exceeds 0.1 did not converge" in page


def test_paired_comparison_statistics():
    p = paired({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.85, 1: 0.75, 2: 0.65})
    assert p.mean == pytest.approx(0.05) and p.std == pytest.approx(0.0, abs=1e-12)
    assert p.significant
    q = paired({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, {0: 0.0, 1: 2.5, 2: 2.0, 3: 4.5})
    # differences 1, -0.5, 1, -0.5: mean 0.25, sd 0.866 -> t = 0.577, not significant
    assert q.mean == pytest.approx(0.25) and q.t == pytest.approx(0.57735, rel=1e-4)
    assert not q.significant and q.verdict() == "within seed noise"


def test_paired_t_test_uses_the_t_distribution_beyond_30_seeds():
    """The hand-written table fell back to 1.96 beyond 30 degrees of freedom: 40 differences
    with t = 2.0 were "beyond seed noise" although t(39) at 95% is 2.023."""
    d = [1.0 if i % 2 else -1.0 for i in range(40)]
    base = {s: 0.0 for s in range(40)}
    shift = 2.0 * (math.sqrt(40 / 39) / math.sqrt(40))  # mean that gives t = 2.0 exactly
    p = paired({s: d[s] + shift for s in range(40)}, base)
    assert p.t == pytest.approx(2.0) and not p.significant
    assert paired({s: d[s] + 1.1 * shift for s in range(40)}, base).significant


def test_spearman_is_scipys_with_ties_and_undefined_cases():
    assert spearman([1.0, 2.0, 2.0, 3.0], [4.0, 3.0, 3.0, 1.0]) == pytest.approx(-1.0)
    assert spearman([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))  # fewer than 3 points
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant side


def test_the_committed_results_page_re_renders_from_its_json(tmp_path, monkeypatch):
    """docs/results.md (and docs/results/report.md) are exactly what the command written at the
    page's top renders from docs/results/eval.json, run from the repository root."""
    page = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    (command,) = [
        line.split("`")[1] for line in page.splitlines() if line.startswith("Regenerate this page")
    ]
    script, *args = shlex.split(command)[1:]
    assert (script, args) == (
        "research/results_page.py",
        ["docs/results/eval.json", "--out", "docs/results", "--docs", "docs/results.md"],
    )
    (tmp_path / "docs" / "results").mkdir(parents=True)
    shutil.copy(REPO / "docs" / "results" / "eval.json", tmp_path / "docs" / "results")
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    for name in ("results.md", "results/report.md"):
        assert (tmp_path / "docs" / name).read_bytes() == (REPO / "docs" / name).read_bytes()
