"""Worker processes for tests/test_distributed.py, launched with torchrun (2 ranks, gloo, CPU).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_workers.py
SCENARIO OUT``: each rank runs SCENARIO and writes what the test compares into the folder OUT.
Everything here is the real thing (process group, DDP, FSDP2, DCP); nothing is simulated.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import flatl2o
from flatl2o import distributed

# ---------------------------------------------------------------- the optimizer (DDP / FSDP2)
STEPS = 4  # optimizer steps of every run
RESUME_AT = 2  # the DCP checkpoint is taken after this many steps
GLOBAL_BATCH = 8


def make_model() -> nn.Module:
    """A small MLP whose rows (5, 3 and 1) do not split evenly over 2 ranks: uneven FSDP2
    shards, and the last layer's shard on rank 1 is empty."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def make_rule() -> flatl2o.UpdateRule:
    """A randomly initialized RNNprop rule, identical on every rank and in the reference."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return flatl2o.make_rule("rnnprop", output_scale=0.05)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same global batch for step ``step`` in every process."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 1, generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int):
    """Each rank takes its contiguous slice of every global batch; DDP/FSDP2 average grads."""
    per_rank = GLOBAL_BATCH // world
    for step in steps:
        x, y = global_batch(step)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        x, y = x[rows], y[rows]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameter values by name."""
    return {
        name.replace("module.", ""): (p.full_tensor() if distributed.is_dtensor(p) else p)
        .detach()
        .clone()
        for name, p in model.named_parameters()
    }


def full_state(model: nn.Module, opt: flatl2o.L2O) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's recurrent state by parameter name, gathered and flattened to (numel, *s)."""
    out = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        out[name.replace("module.", "")] = {
            k: (v.full_tensor() if distributed.is_dtensor(v) else v).reshape(
                (-1, *opt.rule.state_shapes()[k]) if k != "step" else ()
            )
            for k, v in state.items()
        }
    return out


