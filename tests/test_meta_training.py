"""Meta-training: the regularizer reaches the meta-gradient, recipes are checked up front,
kill-and-resume is exact, user tasks fine-tune, and the functional and optimizer paths agree."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import flatl2o
from flatl2o.cli import main as cli_main
from flatl2o.meta.optimizee import learned_optimizer, train_optimizee
from flatl2o.meta.recipe import RecipeError, load_recipe, recipe_from_dict
from flatl2o.meta.tasks import Task, make_task
from flatl2o.meta.trainer import (
    InexactResumeWarning,
    MetaTrainer,
    ResumeError,
    export_name,
    plot_log,
    regularized_unroll,
)

TINY = {
    "name": "tiny",
    "rule": {"architecture": "rnnprop"},
    "task": {"name": "digits-mlp", "batch_size": 32},
    "train": {"iterations": 4, "trajectory": 20, "unroll": 10, "checkpoint_every": 2},
    "curriculum": {"validate_every": 2, "validation_runs": 1},
    "evaluation": {"seeds": 2, "horizons": [20]},
}


def tiny(**sections) -> dict:
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.update(
            {key: value}
        )
    return data


@pytest.mark.parametrize("name", ["hessian-trace", "hessian-eig", "hessian-esd", "entropy"])
def test_alpha_changes_the_meta_gradient_and_zero_alpha_does_not(tmp_path, name):
    recipe = recipe_from_dict(tiny(regularizer={"name": name, "alpha": 1.0}))
    trainer = MetaTrainer(recipe, tmp_path, progress=False)
    theta = trainer.task.init_params(torch.Generator().manual_seed(0))
    state = trainer.rule.init_state(theta.numel())
    meta, reg, _, _ = trainer.unroll_objective(theta, state, 0, regularize=True)
    assert reg is not None and torch.isfinite(reg)
    params = list(trainer.rule.parameters())

    def grads(objective):
        return torch.cat(
            [
                g.flatten()
                for g in torch.autograd.grad(
                    objective, params, retain_graph=True, allow_unused=False
                )
            ]
        )

    plain = grads(meta)
    assert torch.equal(grads(meta + 0.0 * reg), plain)
    regularized = grads(meta + 1.0 * reg)
    assert not torch.allclose(regularized, plain), "R must reach the rule through theta_t"
    # and R's own meta-gradient is non-zero (it flows through the iterates into phi)
    assert grads(reg).abs().sum() > 0


def test_regularizer_schedule():
    assert [regularized_unroll("all", u, 4) for u in range(4)] == [True] * 4
    assert [regularized_unroll("posterior", u, 4) for u in range(4)] == [False, False, True, True]
    assert [regularized_unroll("prior", u, 4) for u in range(4)] == [True, True, False, False]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"train": {"unrol": 3}}, r"unknown key \[train\]\.unrol"),
        ({"train": {"iterations": "ten"}}, r"\[train\]\.iterations must be int"),
        ({"task": {"name": "imagenet"}}, "unknown task 'imagenet'"),
        ({"regularizer": {"name": "sharpness"}}, "unknown regularizer 'sharpness'"),
        ({"regularizer": {"name": "entropy", "options": {"temp": 1}}}, "temp"),
        ({"rule": {"architecture": "lstm9"}}, "unknown rule architecture"),
        ({"rule": {"options": {"hidden": 3}}}, "unknown key"),
        ({"train": {"trajectory": 25}}, "multiple of unroll"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"regularizer": {"name": "hessian-trace"}}, "alpha is 0"),
        # and the other direction: alpha or options given with no regularizer named
        ({"regularizer": {"alpha": 0.1}}, r'name is "none" but alpha is 0\.1 .*silently'),
        (
            {"regularizer": {"options": {"gamma": 0.01}}},
            r"name is \"none\" but .*options are \{'gamma': 0\.01\}",
        ),
        (
            {"regularizer": {"name": "hessian-trace", "alpha": 0.1, "options": {"probes": 0}}},
            r"\[regularizer\]\.options: .*option probes .* >= 1, got 0",
        ),
        (
            {"regularizer": {"name": "entropy", "alpha": 1.0, "options": {"gamma": -0.01}}},
            r"option gamma .* > 0, got -0\.01",
        ),
        # a named regularizer with alpha > 0 that would be computed zero times (docs/method.md §6)
        (
            {"regularizer": {"name": "hessian-trace", "alpha": 0.1, "every": 21}},
            r"never be computed in a trajectory of 20 steps .*every = 21",
        ),
        (
            {
                "regularizer": {"name": "hessian-trace", "alpha": 0.1, "schedule": "posterior"},
                "train": {"trajectory": 10},
            },
            r"never be computed in a trajectory of 10 steps \(1 unroll\(s\) of 10\).*posterior",
        ),
        (
            {
                "regularizer": {"name": "entropy", "alpha": 1.0, "schedule": "posterior"},
                "curriculum": {"lengths": [10, 40]},
            },
            r"never be computed in a \[curriculum\]\.lengths stage of 10 steps",
        ),
        (
            {
                "regularizer": {
                    "name": "hessian-eig",
                    "alpha": 0.1,
                    "schedule": "prior",
                    "every": 30,
                },
                "curriculum": {"lengths": [40, 80]},
            },
            r"stage of 40 steps",
        ),
        (
            {
                "regularizer": {"name": "hessian-trace", "alpha": 0.1},
                "train": {"imitation_prob": 1.0},
            },
            r"imitation_prob is 1, so every unroll imitates Adam",
        ),
        (
            {"regularizer": {"name": "hessian-trace", "alpha": float("nan")}},
            r"alpha must be a finite",
        ),
        (
            {"regularizer": {"name": "hessian-trace", "alpha": float("inf")}},
            r"alpha must be a finite",
        ),
        ({"regularizer": {"every": 0}}, r"\[regularizer\]\.every must be an int >= 1, got 0"),
        # ranges of every numeric key, named with the valid range
        (
            {"curriculum": {"validate_every": 0}},
            r"\[curriculum\]\.validate_every must be an int >= 1",
        ),
        (
            {"curriculum": {"validation_runs": 0}},
            r"\[curriculum\]\.validation_runs must be an int >= 1",
        ),
        ({"curriculum": {"patience": -1}}, r"\[curriculum\]\.patience must be an int >= 0, got -1"),
        (
            {"curriculum": {"lengths": [True]}},
            r"\[curriculum\]\.lengths must be a list of positive",
        ),
        ({"evaluation": {"horizons": []}}, r"\[evaluation\]\.horizons must list at least one"),
        (
            {"evaluation": {"horizons": [20, 20]}},
            r"\[evaluation\]\.horizons has a step count twice",
        ),
        ({"evaluation": {"seeds": 0}}, r"\[evaluation\]\.seeds must be an int >= 1, got 0"),
        ({"task": {"batch_size": 0}}, r"\[task\]\.batch_size must be an int >= 1, got 0"),
        ({"train": {"meta_lr": float("nan")}}, r"\[train\]\.meta_lr must be a finite number > 0"),
        ({"train": {"meta_lr": 0.0}}, r"\[train\]\.meta_lr must be a finite number > 0"),
        ({"train": {"imitation_lr": 0.0}}, r"\[train\]\.imitation_lr must be a finite number > 0"),
        (
            {"train": {"imitation_lr": -0.01}},
            r"\[train\]\.imitation_lr must be a finite number > 0",
        ),
        ({"train": {"grad_clip": -1.0}}, r"\[train\]\.grad_clip must be a finite number >= 0"),
        (
            {"train": {"grad_clip": float("inf")}},
            r"\[train\]\.grad_clip must be a finite number >= 0",
        ),
        (
            {"train": {"imitation_prob": float("nan")}},
            r"\[train\]\.imitation_prob must be in \[0, 1\]",
        ),
        ({"train": {"iterations": 0}}, r"\[train\]\.iterations must be an int >= 1"),
        ({"train": {"checkpoint_every": 0}}, r"\[train\]\.checkpoint_every must be an int >= 1"),
        (
            {"rule": {"options": {"output_scale": float("nan")}}},
            r"\[rule\]\.options: output_scale must be a finite",
        ),
        # the seed must not replay an evaluation (10,000 + i) or validation (1,000,000 + i) run
        (
            {"train": {"seed": 10_001}},
            r"\[train\]\.seed 10001 is the seed of one of the 2 runs of \[evaluation\]\.seeds",
        ),
        (
            {"train": {"seed": 1_000_000}},
            r"\[train\]\.seed 1000000 .* \[curriculum\]\.validation_runs",
        ),
        ({"train": {"seed": -1}}, r"\[train\]\.seed must be an int in \[0, 2\*\*32\)"),
        ({"train": {"seed": 2**32}}, r"\[train\]\.seed must be an int in \[0, 2\*\*32\)"),
    ],
)
def test_bad_recipes_fail_before_any_work(patch, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(tiny(**patch))


def test_cli_reports_a_bad_recipe_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[task]\nname = "nope"\n')
    assert cli_main(["meta-train", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("form", ["flag", "override"])
def test_cli_init_from_a_rule_of_another_architecture_is_a_one_line_error(tmp_path, capsys, form):
    flatl2o.make_rule("l2o-dm").save_pretrained(tmp_path / "dm")
    recipe = _write_recipe(tmp_path)  # an rnnprop recipe
    start = (
        ["--init-from", str(tmp_path / "dm")]
        if form == "flag"
        else [f"rule.init_from={tmp_path / 'dm'}"]
    )
    args = ["meta-train", "--recipe", str(recipe), "--out", str(tmp_path / "o"), *start]
    assert cli_main(args) == 2
    err = _one_line_error(capsys)
    assert "is a 'l2o-dm' rule but [rule].architecture is 'rnnprop'" in err
    assert "rule.architecture=l2o-dm" in err
    assert not (tmp_path / "o").exists()
    # and with the architecture that matches, --init-from starts from that checkpoint
    recipe = recipe_from_dict(
        tiny(rule={"architecture": "l2o-dm", "init_from": str(tmp_path / "dm")})
    )
    trainer = MetaTrainer(recipe, tmp_path / "ok", progress=False)
    assert trainer.rule.fingerprint() == flatl2o.load_rule(tmp_path / "dm").fingerprint()


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    recipe = _write_recipe(tmp_path)
    (tmp_path / "file").write_text("x")
    assert cli_main(["meta-train", "--recipe", str(recipe), "--out", str(tmp_path / "file")]) == 2
    assert "--out" in _one_line_error(capsys)
    args = ["meta-train", "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert (
        cli_main(
            [
                *args,
                "regularizer.name=entropy",
                "regularizer.alpha=1",
                "regularizer.options.steps=0",
            ]
        )
        == 2
    )
    assert "option steps" in _one_line_error(capsys)
    with pytest.raises(SystemExit) as info:  # argparse's own usage error
        cli_main([*args, "--threads", "-1"])
    assert info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_cli_ctrl_c_exits_130_with_a_resume_hint(tmp_path):
    recipe = _write_recipe(tmp_path, train={"iterations": 50, "checkpoint_every": 1})
    out = tmp_path / "run"
    proc = _run_cli(["--recipe", str(recipe), "--out", str(out)])
    deadline = time.time() + 300
    while not (out / "trainer_state" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    output = proc.stdout.read().decode()
    assert "interrupted" in output and "--resume" in output and "Traceback" not in output


def test_configerror_is_exported_from_the_top_level():
    assert flatl2o.ConfigError is flatl2o.rules.ConfigError
    with pytest.raises(flatl2o.ConfigError):
        flatl2o.make_rule("rnnprop", hidden_size=-1)


def test_log_is_strict_json_with_null_for_non_finite_values(tmp_path):
    trainer = MetaTrainer(recipe_from_dict(tiny()), tmp_path, progress=False)
    tmp_path.mkdir(exist_ok=True)
    trainer._log({"iteration": 1, "meta_loss": float("nan"), "val_loss": float("inf")})
    trainer._log({"iteration": 2, "meta_loss": 0.5, "val_loss": 2.0, "best_val_loss": 2.0})

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=reject) for line in lines]
    assert records[0] == {"iteration": 1, "meta_loss": None, "val_loss": None}
    assert records[1]["val_loss"] == 2.0
    plot_log(tmp_path / "log.jsonl", tmp_path / "plot.png")  # nulls are skipped, not plotted


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[task]\nname = "digits-mlp"\n')
    recipe = load_recipe(
        path,
        [
            "train.iterations=7",
            "regularizer.name=entropy",
            "regularizer.alpha=1",
            "train.meta_lr=2e-3",
        ],
    )
    assert (recipe.train.iterations, recipe.regularizer.name, recipe.train.meta_lr) == (
        7,
        "entropy",
        2e-3,
    )


def _write_recipe(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_from_dict(tiny(**sections)).to_toml())
    return path


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flatl2o", "meta-train", "--threads", "1", "--no-progress", *args]
    # Ctrl-C as in a terminal: a suite started in the background (``pytest &``) hands its
    # children SIGINT ignored, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    recipe = _write_recipe(tmp_path, train={"iterations": 6, "checkpoint_every": 2})
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = _run_cli(["--recipe", str(recipe), "--out", str(full)])
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()

    proc = _run_cli(["--recipe", str(recipe), "--out", str(killed)])
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 after iteration 3 is logged (checkpoint was at 2)
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail("run finished before it could be killed")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()
    with pytest.raises(ResumeError, match="already holds a run"):
        MetaTrainer(load_recipe(recipe), killed, progress=False)
    resumed = _run_cli(["--recipe", str(recipe), "--out", str(killed), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()

    a = flatl2o.load_rule(full)
    b = flatl2o.load_rule(killed)
    assert a.fingerprint() == b.fingerprint()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 7))


def _after_one_trajectory(tmp_path: Path, name: str, **regularizer) -> tuple:
    """(slot generator state, rule fingerprint) after two meta-iterations of the tiny recipe
    (4 unrolls, each an imitation unroll with probability 0.3)."""
    reg = {"name": name, "alpha": 0.0 if name == "none" else 1.0, **regularizer}
    recipe = recipe_from_dict(tiny(regularizer=reg, train={"imitation_prob": 0.3}))
    trainer = MetaTrainer(recipe, tmp_path / f"{name}-{regularizer}", progress=False)
    for _ in range(2):
        trainer.trajectory(recipe.train.trajectory)
    return trainer.generator.get_state(), trainer.rule.fingerprint()


@pytest.mark.parametrize("name", ["hessian-trace", "entropy"])
def test_own_regularizer_rng_keeps_the_unregularized_siblings_data(tmp_path, name):
    """[regularizer].rng = "own": R's draws come from a separate generator, so a regularized run
    consumes the same minibatches and imitation choices as its sibling (and only the rule
    differs); with the default ("minibatch") R's draws shift that stream."""
    plain_state, plain_rule = _after_one_trajectory(tmp_path, "none")
    own_state, own_rule = _after_one_trajectory(tmp_path, name, rng="own")
    shared_state, _ = _after_one_trajectory(tmp_path, name)
    assert torch.equal(own_state, plain_state) and own_rule != plain_rule
    assert not torch.equal(shared_state, plain_state)
    with pytest.raises(RecipeError, match=r"\[regularizer\]\.rng must be one of"):
        recipe_from_dict(tiny(regularizer={"name": name, "alpha": 1.0, "rng": "fresh"}))


