"""The ``flatl2o`` command line itself: version, help texts, argument checks, the demo."""

from __future__ import annotations

import re
import sys

import pytest

import flatl2o
from flatl2o.cli import build_parser, main, plain_text
from flatl2o.demo import verdict

COMMANDS = ["demo", "list", "meta-train", "push", "evaluate"]


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*args, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"flatl2o {flatl2o.__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_no_restructuredtext_markup(capsys, command):
    text = _help(capsys, *([command] if command else []))
    assert not re.search(r"`|:(func|class|mod|meth|data|attr):", text), text


def test_plain_text_strips_each_kind_of_markup():
    assert plain_text("``a`` :func:`b.c` :class:`~d` `e`") == "a b.c d e"


def test_every_argument_of_every_command_has_help():
    sub = next(a for a in build_parser()._actions if a.choices and "push" in a.choices)
    for name in COMMANDS:
        parser = sub.choices[name]
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}"


# ---- flatl2o demo -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [["--steps", "-5"], ["--steps", "0"], ["--seeds", "0"], ["--seed", "-1"], ["--steps", "x"]],
)
def test_demo_refuses_bad_arguments_with_a_usage_error(capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["demo", *bad])
    assert info.value.code == 2
    assert f"argument {bad[0]}" in capsys.readouterr().err


def test_demo_prints_a_verdict_and_saves_its_plot(tmp_path, capsys):
    out = tmp_path / "plots" / "demo.png"
    assert main(["demo", "--steps", "4", "--seeds", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Verdict (2 seeds, 0-1; 4 steps" in text
    for lr in ("0.01", "0.001"):
        line = next(x for x in text.splitlines() if x.startswith(f"- vs Adam (lr={lr}): "))
        assert re.search(r"train loss [\d.]+ vs [\d.]+ \(flatl2o (better|worse) by", line), line
        assert "test accuracy" in line and "Hessian trace" in line and "seed noise" in line
    assert f"saved the loss curves and flatness readout to {out.resolve()}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_without_matplotlib_says_so_in_one_line_and_skips_the_plot(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "demo.png"
    assert main(["demo", "--steps", "2", "--seeds", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert [x for x in text.splitlines() if "matplotlib" in x] == [
        "matplotlib is not installed, so no plot was saved "
        "(pip install matplotlib, or the package's demo extra)"
    ]
    assert "seed noise is not measured" in text and not out.exists()


def _runs(**metrics: list[float]) -> list[dict]:
    n = len(next(iter(metrics.values())))
    return [{k: v[i] for k, v in metrics.items()} for i in range(n)]


def test_the_verdict_reports_what_was_measured_whichever_way_it_goes():
    learned = "flatl2o (x)"
    results = {
        learned: _runs(
            train_loss=[0.52, 0.50, 0.51], test_acc=[0.80, 0.90, 0.85], hessian_trace=[5, 6, 7]
        ),
        "Adam (lr=0.01)": _runs(
            train_loss=[0.30, 0.31, 0.29], test_acc=[0.86, 0.84, 0.85], hessian_trace=[9, 9, 9]
        ),
    }
    lines = verdict(results, learned, [0, 1, 2], 100)
    assert lines[0] == "Verdict (3 seeds, 0-2; 100 steps; mean same-seed differences):"
    assert lines[1] == (
        "- vs Adam (lr=0.01): train loss 0.510 vs 0.300 (flatl2o worse by 0.210, beyond seed "
        "noise); test accuracy 85.0% vs 85.0% (no difference at this precision, within seed "
        "noise); Hessian trace (lower = flatter) 6.0 vs 9.0 (flatl2o better by 3.0, beyond seed "
        "noise)."
    )
