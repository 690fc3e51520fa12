"""Check and time the Triton step on a GPU in one short run (for a lent device machine).

    python benchmarks/gpu_check.py            # on a CUDA machine, ~5 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --quick   # the same code paths on CPU

Prints (and writes to --out as JSON): correctness of the Triton kernel against the reference
rule module (every variant with fp32 state; the device's default configuration with bf16
state; every precision), the card's measured copy bandwidth, and for a 100M-parameter step:
time, registers and spills of the compiled kernel, achieved bandwidth and its fraction of the
copy bandwidth, for the device's default configuration and then each of SWEEP (variant,
precision, block, warps, register cap) until --sweep-budget seconds are spent, then the
fastest for RNNprop, NormProp (both of its passes) and bf16 state, next to
torch.optim.Adam (foreach and fused) and the reference step measured in the same run. Then
the whole ``opt.step()`` of L2O (with the fastest configuration) for each rule and Adam on a
transformer-shaped 100M-parameter list of 128 tensors: time and the step's peak memory beyond
the state. Every rule of RULES (L2O-DM, RNNprop, NormProp) is checked and timed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatl2o import L2O
from flatl2o.kernels import ReferenceKernel, rule_program
from flatl2o.kernels import triton_step as ts
from flatl2o.kernels.accuracy import check_inputs
from flatl2o.rules import make_rule

RULES = ["l2o-dm", "rnnprop", "normprop"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up (CUDA events on GPU)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def rule_for(name: str, device: torch.device, **options: object):
    """Rule ``name`` with weights that make every part of its step matter: three times the
    initial ones (saturating the gates); NormProp's gain head and readout, zero and near zero
    in a fresh rule, drawn at random (a gain other than 1, a direction that depends on the
    LSTM). The kernel tests take their rules from here too."""
    torch.manual_seed(0)
    rule = make_rule(name, **options).to(device)
    with torch.no_grad():  # larger weights than init: exercise the nonlinearities
        for p in rule.parameters():
            p.mul_(3)
        if name == "normprop":
            rule.gain.weight.normal_(0.0, 1.0)
            rule.gain.bias.normal_(0.0, 0.5)
            rule.readout.weight.normal_(0.0, 1.0)
            rule.readout.bias.normal_(0.0, 0.5)
    return rule


def state_bytes(rule, dtype: torch.dtype) -> int:
    return rule.state_floats_per_coordinate() * torch.finfo(dtype).bits // 8


def check(device: torch.device, n: int, precisions: list[str]) -> list[dict]:
    """Triton vs the reference module over 3 steps, random state, spread-out gradients."""
    out = []
    config = ts.launch_config(device)
    # every variant with fp32 state; the device's default one also with bf16 state and every
    # precision
    cases = [(v, torch.float32, "ieee") for v in ts.VARIANTS]
    cases += [(config.variant, torch.bfloat16, config.precision)]
    cases += [(config.variant, torch.float32, p) for p in precisions if p != "ieee"]
    for name in RULES:
        rule = rule_for(name, device)
        for variant, sdt, prec in cases:
            g, init, p = check_inputs(rule, n, seed=1)
            g, p = g.to(device), p.to(device)
            st = {k: v.to(device, sdt, copy=True) for k, v in init.items()}
            st_ref = {k: v.to(device, sdt).float().clone() for k, v in init.items()}
            p_ref = p.clone()
            launch = ts.launch_config(device, variant=variant, precision=prec)
            kern = ts.TritonKernel(rule_program(rule), device, launch)
            ref = ReferenceKernel(rule)
            worst_p = worst_s = 0.0
            for step in range(1, 4):
                kern.update(p, g, st, step, 0.5, False, 1 << 16)
                ref.update(p_ref, g, st_ref, step, 0.5, False, 1 << 16)
                if sdt == torch.bfloat16:  # the reference keeps fp32: round like storage
                    st_ref = {k: v.to(sdt).float() for k, v in st_ref.items()}
                worst_p = max(worst_p, (p - p_ref).abs().max().item())
                worst_s = max(
                    worst_s, max((st[k].float() - st_ref[k]).abs().max().item() for k in st)
                )
            row = dict(
                rule=name,
                variant=variant,
                state=str(sdt),
                precision=prec,
                n=n,
                max_abs_param_diff=worst_p,
                max_abs_state_diff=worst_s,
            )
            print("check", row, flush=True)
            out.append(row)
    return out


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device tensor copy."""
    a = torch.empty(nbytes // 4, device=device)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, 10)
    return 2 * nbytes / t


#: (variant, precision, block, warps, ptxas register cap; 0 = ptxas's choice) timed on l2o-dm
#: with fp32 state after the device's default (ts.launch_config), in this order: the
#: configurations benchmarks/triton_resources.py bounds lowest on sm_90 (3xtf32 with
#: register caps trading occupancy for spills: 255 -> 213 registers, 8 warps/SM; 168 -> 12;
#: 128 -> 16), Triton's own tf32x3, then fp32 FMA (the default without TF32 tensor cores;
#: the layout timed on the H200 before), then the persistent grid. The fastest is then used
#: for the other rules and bf16 state.
SWEEP = [
    ("packed", "3xtf32", 64, 4, 168),
    ("packed", "3xtf32", 64, 4, 255),
    ("packed", "3xtf32", 64, 4, 128),
    ("packed", "3xtf32", 128, 4, 168),
    ("packed", "3xtf32", 128, 8, 168),
    ("packed", "tf32x3", 64, 4, 255),
    ("packed", "ieee", 32, 2, 255),
    ("strided", "ieee", 32, 2, 0),
    ("persistent", "3xtf32", 64, 4, 168),
    ("persistent", "ieee", 32, 2, 255),
]
CONFIG_FIELDS = ("variant", "precision", "block", "warps", "maxnreg")


def _launch(device: torch.device, config: tuple) -> ts.LaunchConfig:
    """A (variant, precision, block, warps, maxnreg) tuple as a validated LaunchConfig."""
    return ts.launch_config(device, **dict(zip(CONFIG_FIELDS, config, strict=True)))


@contextlib.contextmanager
def _environment(config: tuple) -> Iterator[None]:
    """$FLATL2O_TRITON_CONFIG set to ``config`` inside the block (how the kernels that L2O
    builds get a configuration, as a user would choose one), restored after it."""
    old = os.environ.get(ts.CONFIG_ENV)
    os.environ[ts.CONFIG_ENV] = ",".join(
        f"{k}={v}" for k, v in zip(CONFIG_FIELDS, config, strict=True)
    )
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ts.CONFIG_ENV, None)
        else:
            os.environ[ts.CONFIG_ENV] = old


