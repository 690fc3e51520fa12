"""One run of the evaluation suites: a :class:`RunSpec` trained and measured, as a JSON record.

The training loop is :func:`flatl2o.meta.optimizee.train_optimizee`, the one that also makes
the model cards' numbers and meta-training's validation (its docstring states the protocol:
seeding, per-tensor parameters, one minibatch per closure call, divergence). This module adds
what a suite run needs on top of it, the same for every optimizer:

- the run of seed ``s`` uses the generator ``EVAL_SEED_OFFSET + s``, so every optimizer starts
  from the same parameters and, when it takes one minibatch per step (all but Entropy-SGD),
  sees the same minibatch sequence. Langevin noise (Entropy-SGD) and flatness probes come from
  their own generators, seeded from the seed too;
- learned rules run through :class:`flatl2o.L2O` (at the rule's lr as shipped), baselines
  through their torch optimizers (:func:`build_optimizer`);
- at each horizon the iterate is measured: in an ``"eval"`` run, loss and accuracy on the full
  train and test splits, the generalization gap (test loss - train loss) and, for a
  :class:`~flatl2o.meta.tasks.Task` (the MNIST suite), the flatness of the full-train-split loss;
  in a ``"tune"`` run, loss and accuracy on the VALIDATION split only (tuning runs never touch
  the test split).

The optimizee is a :class:`~flatl2o.meta.tasks.Task` or a :class:`Workload` (the realistic
suite, :mod:`flatl2o.evaluation.workloads`): a real ``nn.Module`` trained per tensor, as users
do (``opt = X(model.parameters())``, or param groups that keep weight decay off biases and norms
and give Muon the 2-D hidden weights), with its buffers (BatchNorm statistics) and train/eval
mode. A workload's record adds the parameter norm (at each horizon and as a curve), the
wall-clock time of the loss curve, the seconds per step and the optimizer's state bytes per
parameter. ``RunSpec.schedule = "warmup-cosine"`` multiplies every group's lr by
:func:`warmup_cosine` (a ``LambdaLR``), for baselines and learned rules alike.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.flatness import measure_flatness
from flatl2o.meta.optimizee import (
    EVAL_SEED_OFFSET,
    OptimizeeRun,
    Workload,
    split_metrics,
    train_optimizee,
)
from flatl2o.meta.tasks import Task

__all__ = [
    "FLATNESS_SEED_OFFSET",
    "NOISE_SEED_OFFSET",
    "SCHEDULES",
    "RunSpec",
    "Workload",
    "build_optimizer",
    "state_bytes",
    "train_run",
    "warmup_cosine",
]

#: Langevin-noise generators are seeded ``NOISE_SEED_OFFSET + EVAL_SEED_OFFSET + seed``.
NOISE_SEED_OFFSET = 3_000_000
#: Flatness-probe generators are seeded ``FLATNESS_SEED_OFFSET + EVAL_SEED_OFFSET + seed``
#: (plus the horizon), the same for every optimizer.
FLATNESS_SEED_OFFSET = 5_000_000

PURPOSES = ("eval", "tune", "long")
#: Learning-rate schedules a run can use (``None``: constant).
SCHEDULES = ("warmup-cosine",)
#: Warmup-cosine: linear warmup over this fraction of the run, then cosine decay to
#: ``MIN_LR_FRACTION`` of the peak at the last step (nanoGPT's recipe).
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """The lr factor of step ``t`` (0-based, as ``LambdaLR`` counts) of a ``steps``-step run."""
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, steps - warmup))
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass(frozen=True)
class RunSpec:
    """One training run: which optimizee, which optimizer and settings, which seed, what to measure.

    ``optimizer`` is a baseline name or a learned rule's name; ``checkpoint`` is the learned
    rule's folder (``None`` for baselines). ``hparams`` are the optimizer's keyword arguments
    (``{"lr": 1.0}`` for a learned rule). ``trace_probes``/``eig_iters`` = 0 skip flatness.
    """

    task: str
    optimizer: str
    seed: int
    horizons: tuple[int, ...]
    purpose: str = "eval"
    hparams: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    fingerprint: str | None = None
    batch_size: int = 128
    trace_probes: int = 100
    eig_iters: int = 20
    flatness_last_only: bool = False
    curve_points: int = 1000
    schedule: str | None = None

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"horizons must be positive step counts, got {self.horizons}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {self.schedule!r}")
        if self.checkpoint is None and self.optimizer not in BASELINES:
            raise ValueError(
                f"{self.optimizer!r} is not a baseline ({', '.join(BASELINES)}); a learned "
                "rule needs checkpoint=<its folder>"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also the run's cache key material). ``schedule`` appears only when
        set, so the keys of constant-lr runs made before it existed still match (--resume)."""
        d = asdict(self)
        d["horizons"] = list(self.horizons)
        if d["schedule"] is None:
            del d["schedule"]
        return d

    def key(self) -> str:
        """A stable hash of everything that determines the run's result."""
        import json

        d = self.to_dict()
        d.pop("checkpoint")  # the folder may move; the fingerprint identifies the rule
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def build_optimizer(
    spec: RunSpec,
    params: list[nn.Parameter],
    noise_generator: torch.Generator,
    groups: list[dict[str, Any]] | None = None,
) -> Optimizer:
    """The optimizer of ``spec`` on ``params`` (a learned rule through ``flatl2o.L2O``).

    ``groups`` are the same tensors tagged with their ``role`` (see :class:`Workload`); a
    baseline whose ``uses_roles`` is set (AdamW, Muon) is built on them, every other optimizer
    on the plain list, as a user's one-line swap would be.
    """
    if spec.checkpoint is not None:
        from flatl2o import L2O, load_rule

        rule = load_rule(spec.checkpoint)
        if spec.fingerprint is not None and rule.fingerprint() != spec.fingerprint:
            raise RuntimeError(
                f"the checkpoint {spec.checkpoint} changed on disk during the evaluation (rule "
                f"fingerprint {rule.fingerprint()}, planned {spec.fingerprint}); rerun with "
                "--resume: finished runs of unchanged checkpoints are reused"
            )
        return L2O(params, rule=rule, nonfinite="raise", **spec.hparams)
    baseline = BASELINES[spec.optimizer]
    if baseline.uses_roles:
        tagged = groups or [{"params": params, "role": "matrix"}]
        return baseline.make(tagged, dict(spec.hparams), noise_generator)
    return baseline.make(params, dict(spec.hparams), noise_generator)