def fsdp_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def scenario_optimizer(out: Path) -> None:
    """(a) DDP, (b) FSDP2, (c) DCP save after RESUME_AT steps and resume, (d) NaN agreement."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, object] = {}

    # (a) DDP
    ddp = DistributedDataParallel(make_model())
    opt = flatl2o.L2O(ddp.parameters(), make_rule())
    train(ddp, opt, range(STEPS), rank, world)
    results["ddp"] = full_params(ddp)

    # (b) FSDP2: each rank updates its own (uneven) shard with the shard's recurrent state
    mesh = init_device_mesh("cpu", (world,))
    model = fsdp_model(mesh)
    opt = flatl2o.L2O(model.parameters(), make_rule())
    shards = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    train(model, opt, range(RESUME_AT), rank, world)
    results["fsdp_local_shapes"] = shards
    results["fsdp_state_is_dtensor"] = all(
        distributed.is_dtensor(v) for st in opt.state.values() for k, v in st.items() if k != "step"
    )

    # (c) DCP: save the sharded model + optimizer state, train on, then resume into fresh objects
    ckpt = out / "dcp"
    dcp.save(
        {
            "model": get_model_state_dict(model),
            "optim": distributed.get_optimizer_state_dict(model, opt),
        },
        checkpoint_id=ckpt,
    )
    train(model, opt, range(RESUME_AT, STEPS), rank, world)
    results["fsdp"] = full_params(model)
    results["fsdp_state"] = full_state(model, opt)

    model2 = fsdp_model(mesh)
    opt2 = flatl2o.L2O(model2.parameters(), make_rule())
    loaded = {
        "model": get_model_state_dict(model2),
        "optim": distributed.get_optimizer_state_dict(model2, opt2),
    }
    dcp.load(loaded, checkpoint_id=ckpt)
    set_model_state_dict(model2, loaded["model"])
    distributed.set_optimizer_state_dict(model2, opt2, loaded["optim"])
    results["resumed_step"] = float(opt2.state[next(model2.parameters())]["step"])
    train(model2, opt2, range(RESUME_AT, STEPS), rank, world)
    results["resumed"] = full_params(model2)
    results["resumed_state"] = full_state(model2, opt2)

    # a checkpoint of another rule is refused, by name
    other = flatl2o.L2O(model2.parameters(), flatl2o.make_rule("rnnprop"))
    template = distributed.get_optimizer_state_dict(model2, other)
    dcp.load({"optim": template}, checkpoint_id=ckpt)
    try:
        distributed.set_optimizer_state_dict(model2, other, template)
        results["other_rule_error"] = ""
    except ValueError as e:
        results["other_rule_error"] = str(e)

    # (d) a NaN in ONE rank's shard of a gradient: every rank skips that parameter (and raises
    # together under nonfinite="raise"), so no parameter is left half-updated
    x, y = global_batch(99)
    for policy in ("skip", "raise"):
        opt3 = flatl2o.L2O(model2.parameters(), make_rule(), nonfinite=policy)
        opt3.zero_grad()
        nn.functional.mse_loss(model2(x), y).backward()
        weight = model2[0].weight
        if rank == 1:
            weight.grad.to_local()[0, 0] = float("nan")
        before = full_params(model2)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt3.step()
            outcome = f"stepped, {sum('NaN' in str(w.message) for w in caught)} warning(s)"
        except FloatingPointError:
            outcome = "raised"
        after = full_params(model2)
        results[f"nan_{policy}"] = {
            "outcome": outcome,
            "weight_unchanged": torch.equal(before["0.weight"], after["0.weight"]),
            "bias_changed": not torch.equal(before["2.bias"], after["2.bias"]),
        }

    # (e) examples/distributed_train.py: FSDP2 with a DCP checkpoint every 2 steps, run for 4
    # steps at once and as 2 + 2 (the second run resumes); DDP for 2 steps
    example = load_example("distributed_train")
    results["example_full"] = example.main(
        ["--steps", "4", "--save-every", "2", "--ckpt", str(out / "ex_full")]
    )
    resume = ["--steps", "2", "--save-every", "2", "--ckpt", str(out / "ex_resumed")]
    example.main(resume)
    results["example_resumed"] = example.main(["--steps", "4", *resume[2:]])
    results["example_ddp"] = example.main(
        ["--mode", "ddp", "--steps", "2", "--ckpt", str(out / "ex_ddp")]
    )
    torch.save(results, out / f"optimizer_rank{rank}.pt")


def load_example(name: str):
    """Import ``examples/<name>.py`` (a script, not a package)."""
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------ meta-training
def scenario_meta(out: Path) -> None:
    """Meta-train a tiny recipe on every rank: uninterrupted, then killed after a checkpoint
    (an exception on every rank) and resumed; each rank writes its final rule weights."""
    from flatl2o.meta.recipe import load_recipe
    from flatl2o.meta.trainer import MetaTrainer

    rank = dist.get_rank()
    recipe = load_recipe(out / "recipe.toml")
    full = MetaTrainer(recipe, out / "full", progress=False)
    full.run()
    torch.save(full.rule.state_dict(), out / f"full_rank{rank}.pt")

    class Killed(Exception):
        pass

    crashed = MetaTrainer(recipe, out / "killed", progress=False)
    real_trajectory = crashed.trajectory
    done = []

    def trajectory(length: int) -> dict[str, float]:
        if len(done) == recipe.train.checkpoint_every + 1:  # one past the first checkpoint
            raise Killed
        done.append(length)
        return real_trajectory(length)

    crashed.trajectory = trajectory  # type: ignore[method-assign]
    try:
        crashed.run()
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    dist.barrier()
    if rank == 0:  # what the single-process test resumes with --meta-batch 2
        shutil.copytree(out / "killed", out / "killed_copy")
    dist.barrier()
    resumed = MetaTrainer(recipe, out / "killed", resume=True, progress=False)
    resumed.run()
    torch.save(resumed.rule.state_dict(), out / f"resumed_rank{rank}.pt")


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    assert distributed.init_from_env(), "launch with torchrun and at least 2 processes"
    try:
        {"optimizer": scenario_optimizer, "meta": scenario_meta}[scenario](out)
        # rank 0 finishes a meta-training run (evaluates, writes) alone: the ranks leave
        # together, as the CLI's do, or an early rank's teardown can abort or hang the other
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