def test_own_regularizer_rng_resumes_to_the_same_weights(tmp_path):
    recipe = recipe_from_dict(
        tiny(
            regularizer={"name": "entropy", "alpha": 1.0, "rng": "own", "options": {"steps": 2}},
            train={"iterations": 4, "checkpoint_every": 2, "imitation_prob": 0.0},
        )
    )
    full = MetaTrainer(recipe, tmp_path / "full", progress=False).run()
    out = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as m:  # killed right after the checkpoint of iteration 2
        _kill_when_writing_state_json(m, iteration=2)
        with pytest.raises(_Killed):
            MetaTrainer(recipe, out, progress=False).run()
    resumed = MetaTrainer(recipe, out, resume=True, progress=False)
    assert resumed.iteration == 2 and resumed.reg_generators is not None
    resumed.run()
    _assert_same_weights(full, out)


def test_a_run_saved_before_the_rng_key_existed_still_resumes(tmp_path):
    """A checkpoint whose saved recipe lacks [regularizer].rng (an older flatl2o) resumes: the
    missing key means the default, which is how that run was trained."""
    recipe = recipe_from_dict(tiny(train={"iterations": 4, "checkpoint_every": 2}))
    trainer = MetaTrainer(recipe, tmp_path, progress=False)
    trainer.iteration = 2
    trainer._save_state()
    path = tmp_path / "trainer_state" / "state.safetensors"
    from safetensors.torch import load_file, save_file

    from flatl2o.checkpoint import safetensors_header

    header, _ = safetensors_header(path.read_bytes())
    meta = json.loads(header["__metadata__"]["flatl2o_trainer_state"])
    del meta["recipe"]["regularizer"]["rng"]
    save_file(load_file(path), path, metadata={"flatl2o_trainer_state": json.dumps(meta)})
    assert MetaTrainer(recipe, tmp_path, resume=True, progress=False).iteration == 2


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _checkpoint_at_iteration_2(folder: Path) -> Path:
    """A tiny run folder checkpointed at iteration 2 (with this process's thread count)."""
    recipe = recipe_from_dict(tiny(train={"iterations": 4, "checkpoint_every": 2}))
    trainer = MetaTrainer(recipe, folder, progress=False)
    trainer.iteration = 2
    trainer._save_state()
    return _write_recipe(folder.parent)


