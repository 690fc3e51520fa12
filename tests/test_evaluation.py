"""Tests of the evaluation suite: baselines against hand computations, the protocol, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from numerics import BLAS_ROWS_BATCH_INVARIANT
from torch import nn

from flatl2o.evaluation import EvalConfig, engine, evaluate, suite
from flatl2o.evaluation.baselines import BASELINES, SAM, EntropySGD
from flatl2o.evaluation.flatness import (
    full_split_loss,
    hutchinson_trace,
    measure_flatness,
    top_eigenvalue,
)
from flatl2o.evaluation.optimizers import resolve_optimizers
from flatl2o.evaluation.report import render_markdown
from flatl2o.evaluation.runner import RunSpec, train_run
from flatl2o.evaluation.tuning import tune
from flatl2o.meta.data import Dataset, Split, load_digits
from flatl2o.meta.optimizee import EVAL_SEED_OFFSET, evaluate_rule, mean_std, train_optimizee
from flatl2o.meta.tasks import make_task

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as the suite's workers use: tiny ops on a busy 2-core machine are
    many times slower with an OpenMP team of 2 than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=DT)  # SPD, eigenvalues ~1.38 and ~3.62


def _quadratic_closure(p: nn.Parameter, opt: torch.optim.Optimizer, seen: list | None = None):
    """Closure of f(theta) = theta^T A theta / 2 (recording the points it is called at)."""

    def closure() -> torch.Tensor:
        if seen is not None:
            seen.append(p.detach().clone())
        opt.zero_grad()
        loss = 0.5 * p @ A @ p
        loss.backward()
        return loss.detach()

    return closure


# --------------------------------------------------------------------------- SAM


def test_sam_sgd_first_step_matches_hand_computation():
    theta = torch.tensor([1.0, -2.0], dtype=DT)
    lr, rho = 0.1, 0.05
    p = nn.Parameter(theta.clone())
    opt = SAM([p], torch.optim.SGD, rho=rho, lr=lr)
    seen: list[torch.Tensor] = []
    loss = opt.step(_quadratic_closure(p, opt, seen))

    g = A @ theta
    e = rho * g / g.norm()
    expected = theta - lr * (A @ (theta + e))
    assert torch.allclose(p.detach(), expected, atol=1e-12, rtol=0)
    assert len(seen) == 2  # two passes: at w, then at w + e
    assert torch.allclose(seen[0], theta) and torch.allclose(seen[1], theta + e, atol=1e-12)
    assert float(loss) == pytest.approx(float(0.5 * theta @ A @ theta))
    # and it is not plain SGD
    assert not torch.allclose(p.detach(), theta - lr * g, atol=1e-6)


def test_sam_adam_first_step_matches_hand_computation():
    theta = torch.tensor([0.5, 1.5], dtype=DT)
    lr, rho, eps = 0.01, 0.2, 1e-8
    p = nn.Parameter(theta.clone())
    opt = SAM([p], torch.optim.Adam, rho=rho, lr=lr, eps=eps)
    opt.step(_quadratic_closure(p, opt))
    g = A @ theta
    g_sam = A @ (theta + rho * g / g.norm())
    # Adam's first bias-corrected step is lr * g / (|g| + eps)
    expected = theta - lr * g_sam / (g_sam.abs() + eps)
    assert torch.allclose(p.detach(), expected, atol=1e-12, rtol=0)


def test_sam_needs_a_closure_and_rejects_bad_rho():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="closure"):
        SAM([p], torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ValueError, match="rho"):
        SAM([p], torch.optim.SGD, rho=-1.0, lr=0.1)


# ---------------------------------------------------------------------- Entropy-SGD


def test_entropy_sgd_one_langevin_step_without_noise_is_scoped_sgd():
    """Documented limit: L = 1, noise 0 -> SGD with lr * gamma_t * langevin_lr * (1 - average)."""
    theta = torch.tensor([1.0, -2.0], dtype=DT)
    lr, gamma, scoping, eta, avg = 3.0, 0.1, 0.5, 0.2, 0.75
    p = nn.Parameter(theta.clone())
    opt = EntropySGD(
        [p],
        lr=lr,
        gamma=gamma,
        scoping=scoping,
        langevin_steps=1,
        langevin_lr=eta,
        noise=0.0,
        average=avg,
    )
    expected = theta.clone()
    for t in range(3):  # gamma_t = gamma * (1 + scoping)^t
        opt.step(_quadratic_closure(p, opt))
        expected = expected - lr * gamma * (1 + scoping) ** t * eta * (1 - avg) * (A @ expected)
        assert torch.allclose(p.detach(), expected, atol=1e-12, rtol=0)


def test_entropy_sgd_many_langevin_steps_reach_the_gibbs_mean():
    """On a quadratic without noise, mu -> gamma (A + gamma I)^-1 x (the Gibbs mean)."""
    theta = torch.tensor([1.0, -2.0], dtype=DT)
    lr, gamma = 2.0, 0.5
    p = nn.Parameter(theta.clone())
    opt = EntropySGD(
        [p], lr=lr, gamma=gamma, scoping=0.0, langevin_steps=400, langevin_lr=0.1, noise=0.0
    )
    seen: list[torch.Tensor] = []
    opt.step(_quadratic_closure(p, opt, seen))
    mu = gamma * torch.linalg.solve(A + gamma * torch.eye(2, dtype=DT), theta)
    expected = theta - lr * gamma * (theta - mu)
    assert torch.allclose(p.detach(), expected, atol=1e-10, rtol=0)
    assert len(seen) == 400 and torch.equal(seen[0], theta)  # one closure call per step


def test_entropy_sgd_noise_follows_its_generator():
    theta = torch.tensor([1.0, -2.0], dtype=DT)

    def run(seed: int) -> torch.Tensor:
        p = nn.Parameter(theta.clone())
        opt = EntropySGD(
            [p], langevin_steps=3, noise=1e-2, generator=torch.Generator().manual_seed(seed)
        )
        opt.step(_quadratic_closure(p, opt))
        return p.detach()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


# ------------------------------------------------------------------------ flatness


def test_flatness_readouts_match_the_exact_hessian():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=gen)
    w0 = torch.randn(15, generator=gen, dtype=DT)

    def loss_fn(w: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(torch.tanh(x @ w.view(5, 3)) * 3, y)

    hess = torch.autograd.functional.hessian(loss_fn, w0)
    mean, se = hutchinson_trace(loss_fn, w0, probes=7, generator=torch.Generator().manual_seed(3))
    probes = torch.Generator().manual_seed(3)  # the same Rademacher draws, through dense H
    exact = []
    for _ in range(7):
        v = torch.randint(0, 2, (15,), generator=probes).to(DT) * 2 - 1
        exact.append(float(v @ hess @ v))
    assert mean == pytest.approx(math.fsum(exact) / 7, rel=1e-12)
    assert se == pytest.approx(torch.tensor(exact, dtype=DT).std().item() / math.sqrt(7), rel=1e-9)
    eigs = torch.linalg.eigvalsh(hess)
    top = eigs[eigs.abs().argmax()]
    lam, resid = top_eigenvalue(loss_fn, w0, iters=150, generator=torch.Generator().manual_seed(1))
    assert lam == pytest.approx(float(top), rel=1e-6) and resid < 1e-3
    n = 400  # Hutchinson's variance per probe is 2 * sum_{i != j} H_ij^2
    sd = math.sqrt(2 * float((hess**2).sum() - (hess.diagonal() ** 2).sum()) / n)
    many, se = hutchinson_trace(loss_fn, w0, probes=n, generator=torch.Generator().manual_seed(2))
    assert abs(many - float(torch.trace(hess))) < 4 * sd
    assert se == pytest.approx(sd, rel=0.3)  # the reported standard error is right too


# ------------------------------------------------------------------------ protocol


@pytest.fixture(scope="module")
def digits_task():
    return make_task("digits-mlp")


def test_measure_flatness_is_both_readouts_on_one_graph_and_one_generator(digits_task):
    """measure_flatness = hutchinson_trace, then top_eigenvalue continuing the same generator,
    on the full split's loss at a detached copy of the iterate (the suite's flatness cells)."""
    theta = digits_task.init_params(torch.Generator().manual_seed(0)).requires_grad_(True)
    got = measure_flatness(
        digits_task, theta, probes=3, iters=4, generator=torch.Generator().manual_seed(5)
    )
    gen = torch.Generator().manual_seed(5)
    loss_fn = full_split_loss(digits_task)
    trace = hutchinson_trace(loss_fn, theta, probes=3, generator=gen)
    eig = top_eigenvalue(loss_fn, theta, iters=4, generator=gen)
    assert (got.trace, got.trace_se, got.top_eig, got.top_eig_residual) == (*trace, *eig)
    assert theta.grad is None


def test_metrics_are_measured_on_full_splits_and_gap_is_test_minus_train(digits_task):
    """The runner equals a hand-written loop: seeded init, a batch per step, full-split metrics."""
    spec = RunSpec(
        "digits-mlp",
        "adam",
        seed=3,
        horizons=(7, 15),
        hparams={"lr": 0.01},
        trace_probes=5,
        eig_iters=4,
    )
    rec = train_run(spec, digits_task)

    gen = torch.Generator().manual_seed(EVAL_SEED_OFFSET + 3)
    p = nn.Parameter(digits_task.init_params(gen))
    opt = torch.optim.Adam([p], lr=0.01)
    losses = []
    for _ in range(15):
        x, y = digits_task.sample_batch(gen)
        opt.zero_grad()
        loss = digits_task.loss(p, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    m = rec["metrics"]["15"]
    train = digits_task.evaluate(p.detach(), "train")
    test = digits_task.evaluate(p.detach(), "test")
    assert m["train_loss"] == pytest.approx(train["loss"], rel=1e-6)
    assert m["test_accuracy"] == pytest.approx(test["accuracy"])
    assert m["gap"] == pytest.approx(m["test_loss"] - m["train_loss"], abs=1e-12)
    assert rec["curve"] == pytest.approx(losses, rel=1e-5)
    assert set(rec["metrics"]) == {"7", "15"} and rec["grad_evals"] == 15
    for h in ("7", "15"):
        vals = rec["metrics"][h]
        assert all(math.isfinite(v) for v in vals.values()), vals
        assert vals["hessian_trace"] > 0 and vals["hessian_top_eig"] > 0
    assert rec["diverged_at"] is None


def test_same_seed_same_init_and_batches_for_every_optimizer(digits_task):
    info = resolve_optimizers(["rnnprop"])["rnnprop"]
    specs = [
        RunSpec("digits-mlp", name, seed=s, horizons=(3,), hparams=hp, trace_probes=0)
        for s in (0, 1)
        for name, hp in [
            ("adam", {"lr": 0.01}),
            ("sgd", {"lr": 0.1}),
            ("sam-sgd", {"lr": 0.1, "rho": 0.05}),
            ("entropy-sgd", {"lr": 10.0, "gamma": 0.03}),
        ]
    ] + [
        RunSpec(
            "digits-mlp",
            "rnnprop",
            seed=s,
            horizons=(3,),
            hparams={"lr": 1.0},
            checkpoint=info.path,
            fingerprint=info.fingerprint,
            trace_probes=0,
        )
        for s in (0, 1)
    ]
    recs = [train_run(s, digits_task) for s in specs]
    by_seed: dict[int, set] = {0: set(), 1: set()}
    first_loss: dict[int, set] = {0: set(), 1: set()}
    for spec, rec in zip(specs, recs, strict=True):
        by_seed[spec.seed].add(rec["init_sha"])
        first_loss[spec.seed].add(rec["curve"][0])
    assert len(by_seed[0]) == 1 and len(by_seed[1]) == 1 and by_seed[0] != by_seed[1]
    assert len(first_loss[0]) == 1 and len(first_loss[1]) == 1  # same first minibatch too
    # one-batch-per-step optimizers see the same second minibatch: SGD and SAM-SGD share
    # their first step's gradient direction only through the batch, so compare Adam vs L2O
    # via the batch stream instead: Entropy-SGD draws 5 per step, the others 1.
    grads = {r["spec"]["optimizer"]: r["grad_evals"] for r in recs if r["spec"]["seed"] == 0}
    assert grads == {"adam": 3, "sgd": 3, "sam-sgd": 6, "entropy-sgd": 15, "rnnprop": 3}


def test_model_card_metrics_are_the_suites_runs_summarized(digits_task):
    """evaluate_rule (model cards, meta-training's final evaluation) is the suite's runs of the
    same rule, seeds and horizons, summarized with the results page's sample std: bit for bit.
    The cards used to come from a second loop (the rule module on one flat vector instead of
    L2O's kernel: other rounding, grown over 1,000 steps) and the population std."""
    from flatl2o import load_rule

    info = resolve_optimizers(["rnnprop"])["rnnprop"]
    recs = [
        train_run(
            RunSpec(
                "digits-mlp",
                "rnnprop",
                seed=seed,
                horizons=(10, 60),
                hparams={"lr": 1.0},
                checkpoint=info.path,
                fingerprint=info.fingerprint,
                trace_probes=0,
            ),
            digits_task,
        )
        for seed in range(3)
    ]
    card = evaluate_rule(load_rule("rnnprop"), digits_task, horizons=[10, 60], seeds=3)
    for h in ("10", "60"):
        for key in ("test_accuracy", "test_loss", "train_loss"):
            mean, std = mean_std([r["metrics"][h][key] for r in recs])
            assert (card[f"{key}@{h}"], card[f"{key}_std@{h}"]) == (mean, std), (key, h)


@pytest.mark.parametrize("architecture", ["l2o-dm", "rnnprop"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_task_is_stepped_per_tensor_exactly_as_one_flat_vector(architecture, backend):
    """train_optimizee hands the optimizer one tensor per module parameter (so a rule that
    scales per tensor sees the tensors); for a coordinatewise rule that is bit-identical to
    stepping the task's one flat vector, which the suite and the cards did before (the
    reference kernel: where the BLAS rounds a row alike in any number of 64-row tiles)."""
    import flatl2o
    from flatl2o.kernels import make_kernel

    task = make_task("digits-mlp", batch_size=32)
    rule = flatl2o.make_rule(architecture)
    traj = train_optimizee(
        task,
        lambda params, groups: flatl2o.L2O(params, rule=rule, backend=backend),
        seed=7,
        horizons=[25],
    )
    assert [p.shape for p in traj.run.params] == list(task.param_shapes.values())

    gen = torch.Generator().manual_seed(7)
    flat = nn.Parameter(task.init_params(gen))
    opt = flatl2o.L2O([flat], rule=rule, backend=backend)
    losses = []
    for _ in range(25):
        x, y = task.sample_batch(gen)
        opt.zero_grad()
        loss = task.loss(flat, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    kernel = make_kernel(rule, torch.device("cpu"), backend).name
    if kernel != "reference" or BLAS_ROWS_BATCH_INVARIANT:  # else the BLAS rounds tails apart
        assert traj.losses == losses
        assert torch.equal(traj.run.theta(), flat.detach())
    torch.testing.assert_close(traj.run.theta(), flat.detach(), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_changed_since_planning_is_refused(digits_task):
    info = resolve_optimizers(["rnnprop"])["rnnprop"]
    spec = RunSpec(
        "digits-mlp",
        "rnnprop",
        seed=0,
        horizons=(2,),
        hparams={"lr": 1.0},
        checkpoint=info.path,
        fingerprint="0" * 16,
        trace_probes=0,
    )
    with pytest.raises(RuntimeError, match="changed on disk"):
        train_run(spec, digits_task)


def test_divergence_stops_the_run_at_the_last_finite_iterate(digits_task):
    spec = RunSpec(
        "digits-mlp", "sgd", seed=0, horizons=(30,), hparams={"lr": 1e38}, trace_probes=0
    )
    rec = train_run(spec, digits_task)
    t = rec["diverged_at"]
    assert t is not None and 1 < t <= 30
    # the failing step's loss is recorded (as null) and no step is taken after it
    assert len(rec["curve"]) == t and rec["curve"][-1] is None and rec["grad_evals"] == t
    assert all(v is not None for v in rec["curve"][:-1])
    assert "30" in rec["metrics"]  # later horizons are still measured (at that iterate)


def _poisoned(ds: Dataset) -> Dataset:
    """The same train/val data with a garbage test split (NaN inputs, permuted labels)."""
    gen = torch.Generator().manual_seed(99)
    y = ds.test.y[torch.randperm(len(ds.test), generator=gen)]
    test = Split(x=torch.full_like(ds.test.x, math.nan), y=y, index=ds.test.index)
    return dataclasses.replace(ds, test=test)


def test_tuning_never_reads_the_test_split():
    clean = make_task("digits-mlp")
    dirty = make_task("digits-mlp", dataset=_poisoned(load_digits()))
    # positive control: an evaluation run does read the poisoned test split
    spec = RunSpec(
        "digits-mlp", "adam", seed=0, horizons=(2,), hparams={"lr": 0.01}, trace_probes=0
    )
    assert math.isnan(train_run(spec, dirty)["metrics"]["2"]["test_loss"])
    for name, base in (("sgd", None), ("sam-sgd", {5: {"lr": 0.1}, 12: {"lr": 0.3}})):
        a = tune(clean, name, horizons=(5, 12), seeds=1, base_selected=base)
        b = tune(dirty, name, horizons=(5, 12), seeds=1, base_selected=base)
        assert a["trials"] == b["trials"] and a["selected"] == b["selected"]
        assert all(math.isfinite(t["val"]["12"]["val_loss"]) for t in a["trials"])
        if base:  # SAM keeps its base's lr per horizon
            assert a["selected"]["5"]["lr"] == 0.1 and a["selected"]["12"]["lr"] == 0.3


def test_tuning_selects_by_validation_accuracy():
    task = make_task("digits-mlp")
    res = tune(task, "adam", horizons=(5,), seeds=1)
    accs = {t["hparams"]["lr"]: t["val"]["5"]["val_accuracy"] for t in res["trials"]}
    assert res["selected"]["5"]["lr"] == max(accs, key=lambda k: (accs[k], -k))
    # 5 steps favour the largest lr of the grid: the grid grew one step past it (3 x 0.03),
    # the new end won too, and the result says that it is still at the end of what was tried
    grid = sorted(BASELINES["adam"].grid["lr"])
    assert sorted(accs) == res["tried"]["lr"] == [*grid, 0.09]
    assert res["selected"]["5"]["lr"] == 0.09 and res["at_edge"] == {"5": ["lr"]}


def test_the_suite_grows_grids_like_tune_does(tmp_path: Path):
    """The parallel planner (jobs=2) extends a grid exactly as the serial tune() does, SAM's
    rho trials included, and only then unlocks the baseline's evaluation runs."""
    cfg = EvalConfig.quick(optimizers=("sam-adam",), horizons=(5,), long_horizon=0, seeds=1)
    data = suite.evaluate(cfg, out=tmp_path, jobs=2, progress=False)
    task = make_task("digits-mlp")
    adam = tune(task, "adam", horizons=(5,), seeds=1)
    sam = tune(task, "sam-adam", horizons=(5,), seeds=1, base_selected={5: adam["selected"]["5"]})
    got = data["tuning"]["digits-mlp"]
    for name, want in (("adam", adam), ("sam-adam", sam)):
        assert got[name]["tried"] == want["tried"] and got[name]["selected"] == want["selected"]
        assert sorted(map(str, got[name]["trials"])) == sorted(map(str, want["trials"]))
    assert adam["tried"]["lr"][-1] == 0.09  # the grid did grow
    (run,) = [r for r in data["runs"] if r["spec"]["optimizer"] == "sam-adam"]
    assert run["spec"]["hparams"] == sam["selected"]["5"]
    # the page says where the grid grew and which selections are still at an end
    page = render_markdown(data)
    (row,) = [r for r in page.splitlines() if r.startswith("| `digits-mlp` | `sam-adam` |")]
    rho = sam["selected"]["5"]["rho"]
    edge = " (edge)" if sam["at_edge"] else ""
    assert row.startswith(f"| `digits-mlp` | `sam-adam` | lr 0.09, rho {rho:g}{edge} |"), row
    assert "grid(s) grew" in page


def _trials(name: str, scores: dict[tuple, float], diverged: tuple = ()) -> list[dict]:
    """Tuning trials of ``name`` at horizon 10: ``{hparam values in grid key order: val acc}``."""
    keys = (
        ["lr", *BASELINES[name].grid] if BASELINES[name].tune_after else list(BASELINES[name].grid)
    )
    return [
        {
            "hparams": dict(zip(keys, values, strict=True)),
            "val": {
                "10": {"val_accuracy": acc, "val_loss": 1 - acc, "diverged": values in diverged}
            },
        }
        for values, acc in scores.items()
    ]


def test_a_grid_grows_one_step_past_an_end_where_the_selection_sits():
    from flatl2o.evaluation.tuning import at_edge, extension_points

    # Adam's lr grid 1e-3..3e-2: best at 1e-3 -> try 1e-3 / 3 once, then stop (and say so)
    t = _trials("adam", {(1e-3,): 0.9, (3e-3,): 0.8, (1e-2,): 0.7, (3e-2,): 0.6})
    assert extension_points("adam", t, [10]) == [{"lr": 0.000333}]
    t += _trials("adam", {(0.000333,): 0.95})
    assert extension_points("adam", t, [10]) == []  # one extension per end
    assert at_edge("adam", t, {"10": {"lr": 0.000333}}) == {"10": ["lr"]}
    # inside the grid: nothing to add, not at an edge
    t = _trials("adam", {(1e-3,): 0.7, (3e-3,): 0.9, (1e-2,): 0.8, (3e-2,): 0.6})
    assert extension_points("adam", t, [10]) == []
    assert at_edge("adam", t, {"10": {"lr": 3e-3}}) == {}
    # SGD best at its largest lr, whose extension diverges: the search is bounded there
    t = _trials("sgd", {(0.03,): 0.6, (0.1,): 0.7, (0.3,): 0.8, (1.0,): 0.9})
    assert extension_points("sgd", t, [10]) == [{"lr": 3.33}]
    t += _trials("sgd", {(3.33,): 0.1}, diverged=((3.33,),))
    assert extension_points("sgd", t, [10]) == []
    assert at_edge("sgd", t, {"10": {"lr": 1.0}}) == {}
    # two hyper-parameters: a new value is crossed with every value tried for the other
    t = _trials(
        "entropy-sgd", {(10.0, 0.03): 0.9, (10.0, 0.1): 0.8, (30.0, 0.03): 0.7, (30.0, 0.1): 0.6}
    )
    new = extension_points("entropy-sgd", t, [10])
    assert sorted((p["lr"], p["gamma"]) for p in new) == [
        (3.33, 0.009),
        (3.33, 0.03),
        (3.33, 0.1),
        (10.0, 0.009),
        (30.0, 0.009),
    ]
    # SAM: only rho grows, at each of its base's learning rates
    t = _trials("sam-sgd", {(0.1, 0.01): 0.6, (0.1, 0.05): 0.7, (0.1, 0.2): 0.9})
    assert extension_points("sam-sgd", t, [10], {10: {"lr": 0.1}}) == [{"lr": 0.1, "rho": 0.8}]


def test_both_suites_grow_a_grid_with_one_rule():
    """values_beyond is the one rule of both suites' grid growth (the realistic suite's planner
    had its own copy): one step past an end where a selection sits, by the grid's own outer
    ratio, once per end; a grid given point by point (repeated values) has the same ratio."""
    from flatl2o.evaluation.tuning import values_beyond

    grid = (1e-4, 3e-4, 1e-3)  # AdamW's lr grid scaled by the fine-tuning's 0.1
    assert values_beyond(grid, grid, [1e-4]) == [3.33e-05]
    assert values_beyond(grid, grid, [1e-3, 1e-4]) == [3.33e-05, 0.00333]
    assert values_beyond(grid, grid, [3e-4]) == []
    assert values_beyond([*grid, *grid], grid, [1e-3]) == [0.00333]
    assert values_beyond(grid, [*grid, 0.00333], [0.00333]) == []  # that end's step is spent


# --------------------------------------------------------------------------- names


def test_name_options_are_split_by_the_parser_for_both_suites():
    """``--tasks a,b c`` is three names as parsed (both halves of ``flatl2o evaluate`` read the
    tuple; the realistic half no longer imports the other half's splitter: no import cycle)."""
    import argparse

    from flatl2o.evaluation.command import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--tasks", "a,b", "c", "--optimizers", "x", "--long-tasks", "a,"])
    assert (args.tasks, args.optimizers, args.long_tasks) == (("a", "b", "c"), ("x",), ("a",))
    assert p.parse_args([]).tasks is None


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="entropy-sgd"):
        resolve_optimizers(["adam", "no-such-optimizer"])
    with pytest.raises(ValueError, match="mnist-mlp-relu"):
        EvalConfig(tasks=("no-such-task",)).validate()


def test_flatness_budget_option_and_validation():
    from flatl2o.evaluation.command import _flatness

    assert _flatness(["mnist-conv=20,10", "mnist-mlp-deep=0,0"]) == {
        "mnist-conv": (20, 10),
        "mnist-mlp-deep": (0, 0),
    }
    with pytest.raises(ValueError, match="TASK=PROBES,ITERS"):
        _flatness(["mnist-conv=20"])
    assert EvalConfig().flatness_for("mnist-conv") == (0, 0)  # skipped by default (cost)
    assert EvalConfig().flatness_for("mnist-mlp-relu") == (100, 20)
    with pytest.raises(ValueError, match="two positive counts"):
        EvalConfig(flatness={"mnist-conv": (5, 0)}).validate()
    with pytest.raises(ValueError, match="long_tasks"):
        EvalConfig(tasks=("mnist-conv",), long_horizon=2000).validate()


def test_regularized_checkpoint_pairs_with_its_sibling_from_the_recipe():
    infos = resolve_optimizers(["rnnprop-hessian"])
    info = infos["rnnprop-hessian"]
    assert info.regularized and info.regularizer == "hessian-trace" and info.alpha > 0
    assert info.sibling == "rnnprop" and info.sibling_basis == "recipe"
    assert resolve_optimizers(["rnnprop"])["rnnprop"].sibling is None


def test_seen_task_comes_from_the_checkpoints_recipes():
    """ "Seen" is the task the learned rules were meta-trained on (their recipe's [task] name),
    not a hard-coded name: the quick config's default would call the MNIST MLP unseen."""
    from types import SimpleNamespace

    cfg = EvalConfig.quick(tasks=("mnist-mlp-sigmoid",), long_horizon=0)
    assert cfg.seen_task == "digits-mlp"  # the fallback
    infos = resolve_optimizers(["rnnprop", "adam"])
    assert suite.seen_tasks(cfg, infos) == {"mnist-mlp-sigmoid": ["rnnprop"]}
    assert suite.seen_tasks(cfg, resolve_optimizers(["adam"])) == {"digits-mlp": []}
    planner = SimpleNamespace(tuning={}, hparams={})
    results: dict = {"eval": [], "long": [], "tune": [], "reused": []}
    data = suite._assemble(cfg, infos, planner, results, engine._environment(1, 1), 0.0, None, True)
    assert data["tasks"]["mnist-mlp-sigmoid"]["seen"] is True
    assert data["tasks"]["mnist-mlp-sigmoid"]["seen_by"] == ["rnnprop"]


# ------------------------------------------------------------------------------ CLI


def test_quick_cli_end_to_end_and_deterministic_report(tmp_path: Path):
    from flatl2o.cli import main

    out = tmp_path / "eval"
    docs = tmp_path / "docs" / "results.md"
    opts = ["rnnprop-hessian", "rnnprop", "adam", "sam-adam"]
    rc = main(
        [
            "evaluate",
            "--quick",
            "--optimizers",
            *opts,
            "--out",
            str(out),
            "--docs",
            str(docs),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["complete"] and sorted(data["optimizers"]) == sorted(opts)
    assert {r["spec"]["optimizer"] for r in data["runs"]} == set(opts)
    assert len({r["spec"]["seed"] for r in data["runs"]}) == 2 and data["long_runs"]
    hp = data["hparams"]["digits-mlp"]
    assert all(hp["sam-adam"][h]["lr"] == hp["adam"][h]["lr"] for h in ("10", "30"))
    assert hp["rnnprop"] == {"10": {"lr": 1.0}, "30": {"lr": 1.0}}  # learned rules: as shipped
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(
        [
            "loss_curves_digits-mlp.png",
            "test_accuracy_10.png",
            "test_accuracy_30.png",
            "flatness_vs_accuracy_10.png",
            "flatness_vs_accuracy_30.png",
            "long_digits-mlp.png",
        ]
    )
    page = docs.read_text()
    # the package's generic report: no study's questions (research/results_page.py adds them)
    for heading in ("# Evaluation results", "## Setup", "## Full results", "## Long horizon"):
        assert heading in page
    assert "## 1." not in page and "sibling" not in page.split("## Figures")[1]
    assert "../eval/test_accuracy_10.png" in page  # figures linked relative to the page

    # regeneration from the JSON alone is deterministic (markdown and PNG bytes)
    before = {p.name: p.read_bytes() for p in [*out.glob("*.png"), out / "report.md"]}
    page_before = docs.read_bytes()
    regen = ["evaluate", "--report-only", str(out / "eval.json"), "--docs", str(docs)]
    assert main(regen) == 0
    after = {p.name: p.read_bytes() for p in [*out.glob("*.png"), out / "report.md"]}
    assert after == before and docs.read_bytes() == page_before
    # the recorded regeneration command is the one just run
    assert f"flatl2o evaluate --report-only {out / 'eval.json'} --docs {docs}" in page


def test_resume_reuses_runs_only_from_the_same_code_and_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A learned rule's trajectory moves with float-level changes, so --resume never mixes
    runs made by other code (or torch, CPU, thread count) into one results file."""
    cfg = EvalConfig.quick(optimizers=("rnnprop",), long_horizon=0)
    calls = []
    environment = engine._environment
    monkeypatch.setattr(engine, "_environment", lambda *a: calls.append(a) or environment(*a))
    first = evaluate(cfg, out=tmp_path, progress=False)
    # read once, before the runs: the code that ran, not what the checkout holds at the end
    assert first["environment"]["code_sha"] == engine.code_sha() and len(calls) == 1
    again = evaluate(cfg, out=tmp_path, resume=True, progress=False)
    assert again["timing"]["runs_reused"] == len(first["runs"]) > 0
    data = json.loads((tmp_path / "eval.json").read_text())
    data["environment"]["code_sha"] = "0" * 20  # as if made before a kernel change
    (tmp_path / "eval.json").write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match=r"not reusing the runs .* another code_sha"):
        rerun = evaluate(cfg, out=tmp_path, resume=True, progress=False)
    assert rerun["timing"]["runs_reused"] == 0

    def numbers(runs: list) -> list:  # everything but timings
        return [
            {h: {k: v for k, v in m.items() if not k.endswith("seconds")} for h, m in r.items()}
            for r in (run["metrics"] for run in runs)
        ]

    assert numbers(rerun["runs"]) == numbers(first["runs"])


def test_cli_reports_unknown_optimizer_cleanly(tmp_path: Path, capsys):
    from flatl2o.cli import main

    rc = main(["evaluate", "--quick", "--optimizers", "adamw", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown optimizer(s) ['adamw']" in err and "sam-adam" in err


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_jobs(tmp_path: Path):
    cfg = EvalConfig.quick(optimizers=("rnnprop", "adam", "sam-adam"), long_horizon=0)
    one = evaluate(cfg, jobs=1, progress=False)
    two = evaluate(cfg, jobs=2, progress=False)
    strip = ("seconds", "cpu_seconds", "train_seconds", "measure_seconds", "flatness_seconds")

    def clean(runs: list) -> list:
        out = []
        for r in runs:
            r = {k: v for k, v in r.items() if k not in strip}
            r["metrics"] = {
                h: {k: v for k, v in m.items() if k not in strip} for h, m in r["metrics"].items()
            }
            out.append(r)
        return out

    assert clean(one["runs"]) == clean(two["runs"])
    assert one["hparams"] == two["hparams"]


def test_progress_shows_phases_whose_bars_never_go_backwards(tmp_path: Path, monkeypatch):
    """Runs are planned as tuning proceeds (adam's grid grows here, SAM's trials and every
    baseline's final runs wait for a selection), yet each phase's bar only moves forward and
    ends full, with the exact run counts."""
    seen: list[dict[str, tuple[int, int]]] = []
    show = engine.PhaseProgress._show
    monkeypatch.setattr(
        engine.PhaseProgress, "_show", lambda self: (seen.append(self.fractions()), show(self))
    )
    cfg = EvalConfig.quick(
        optimizers=("rnnprop", "sam-adam"), horizons=(5,), long_horizon=10, seeds=1
    )
    data = suite.evaluate(cfg, out=tmp_path, progress=True)
    assert set(seen[0]) == {"tuning baselines", "final runs"}
    for phase in seen[0]:
        fractions = [s[phase][0] / s[phase][1] for s in seen if s[phase][1]]
        assert fractions == sorted(fractions), phase
        assert all(done <= total for done, total in (s[phase] for s in seen))
    tuned = sum(len(t["trials"]) for t in data["tuning"]["digits-mlp"].values())
    assert seen[-1] == {
        "tuning baselines": (tuned, tuned),
        "final runs": (len(data["runs"]) + len(data["long_runs"]),) * 2,
    }
    assert data["tuning"]["digits-mlp"]["adam"]["tried"]["lr"][-1] == 0.09  # the grid grew


def test_runs_start_largest_first_without_timing_anything(monkeypatch):
    """The engine orders runs by their gradient evaluations (steps x gradients per step), a
    static count, instead of timing every task and rule before the first run: the long run
    starts first; a SAM run counts 2 gradients a step."""
    started: list[tuple[str, str, int]] = []
    real = engine.train_run

    def record(spec, task):
        started.append((spec.purpose, spec.optimizer, max(spec.horizons)))
        return real(spec, task)

    monkeypatch.setattr(engine, "train_run", record)
    cfg = EvalConfig.quick(optimizers=("rnnprop", "sam-adam"), horizons=(5,), long_horizon=10)
    cfg.seeds = cfg.long_seeds = 1
    evaluate(cfg, progress=False)
    assert started[0] == ("long", "rnnprop", 10)
    assert engine._size(RunSpec("digits-mlp", "sam-adam", 0, (5, 30))) == 60