def bench(device: torch.device, n: int, reps: int, sweep: bool, budget: float) -> list[dict]:
    """Adam, then the Triton step on ``n`` coordinates; the sweep stops after ``budget`` s."""
    rows = []
    grad = torch.randn(n, device=device)
    param = torch.randn(n, device=device)
    pa = torch.nn.Parameter(param.clone())
    pa.grad = grad.clone()
    for label, kw in [("adam-foreach", dict(foreach=True)), ("adam-fused", dict(fused=True))]:
        if device.type != "cuda" and label == "adam-fused":
            continue
        opt = torch.optim.Adam([pa], lr=1e-3, **kw)
        t = timed(opt.step, device, reps)
        rows.append(dict(what=label, n=n, seconds=t))
        print("bench", rows[-1], flush=True)
        del opt
    adam = rows[0]["seconds"]
    fused = rows[1]["seconds"] if len(rows) > 1 else None
    del pa
    c = ts.launch_config(device)
    default = (c.variant, c.precision, c.block, c.warps, c.maxnreg)

    def run(name: str, sdt: torch.dtype, config: tuple) -> dict:
        rule = rule_for(name, device)
        kern = ts.TritonKernel(rule_program(rule), device, _launch(device, config))
        st = {k: v.to(sdt) for k, v in rule.init_state(n, device=device).items()}
        moved = n * (4 + 8 + 2 * state_bytes(rule, sdt))  # grad r, param r+w, state r+w
        if name == "normprop":  # and its direction, written by the first pass, read by the second
            moved += 8 * n
        row = dict(what="flatl2o-triton", rule=name, state=str(sdt), n=n)
        row.update(zip(CONFIG_FIELDS, config, strict=True))
        step = iter(range(1, 10**6))
        try:
            t = timed(
                lambda: kern.update(param, grad, st, next(step), 1e-9, False, 0), device, reps
            )
        except Exception as e:  # a config that does not compile: record, go on
            row["error"] = repr(e)[:300]
            print("bench", row, flush=True)
            return row
        compiled = kern.last_compiled
        row.update(
            seconds=t,
            bytes=moved,
            gbps=moved / t / 1e9,
            vs_adam=t / adam,
            vs_adam_fused=t / fused if fused else None,
            registers=getattr(compiled, "n_regs", None),
            spills=getattr(compiled, "n_spills", None),
        )
        print("bench", row, flush=True)
        return row

    start = time.perf_counter()
    configs = [default] + [c for c in SWEEP if c != default] if sweep else [default]
    for config in configs:
        if time.perf_counter() - start > budget:
            print(f"sweep budget of {budget:.0f} s spent; skipping the rest", flush=True)
            break
        rows.append(run("l2o-dm", torch.float32, config))
    timed_rows = [r for r in rows if r.get("rule") == "l2o-dm" and "seconds" in r]
    best = min(timed_rows, key=lambda r: r["seconds"]) if timed_rows else None
    config = tuple(best[k] for k in CONFIG_FIELDS) if best else default
    print("best config", config, flush=True)
    fp32 = torch.float32
    for sdt in (torch.float32, torch.bfloat16):  # l2o-dm in fp32: timed in the sweep
        rows += [run(name, sdt, config) for name in RULES if name != "l2o-dm" or sdt != fp32]
    return rows