def test_resume_with_another_thread_count_is_refused_unless_allowed(
    tmp_path, capsys, restore_threads
):
    """Float reductions split over another number of threads round differently, so a resume
    with another thread count would not end where the uninterrupted run ends: refused with
    the flag that matches it, or continued with a one-line warning when allowed."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    recipe_path = _checkpoint_at_iteration_2(out)
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    assert state["threads"] == 1 and state["torch"] == torch.__version__
    torch.set_num_threads(2)
    recipe = load_recipe(recipe_path)
    message = r"torch intra-op threads: saved 1, now 2.*--threads 1 .*--allow-inexact-resume"
    with pytest.raises(ResumeError, match=message):
        MetaTrainer(recipe, out, resume=True, progress=False)
    with pytest.warns(InexactResumeWarning, match="saved 1, now 2"):
        assert MetaTrainer(recipe, out, resume=True, progress=False, exact_resume=False).iteration
    args = ["meta-train", "--recipe", str(recipe_path), "--out", str(out), "--resume"]
    assert cli_main([*args, "--threads", "2", "--no-progress"]) == 2
    assert "--threads 1" in _one_line_error(capsys)
    torch.set_num_threads(1)  # the count it was saved with: resumed without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MetaTrainer(recipe, out, resume=True, progress=False).iteration == 2
    assert cli_main([*args, "--threads", "2", "--no-progress", "--allow-inexact-resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("flatl2o meta-train: warning: resuming") == 1 and "Traceback" not in err
    assert (out / "model.safetensors").is_file()


def test_a_run_saved_before_the_thread_count_was_recorded_still_resumes(tmp_path, restore_threads):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    recipe_path = _checkpoint_at_iteration_2(out)
    path = out / "trainer_state" / "state.safetensors"
    from safetensors.torch import load_file, save_file

    from flatl2o.checkpoint import safetensors_header

    header, _ = safetensors_header(path.read_bytes())
    meta = json.loads(header["__metadata__"]["flatl2o_trainer_state"])
    del meta["threads"], meta["torch"]
    save_file(load_file(path), path, metadata={"flatl2o_trainer_state": json.dumps(meta)})
    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer = MetaTrainer(load_recipe(recipe_path), out, resume=True, progress=False)
    assert trainer.iteration == 2


def test_resume_refuses_a_different_recipe(tmp_path):
    recipe = recipe_from_dict(tiny(train={"iterations": 2}))
    MetaTrainer(recipe, tmp_path, progress=False).run()
    other = recipe_from_dict(tiny(train={"iterations": 2, "meta_lr": 0.5}))
    with pytest.raises(ResumeError, match="different recipe"):
        MetaTrainer(other, tmp_path, resume=True, progress=False)
    with pytest.raises(ResumeError, match="nothing to resume"):
        MetaTrainer(recipe, tmp_path / "empty", resume=True, progress=False)


def test_output_is_a_hub_ready_folder_that_the_optimizer_loads(tmp_path):
    recipe = recipe_from_dict(
        tiny(regularizer={"name": "hessian-trace", "alpha": 0.1}, train={"imitation_prob": 0.5})
    )
    out = MetaTrainer(recipe, tmp_path / "run", progress=False, command="pytest").run()
    for name in ("config.json", "model.safetensors", "README.md", "recipe.toml", "metrics.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert (
        "library_name: flatl2o" in card and "hessian-trace" in card and "Command: `pytest`" in card
    )
    # a real title and usage line: the folder it was written to, not a placeholder
    assert "PATH_OR_REPO_ID" not in card and "\n# tiny\n" in card
    assert f"L2O.from_pretrained(model.parameters(), {json.dumps(str(out))})" in card
    assert "Task: `digits-mlp` (batch 32)" in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy@20"] <= 1.0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all("regularizer" in r or "imitation" in r for r in records)
    assert any("val_loss" in r for r in records)
    # the recipe written next to the weights reproduces the run's configuration
    assert load_recipe(out / "recipe.toml").to_dict() == recipe.to_dict()
    model = nn.Linear(3, 2)
    opt = flatl2o.L2O.from_pretrained(model.parameters(), out)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    # an exported copy's card loads the copy; a copy into pretrained/ loads the shipped name
    trainer = MetaTrainer(recipe, out, resume=True, progress=False)
    exported = trainer.export(tmp_path / "shipped" / "tiny")
    card = (exported / "README.md").read_text()
    assert f"from_pretrained(model.parameters(), {json.dumps(str(exported))})" in card
    assert export_name(Path(flatl2o.hub.SHIPPED_DIRS[1]) / "dm-entropy") == "dm-entropy"


def test_finetune_from_a_checkpoint_on_a_users_own_module(tmp_path):
    """A user's nn.Module + loss + sampler becomes a meta-training task without rewriting it."""
    start = flatl2o.make_rule("rnnprop")
    start.save_pretrained(tmp_path / "start")

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return self.body(x).squeeze(-1) * self.scale

    w = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def sample(gen):
        x = torch.randn(32, 4, generator=gen)
        return x, x @ w

    task = Task.from_module(Regressor(), nn.functional.mse_loss, sampler=sample, name="user")
    recipe = recipe_from_dict(
        tiny(rule={"init_from": str(tmp_path / "start")}, curriculum={"validate_every": 100})
    )
    out = MetaTrainer(recipe, tmp_path / "ft", task=task, progress=False).run()
    tuned = flatl2o.load_rule(out)
    assert tuned.fingerprint() != start.fingerprint()
    # the card names the task that was trained on, not the recipe's [task] (digits-mlp)
    card = (out / "README.md").read_text()
    assert "digits-mlp" not in card
    assert "a user-defined task `user` (49 parameters, batches from its sampler" in card
    model = Regressor()
    opt = flatl2o.L2O(model.parameters(), tuned)
    x, y = sample(torch.Generator().manual_seed(1))
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_rollout_path_matches_the_optimizer_path():
    """The functional path used in meta-training and L2O on an nn.Module give equal numbers."""
    task = make_task("digits-mlp", batch_size=16)
    rule = flatl2o.make_rule("rnnprop")
    gen = torch.Generator().manual_seed(3)
    theta0 = task.init_params(gen)
    batches = [task.sample_batch(gen) for _ in range(5)]
    it = iter(batches)

    # functional path, with the same batches
    theta = theta0.clone()
    state = rule.init_state(theta.numel())
    with torch.no_grad():
        for t, (x, y) in enumerate(batches, start=1):
            with torch.enable_grad():
                th = theta.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(task.loss(th, x, y), th)
            step, state = rule(g, state, t)
            theta = theta - step
    # optimizer path on the module itself
    task.load_params(theta0)
    opt = flatl2o.L2O(task.module.parameters(), rule)
    for x, y in it:
        opt.zero_grad()
        nn.functional.cross_entropy(task.module(x), y).backward()
        opt.step()
    flat = task.flatten(dict(task.module.named_parameters()))
    torch.testing.assert_close(flat, theta, rtol=1e-6, atol=1e-7)
    # and train_optimizee (validation, evaluation, model cards) is the same loop
    traj = train_optimizee(task, learned_optimizer(rule), seed=3, horizons=[5])
    torch.testing.assert_close(traj.run.theta(), theta, rtol=1e-6, atol=1e-7)
    assert len(traj.losses) == 5 and traj.diverged_at is None


