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

The optimizee is either a :class:`~flatl2o.meta.tasks.Task` (the MNIST suite: one flat
``theta``) or a :class:`Workload` (the realistic suite, :mod:`flatl2o.evaluation.workloads`):
a real ``nn.Module`` whose parameters are trained per tensor, as users do
(``opt = X(model.parameters())``, or param groups that keep weight decay off biases and norms
and give Muon the 2-D hidden weights), with its buffers (BatchNorm statistics) and train/eval
mode. The loop is the same for both; a workload's record adds the parameter norm (at each
horizon and as a curve), the wall-clock time of the loss curve, the seconds per step and the
optimizer's state bytes per parameter. ``RunSpec.schedule = "warmup-cosine"`` multiplies every
group's lr by :func:`warmup_cosine` (a ``LambdaLR``), for baselines and learned rules alike.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

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


class Workload(Protocol):
    """A realistic optimizee: a real ``nn.Module`` trained per tensor (see the module docstring).

    ``build`` draws the model's initialization from ``generator`` (deterministic given its
    state); ``param_groups`` tags the model's trainable tensors with a ``role``: ``"hidden"``
    (2-D hidden weight matrices: Muon's), ``"matrix"`` (other weights of 2 or more dimensions:
    embeddings, convolutions, the output layer) or ``"vector"`` (biases and normalization
    parameters: no weight decay). ``evaluate`` runs the model in eval mode on a whole split and
    returns at least ``{"loss": ...}``.
    """

    name: str
    batch_size: int

    def build(self, generator: torch.Generator) -> nn.Module: ...

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...

    def sample_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...


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