def state_bytes(opt: Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps between steps (its ``state_dict``'s state)."""

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return walk(opt.state_dict().get("state", {}))


def _downsample(curve: list[float], points: int) -> tuple[int, list[float | None]]:
    """Window means so that at most ``points`` values remain; non-finite values become None."""
    if points <= 0 or not curve:
        return 0, []
    every = max(1, math.ceil(len(curve) / max(points, 1)))
    out: list[float | None] = []
    for i in range(0, len(curve), every):
        window = curve[i : i + every]
        value = math.fsum(window) / len(window)
        out.append(float(f"{value:.6g}") if math.isfinite(value) else None)
    return every, out


def _measure(run: OptimizeeRun, spec: RunSpec, horizon: int) -> dict[str, float]:
    if spec.purpose == "tune":  # validation only: tuning must never read the test split
        val = split_metrics(run, ["val"])
        return {"val_loss": val["val_loss"], "val_accuracy": val["val_accuracy"]}
    out = split_metrics(run, ["train", "test"])
    out = {k: out[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}
    out["gap"] = out["test_loss"] - out["train_loss"]
    if run.is_module:
        out["param_norm"] = run.param_norm()
        return out
    last = horizon == max(spec.horizons)
    if spec.trace_probes > 0 and spec.eig_iters > 0 and (last or not spec.flatness_last_only):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(
            FLATNESS_SEED_OFFSET + EVAL_SEED_OFFSET + spec.seed + 7919 * horizon
        )
        flat = measure_flatness(
            run.task, run.theta(), probes=spec.trace_probes, iters=spec.eig_iters, generator=gen
        )
        out.update(flat.to_dict())
        out["flatness_seconds"] = time.perf_counter() - t0
    return out


def train_run(spec: RunSpec, task: Task | Workload) -> dict[str, Any]:
    """Run ``spec`` on ``task`` (built for ``spec.task``); return a JSON-ready result record.

    The record holds the spec, ``init_sha`` (hash of the initial parameters), ``metrics``
    (``{str(horizon): {...}}``), the loss ``curve`` (window means, ``curve_every`` steps per
    value), ``grad_evals``, ``diverged_at`` and timings; for a :class:`Workload` also
    ``norm_curve`` (parameter norm, same windows), ``curve_seconds`` (training seconds at the
    end of each window), ``seconds_per_step`` (wall-clock) and ``cpu_seconds_per_step`` (this
    process's CPU time: robust to other load on the machine), ``num_params`` and
    ``state_bytes_per_param``.
    """
    if task.batch_size != spec.batch_size:
        raise ValueError(f"task batch_size {task.batch_size} != spec {spec.batch_size}")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    seed = EVAL_SEED_OFFSET + spec.seed
    noise = torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)
    traj = train_optimizee(
        task,
        lambda params, groups: build_optimizer(spec, params, noise, groups),
        seed=seed,
        horizons=spec.horizons,
        measure=lambda run, horizon: _measure(run, spec, horizon),
        schedule=warmup_cosine(max(spec.horizons)) if spec.schedule == "warmup-cosine" else None,
        record_norms=not isinstance(task, Task),
    )
    run, curve = traj.run, traj.losses
    every, values = _downsample(curve, spec.curve_points)
    total = time.perf_counter() - t_start
    measure_s = traj.measure_seconds
    record: dict[str, Any] = {
        "key": spec.key(),
        "spec": spec.to_dict(),
        "init_sha": run.init_sha,
        "metrics": {str(h): m for h, m in traj.metrics.items()},
        "curve_every": every,
        "curve": values,
        "grad_evals": traj.grad_evals,
        "diverged_at": traj.diverged_at,
        "seconds": total,
        "cpu_seconds": time.process_time() - cpu_start,
        "train_seconds": total - measure_s,
        "measure_seconds": measure_s,
    }
    if run.is_module:
        record["norm_curve"] = _downsample(traj.norms, spec.curve_points)[1]
        record["curve_seconds"] = (
            [
                float(f"{traj.elapsed[min(i + every, len(traj.elapsed)) - 1]:.4g}")
                for i in range(0, len(traj.elapsed), every)
            ]
            if every
            else []
        )
        record["seconds_per_step"] = (total - measure_s) / max(1, len(curve))
        cpu_train = time.process_time() - cpu_start - traj.measure_cpu_seconds
        record["cpu_seconds_per_step"] = cpu_train / max(1, len(curve))
        record["num_params"] = sum(q.numel() for q in run.params)
        record["state_bytes_per_param"] = state_bytes(traj.optimizer) / record["num_params"]
    return record