DATA = Path(__file__).parent / "data"


def _assert_metrics_match(measured: dict, stored: dict, *, acc_tol: float, loss_rtol: float):
    for key, want in stored.items():
        if "_std@" in key:
            continue
        got = measured[key]
        if key.startswith("test_accuracy"):
            assert abs(got - want) <= acc_tol, (key, got, want)
        else:
            assert abs(got - want) <= loss_rtol * abs(want), (key, got, want)


def test_short_recipe_reproduces_its_stored_metrics(tmp_path):
    recipe = load_recipe(DATA / "short_recipe.toml")
    out = MetaTrainer(recipe, tmp_path, progress=False).run()
    measured = json.loads((out / "metrics.json").read_text())
    stored = json.loads((DATA / "short_recipe_metrics.json").read_text())
    _assert_metrics_match(measured, stored, acc_tol=0.02, loss_rtol=0.02)


SHIPPED = sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.toml"))


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_full_recipe_reproduces_the_shipped_checkpoint(tmp_path, name):
    """Opt-in (--runslow): rerun a shipped recipe end to end and compare with its model card."""
    shipped = Path(__file__).parents[1] / "pretrained" / name
    if not (shipped / "metrics.json").is_file():
        pytest.skip(f"{name} is not shipped yet")
    out = MetaTrainer(load_recipe(shipped / "recipe.toml"), tmp_path, progress=False).run()
    measured = json.loads((out / "metrics.json").read_text())
    stored = json.loads((shipped / "metrics.json").read_text())
    _assert_metrics_match(measured, stored, acc_tol=0.03, loss_rtol=0.05)


