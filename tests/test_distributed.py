"""flatl2o on torch.distributed with 2 real processes (torchrun, gloo, CPU): the optimizer under
DDP and FSDP2 matches single-process training with the same global batch, its sharded state
saves and resumes with torch.distributed.checkpoint, and meta-training on 2 ranks stays in sync,
resumes exactly and matches one process unrolling both ranks' optimizees."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import flatl2o
from flatl2o.meta.recipe import load_recipe, recipe_from_dict
from flatl2o.meta.trainer import MetaTrainer, ResumeError

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

import dist_workers as W  # tests/ is on sys.path, like hub_server

HERE = Path(__file__).parent


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port is picked); each
    worker runs through tests/hang_dump.py, which writes its stacks to stderr 30 s before the
    timeout, so a hang's failure message says where every remaining worker waits."""
    # the workers import the same flatl2o as this process, and dist_workers from tests/
    path = [str(Path(flatl2o.__file__).parents[1]), str(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(HERE / "hang_dump.py"), str(max(timeout - 30, 1))]
    # its own session, so that a hung run's workers are killed with it, not left to slow down
    # the rest of the suite
    with subprocess.Popen(
        [*cmd, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
        start_new_session=True,
    ) as popen:
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGTERM)  # torchrun stops its workers on SIGTERM
            try:
                out, err = popen.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(popen.pid, signal.SIGKILL)
                out, err = popen.communicate()
            raise AssertionError(  # say where it hung: the output so far
                f"torchrun {' '.join(args)} still running after {timeout} s:\n"
                f"{out[-4000:]}\n{err[-12000:]}"
            ) from None
    assert popen.returncode == 0, f"torchrun failed:\n{out[-4000:]}\n{err[-8000:]}"
    return subprocess.CompletedProcess(popen.args, popen.returncode, out, err)


def test_a_worker_still_running_at_the_deadline_writes_where_it_waits(tmp_path):
    """The diagnosis torchrun() relies on: hang_dump.py dumps the stacks and lets the run go on."""
    script = tmp_path / "slow.py"
    script.write_text("import time\n\ndef wait_here():\n    time.sleep(3)\n\nwait_here()\n")
    run = subprocess.run(
        [sys.executable, str(HERE / "hang_dump.py"), "1", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0
    assert "Timeout" in run.stderr and "in wait_here" in run.stderr, run.stderr
    # and a module runs as with python -m (its own argv), without a dump when it is quick
    run = subprocess.run(
        [sys.executable, str(HERE / "hang_dump.py"), "60", "-m", "json.tool", "--compact"],
        input='{"a": [1, 2]}',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and run.stdout.strip() == '{"a":[1,2]}' and not run.stderr


# ------------------------------------------------------------------ the optimizer
@pytest.fixture(scope="module")
def optimizer_dir(tmp_path_factory) -> Path:
    """The folder where tests/dist_workers.py's optimizer scenario wrote its results."""
    out = tmp_path_factory.mktemp("optimizer")
    torchrun(str(HERE / "dist_workers.py"), "optimizer", str(out))
    return out


@pytest.fixture(scope="module")
def optimizer_runs(optimizer_dir) -> list[dict]:
    """Both ranks' results of the optimizer scenario."""
    return [
        torch.load(optimizer_dir / f"optimizer_rank{r}.pt", weights_only=True) for r in range(2)
    ]


@pytest.fixture(scope="module")
def reference() -> dict:
    """Single-process training with the full global batch: parameters and optimizer state."""
    model = W.make_model()
    opt = flatl2o.L2O(model.parameters(), W.make_rule())
    W.train(model, opt, range(W.STEPS), rank=0, world=1)
    return {"params": W.full_params(model), "state": W.full_state(model, opt)}


def assert_tensors_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], dict):
            assert_tensors_close(got[key], want[key])
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_matches_single_process_training(optimizer_runs, reference):
    for run in optimizer_runs:
        assert_tensors_close(run["ddp"], reference["params"])
    # and the reference itself moved: the comparison is not between untrained models
    assert not torch.allclose(reference["params"]["0.weight"], W.make_model()[0].weight)


def test_fsdp2_matches_single_process_training_shard_by_shard(optimizer_runs, reference):
    # uneven shards: 5 rows -> 3 + 2, 3 rows -> 2 + 1, 1 row -> 1 + 0 (an empty shard)
    assert optimizer_runs[0]["fsdp_local_shapes"]["0.weight"] == (3, 6)
    assert optimizer_runs[1]["fsdp_local_shapes"]["0.weight"] == (2, 6)
    assert optimizer_runs[1]["fsdp_local_shapes"]["2.weight"] == (1, 5)
    assert optimizer_runs[1]["fsdp_local_shapes"]["4.weight"] == (0, 3)
    for run in optimizer_runs:
        assert run["fsdp_state_is_dtensor"]
        assert_tensors_close(run["fsdp"], reference["params"])
        # the gathered recurrent state equals the single process's, coordinate by coordinate
        assert_tensors_close(run["fsdp_state"], reference["state"])


def test_sharded_state_saves_with_dcp_and_resumes_exactly(optimizer_runs):
    for run in optimizer_runs:
        assert run["resumed_step"] == W.RESUME_AT
        for key, value in run["fsdp"].items():
            assert torch.equal(run["resumed"][key], value), key
        for name, state in run["fsdp_state"].items():
            for key, value in state.items():
                assert torch.equal(run["resumed_state"][name][key], value), (name, key)
        assert "rule" in run["other_rule_error"] and "same rule" in run["other_rule_error"]


def test_a_two_rank_checkpoint_reshards_onto_one_process(optimizer_dir, optimizer_runs):
    """DCP reshards the DTensor state: the 2-rank checkpoint resumes under FSDP2 on 1 rank."""
    import socket

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from flatl2o import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = W.fsdp_model(init_device_mesh("cpu", (1,)))
        opt = flatl2o.L2O(model.parameters(), W.make_rule())
        state = {
            "model": get_model_state_dict(model),
            "optim": distributed.get_optimizer_state_dict(model, opt),
        }
        dcp.load(state, checkpoint_id=optimizer_dir / "dcp")
        set_model_state_dict(model, state["model"])
        distributed.set_optimizer_state_dict(model, opt, state["optim"])
        W.train(model, opt, range(W.RESUME_AT, W.STEPS), rank=0, world=1)
        assert_tensors_close(W.full_params(model), optimizer_runs[0]["fsdp"])
        assert_tensors_close(W.full_state(model, opt), optimizer_runs[0]["fsdp_state"])
    finally:
        dist.destroy_process_group()


def test_a_nan_in_one_shard_is_handled_on_every_rank(optimizer_runs):
    for run in optimizer_runs:
        skip, raise_ = run["nan_skip"], run["nan_raise"]
        assert skip == {
            "outcome": "stepped, 1 warning(s)",
            "weight_unchanged": True,
            "bias_changed": True,
        }
        assert raise_["outcome"] == "raised" and raise_["weight_unchanged"]


def test_distributed_example_trains_and_resumes_from_its_dcp_checkpoint(optimizer_runs):
    for run in optimizer_runs:
        full, resumed, ddp = run["example_full"], run["example_resumed"], run["example_ddp"]
        assert full["start"] == 0 and resumed["start"] == 2
        assert resumed["losses"] == full["losses"][2:]
        for name, value in full["params"].items():
            assert torch.equal(resumed["params"][name], value), name
        # DDP and FSDP2 train the same model on the same data alike
        assert ddp["losses"] == pytest.approx(full["losses"][:2], rel=1e-5)


# ------------------------------------------------------------------------ meta-training
#: Every path of a meta-step: imitation unrolls (drawn on rank 0, broadcast), a regularizer
#: with random probes (per-optimizee generators), validation (rank 0, broadcast).
META_RECIPE = {
    "name": "dist",
    "rule": {"architecture": "rnnprop"},
    "task": {"name": "digits-mlp", "batch_size": 16},
    "train": {
        "iterations": 4,
        "trajectory": 20,
        "unroll": 10,
        "checkpoint_every": 2,
        "imitation_prob": 0.3,
    },
    "regularizer": {"name": "hessian-trace", "alpha": 0.01},
    "curriculum": {"validate_every": 2, "validation_runs": 1},
    "evaluation": {"seeds": 1, "horizons": [20]},
}


@pytest.fixture(scope="module")
def meta_runs(tmp_path_factory) -> Path:
    """A 2-rank meta-training (uninterrupted, and killed + resumed) through the Python API, and
    the same recipe through ``torchrun -m flatl2o meta-train``."""
    out = tmp_path_factory.mktemp("meta")
    (out / "recipe.toml").write_text(recipe_from_dict(META_RECIPE).to_toml())
    torchrun(str(HERE / "dist_workers.py"), "meta", str(out))
    cli = torchrun(
        "-m", "flatl2o", "meta-train", "--recipe", str(out / "recipe.toml"),
        "--out", str(out / "cli"), "--threads", "1", "--no-progress",
    )  # fmt: skip
    (out / "cli_stdout.txt").write_text(cli.stdout)
    return out


def saved_rule(run: Path) -> dict[str, torch.Tensor]:
    """The rule weights of a run's last checkpoint (the current rule, not the best one)."""
    from safetensors.torch import load_file

    tensors = load_file(str(run / "trainer_state" / "state.safetensors"))
    return {k[5:]: v for k, v in tensors.items() if k.startswith("rule.")}


def test_meta_training_on_two_ranks_stays_in_sync_and_resumes_exactly(meta_runs):
    full = [torch.load(meta_runs / f"full_rank{r}.pt", weights_only=True) for r in range(2)]
    resumed = [torch.load(meta_runs / f"resumed_rank{r}.pt", weights_only=True) for r in range(2)]
    start = flatl2o.make_rule("rnnprop").state_dict()
    for key, value in full[0].items():
        assert torch.equal(full[1][key], value), f"ranks out of sync in {key}"
        for r in range(2):
            assert torch.equal(resumed[r][key], value), f"rank {r} resumed differently: {key}"
    assert any(not torch.equal(full[0][k], start[k]) for k in start), "the rule did not train"
    assert saved_rule(meta_runs / "full").keys() == full[0].keys()


def test_meta_train_cli_under_torchrun(meta_runs):
    out = meta_runs / "cli"
    stdout = (meta_runs / "cli_stdout.txt").read_text()
    assert stdout.count("wrote ") == 1, stdout  # rank 0 only
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]  # one writer, no duplicates
    assert any("imitation" in r for r in records) and any("regularizer" in r for r in records)
    card = (out / "README.md").read_text()
    assert "torchrun --nproc-per-node 2 -m flatl2o meta-train" in card
    assert "2 processes x meta_batch 1" in card
    assert json.loads((out / "trainer_state" / "state.json").read_text())["slots"] == 2
    # the CLI and the Python API run the same computation
    for key, value in saved_rule(meta_runs / "full").items():
        assert torch.equal(saved_rule(out)[key], value), key
    flatl2o.load_rule(out)  # a complete, loadable checkpoint folder


def test_two_ranks_match_one_process_unrolling_both_ranks_optimizees(meta_runs, tmp_path):
    """N=2 processes x meta_batch 1 == 1 process x meta_batch 2: the same optimizees and data,
    and DDP's average of the ranks' meta-gradients is the gradient of the mean objective."""
    torch.set_num_threads(1)
    recipe = load_recipe(meta_runs / "recipe.toml")
    single = MetaTrainer(recipe, tmp_path / "single", progress=False, meta_batch=2)
    single.run()
    want = saved_rule(meta_runs / "full")
    for key, value in saved_rule(tmp_path / "single").items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6, msg=key)
    logs = [
        [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        for run in (meta_runs / "full", tmp_path / "single")
    ]
    for a, b in zip(*logs, strict=True):
        assert a.keys() == b.keys()
        for key in ("meta_loss", "regularizer", "imitation", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)

    # a 2-rank checkpoint resumes in one process with the same number of optimizees only
    killed = meta_runs / "killed_copy"
    with pytest.raises(ResumeError, match="2 optimizees per meta-step"):
        MetaTrainer(recipe, killed, resume=True, progress=False)
    MetaTrainer(recipe, killed, resume=True, progress=False, meta_batch=2).run()
    for key, value in saved_rule(killed).items():
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-6, msg=key)
