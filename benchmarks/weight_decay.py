"""Decoupled weight decay in ``flatl2o.L2O``: how large the learned step is next to Adam's, and
what ``weight_decay`` does to the parameter norm of a long run.

    nice python benchmarks/weight_decay.py              # ~25 minutes on 2 busy cores
    nice python benchmarks/weight_decay.py --quick      # smoke (a minute)

1. Step size. L2O's ``lr`` (default 1.0) multiplies a learned step whose scale the rule sets
   (``output_scale``, 0.01 for the shipped rules). Weight decay shrinks a parameter by
   ``1 - lr * output_scale * weight_decay`` per step, i.e. it takes ``lr * output_scale`` as
   the rule's effective learning rate, as AdamW shrinks by ``1 - lr * weight_decay``. This
   measures the RMS (over coordinates, averaged over steps) of the default rule's step and of
   Adam's at lr 1e-3, on two models, so the docs can say how the two effective learning rates
   compare.
2. Parameter norm. A character-level transformer (2 blocks, d_model 64) trained for 5,000
   steps with the default ``L2O`` without and with weight decay (0.01, AdamW's default, and
   0.1), next to Adam and AdamW (weight decay 0.01) at lr 1e-3. Reported: the parameter norm
   along the run, the final training loss (mean of the last 100 steps), the held-out loss.

Text: the Python sources of the installed torch's ``torch/optim`` package (sorted, read at run
time; pinned by the torch version recorded in the results), 90% to train, 10% held out.
Writes benchmarks/results/weight_decay.json and .md (``markdown(json.load(...))`` redraws it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._results import write_result
from flatl2o import L2O
from flatl2o.hub import DEFAULT_PRETRAINED

CONTEXT = 64
BATCH = 16


def corpus() -> tuple[Tensor, list[str]]:
    """The bytes of torch/optim/*.py of the installed torch, in name order."""
    root = Path(torch.__file__).parent / "optim"
    files = sorted(root.glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), [f.name for f in files]


class CharTransformer(nn.Module):
    """A causal character-level transformer (byte vocabulary, learned positions)."""

    def __init__(self, d_model: int = 64, blocks: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.randn(CONTEXT, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


class CharMLP(nn.Module):
    """Next byte from the previous 8 (embedding, one hidden layer)."""

    def __init__(self, width: int = 8, d: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(
            nn.Embedding(256, d), nn.Flatten(), nn.Linear(width * d, hidden), nn.ReLU(),
            nn.Linear(hidden, 256),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x[:, -self.width - 1 : -1]).unsqueeze(1)


def batch(data: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    start = torch.randint(0, data.numel() - CONTEXT - 1, (BATCH,), generator=gen)
    idx = start[:, None] + torch.arange(CONTEXT + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    y = y[:, -logits.shape[1] :]
    return nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))


#: The transformer runs: name -> (optimizer, options).
RUNS = {
    "L2O": ("l2o", {}),
    "L2O wd 0.01": ("l2o", {"weight_decay": 0.01}),
    "L2O wd 0.1": ("l2o", {"weight_decay": 0.1}),
    "Adam": ("adam", {"lr": 1e-3}),
    "AdamW wd 0.01": ("adamw", {"lr": 1e-3, "weight_decay": 0.01}),
}


def make_optimizer(kind: str, params: list[nn.Parameter], **options: float) -> Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, **options)
    if kind == "adamw":
        return torch.optim.AdamW(params, **options)
    return L2O(params, **options)


def param_norm(params: list[nn.Parameter]) -> float:
    return float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in params)))


@torch.no_grad()
def held_out_loss(model: nn.Module, data: Tensor, batches: int = 40) -> float:
    gen = torch.Generator().manual_seed(12345)
    return sum(float(loss_of(model, *batch(data, gen))) for _ in range(batches)) / batches


def train(
    model_cls: type[nn.Module],
    name: str,
    steps: int,
    train_data: Tensor,
    test_data: Tensor,
    runs: dict[str, tuple[str, dict]] = RUNS,
) -> dict:
    """One run; the step RMS is measured over every step (before any weight decay moves it:
    only the runs without weight decay are used for it)."""
    torch.manual_seed(0)
    model = model_cls()
    params = [p for p in model.parameters()]
    kind, options = runs[name]
    opt = make_optimizer(kind, params, **options)
    gen = torch.Generator().manual_seed(1)
    n = sum(p.numel() for p in params)
    norms, losses, rms = {0: param_norm(params)}, [], []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        loss = loss_of(model, *batch(train_data, gen))
        loss.backward()
        opt.step()
        losses.append(float(loss))
        sq = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before, strict=True))
        rms.append(math.sqrt(sq / n))
        if step % max(1, steps // 10) == 0 or step == steps:
            norms[step] = param_norm(params)
    tail = losses[-min(100, len(losses)) :]
    return {
        "optimizer": name,
        "params": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "param_norm": norms,
        "train_loss_last100": sum(tail) / len(tail),
        "held_out_loss": held_out_loss(model, test_data),
        "step_rms_mean": sum(rms) / len(rms),
        "step_rms_first100": sum(rms[:100]) / len(rms[:100]),
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    out = [
        "# Weight decay in L2O",
        "",
        f"`{s['command']}`; torch {s['torch']}, checkpoint `{s['checkpoint']}`, text: "
        f"{s['text_bytes']:,} bytes of torch/optim/*.py, batch {s['batch']} x {s['context']} "
        f"bytes, Adam/AdamW lr 1e-3, model seed 0, one torch thread.",
        "",
        "## Step size: RMS of one step over all coordinates",
        "",
        "| model | steps | L2O (lr 1.0) | Adam (lr 1e-3) | L2O / Adam |",
        "|---|---|---|---|---|",
    ]
    for row in result["step_rms"]:
        out.append(
            f"| {row['model']} | {row['steps']} | {row['l2o']:.3g} | {row['adam']:.3g} | "
            f"{row['l2o'] / row['adam']:.2f} |"
        )
    out += [
        "",
        "(mean over every step of the run; L2O's effective learning rate for weight decay is "
        f"lr x output_scale = {s['effective_lr']:g}.)",
        "",
        f"## Character-level transformer, {s['steps']} steps",
        "",
        "| optimizer | parameters | norm at start | norm at end | train loss (last 100) | "
        "held-out loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["transformer"]:
        norms = list(r["param_norm"].values())
        out.append(
            f"| {r['optimizer']} | {r['params']:,} | {norms[0]:.1f} | {norms[-1]:.1f} | "
            f"{r['train_loss_last100']:.3f} | {r['held_out_loss']:.3f} |"
        )
    out += ["", "Parameter norm along the run:", ""]
    steps = list(result["transformer"][0]["param_norm"])
    out.append("| step | " + " | ".join(r["optimizer"] for r in result["transformer"]) + " |")
    out.append("|---" * (1 + len(result["transformer"])) + "|")
    for st in steps:
        out.append(
            f"| {st} | "
            + " | ".join(f"{r['param_norm'][st]:.1f}" for r in result["transformer"])
            + " |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--rms-steps", type=int, default=500, help="steps of the MLP step-size runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 steps")
    ap.add_argument("--out", default="benchmarks/results/weight_decay.json")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rms_steps = 50, 50
    torch.set_num_threads(1)
    data, files = corpus()
    split = int(0.9 * data.numel())
    train_data, test_data = data[:split], data[split:]
    runs = []
    for name in RUNS:
        runs.append(train(CharTransformer, name, args.steps, train_data, test_data))
        print(runs[-1], flush=True)
    mlp = {k: train(CharMLP, k, args.rms_steps, train_data, test_data) for k in ("L2O", "Adam")}
    by_name = {r["optimizer"]: r for r in runs}
    probe = L2O([nn.Parameter(torch.zeros(1))])
    result = {
        "settings": {
            "command": "python benchmarks/weight_decay.py" + (" --quick" if args.quick else ""),
            "torch": torch.__version__,
            "checkpoint": DEFAULT_PRETRAINED,
            "effective_lr": probe._effective_lr(probe.param_groups[0]),
            "text_files": files,
            "text_bytes": data.numel(),
            "batch": BATCH,
            "context": CONTEXT,
            "steps": args.steps,
            "runs": {name: [kind, options] for name, (kind, options) in RUNS.items()},
        },
        "step_rms": [
            {
                "model": "char transformer (2 x d64)",
                "steps": args.steps,
                "l2o": by_name["L2O"]["step_rms_mean"],
                "adam": by_name["Adam"]["step_rms_mean"],
            },
            {
                "model": "char MLP (8 x 32 -> 256 -> 256)",
                "steps": args.rms_steps,
                "l2o": mlp["L2O"]["step_rms_mean"],
                "adam": mlp["Adam"]["step_rms_mean"],
            },
        ],
        "transformer": runs,
        "mlp": list(mlp.values()),
    }
    write_result(args.out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