# ---- recipes: overrides, TOML round trip, shipped recipes ------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.iterations.x=3", r"train\.iterations is a value \(4\), not a table"),
        ("name.x=1", r"name is a value \('tiny'\), not a table, so it has no key 'x'"),
        ("regularizer..alpha=1", "empty key"),
    ],
)
def test_an_override_into_a_value_is_a_recipe_error(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write_recipe(tmp_path), [override])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("folder", r"recipe .* is a folder; pass a recipe TOML file"),
        ("latin-1", r"recipe file .* is not UTF-8 text \(byte 0xe9 at offset 11\)"),
        ("missing", r"recipe file .* does not exist"),
    ],
)
def test_an_unreadable_recipe_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, case, message):
    path = {"folder": tmp_path, "latin-1": tmp_path / "r.toml", "missing": tmp_path / "no.toml"}
    (tmp_path / "r.toml").write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    args = ["meta-train", "--recipe", str(path[case]), "--out", str(tmp_path / "o")]
    assert cli_main(args) == 2
    assert re.search(message, _one_line_error(capsys))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [  # a key set on the command line is blamed on the override as typed, not on the file
        (["train.iteratons=5"], r"^command-line override 'train\.iteratons=5': unknown key"),
        (["train.iterations=-1"], r"^command-line override 'train\.iterations=-1': \[train\]"),
        (["train.unroll=abc"], r"^command-line override 'train\.unroll=abc': \[train\]\.unroll"),
        (["nope.x=1"], r"^command-line override 'nope\.x=1': unknown key 'nope'"),
        (
            ["regularizer.name=entropy", "regularizer.alpha=1", "regularizer.options.steps=0"],
            r"^command-line overrides 'regularizer\.options\.steps=0', 'regularizer\.name=",
        ),
        # a rule broken by the file and an override together names both
        (["train.unroll=3"], r"^\S+recipe\.toml with command-line override 'train\.unroll=3': "),
    ],
)
def test_a_bad_override_is_blamed_on_the_command_line(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write_recipe(tmp_path), overrides)


def test_a_bad_key_in_the_file_is_blamed_on_the_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(_write_recipe(tmp_path).read_text() + "\n[extra]\nx = 1\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: unknown key 'extra'"):
        load_recipe(path, ["train.iterations=2"])


@pytest.mark.parametrize(
    "text",
    [
        'plain ü é "q" \\ back\\slash \n newline \t tab \r \b \f',
        "trained on MNIST \U0001f600 (emoji)",
        "math: \U0001d6fc = 1e-3, ∑ and 中文",
        "controls \x00 \x1f \x7f and a zero-width joiner \u200d",
    ],
)
def test_recipe_toml_round_trips_any_text(tmp_path, text):
    recipe = recipe_from_dict(
        tiny(
            name=text,
            description=text,
            regularizer={"name": "entropy", "alpha": 1.0, "options": {"gamma": 1e-3}},
        )
    )
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml(), encoding="utf-8")
    assert load_recipe(path).to_dict() == recipe.to_dict()


