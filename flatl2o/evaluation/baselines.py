"""Hand-crafted baselines that torch does not ship: SAM and Entropy-SGD, as torch optimizers.

Both are ordinary ``torch.optim.Optimizer`` subclasses whose ``step`` needs a closure that
zeroes the gradients, recomputes the loss, calls ``backward()`` and returns the loss:

- :class:`SAM` (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021) calls the closure twice **on the same minibatch**: once at ``w``
  to get ``g``, once at ``w + e`` with ``e = rho * g / ||g||`` (the first-order solution of the
  inner maximization, p = 2), then restores ``w`` and lets the base optimizer (SGD, Adam, ...)
  step with the gradient taken at ``w + e``.
- :class:`EntropySGD` (Chaudhari et al., "Entropy-SGD: Biasing Gradient Descent Into Wide
  Valleys", ICLR 2017, Algorithm 1) calls the closure ``langevin_steps`` times and expects **a
  fresh minibatch on every call** (as the authors' code does; ``fresh_batch_per_closure`` says
  so to a training loop). Each call is one stochastic-gradient Langevin (SGLD) step of a walker
  ``x'`` started at ``x``; ``mu`` averages the walker; the outer step is
  ``x <- x - lr * gamma_t * (x - mu)``, the gradient of the negative local entropy.

:data:`BASELINES` registers every baseline of the evaluation suite (Adam, SGD with momentum,
SAM on SGD and on Adam, Entropy-SGD) with its hyper-parameter grid; see
:mod:`flatl2o.evaluation.tuning`. AdamW and Muon (``uses_roles``) need a real module's
parameters tagged by role, so only the realistic suite (:mod:`flatl2o.evaluation.realistic`)
runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["BASELINES", "SAM", "Baseline", "EntropySGD", "MuonAdamW", "make_baseline"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
Closure = Callable[[], Tensor]


def _require_closure(closure: Closure | None, name: str) -> Closure:
    if closure is None:
        raise ValueError(
            f"{name}.step needs a closure that zeroes the gradients, recomputes the loss, "
            "calls loss.backward() and returns the loss: opt.step(closure)"
        )
    return closure


class SAM(Optimizer):
    """Sharpness-Aware Minimization around a base optimizer (Foret et al. 2021).

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)`` builds the base optimizer
    on the same parameter groups with the remaining keyword arguments. One ``step(closure)``:

    1. ``loss = closure()`` gives ``g = grad L(w)`` on the current minibatch;
    2. ``e = rho * g / (||g||_2 + 1e-12)``, the norm taken over all parameters of all groups;
       ``w <- w + e``;
    3. ``closure()`` again (same minibatch) gives ``grad L(w + e)``;
    4. ``w <- w - e``, then the base optimizer steps with ``grad L(w + e)``.

    Returns the loss of step 1 (the loss at ``w``). Costs two forward/backward passes.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        **base_kwargs: Any,
    ) -> None:
        if not (rho >= 0.0 and math.isfinite(rho)):
            raise ValueError(f"SAM: rho must be a finite number >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups, shared
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter to ``w + e`` (the ascent point) and remember ``e``."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale.to(p.grad.dtype)
                p.add_(e)
                self.state[p]["e"] = e

    @torch.no_grad()
    def second_step(self) -> None:
        """Return every parameter to ``w`` and step the base optimizer with grad L(w + e)."""
        for group in self.param_groups:
            for p in group["params"]:
                e = self.state[p].pop("e", None)
                if e is not None:
                    p.sub_(e)
        self.base_optimizer.step()

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step; ``closure`` must recompute the loss on the SAME minibatch."""
        closure = _require_closure(closure, "SAM")
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (SAM keeps nothing between steps)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (re-links the shared groups)."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


class EntropySGD(Optimizer):
    """Entropy-SGD (Chaudhari et al. 2017, Algorithm 1) as a torch optimizer.

    One ``step(closure)``, with ``x`` the parameters and ``gamma_t = gamma * (1 + scoping)^t``
    (``t`` = outer steps taken so far, "gamma scoping"):

    - ``x' <- x``, ``mu <- x``; then ``langevin_steps`` times: ``closure()`` (a FRESH minibatch)
      gives ``g = grad f(x')``, and, with ``eta = langevin_lr``,
      ``x' <- x' - eta * (g + gamma_t * (x' - x)) + sqrt(2 * eta * noise) * N(0, I)``,
      ``mu <- average * mu + (1 - average) * x'``;
    - outer step on ``d = gamma_t * (x - mu)`` (the gradient of the negative local entropy):
      ``x <- x - lr * d``, or with ``momentum`` > 0 the SGD momentum form
      ``b <- momentum * b + d``, ``x <- x - lr * b`` (Nesterov: ``x <- x - lr * (d + momentum b)``).

    The averaging ``mu <- 0.75 mu + 0.25 x'`` and the noise scale follow the authors' released
    code and this project's local-entropy regularizer (``noise`` is the temperature epsilon); the
    released code's learning rate equals ``lr * gamma`` here. Limits used by the tests: with
    ``langevin_steps = 1`` and ``noise = 0`` one step is SGD with learning rate
    ``lr * gamma * langevin_lr * (1 - average)``; on ``f = x^T A x / 2`` without noise and
    with many Langevin steps, ``mu -> gamma (A + gamma I)^-1 x``, the Gibbs mean.

    Returns the loss of the first closure call (the minibatch loss at ``x``). Costs
    ``langevin_steps`` forward/backward passes per step. ``generator`` seeds the Langevin noise.
    """

    #: The closure must draw a new minibatch on every call (one per Langevin step).
    fresh_batch_per_closure = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        gamma: float = 0.03,
        scoping: float = 1e-4,
        langevin_steps: int = 5,
        langevin_lr: float = 0.1,
        noise: float = 1e-4,
        average: float = 0.75,
        momentum: float = 0.0,
        nesterov: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        checks = {
            "lr > 0": lr > 0,
            "gamma > 0": gamma > 0,
            "scoping >= 0": scoping >= 0,
            "langevin_steps >= 1": int(langevin_steps) == langevin_steps >= 1,
            "langevin_lr > 0": langevin_lr > 0,
            "noise >= 0": noise >= 0,
            "0 <= average < 1": 0 <= average < 1,
            "0 <= momentum < 1": 0 <= momentum < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"EntropySGD: need {', '.join(bad)}")
        defaults = dict(
            lr=lr,
            gamma=gamma,
            scoping=scoping,
            langevin_steps=int(langevin_steps),
            langevin_lr=langevin_lr,
            noise=noise,
            average=average,
            momentum=momentum,
            nesterov=nesterov,
        )
        super().__init__(params, defaults)
        self.generator = generator
        self.outer_steps = 0

    def _noise_like(self, p: Tensor) -> Tensor:
        return torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One outer Entropy-SGD step; ``closure`` must draw a fresh minibatch on each call."""
        closure = _require_closure(closure, "EntropySGD")
        params = [p for g in self.param_groups for p in g["params"]]
        anchor = {p: p.detach().clone() for p in params}
        mean = {p: p.detach().clone() for p in params}
        steps = {g["langevin_steps"] for g in self.param_groups}
        if len(steps) != 1:
            raise ValueError("EntropySGD: all parameter groups must share langevin_steps")
        first_loss: Tensor | None = None
        for _ in range(steps.pop()):
            with torch.enable_grad():
                loss = closure()
            if first_loss is None:
                first_loss = loss
            for group in self.param_groups:
                gamma = group["gamma"] * (1.0 + group["scoping"]) ** self.outer_steps
                eta, avg = group["langevin_lr"], group["average"]
                std = math.sqrt(2.0 * eta * group["noise"])
                for p in group["params"]:
                    g = torch.zeros_like(p) if p.grad is None else p.grad
                    p.sub_(eta * (g + gamma * (p - anchor[p])))
                    if std > 0:
                        p.add_(self._noise_like(p), alpha=std)
                    mean[p].mul_(avg).add_(p, alpha=1.0 - avg)
        for group in self.param_groups:
            gamma = group["gamma"] * (1.0 + group["scoping"]) ** self.outer_steps
            mom = group["momentum"]
            for p in group["params"]:
                d = gamma * (anchor[p] - mean[p])
                if mom > 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    buf = d.clone() if buf is None else buf.mul_(mom).add_(d)
                    state["momentum_buffer"] = buf
                    d = d + mom * buf if group["nesterov"] else buf
                p.copy_(anchor[p] - group["lr"] * d)
        self.outer_steps += 1
        assert first_loss is not None
        return first_loss

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the outer step count (it sets gamma_t)."""
        sd = super().state_dict()
        sd["outer_steps"] = self.outer_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`."""
        sd = dict(state_dict)
        self.outer_steps = int(sd.pop("outer_steps", 0))
        super().load_state_dict(sd)


def _roles(groups: ParamsT) -> dict[str, list[Tensor]]:
    """Parameters by ``role`` from tagged param groups (see ``Baseline.uses_roles``)."""
    out: dict[str, list[Tensor]] = {"hidden": [], "matrix": [], "vector": []}
    for g in groups:
        if not isinstance(g, dict) or g.get("role") not in out:
            raise ValueError(
                "this optimizer needs param groups tagged with a role ('hidden', 'matrix' or "
                "'vector'): [{'params': [...], 'role': 'hidden'}, ...]"
            )
        out[g["role"]] += list(g["params"])
    return out


class MuonAdamW(Optimizer):
    """``torch.optim.Muon`` on the 2-D hidden weight matrices, AdamW on every other tensor.

    Muon uses ``adjust_lr_fn="match_rms_adamw"`` (Moonlight's scaling: its update has AdamW's
    RMS), so one ``lr`` and ``weight_decay`` serve both halves, as Moonlight trains them; biases
    and normalization parameters get no weight decay. ``params`` are role-tagged groups.
    """

    def __init__(
        self, params: ParamsT, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95
    ) -> None:
        roles = _roles(params)
        if not roles["hidden"]:
            raise ValueError("Muon needs 2-D hidden weight matrices; this model has none")
        self.muon = torch.optim.Muon(
            roles["hidden"],
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        rest = (
            [{"params": roles["matrix"], "weight_decay": weight_decay}] if roles["matrix"] else []
        )
        rest += [{"params": roles["vector"], "weight_decay": 0.0}] if roles["vector"] else []
        self.adamw = torch.optim.AdamW(rest, lr=lr)
        super().__init__(
            [*self.muon.param_groups, *self.adamw.param_groups], dict(lr=lr)
        )  # shared group dicts: an LR scheduler on this optimizer drives both halves
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor | None:  # type: ignore[override]
        """One Muon step and one AdamW step on the gradients of one ``closure()`` call."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Both halves' state dicts."""
        return {"state": {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`."""
        self.muon.load_state_dict(state_dict["state"]["muon"])
        self.adamw.load_state_dict(state_dict["state"]["adamw"])
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]


# ------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Baseline:
    """One baseline of the evaluation: how to build it and which grid to tune it on.

    ``grid`` maps a hyper-parameter to the values tried on the validation split. ``tune_after``
    names a baseline whose tuned ``lr`` this one reuses (SAM keeps its base optimizer's learning
    rate and tunes rho, as Foret et al. did); then ``grid`` holds the remaining keys only.
    ``uses_roles``: ``build`` takes param groups tagged with a ``role`` ("hidden", "matrix",
    "vector"; see :class:`flatl2o.evaluation.runner.Workload`) instead of a plain list;
    ``schedule`` is the lr schedule its runs use (``"warmup-cosine"`` or ``None``).
    """

    name: str
    description: str
    build: Callable[..., Optimizer]
    grid: dict[str, tuple[float, ...]]
    grads_per_step: int = 1
    tune_after: str | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    uses_roles: bool = False
    schedule: str | None = None

    def make(
        self, params: ParamsT, hparams: dict[str, float], generator: torch.Generator | None
    ) -> Optimizer:
        """Build the optimizer on ``params`` with tuned ``hparams`` (and the fixed options)."""
        return self.build(params, generator=generator, **self.fixed, **hparams)


def _adam(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    return torch.optim.Adam(params, **kw)


def _sgd(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    return torch.optim.SGD(params, **kw)


def _sam_sgd(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    return SAM(params, torch.optim.SGD, **kw)


def _sam_adam(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    return SAM(params, torch.optim.Adam, **kw)


def _adamw(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    """AdamW as users run it: weight decay on weights, none on biases and norms."""
    roles = _roles(params)
    wd = kw.pop("weight_decay", 0.0)
    groups = [{"params": roles["hidden"] + roles["matrix"], "weight_decay": wd}]
    groups += [{"params": roles["vector"], "weight_decay": 0.0}] if roles["vector"] else []
    return torch.optim.AdamW(groups, **kw)


def _muon(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    return MuonAdamW(params, **kw)


def _entropy(params: ParamsT, *, generator: torch.Generator | None = None, **kw: Any) -> Optimizer:
    return EntropySGD(params, generator=generator, **kw)


_RHO_GRID = (0.01, 0.05, 0.2)

#: The baselines of the evaluation suite, by name.
BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline(
            "adam",
            "Adam (betas 0.9/0.999), lr tuned",
            _adam,
            {"lr": (1e-3, 3e-3, 1e-2, 3e-2)},
        ),
        Baseline(
            "sgd",
            "SGD with momentum 0.9, lr tuned",
            _sgd,
            {"lr": (0.03, 0.1, 0.3, 1.0)},
            fixed={"momentum": 0.9},
        ),
        Baseline(
            "sam-sgd",
            "SAM (Foret et al. 2021) on SGD momentum 0.9: lr of tuned SGD, rho tuned",
            _sam_sgd,
            {"rho": _RHO_GRID},
            grads_per_step=2,
            tune_after="sgd",
            fixed={"momentum": 0.9},
        ),
        Baseline(
            "sam-adam",
            "SAM (Foret et al. 2021) on Adam: lr of tuned Adam, rho tuned",
            _sam_adam,
            {"rho": _RHO_GRID},
            grads_per_step=2,
            tune_after="adam",
        ),
        Baseline(
            "entropy-sgd",
            "Entropy-SGD (Chaudhari et al. 2017), 5 Langevin steps; lr and gamma tuned",
            _entropy,
            {"lr": (10.0, 30.0), "gamma": (0.03, 0.1)},
            grads_per_step=5,
            fixed={"langevin_steps": 5, "langevin_lr": 0.1, "noise": 1e-4, "scoping": 1e-4},
        ),
        Baseline(
            "adamw",
            "AdamW (no decay on biases/norms), lr and weight decay tuned, warmup + cosine",
            _adamw,
            {"lr": (1e-3, 3e-3, 1e-2), "weight_decay": (0.0, 0.1)},
            uses_roles=True,
            schedule="warmup-cosine",
        ),
        Baseline(
            "muon",
            "torch.optim.Muon on 2-D hidden weights + AdamW on the rest, lr tuned, wd 0.1",
            _muon,
            {"lr": (1e-3, 3e-3, 1e-2)},
            uses_roles=True,
            fixed={"weight_decay": 0.1},
        ),
    )
}


def make_baseline(
    name: str,
    params: ParamsT,
    hparams: dict[str, float],
    generator: torch.Generator | None = None,
) -> Optimizer:
    """Build baseline ``name`` with ``hparams``; unknown names list the choices."""
    try:
        baseline = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}") from None
    return baseline.make(params, hparams, generator)
