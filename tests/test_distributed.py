"""flatl2o on torch.distributed with 2 real processes (torchrun, gloo, CPU): the optimizer under
DDP and FSDP2 matches single-process training with the same global batch, its sharded state
saves and resumes with torch.distributed.checkpoint, and meta-training on 2 ranks stays in sync,
resumes exactly and matches one process unrolling both ranks' optimizees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import flatl2o

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

import dist_workers as W  # tests/ is on sys.path, like hub_server

HERE = Path(__file__).parent


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port is picked)."""
    # the workers import the same flatl2o as this process, and dist_workers from tests/
    path = [str(Path(flatl2o.__file__).parents[1]), str(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


# ------------------------------------------------------------------ the optimizer
@pytest.fixture(scope="module")
def optimizer_runs(tmp_path_factory) -> list[dict]:
    """Both ranks' results of tests/dist_workers.py's optimizer scenario."""
    out = tmp_path_factory.mktemp("optimizer")
    torchrun(str(HERE / "dist_workers.py"), "optimizer", str(out))
    return [torch.load(out / f"optimizer_rank{r}.pt", weights_only=True) for r in range(2)]


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
    # uneven shards: 5 rows -> 3 + 2, 3 rows -> 2 + 1
    assert optimizer_runs[0]["fsdp_local_shapes"]["0.weight"] == (3, 6)
    assert optimizer_runs[1]["fsdp_local_shapes"]["0.weight"] == (2, 6)
    assert optimizer_runs[1]["fsdp_local_shapes"]["2.weight"] == (1, 5)
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


def test_a_nan_in_one_shard_is_handled_on_every_rank(optimizer_runs):
    for run in optimizer_runs:
        skip, raise_ = run["nan_skip"], run["nan_raise"]
        assert skip == {
            "outcome": "stepped, 1 warning(s)",
            "weight_unchanged": True,
            "bias_changed": True,
        }
        assert raise_["outcome"] == "raised" and raise_["weight_unchanged"]