RECIPE_FILES = sorted((Path(__file__).parents[1] / "recipes").glob("*.toml")) + sorted(
    (Path(__file__).parents[1] / "pretrained").glob("*/recipe.toml")
)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_still_loads_and_validates(path):
    recipe = load_recipe(path)  # validates
    assert recipe.regularizer.name == "none" or recipe.regularizer.alpha > 0
    assert recipe_from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


def test_there_are_shipped_recipes_to_check():
    assert len(RECIPE_FILES) >= 12


# ---- resume: one atomic checkpoint, damaged checkpoints, folder checks -------------------------
class _Killed(BaseException):
    """Stands for a SIGKILL at a chosen instant of an in-process run."""


def _kill_when_writing_state_json(monkeypatch, iteration: int) -> None:
    """Make the trainer die when it writes ``trainer_state/state.json`` for ``iteration``,
    after that checkpoint's ``state.safetensors`` was written."""
    import flatl2o.meta.run_state as run_state

    real = run_state.atomic_write_text

    def write(path, text):
        if Path(path).name == "state.json" and json.loads(text)["iteration"] == iteration:
            raise _Killed
        return real(path, text)

    monkeypatch.setattr(run_state, "atomic_write_text", write)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return flatl2o.load_rule(folder).state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A complete tiny run (4 trajectories, checkpoints at 2 and 4) to compare and corrupt."""
    out = tmp_path_factory.mktemp("finished") / "run"
    MetaTrainer(recipe_from_dict(tiny(train={"imitation_prob": 0.3})), out, progress=False).run()
    return out


def test_a_kill_between_the_checkpoint_writes_resumes_exactly(tmp_path, monkeypatch, finished_run):
    """The tensors of iteration 4 are on disk, state.json still says 2: the resume must
    continue from 4 (all counters are in the safetensors file), not mix the two."""
    recipe = recipe_from_dict(tiny(train={"imitation_prob": 0.3}))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_when_writing_state_json(m, iteration=4)
        with pytest.raises(_Killed):
            MetaTrainer(recipe, out, progress=False).run()
    assert json.loads((out / "trainer_state" / "state.json").read_text())["iteration"] == 2
    MetaTrainer(recipe, out, resume=True, progress=False).run()
    _assert_same_weights(finished_run, out)
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]


def _strip_counters(folder: Path) -> None:
    """Rewrite a checkpoint's tensors file without the counters in its metadata."""
    from safetensors.torch import load_file, save_file

    path = folder / "trainer_state" / "state.safetensors"
    save_file(load_file(str(path)), str(path))


