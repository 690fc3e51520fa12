"""Train one optimizee with one optimizer and measure it: the unit of work of the suite.

Protocol (docs/method.md §5), the same for every optimizer:

- the run of seed ``s`` draws everything from ``torch.Generator().manual_seed(EVAL_SEED_OFFSET +
  s)``: first the initialization (``Task.init_params``, the project's initializer), then one
  training minibatch per closure call (uniform with replacement from the TRAIN split). So every
  optimizer starts from the same parameters and, when it takes one minibatch per step (all but
  Entropy-SGD), sees the same minibatch sequence. Langevin noise (Entropy-SGD) and flatness
  probes come from their own generators, seeded from the seed too;
- the optimizee's parameters are one flat ``nn.Parameter``; learned rules run through
  :class:`flatl2o.L2O` (``lr = 1.0``), baselines through their torch optimizers, all by
  ``optimizer.step(closure)``;
- the minibatch loss before each step is recorded (the loss curve);
- at each horizon the iterate is measured: in an ``"eval"`` run, loss and accuracy on the full
  train and test splits, the generalization gap (test loss - train loss) and the flatness of the
  full-train-split loss; in a ``"tune"`` run, loss and accuracy on the VALIDATION split only
  (tuning runs never touch the test split);
- a run whose minibatch loss or parameters become non-finite is stopped: its parameters are
  reset to the iterate before the failing step, ``diverged_at`` records the step, and later
  horizons are measured at that iterate.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatl2o.evaluation.baselines import BASELINES
from flatl2o.evaluation.flatness import measure_flatness
from flatl2o.meta.rollout import EVAL_SEED_OFFSET
from flatl2o.meta.tasks import Task

__all__ = [
    "FLATNESS_SEED_OFFSET",
    "NOISE_SEED_OFFSET",
    "RunSpec",
    "build_optimizer",
    "train_run",
]

#: Langevin-noise generators are seeded ``NOISE_SEED_OFFSET + EVAL_SEED_OFFSET + seed``.
NOISE_SEED_OFFSET = 3_000_000
#: Flatness-probe generators are seeded ``FLATNESS_SEED_OFFSET + EVAL_SEED_OFFSET + seed``
#: (plus the horizon), the same for every optimizer.
FLATNESS_SEED_OFFSET = 5_000_000

PURPOSES = ("eval", "tune", "long")


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

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {self.purpose!r}")
        if not self.horizons or min(self.horizons) < 1:
            raise ValueError(f"horizons must be positive step counts, got {self.horizons}")
        if self.checkpoint is None and self.optimizer not in BASELINES:
            raise ValueError(
                f"{self.optimizer!r} is not a baseline ({', '.join(BASELINES)}); a learned "
                "rule needs checkpoint=<its folder>"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also the run's cache key material)."""
        d = asdict(self)
        d["horizons"] = list(self.horizons)
        return d

    def key(self) -> str:
        """A stable hash of everything that determines the run's result."""
        import json

        d = self.to_dict()
        d.pop("checkpoint")  # the folder may move; the fingerprint identifies the rule
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:20]


def build_optimizer(
    spec: RunSpec, params: list[nn.Parameter], noise_generator: torch.Generator
) -> Optimizer:
    """The optimizer of ``spec`` on ``params`` (a learned rule through ``flatl2o.L2O``)."""
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
    return BASELINES[spec.optimizer].make(params, dict(spec.hparams), noise_generator)


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


def _measure(task: Task, theta: torch.Tensor, spec: RunSpec, horizon: int) -> dict[str, float]:
    if spec.purpose == "tune":  # validation only: tuning must never read the test split
        val = task.evaluate(theta, "val")
        return {"val_loss": val["loss"], "val_accuracy": val.get("accuracy", math.nan)}
    train = task.evaluate(theta, "train")
    test = task.evaluate(theta, "test")
    out = {
        "train_loss": train["loss"],
        "train_accuracy": train.get("accuracy", math.nan),
        "test_loss": test["loss"],
        "test_accuracy": test.get("accuracy", math.nan),
        "gap": test["loss"] - train["loss"],
    }
    last = horizon == max(spec.horizons)
    if spec.trace_probes > 0 and spec.eig_iters > 0 and (last or not spec.flatness_last_only):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(
            FLATNESS_SEED_OFFSET + EVAL_SEED_OFFSET + spec.seed + 7919 * horizon
        )
        flat = measure_flatness(
            task, theta, probes=spec.trace_probes, iters=spec.eig_iters, generator=gen
        )
        out.update(flat.to_dict())
        out["flatness_seconds"] = time.perf_counter() - t0
    return out


def train_run(spec: RunSpec, task: Task) -> dict[str, Any]:
    """Run ``spec`` on ``task`` (built for ``spec.task``); return a JSON-ready result record.

    The record holds the spec, ``init_sha`` (hash of the initial parameters), ``metrics``
    (``{str(horizon): {...}}``), the loss ``curve`` (window means, ``curve_every`` steps per
    value), ``grad_evals``, ``diverged_at`` and timings.
    """
    if task.batch_size != spec.batch_size:
        raise ValueError(f"task batch_size {task.batch_size} != spec {spec.batch_size}")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    seed = EVAL_SEED_OFFSET + spec.seed
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)
    theta0 = task.init_params(gen)
    init_sha = hashlib.sha256(theta0.detach().cpu().numpy().tobytes()).hexdigest()[:16]
    p = nn.Parameter(theta0.clone())
    opt = build_optimizer(spec, [p], noise)
    fresh = bool(getattr(opt, "fresh_batch_per_closure", False))
    horizons = sorted(set(spec.horizons))
    steps = horizons[-1]
    curve: list[float] = []
    metrics: dict[str, dict[str, float]] = {}
    grad_evals, diverged_at, measure_s = 0, None, 0.0
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal batch, calls, grad_evals
        if batch is None or (fresh and calls > 0):
            batch = task.sample_batch(gen)
        calls += 1
        grad_evals += 1
        opt.zero_grad(set_to_none=True)
        loss = task.loss(p, *batch)
        loss.backward()
        return loss.detach()

    for t in range(1, steps + 1):
        if diverged_at is None:
            batch, calls = None, 0
            before = p.detach().clone()
            try:
                loss = float(opt.step(closure))
            except FloatingPointError:  # L2O(nonfinite="raise") on a NaN/inf gradient
                loss = math.nan
            if not math.isfinite(loss) or not bool(torch.isfinite(p).all()):
                with torch.no_grad():
                    p.copy_(before)
                diverged_at = t
            curve.append(loss)
        if t in horizons:
            t0 = time.perf_counter()
            metrics[str(t)] = _measure(task, p.detach(), spec, t)
            measure_s += time.perf_counter() - t0
    every, values = _downsample(curve, spec.curve_points)
    total = time.perf_counter() - t_start
    return {
        "key": spec.key(),
        "spec": spec.to_dict(),
        "init_sha": init_sha,
        "metrics": metrics,
        "curve_every": every,
        "curve": values,
        "grad_evals": grad_evals,
        "diverged_at": diverged_at,
        "seconds": total,
        "cpu_seconds": time.process_time() - cpu_start,
        "train_seconds": total - measure_s,
        "measure_seconds": measure_s,
    }
