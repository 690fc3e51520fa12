"""Speed and memory of one flatl2o optimizer step on the CPU, next to torch.optim.Adam.

    python benchmarks/step.py                 # 1e5, 1e6, 1e7 parameters (~3 minutes)
    python benchmarks/step.py --sizes 100000 --no-e2e   # quick look

Everything is measured in this run, on this machine: the machine's fp32 matmul rate (best of
10 at the start and 10 at the end) and copy bandwidth, Adam (foreach) on the same parameters,
then each rule on each backend: best-of-N step time (interference on a shared machine only
adds time), the ratio to Adam, achieved GFLOP/s and GB/s, the arithmetic floor (the step's
matmul FLOPs at the measured matmul rate) and the ratio to it, optimizer state bytes per
parameter, and the peak transient memory of a step (resident-set high-water mark above the
memory held before the step, measured in a child process whose large allocations are
mmapped, ``MALLOC_MMAP_THRESHOLD_``, so freed memory leaves the resident set; timing is
measured without that setting). Then an end-to-end training step of two small models.
Results are printed as a markdown table and written to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatl2o import L2O, make_rule
from flatl2o.rules import UpdateRule


def best_time(fn, reps: int, warmup: int = 1) -> float:
    """Best of ``reps`` timed runs: on a shared machine interference only adds time."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_rate() -> float:
    """FLOP/s of a large fp32 matmul with all of torch's threads (best of 10)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / best_time(lambda: a @ b, 10, 2)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 256 MiB tensor copy."""
    a = torch.randn(64 << 20)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / best_time(lambda: b.copy_(a), 5, 2)


def step_flops(rule: UpdateRule) -> int:
    """Matmul FLOPs per coordinate of one step (the gate products, input layer, read-out)."""
    c = rule.config
    flops = 0
    for cell in rule.lstm.cells:
        flops += 2 * 4 * c.hidden_size * (cell.input_size + c.hidden_size)
    if hasattr(rule, "input"):
        flops += 2 * rule.input.in_features * rule.input.out_features
    return flops + 2 * c.hidden_size


def step_bytes(rule: UpdateRule) -> int:
    """Bytes per coordinate a step must move: grad read, param read+write, state read+write."""
    return 4 + 8 + 2 * 4 * rule.state_floats_per_coordinate()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def transient_bytes(fn) -> int | None:
    """Peak resident memory during ``fn()`` above the resident memory before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (Linux >= 4.0)
    except OSError:
        return None
    before = _status("VmRSS:")
    fn()
    return max(0, _status("VmHWM:") - before)


def _params(n: int) -> list[nn.Parameter]:
    """A realistic parameter list (a few tensors, not one flat vector) with gradients."""
    shapes = [(n // 2,), (n // 4,), (n - n // 2 - n // 4,)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _make_optimizer(what: str, rule_name: str | None, params: list[nn.Parameter]):
    if what == "adam-foreach":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    torch.manual_seed(0)
    return L2O(params, make_rule(rule_name), lr=1e-9, backend=what.split("-", 1)[1])


def child_transient(n: int, what: str, rule_name: str | None) -> int | None:
    """Peak transient bytes of one step, measured in a child with mmapped large allocations."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--transient", str(n), what, rule_name or "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(proc.stderr[-2000:], file=sys.stderr)
        return None


def _transient_main(n: int, what: str, rule_name: str) -> None:
    params = _params(n)
    opt = _make_optimizer(what, None if rule_name == "-" else rule_name, params)
    opt.step()  # state exists before the measured step
    print(json.dumps(transient_bytes(opt.step)))


def bench_sizes(sizes: list[int], reps: int) -> list[dict]:
    rows = []
    for n in sizes:
        params = _params(n)
        adam = _make_optimizer("adam-foreach", None, params)
        t_adam = best_time(adam.step, reps * 3, 2)
        adam_transient = child_transient(n, "adam-foreach", None)
        rows.append(
            dict(
                n=n,
                what="adam-foreach",
                seconds=t_adam,
                ratio_adam=1.0,
                state_bytes_per_param=8,
                transient_bytes=adam_transient,
            )
        )
        del adam
        for name in ("l2o-dm", "rnnprop", "normprop"):
            torch.manual_seed(0)
            rule = make_rule(name)
            for backend in ("cpu", "reference"):
                if backend == "reference" and n > 1_000_000:
                    continue  # minutes per step; the 1e6 row shows its ratio
                opt = _make_optimizer(f"flatl2o-{backend}", name, params)
                opt.step()  # creates the state
                t = best_time(opt.step, reps if n >= 10**7 else reps * 6, 1)
                transient = child_transient(n, f"flatl2o-{backend}", name)
                rows.append(
                    dict(
                        n=n,
                        what=f"flatl2o-{backend}",
                        rule=name,
                        seconds=t,
                        ratio_adam=t / t_adam,
                        gflops=step_flops(rule) * n / t / 1e9,
                        gbps=step_bytes(rule) * n / t / 1e9,
                        floor_seconds=None,
                        state_bytes_per_param=4 * rule.state_floats_per_coordinate(),
                        transient_bytes=transient,
                        flops_per_coord=step_flops(rule),
                    )
                )
                print(rows[-1], flush=True)
                del opt
    return rows