def test_a_checkpoint_without_counters_is_not_resumed_from_state_json(tmp_path, finished_run):
    """The counters are read from state.safetensors only (one atomic file); state.json is a
    copy, so a tensors file without them is damaged even next to a matching state.json
    (the format that kept them only in state.json was never released)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _strip_counters(out)
    assert json.loads((out / "trainer_state" / "state.json").read_text())["iteration"] == 4
    recipe = recipe_from_dict(tiny(train={"imitation_prob": 0.3}))
    with pytest.raises(ResumeError, match=r"damaged or incomplete: .*holds no counters"):
        MetaTrainer(recipe, out, resume=True, progress=False)


def _corrupt(folder: Path, case: str) -> None:
    from safetensors.torch import load_file, save_file

    state = folder / "trainer_state"
    tensors_path = state / "state.safetensors"
    if case == "truncated tensors":
        tensors_path.write_bytes(tensors_path.read_bytes()[:1000])
    elif case == "truncated tensor data":
        tensors_path.write_bytes(tensors_path.read_bytes()[:-100])
    elif case == "garbage tensors":
        tensors_path.write_bytes(b"\xff" * 64)
    elif case == "empty tensors":
        tensors_path.write_bytes(b"")
    elif case == "missing tensors":
        tensors_path.unlink()
    elif case in ("missing counter", "missing rng tensor"):
        from safetensors import safe_open

        with safe_open(str(tensors_path), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(tensors_path))
        if case == "missing counter":
            meta = json.loads(metadata["flatl2o_trainer_state"])
            del meta["log_lines"]
            metadata["flatl2o_trainer_state"] = json.dumps(meta)
        else:
            del tensors["rng"]
        save_file(tensors, str(tensors_path), metadata=metadata)
    elif case == "no counters":
        _strip_counters(folder)
    else:  # pragma: no cover
        raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "truncated tensors",
        "truncated tensor data",
        "garbage tensors",
        "empty tensors",
        "missing tensors",
        "missing counter",
        "missing rng tensor",
        "no counters",
    ],
)
def test_a_damaged_checkpoint_is_a_one_line_resume_error(tmp_path, capsys, finished_run, case):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    _corrupt(out, case)
    (tmp_path / "recipe.toml").write_text((out / "recipe.toml").read_text())
    args = ["meta-train", "--recipe", str(tmp_path / "recipe.toml"), "--out", str(out)]
    assert cli_main([*args, "--resume", "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "damaged or incomplete" in err and "delete" in err, err


def test_state_json_is_only_a_copy_so_damaging_it_does_not_stop_a_resume(tmp_path, finished_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "trainer_state" / "state.json").write_text("")
    trainer = MetaTrainer(load_recipe(out / "recipe.toml"), out, resume=True, progress=False)
    assert trainer.iteration == 4


@pytest.mark.parametrize(
    "existing", ["log.jsonl", "model.safetensors", "recipe.toml", "best", "README.md"]
)
def test_a_new_run_refuses_a_folder_with_an_earlier_run_or_checkpoint(tmp_path, existing):
    out = tmp_path / "run"
    out.mkdir()
    (out / existing).mkdir() if existing == "best" else (out / existing).write_text("{}\n")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ResumeError, match=rf"already holds .*{existing}.*delete {out}"):
        MetaTrainer(recipe_from_dict(tiny()), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written or appended


def test_a_new_run_may_use_a_folder_that_holds_other_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("shell redirection of this run's output\n")
    MetaTrainer(recipe_from_dict(tiny()), out, progress=False)  # no error


def test_a_run_killed_before_its_first_checkpoint_says_to_delete_the_folder(tmp_path):
    recipe = recipe_from_dict(tiny(train={"checkpoint_every": 4}))
    out = tmp_path / "run"
    trainer = MetaTrainer(recipe, out, progress=False)
    out.mkdir()
    trainer._log({"iteration": 1, "meta_loss": 1.0})  # what a run killed at iteration 1 left
    with pytest.raises(ResumeError, match=rf"saved no checkpoint yet\); delete {out}"):
        MetaTrainer(recipe, out, resume=True, progress=False)
    with pytest.raises(ResumeError, match=r"already holds files .*log\.jsonl"):
        MetaTrainer(recipe, out, progress=False)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_resume_does_not_reload_init_from(tmp_path):
    import shutil

    start = tmp_path / "start"
    flatl2o.make_rule("rnnprop", hidden_size=8).save_pretrained(start)
    recipe = recipe_from_dict(tiny(rule={"init_from": str(start)}, train={"iterations": 2}))
    out = tmp_path / "run"
    MetaTrainer(recipe, out, progress=False).run()
    shutil.rmtree(start)  # a deleted folder (or an offline Hub id) must not stop the resume
    trainer = MetaTrainer(recipe, out, resume=True, progress=False)
    assert trainer.rule.config.hidden_size == 8
    assert trainer.rule.fingerprint() == flatl2o.load_rule(out).fingerprint()


def test_resume_names_the_recipe_keys_that_differ(tmp_path):
    recipe = recipe_from_dict(tiny(train={"iterations": 2}))
    MetaTrainer(recipe, tmp_path, progress=False).run()
    other = recipe_from_dict(
        tiny(train={"iterations": 2, "meta_lr": 0.5}, regularizer={"name": "entropy", "alpha": 1})
    )
    with pytest.raises(ResumeError) as info:
        MetaTrainer(other, tmp_path, resume=True, progress=False)
    message = str(info.value)
    assert "train.meta_lr: saved 0.001, now 0.5" in message
    assert "regularizer.name: saved 'none', now 'entropy'" in message
    assert "regularizer.alpha: saved 0.0, now 1.0" in message
    assert "train.iterations" not in message


# ---- a diverged run: non-finite metrics, a NaN rule ---------------------------------------------
def _nan_rule(architecture: str = "l2o-dm"):
    rule = flatl2o.make_rule(architecture)
    with torch.no_grad():
        next(rule.parameters()).fill_(float("nan"))
    return rule


def test_validation_measures_what_the_suites_validation_runs_measure(tmp_path):
    """Meta-training validation is the evaluation suite's loop (L2O's kernel, per tensor): its
    value is the mean validation loss of the suite's ``"tune"`` runs of the same rule on the
    validation seeds, bit for bit (it was a second loop on the rule module, rounding apart)."""
    from flatl2o.evaluation.runner import RunSpec, train_run
    from flatl2o.meta.optimizee import EVAL_SEED_OFFSET
    from flatl2o.meta.recipe import VAL_SEED_OFFSET

    recipe = recipe_from_dict(tiny(curriculum={"validate_every": 2, "validation_runs": 2}))
    trainer = MetaTrainer(recipe, tmp_path / "run", progress=False)
    trainer.rule.save_pretrained(tmp_path / "rule")
    runs = [
        train_run(
            RunSpec(
                recipe.task.name,
                "rule",
                seed=VAL_SEED_OFFSET - EVAL_SEED_OFFSET + i,
                horizons=(30,),
                purpose="tune",
                hparams={"lr": 1.0},
                checkpoint=str(tmp_path / "rule"),
                batch_size=recipe.task.batch_size,
            ),
            trainer.task,
        )
        for i in range(2)
    ]
    want = sum(r["metrics"]["30"]["val_loss"] for r in runs) / 2
    assert trainer.validate(30) == want


def test_evaluate_rule_reports_diverged_runs_at_their_last_finite_iterate():
    """A rule whose steps are NaN diverges at step 1 on every seed: the runs are measured at
    their last finite iterate (the initialization), as the results pages measure them, and the
    summary says how many diverged."""
    from flatl2o.meta.optimizee import evaluate_rule

    task = make_task("digits-mlp", batch_size=16)
    metrics = evaluate_rule(_nan_rule(), task, horizons=[3], seeds=2)
    assert metrics["diverged@3"] == 2
    init = [task.evaluate(task.init_params(torch.Generator().manual_seed(10_000 + s)), "test")
            for s in range(2)]  # fmt: skip
    assert metrics["test_loss@3"] == pytest.approx((init[0]["loss"] + init[1]["loss"]) / 2)
    assert "diverged@3" not in evaluate_rule(
        flatl2o.make_rule("rnnprop"), task, horizons=[3], seeds=1
    )


def test_mean_std_is_the_results_pages_convention():
    """Mean and SAMPLE std of the finite values (the results page's ``Stats``): the model
    cards used the population std, so a card and the results page disagreed on the same runs."""
    from flatl2o.meta.optimizee import mean_std

    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([1.0, math.inf, 3.0, math.nan]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([math.inf, -math.inf]))


def test_finish_records_non_finite_metrics_as_null(tmp_path, monkeypatch):
    import flatl2o.meta.trainer as trainer_module

    def diverged(rule, task, *, horizons, seeds):
        return {"test_accuracy@20": 0.1, "test_accuracy_std@20": 0.0, "test_loss@20": math.inf,
                "test_loss_std@20": math.nan, "train_loss@20": math.nan,
                "train_loss_std@20": math.nan}  # fmt: skip

    monkeypatch.setattr(trainer_module, "evaluate_rule", diverged)
    trainer = MetaTrainer(recipe_from_dict(tiny()), tmp_path / "run", progress=False)
    out = trainer.finish()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_loss@20"] is None and metrics["train_loss@20"] is None
    assert (out / "README.md").is_file() and flatl2o.load_rule(out) is not None


def test_evaluation_reports_validation_split_numbers_for_choosing_hyper_parameters(
    tmp_path, monkeypatch
):
    """Regularizer strengths must be compared on validation numbers, not on the test split:
    evaluate_rule and the model card report both (the test keys stay for old readers)."""
    import flatl2o.meta.trainer as trainer_module
    from flatl2o.meta.optimizee import evaluate_rule

    task = make_task("digits-mlp", batch_size=16)
    metrics = evaluate_rule(flatl2o.make_rule("rnnprop"), task, horizons=[2, 3], seeds=2)
    for h in (2, 3):
        for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_loss"):
            assert math.isfinite(metrics[f"{key}@{h}"]) and f"{key}_std@{h}" in metrics
        assert 0.0 <= metrics[f"val_accuracy@{h}"] <= 1.0

    def fake(rule, task, *, horizons, seeds):
        return {f"{k}@20": v for k, v in (("test_accuracy", 0.8), ("test_accuracy_std", 0.01),
                ("test_loss", 0.6), ("test_loss_std", 0.1), ("train_loss", 0.5),
                ("train_loss_std", 0.1), ("val_accuracy", 0.75), ("val_accuracy_std", 0.02),
                ("val_loss", 0.7), ("val_loss_std", 0.1))}  # fmt: skip

    monkeypatch.setattr(trainer_module, "evaluate_rule", fake)
    out = MetaTrainer(recipe_from_dict(tiny()), tmp_path / "run", progress=False).finish()
    card = (out / "README.md").read_text()
    assert "| steps | val accuracy | val loss | test accuracy | test loss | train loss |" in card
    assert "| 20 | 0.7500 ± 0.0200 | 0.7000 | 0.8000 ± 0.0100 | 0.6000 | 0.5000 |" in card
    assert "choose hyper-parameters" in card
    assert json.loads((out / "metrics.json").read_text())["val_accuracy@20"] == 0.75


def test_finish_refuses_a_diverged_rule_with_a_clear_error(tmp_path):
    from flatl2o.checkpoint import CheckpointError

    trainer = MetaTrainer(recipe_from_dict(tiny()), tmp_path / "run", progress=False)
    trainer.rule = _nan_rule("rnnprop")
    with pytest.raises(CheckpointError, match=r"meta-training diverged.*lower \[train\]\.meta_lr"):
        trainer.finish()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # with a validated (finite) best rule, the run ships that one
    flatl2o.make_rule("rnnprop").save_pretrained(tmp_path / "run" / "best")
    trainer.finish(evaluate=False)
    flatl2o.load_rule(tmp_path / "run")


# ---- the plot ------------------------------------------------------------------------------------
def test_plot_uses_a_linear_axis_for_values_that_are_not_all_positive(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    log = tmp_path / "log.jsonl"
    log_losses = [0.8, 0.1, -0.2, -0.9]  # meta_loss = "log": mean log f, negative once f < 1
    log.write_text(
        "".join(
            json.dumps({"iteration": i + 1, "meta_loss": v, "val_loss": 2.0 / (i + 1)}) + "\n"
            for i, v in enumerate(log_losses)
        )
    )
    assert plot_log(log, tmp_path / "plot.png") is not None
    (fig,) = figures
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {"meta_loss": "linear", "val_loss": "log"}


def _drawn_pixels(fig) -> dict[str, int]:
    """Per axes (by title), how many pixels inside it have the colour of its data (C0)."""
    import numpy as np

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    height = image.shape[0]
    out = {}
    for ax in fig.axes:
        box = ax.get_window_extent()
        crop = image[
            int(height - box.y1) + 2 : int(height - box.y0) - 2, int(box.x0) + 2 : int(box.x1) - 2
        ]
        out[ax.get_title()] = int((np.abs(crop - [31, 119, 180]).sum(-1) < 60).sum())
    return out


@pytest.mark.parametrize("points", [1, 2])
def test_plot_of_a_run_with_one_or_two_logged_points_shows_them(tmp_path, monkeypatch, points):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its pixels
    log = tmp_path / "log.jsonl"
    records = [{"iteration": i + 1, "meta_loss": 1.0 / (i + 1)} for i in range(points)]
    records[-1]["val_loss"] = 0.5  # validated at the end only: a single point
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_log(log, tmp_path / "plot.png") is not None
    (fig,) = figures
    drawn = _drawn_pixels(fig)
    plt.close(fig)
    assert set(drawn) == {"meta_loss", "val_loss"}
    assert all(n >= 20 for n in drawn.values()), drawn


def test_a_non_finite_meta_gradient_is_skipped_not_applied(tmp_path):
    """An unroll from a diverged optimizee (NaN parameters) has a NaN meta-gradient: applying it
    made every weight of the rule, and so every later trajectory, NaN (seen in a NormProp run
    at a large base step). The step is skipped and counted; a finite unroll still steps."""
    trainer = MetaTrainer(recipe_from_dict(tiny()), tmp_path, progress=False)
    theta = trainer.task.init_params(torch.Generator().manual_seed(0))
    state = trainer.rule.init_state(theta.numel())
    before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    bad = theta.clone()
    bad[0] = float("nan")
    trainer.unroll(bad, state, 0, regularize=False)
    assert trainer.skipped_meta_steps == 1 and not trainer.meta_opt.state
    for k, v in trainer.rule.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.unroll(theta, state, 0, regularize=False)
    assert trainer.skipped_meta_steps == 1 and trainer.meta_opt.state
    assert all(bool(torch.isfinite(v).all()) for v in trainer.rule.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in trainer.rule.state_dict().items())
