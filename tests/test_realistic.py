"""The realistic suite: workloads, the generalized runner, the --quick mode end to end, resume,
and the page rendered from the JSON alone (toy sizes: seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flatl2o.evaluation.runner import RunSpec, train_run, warmup_cosine
from flatl2o.evaluation.workloads import STANDARD_TINY, make_workload

DATA = Path(__file__).parent / "data"
TIMING = ("seconds", "cpu_seconds", "train_seconds", "measure_seconds")


def test_flat_task_records_are_unchanged_by_the_module_runner():
    """The MNIST suite's runs give the records the runner gave when it stepped a Task's one
    flat theta (recorded with commit 2804635 on torch 2.13 CPU): stepping it per tensor, as
    train_optimizee does, changes no bit for these coordinatewise optimizers."""
    if not torch.__version__.startswith("2.13"):
        pytest.skip("the reference records were made with torch 2.13")
    from flatl2o.meta.tasks import make_task

    expected = json.loads((DATA / "runner_flat_records.json").read_text())
    task = make_task("digits-mlp", batch_size=128)
    # recorded with torch's 2 threads: the Hessian readouts' reductions round differently with
    # another count (an earlier test may have left one set)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_flat_records(expected, task)
    finally:
        torch.set_num_threads(threads)


def _check_flat_records(expected: list[dict], task) -> None:
    from flatl2o.evaluation.baselines import BASELINES
    from flatl2o.hub import _shipped_dir

    for want in expected:
        s = dict(want["spec"])
        learned = s["optimizer"] not in BASELINES
        s["checkpoint"] = str(_shipped_dir(s["optimizer"])) if learned else None
        s["horizons"] = tuple(s["horizons"])
        got = train_run(RunSpec(**s), task)
        for k in TIMING:
            got.pop(k)
        for m in got["metrics"].values():
            m.pop("flatness_seconds", None)
        got["spec"].pop("checkpoint")
        assert got == want, s["optimizer"]


@pytest.mark.parametrize("name", STANDARD_TINY)
def test_workload_learns_is_deterministic_by_seed_and_tags_every_tensor(name: str):
    w = make_workload(name)
    a = w.build(torch.Generator().manual_seed(3))
    b = w.build(torch.Generator().manual_seed(3))
    c = w.build(torch.Generator().manual_seed(4))
    sa, sb, sc = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)
    groups = w.param_groups(a)
    tagged = [p for g in groups for p in g["params"]]
    assert sorted(map(id, tagged)) == sorted(id(p) for p in a.parameters())
    assert all(p.ndim == 2 for g in groups if g["role"] == "hidden" for p in g["params"])
    assert all(p.ndim < 2 for g in groups if g["role"] == "vector" for p in g["params"])
    x, y = w.sample_batch(torch.Generator().manual_seed(0))
    out = a(x)
    assert out.shape[0] == w.batch_size and out.shape[: y.ndim] == y.shape
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    first = float(w.loss(a, x, y).detach())
    for _ in range(15):  # one fixed batch: AdamW must fit it
        opt.zero_grad()
        w.loss(a, x, y).backward()
        opt.step()
    assert float(w.loss(a, x, y).detach()) < first
    assert math.isfinite(w.evaluate(a.eval(), "test")["loss"])


def test_regression_workload_standardizes_with_the_train_split_statistics_only():
    """Features and target of the diabetes workload are standardized with the TRAIN split's
    mean and std: the train split is exactly mean 0 / std 1, and one increasing affine map per
    column takes the raw data to all three splits (so validation and test use the train
    statistics, and their own statistics never reach training)."""
    import numpy as np
    from sklearn.datasets import load_diabetes

    x_raw, y_raw = load_diabetes(return_X_y=True)
    w = make_workload("regression-tiny")  # the same data as "regression"
    xs, ys = zip(*(w.splits[s] for s in ("train", "val", "test")), strict=True)
    assert sum(len(y) for y in ys) == len(y_raw) and all(y.dtype == torch.float32 for y in ys)
    columns = [(ys, y_raw)] + [(tuple(x[:, j] for x in xs), x_raw[:, j]) for j in range(10)]
    for splits, raw in columns:
        train = splits[0].double().numpy()
        assert abs(train.mean()) < 1e-6 and abs(train.std() - 1.0) < 1e-6
        std = np.sort(np.concatenate([s.double().numpy() for s in splits]))
        a, b = np.polyfit(std, np.sort(raw), 1)
        assert a > 0 and np.abs(a * std + b - np.sort(raw)).max() < 1e-5 * np.ptp(raw)
    assert abs(float(ys[2].mean())) > 1e-3  # the test split keeps its own offset


def test_full_size_workloads_are_what_the_page_says():
    lm = make_workload("lm")
    assert {g["role"] for g in lm.param_groups(lm.factory())} == {"hidden", "matrix", "vector"}
    cnn = make_workload("cnn")  # convolutions are not Muon's: no 2-D hidden weights
    assert "hidden" not in {g["role"] for g in cnn.param_groups(cnn.factory())}
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.factory().modules())
    assert lm.data_info["files"] and len(lm.data_info["sha256"]) == 64


def test_module_run_records_norm_and_state_bytes_and_stops_at_divergence():
    w = make_workload("cnn-tiny")
    spec = RunSpec(
        task="cnn-tiny", optimizer="sgd", seed=0, horizons=(4, 8), hparams={"lr": 1e30},
        batch_size=w.batch_size, trace_probes=0, eig_iters=0,
    )  # fmt: skip
    r = train_run(spec, w)
    assert r["diverged_at"] == 2  # the parameters are back at the last finite iterate
    assert all(math.isfinite(m["param_norm"]) for m in r["metrics"].values())
    ok = train_run(dataclass_replace(spec, hparams={"lr": 0.1}), w)
    assert ok["diverged_at"] is None and len(ok["norm_curve"]) == len(ok["curve"])
    assert ok["state_bytes_per_param"] == pytest.approx(4.0)  # one fp32 momentum buffer


def dataclass_replace(spec: RunSpec, **kw) -> RunSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)


def test_adamw_keeps_decay_off_vectors_and_muon_gets_the_hidden_matrices():
    from flatl2o.evaluation.baselines import BASELINES, MuonAdamW

    w = make_workload("lm-tiny")
    model = w.build(torch.Generator().manual_seed(0))
    groups = w.param_groups(model)
    adamw = BASELINES["adamw"].make(groups, {"lr": 1e-3, "weight_decay": 0.1}, None)
    for g in adamw.param_groups:
        assert (g["weight_decay"] == 0.0) == all(p.ndim < 2 for p in g["params"])
    muon = BASELINES["muon"].make(groups, {"lr": 1e-3}, None)
    hidden = {id(p) for g in groups if g["role"] == "hidden" for p in g["params"]}
    assert {id(p) for g in muon.muon.param_groups for p in g["params"]} == hidden
    sched = torch.optim.lr_scheduler.LambdaLR(muon, warmup_cosine(100))
    muon.step()
    sched.step()
    assert muon.muon.param_groups[0]["lr"] == muon.adamw.param_groups[0]["lr"] < 1e-3
    with pytest.raises(ValueError, match="tagged with a role"):
        MuonAdamW(model.parameters())


def test_warmup_cosine_rises_linearly_then_decays_to_a_tenth():
    f = warmup_cosine(1000)  # 50 warmup steps
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0)
    assert f(999) == pytest.approx(0.1, abs=1e-4) and f(500) < f(100) < 1.0


def test_mnist_suite_default_excludes_the_module_only_baselines():
    from flatl2o.evaluation.optimizers import default_optimizers, resolve_optimizers

    names = default_optimizers()
    assert "adam" in names and "adamw" not in names and "muon" not in names
    with pytest.raises(ValueError, match="--suite realistic"):  # a flat theta has no roles
        resolve_optimizers(["muon"])


def _cli(out: Path, *extra: str) -> list[str]:
    return [
        "evaluate", "--suite", "realistic", "--quick", "--no-progress", "--out", str(out),
        "--tasks", "lm-tiny", "regression-tiny", "--optimizers", "rnnprop-entropy",
        "--horizons", "5", "10", "--long-horizon", "20", *extra,
    ]  # fmt: skip


def test_quick_cli_end_to_end_and_the_page_renders_from_the_json(tmp_path: Path):
    from flatl2o.cli import main
    from flatl2o.evaluation.realistic import load_realistic
    from flatl2o.evaluation.realistic_report import render_realistic

    out = tmp_path / "r"
    docs = tmp_path / "docs" / "realistic.md"
    assert main(_cli(out, "--docs", str(docs))) == 0
    data = load_realistic(out)
    assert data["complete"] and data["default"] == "rnnprop-entropy"
    arms = data["arms"]["lm-tiny"]
    assert {"adam", "adamw", "sgd", "muon", "l2o-lr", "l2o-cosine"} <= set(arms)
    for arm in arms:  # every arm, both seeds, at every horizon (and the long one on the LM)
        for h in (5, 10):
            seeds = {
                r["spec"]["seed"]
                for r in data["runs"]
                if r["spec"]["task"] == "lm-tiny"
                and r["spec"]["optimizer"] == arm
                and h in r["spec"]["horizons"]
            }
            assert seeds == {0, 1}, (arm, h)
        assert {r["spec"]["seed"] for r in data["long_runs"] if r["spec"]["optimizer"] == arm} == {
            0,
            1,
        }
    # published checkpoints are named by shipped name, never this machine's folder
    assert data["learned"]["rnnprop-entropy"]["path"] == "rnnprop-entropy"
    for kind in ("runs", "long_runs", "tuning_runs"):
        assert {r["spec"]["checkpoint"] for r in data[kind]} <= {None, "rnnprop-entropy"}, kind
    for r in data["tuning_runs"]:  # tuning reads the validation split only
        assert all(set(m) == {"val_loss", "val_accuracy"} for m in r["metrics"].values())
    adamw = [r for r in data["runs"] if r["spec"]["optimizer"] == "adamw"]
    assert {tuple(r["spec"]["horizons"]) for r in adamw} == {(5,), (10,)}  # schedule per horizon
    assert all(r["spec"]["schedule"] == "warmup-cosine" for r in adamw)
    sel = data["tuning"]["lm-tiny"]["adamw"]["selected"]
    assert set(sel) == {"5", "10"} and set(sel["5"]) == {"lr", "weight_decay"}
    for name in ("realistic_lm-tiny.png", "realistic_lm-tiny_long.png", "report.md"):
        assert (out / name).is_file()
    page = docs.read_text()
    assert page == render_realistic(json.loads((out / "eval.json").read_text()), "../r",
                                    data["command"])  # fmt: skip
    assert "QUICK MODE" in page and "| `lm-tiny` (test loss) | 20 |" in page
    assert "--suite realistic --quick" in page
    assert main(_cli(tmp_path / "x", "--trace-probes", "3")) == 2  # an MNIST-only option

    # the verdicts come from the numbers: make the default worse than Adam by 1 nat on each seed
    adam = {
        r["spec"]["seed"]: r["metrics"]["5"]["test_loss"]
        for r in data["runs"]
        if r["spec"]["task"] == "lm-tiny" and r["spec"]["optimizer"] == "adam"
    }
    for r in data["runs"]:
        if r["spec"]["task"] == "lm-tiny" and r["spec"]["optimizer"] == "rnnprop-entropy":
            r["metrics"]["5"]["test_loss"] = (
                adam[r["spec"]["seed"]] + 1.0 + 0.01 * r["spec"]["seed"]
            )
    worse = render_realistic(data)
    assert "beyond seed noise:** `lm-tiny` at 5 steps: worse than Adam 1e-3 by 1.005" in worse


def test_resume_after_an_interruption_reruns_only_what_was_missing(tmp_path: Path, monkeypatch):
    import flatl2o.evaluation.engine as engine
    from flatl2o.evaluation.realistic import RealisticConfig, evaluate_realistic

    cfg = RealisticConfig.quick(
        workloads=("regression-tiny",), long_workloads=(), long_horizon=0,
        checkpoints=("rnnprop-entropy",), horizons=(5, 10),
    )  # fmt: skip
    reference = evaluate_realistic(cfg, progress=False)
    real, calls = engine.train_run, []

    def dies_after_six(spec, task):
        if len(calls) == 6:
            raise KeyboardInterrupt("killed")
        calls.append(spec.key())
        return real(spec, task)

    monkeypatch.setattr(engine, "train_run", dies_after_six)
    with pytest.raises(KeyboardInterrupt):
        evaluate_realistic(cfg, out=tmp_path, progress=False)
    assert (tmp_path / "eval.partial.json").is_file()

    def counted(spec, task):
        calls.append(spec.key())
        return real(spec, task)

    monkeypatch.setattr(engine, "train_run", counted)
    done = evaluate_realistic(cfg, out=tmp_path, progress=False, resume=True)
    assert done["timing"]["runs_reused"] == 6
    assert len(calls) == len(set(calls))  # nothing ran twice

    clock = (*TIMING, "curve_seconds", "seconds_per_step", "cpu_seconds_per_step")

    def strip(rs):
        return sorted(json.dumps({k: v for k, v in r.items() if k not in clock}) for r in rs)

    for kind in ("runs", "tuning_runs"):  # the same numbers as an uninterrupted run
        assert strip(done[kind]) == strip(reference[kind])


def test_the_long_horizon_runs_the_default_and_the_baselines_not_every_checkpoint():
    from flatl2o.evaluation.realistic import RealisticConfig, _learned_infos, _Planner

    cfg = RealisticConfig.quick(workloads=("lm-tiny",), checkpoints=("dm", "rnnprop-entropy"))
    planner = _Planner(cfg, _learned_infos(cfg.checkpoints))
    long = {s.optimizer for s in planner.initial() if s.purpose == "long"}
    assert long == {"adam", "rnnprop-entropy", "l2o-cosine"}  # tuned arms follow their tuning
    every = RealisticConfig.quick(workloads=("lm-tiny",), checkpoints=("dm",), long_arms=())
    planner = _Planner(every, _learned_infos(every.checkpoints))
    assert "dm" in {s.optimizer for s in planner.initial() if s.purpose == "long"}


def test_a_selection_at_an_end_of_the_grid_is_tried_one_step_beyond():
    from flatl2o.evaluation.realistic import RealisticConfig, _learned_infos, _Planner

    cfg = RealisticConfig.quick(workloads=("regression-tiny",), checkpoints=("rnnprop-entropy",))
    planner = _Planner(cfg, _learned_infos(cfg.checkpoints))
    trials = [s for s in planner.initial() if s.purpose == "tune" and s.optimizer == "sgd"]

    def record(spec, val_loss):  # the validation loss falls with the lr: the top end wins
        m = {str(h): {"val_loss": val_loss, "val_accuracy": math.nan} for h in spec.horizons}
        return {"spec": spec.to_dict(), "metrics": m, "diverged_at": None}

    more = []
    for s in trials:
        more += planner.done(s, record(s, 1.0 / s.hparams["lr"]))
    assert [s.hparams for s in more] == [{"lr": 0.9}] and {s.purpose for s in more} == {"tune"}
    final = planner.done(more[0], record(more[0], 1.0 / 0.9))
    assert {s.purpose for s in final} == {"eval"} and final[0].hparams == {"lr": 0.9}
    entry = planner.tuning["regression-tiny"]["sgd"]
    assert entry["tried"]["lr"][-1] == 0.9 and entry["at_edge"] == {"10": ["lr"], "30": ["lr"]}


def test_progress_bars_of_the_realistic_suite_never_go_backwards(monkeypatch):
    """The realistic planner gives the phase display its bounds too: each bar only moves
    forward and ends full at the exact run counts, also when a grid grows."""
    import flatl2o.evaluation.engine as engine
    from flatl2o.evaluation.realistic import RealisticConfig, evaluate_realistic

    seen: list[dict[str, tuple[int, int]]] = []
    show = engine.PhaseProgress._show
    monkeypatch.setattr(
        engine.PhaseProgress, "_show", lambda self: (seen.append(self.fractions()), show(self))
    )
    cfg = RealisticConfig.quick(
        workloads=("regression-tiny",), long_workloads=(), long_horizon=0,
        checkpoints=("rnnprop-entropy",), horizons=(5, 10),
    )  # fmt: skip
    data = evaluate_realistic(cfg, progress=True)
    for phase in ("tuning baselines", "final runs"):
        fractions = [s[phase][0] / s[phase][1] for s in seen if s[phase][1]]
        assert fractions == sorted(fractions), phase
    assert seen[-1] == {
        "tuning baselines": (len(data["tuning_runs"]),) * 2,
        "final runs": (len(data["runs"]) + len(data.get("long_runs", [])),) * 2,
    }


def test_the_page_says_when_its_wall_time_covers_only_the_last_invocation() -> None:
    """A resumed run's JSON holds the last invocation's wall time only: the page must say so
    and bound the whole run by the runs' CPU time, and name the CPU without cpuinfo's key."""
    from flatl2o.evaluation.realistic_report import render_realistic

    repo = Path(__file__).resolve().parents[1]
    data = json.loads((repo / "docs" / "realistic" / "eval.json").read_text())
    data["environment"]["cpu"] = "model name\t: Some CPU"
    data["timing"] = {"wall_seconds": 600.0, "run_cpu_seconds": {"eval": 7200.0}, "runs_reused": 5}
    page = render_realistic(data, "realistic")
    assert "Ran in 10.0 min wall-clock (it reused 5 runs from an earlier invocation" in page
    assert "no less than 1.00 h" in page
    assert "on Some CPU," in page and "model name" not in page
    data["timing"]["runs_reused"] = 0
    assert "Ran in 10.0 min wall-clock (the runs took 2.00 CPU-hours)" in render_realistic(
        data, "realistic"
    )


def test_a_checkpoint_runs_at_its_lr_as_shipped_in_both_suites(tmp_path: Path) -> None:
    """A NormProp checkpoint (lr means Adam's lr, default 1e-3) is evaluated at 1e-3, not at
    the paper rules' 1.0, which would take steps 1,000x too large; the paper's rules stay at 1."""
    from flatl2o import make_rule
    from flatl2o.checkpoint import save_rule
    from flatl2o.evaluation.optimizers import resolve_optimizers
    from flatl2o.evaluation.realistic import RealisticConfig, _learned_infos, _Planner
    from flatl2o.evaluation.suite import EvalConfig
    from flatl2o.evaluation.suite import _Planner as _SuitePlanner

    save_rule(make_rule("normprop"), tmp_path / "np")
    folder = str(tmp_path / "np")
    cfg = RealisticConfig.quick(workloads=("regression-tiny",), checkpoints=(folder, "dm"))
    infos = _learned_infos(cfg.checkpoints)
    specs = _Planner(cfg, infos).initial()
    lrs: dict[str, set[float]] = {}
    for s in specs:
        if s.purpose == "eval":
            lrs.setdefault(s.optimizer, set()).add(s.hparams["lr"])
    (arm,) = [n for n, i in infos.items() if i["architecture"] == "normprop"]
    assert lrs[arm] == {1e-3} and lrs["dm"] == {1.0} and lrs["l2o-cosine"] == {1.0}
    suite = EvalConfig.quick(optimizers=(folder, "dm", "adam"))
    resolved = resolve_optimizers(suite.optimizers)
    planned = _SuitePlanner(suite, resolved).initial()
    (arm,) = [n for n, i in resolved.items() if i.architecture == "normprop"]
    assert {s.hparams["lr"] for s in planned if s.optimizer == "dm"} == {1.0}
    assert {s.hparams["lr"] for s in planned if s.optimizer == arm} == {1e-3}


def test_cli_workload_subset_without_the_long_horizon_workload():
    """``--tasks regression`` alone is a valid run: the LM's long horizon is dropped, not an
    error, and the page does not announce a long horizon on no workload."""
    import argparse

    from flatl2o.evaluation.realistic_command import _config
    from flatl2o.evaluation.realistic_report import render_realistic

    fields = ("optimizers", "seeds", "horizons", "long_horizon", "tune_seeds")
    args = argparse.Namespace(tasks=["regression"], quick=False, **dict.fromkeys(fields))
    config = _config(args)
    assert list(config.workloads) == ["regression"] and config.long_workloads == ()
    args = argparse.Namespace(tasks=["regression-tiny"], quick=True, **dict.fromkeys(fields))
    assert _config(args).long_workloads == ()
    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "docs" / "realistic" / "eval.json").read_text())
    data["config"]["long_workloads"] = []
    page = render_realistic(data, "realistic")
    assert "steps on ." not in page and "horizons 1000, 5000." in page