class _FlatRun:
    """A :class:`Task`'s run: one flat ``nn.Parameter`` (the MNIST suite, unchanged)."""

    extras = False

    def __init__(self, task: Task, gen: torch.Generator) -> None:
        self.task = task
        theta0 = task.init_params(gen)
        self.init_sha = hashlib.sha256(theta0.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        self.p = nn.Parameter(theta0.clone())
        self.params = [self.p]
        self.groups: list[dict[str, Any]] = [{"params": self.params, "role": "matrix"}]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.loss(self.p, x, y)

    def evaluate(self, split: str) -> dict[str, float]:
        return self.task.evaluate(self.p.detach(), split)


class _ModuleRun:
    """A :class:`Workload`'s run: the module's own parameters, per tensor, and its buffers."""

    extras = True

    def __init__(self, workload: Workload, gen: torch.Generator) -> None:
        self.workload = workload
        self.model = workload.build(gen)
        self.groups = workload.param_groups(self.model)
        self.params = [p for g in self.groups for p in g["params"]]
        if len({id(p) for p in self.params}) != len(list(self.model.parameters())):
            raise ValueError(f"{workload.name}: param_groups must hold every parameter once")
        digest = hashlib.sha256()
        for t in self.params:
            digest.update(t.detach().cpu().numpy().tobytes())
        self.init_sha = digest.hexdigest()[:16]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.train()
        return self.workload.loss(self.model, x, y)

    def evaluate(self, split: str) -> dict[str, float]:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.workload.evaluate(self.model, split)
        finally:
            self.model.train(was)

    def param_norm(self) -> float:
        with torch.no_grad():  # in float64: a diverging run's float32 sum of squares overflows
            return math.sqrt(math.fsum(float(p.double().square().sum()) for p in self.params))


def _snapshot(run: _FlatRun | _ModuleRun) -> list[torch.Tensor]:
    if isinstance(run, _FlatRun):
        return [run.p.detach().clone()]
    return [t.detach().clone() for t in (*run.model.parameters(), *run.model.buffers())]


def _restore(run: _FlatRun | _ModuleRun, saved: list[torch.Tensor]) -> None:
    tensors = (
        [run.p] if isinstance(run, _FlatRun) else [*run.model.parameters(), *run.model.buffers()]
    )
    with torch.no_grad():
        for t, v in zip(tensors, saved, strict=True):
            t.copy_(v)


def _measure(run: _FlatRun | _ModuleRun, spec: RunSpec, horizon: int) -> dict[str, float]:
    if spec.purpose == "tune":  # validation only: tuning must never read the test split
        val = run.evaluate("val")
        return {"val_loss": val["loss"], "val_accuracy": val.get("accuracy", math.nan)}
    train = run.evaluate("train")
    test = run.evaluate("test")
    out = {
        "train_loss": train["loss"],
        "train_accuracy": train.get("accuracy", math.nan),
        "test_loss": test["loss"],
        "test_accuracy": test.get("accuracy", math.nan),
        "gap": test["loss"] - train["loss"],
    }
    if isinstance(run, _ModuleRun):
        out["param_norm"] = run.param_norm()
        return out
    last = horizon == max(spec.horizons)
    if spec.trace_probes > 0 and spec.eig_iters > 0 and (last or not spec.flatness_last_only):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(
            FLATNESS_SEED_OFFSET + EVAL_SEED_OFFSET + spec.seed + 7919 * horizon
        )
        flat = measure_flatness(
            run.task, run.p.detach(), probes=spec.trace_probes, iters=spec.eig_iters, generator=gen
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
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)
    run = _FlatRun(task, gen) if isinstance(task, Task) else _ModuleRun(task, gen)
    opt = build_optimizer(spec, run.params, noise, run.groups)
    fresh = bool(getattr(opt, "fresh_batch_per_closure", False))
    horizons = sorted(set(spec.horizons))
    steps = horizons[-1]
    sched = None
    if spec.schedule == "warmup-cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    curve: list[float] = []
    norms: list[float] = []
    elapsed: list[float] = []
    metrics: dict[str, dict[str, float]] = {}
    grad_evals, diverged_at, measure_s, measure_cpu = 0, None, 0.0, 0.0
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal batch, calls, grad_evals
        if batch is None or (fresh and calls > 0):
            batch = task.sample_batch(gen)
        calls += 1
        grad_evals += 1
        opt.zero_grad(set_to_none=True)
        loss = run.loss(*batch)
        loss.backward()
        return loss.detach()

    for t in range(1, steps + 1):
        if diverged_at is None:
            batch, calls = None, 0
            before = _snapshot(run)
            try:
                loss = float(opt.step(closure))
            except FloatingPointError:  # L2O(nonfinite="raise") on a NaN/inf gradient
                loss = math.nan
            if not math.isfinite(loss) or not all(
                bool(torch.isfinite(q).all()) for q in run.params
            ):
                _restore(run, before)
                diverged_at = t
            elif sched is not None:
                sched.step()
            curve.append(loss)
            if run.extras:
                norms.append(run.param_norm())
                elapsed.append(time.perf_counter() - t_start - measure_s)
        if t in horizons:
            t0, c0 = time.perf_counter(), time.process_time()
            metrics[str(t)] = _measure(run, spec, t)
            measure_s += time.perf_counter() - t0
            measure_cpu += time.process_time() - c0
    every, values = _downsample(curve, spec.curve_points)
    total = time.perf_counter() - t_start
    record: dict[str, Any] = {
        "key": spec.key(),
        "spec": spec.to_dict(),
        "init_sha": run.init_sha,
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
    if run.extras:
        record["norm_curve"] = _downsample(norms, spec.curve_points)[1]
        record["curve_seconds"] = (
            [
                float(f"{elapsed[min(i + every, len(elapsed)) - 1]:.4g}")
                for i in range(0, len(elapsed), every)
            ]
            if every
            else []
        )
        record["seconds_per_step"] = (total - measure_s) / max(1, len(curve))
        cpu_train = time.process_time() - cpu_start - measure_cpu
        record["cpu_seconds_per_step"] = cpu_train / max(1, len(curve))
        record["num_params"] = sum(q.numel() for q in run.params)
        record["state_bytes_per_param"] = state_bytes(opt) / record["num_params"]
    return record