def reference_time(device: torch.device, n: int, reps: int) -> list[dict]:
    rows = []
    for name in RULES:
        rule = rule_for(name, device)
        ref = ReferenceKernel(rule)
        st = rule.init_state(n, device=device)
        g = torch.randn(n, device=device)
        p = torch.randn(n, device=device)
        step = iter(range(1, 10**6))
        t = timed(
            lambda r=ref, p=p, g=g, s=st, i=step: r.update(p, g, s, next(i), 1e-9, False, 1 << 20),
            device,
            reps,
        )
        rows.append(dict(what="flatl2o-reference", rule=name, n=n, seconds=t))
        print("bench", rows[-1], flush=True)
    return rows


def transformer_params(device: torch.device, layers: int, d: int) -> list[torch.nn.Parameter]:
    """Parameters shaped like a transformer's (per layer: attention q/k/v/o, a 4x MLP, two
    LayerNorms, biases), with random gradients: 16 tensors and 12 d^2 + 13 d floats a layer."""
    torch.manual_seed(0)
    shapes = []
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 4 + [(4 * d,), (d,)]
        shapes += [(d,)] * 4  # two LayerNorms: weight and bias
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def optimizer_step(device: torch.device, layers: int, d: int, reps: int) -> list[dict]:
    """The whole ``opt.step()`` on a transformer-shaped parameter list (one kernel launch per
    tensor, the finiteness check, the state lookups), next to Adam, with the step's peak
    memory beyond what was allocated before it (the state already exists: the second step)."""
    params = transformer_params(device, layers, d)
    n = sum(p.numel() for p in params)
    makers = [("adam-foreach", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True))]
    if device.type == "cuda":
        makers.append(("adam-fused", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)))
    for name in RULES:
        makers.append((f"flatl2o-{name}", lambda ps, r=name: L2O(ps, rule_for(r, device))))
    rows = []
    for label, make in makers:
        opt = make(params)
        opt.step()  # creates the state (and on the GPU compiles and verifies the kernel)
        _sync(device)
        row = dict(what=label, n=n, tensors=len(params))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            opt.step()
            _sync(device)
            row["transient_bytes"] = torch.cuda.max_memory_allocated(device) - before
        row["state_bytes_per_param"] = (
            sum(
                t.numel() * t.element_size()
                for s in opt.state.values()
                for t in s.values()
                if torch.is_tensor(t) and t.numel() > 1
            )
            / n
        )
        row["seconds"] = timed(opt.step, device, reps)
        if label.startswith("flatl2o"):
            row["backend"] = type(opt._kernel_on(device)).__name__
        rows.append(row)
        print("optimizer_step", row, flush=True)
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    adam = rows[0]["seconds"]
    for row in rows:
        row["vs_adam_foreach"] = row["seconds"] / adam
    return rows


def end_to_end(device: torch.device) -> dict:
    """L2O(backend='triton') on a small model matches backend='reference' over 5 steps."""
    res = {}
    for name in RULES:
        rule = rule_for(name, device)
        models = []
        for backend in ("triton", "reference"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)
            ).to(device)
            opt = L2O(model.parameters(), rule, backend=backend)
            for i in range(5):
                gen = torch.Generator().manual_seed(i)
                x = torch.randn(32, 64, generator=gen).to(device)
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            models.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        res[name] = (models[0] - models[1]).abs().max().item()
    print("end_to_end max abs param diff", res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for TRITON_INTERPRET=1)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument(
        "--sweep-budget", type=float, default=240.0, help="seconds of kernel sweep at most"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = dict(
        torch=torch.__version__,
        triton=getattr(ts.triton, "__version__", None),
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        python=platform.python_version(),
    )
    print(info, flush=True)
    big = 1000 if args.quick else 100_000_000
    result = dict(info=info)
    result["check"] = check(
        device,
        333 if args.quick else 1_000_003,
        ["ieee", "3xtf32"] if args.quick else ["ieee", "tf32x3", "3xtf32"],
    )
    result["end_to_end"] = end_to_end(device)
    result["copy_bytes_per_s"] = copy_bandwidth(device, 1 << (16 if args.quick else 31))
    print("copy bandwidth GB/s", result["copy_bytes_per_s"] / 1e9, flush=True)
    result["bench"] = bench(
        device, big, 2 if args.quick else 3, sweep=not args.quick, budget=args.sweep_budget
    )
    best = min(
        (r for r in result["bench"] if r.get("rule") == "l2o-dm" and "seconds" in r),
        key=lambda r: r["seconds"],
        default=None,
    )
    # the whole optimizer step with the fastest kernel configuration
    with _environment(tuple(best[k] for k in CONFIG_FIELDS)) if best else contextlib.nullcontext():
        result["optimizer_step"] = optimizer_step(
            device, 1 if args.quick else 8, 32 if args.quick else 1024, 2 if args.quick else 5
        )
    result["reference"] = reference_time(
        device, 1000 if args.quick else 10_000_000, 1 if args.quick else 3
    )
    for r in result["bench"]:
        if "gbps" in r:
            r["fraction_of_copy"] = r["gbps"] * 1e9 / result["copy_bytes_per_s"]
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