class SmallConvNet(nn.Module):
    """A small MNIST-sized conv net (about 0.2M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(64 * 7 * 7, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        return self.out(torch.relu(self.head(self.features(x).flatten(1))))


def small_transformer() -> nn.Module:
    """A 2-layer transformer encoder, d_model 256 (about 1.6M parameters)."""
    layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 2), nn.Linear(256, 10))


def end_to_end(reps: int) -> list[dict]:
    rows = []
    cases = [
        ("convnet-mnist b128", SmallConvNet, lambda g: torch.randn(128, 1, 28, 28, generator=g)),
        (
            "transformer-2x256 b16x64",
            small_transformer,
            lambda g: torch.randn(16, 64, 256, generator=g),
        ),
    ]
    for label, build, batch in cases:
        times = {}
        for opt_name in ("adam", "flatl2o-rnnprop", "flatl2o-l2o-dm", "flatl2o-normprop"):
            torch.manual_seed(0)
            model = build()
            if opt_name == "adam":
                opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
            else:
                opt = L2O(model.parameters(), make_rule(opt_name.split("-", 1)[1]))
            gen = torch.Generator().manual_seed(0)
            x = batch(gen)
            y = torch.randint(0, 10, (x.shape[0],), generator=gen)

            def step(model=model, opt=opt, x=x, y=y):
                opt.zero_grad()
                out = model(x)
                out = out.mean(1) if out.dim() == 3 else out
                nn.functional.cross_entropy(out, y).backward()
                opt.step()

            times[opt_name] = best_time(step, reps, 2)
        n = sum(p.numel() for p in build().parameters())
        for opt_name, t in times.items():
            rows.append(
                dict(
                    model=label,
                    params=n,
                    optimizer=opt_name,
                    seconds=t,
                    ratio_adam=t / times["adam"],
                )
            )
            print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['threads']} torch threads; fp32 matmul "
        f"{m['matmul_gflops']:.0f} GFLOP/s, copy {m['copy_gbps']:.1f} GB/s (measured in this run); "
        f"load average {m['load_average_before'][0]:.1f} before, "
        f"{m.get('load_average_after', [float('nan')])[0]:.1f} after.",
        "",
        "| params | step | rule | time (ms) | × Adam | GFLOP/s | GB/s | × floor | state B/param "
        "| transient MiB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["steps"]:
        floor = r.get("flops_per_coord", 0) * r["n"] / (m["matmul_gflops"] * 1e9)
        tr = r.get("transient_bytes")
        lines.append(
            f"| {r['n']:.0e} | {r['what']} | {r.get('rule', '')} | {r['seconds'] * 1e3:.2f} "
            f"| {r['ratio_adam']:.1f} | {r.get('gflops', float('nan')):.1f} "
            f"| {r.get('gbps', float('nan')):.1f} "
            f"| {r['seconds'] / floor if floor else float('nan'):.1f} "
            f"| {r['state_bytes_per_param']} "
            f"| {tr / 2**20 if tr is not None else float('nan'):.1f} |"
        )
    if result.get("end_to_end"):
        lines += [
            "",
            "| model | params | optimizer | train step (ms) | × Adam |",
            "|---|---:|---|---:|---:|",
        ]
        for r in result["end_to_end"]:
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['optimizer']} "
                f"| {r['seconds'] * 1e3:.1f} | {r['ratio_adam']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end models")
    ap.add_argument("--out", default="benchmarks/results/step.json")
    ap.add_argument("--transient", nargs=3, help=argparse.SUPPRESS)  # child: N WHAT RULE
    args = ap.parse_args()
    if args.transient:
        _transient_main(int(args.transient[0]), args.transient[1], args.transient[2])
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = dict(
        cpu=_cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        matmul_gflops=matmul_rate() / 1e9,
        copy_gbps=copy_bandwidth() / 1e9,
        load_average_before=os.getloadavg(),
    )
    print(machine, flush=True)
    result = dict(machine=machine, steps=bench_sizes(args.sizes, args.reps))
    if not args.no_e2e:
        result["end_to_end"] = end_to_end(args.reps * 4)
    machine["load_average_after"] = os.getloadavg()
    # the floor is the machine's speed: measured again at the end, the faster of the two
    machine["matmul_gflops"] = max(machine["matmul_gflops"], matmul_rate() / 1e9)
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
