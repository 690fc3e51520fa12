"""Registers, spills, instruction counts and a static time bound of the Triton step kernel,
compiled for a GPU without one.

    python benchmarks/triton_resources.py             # ~3 minutes on 2 CPU cores
    python benchmarks/triton_resources.py --calibrate # + the bound vs the H200 timings
    python benchmarks/triton_resources.py --arch 90 --rule l2o-dm

Compiles ``flatl2o/kernels/triton_jit.py``'s kernel ahead of time for an NVIDIA target
(default sm_90, the H100/H200) with Triton's bundled ptxas, for each (variant, tl.dot
precision, block, warps, ptxas register cap) below, and reads the cubin with cuobjdump:
registers per thread, the per-thread stack (register spills to local memory), shared memory
per program, and the machine instructions (SASS) the kernel issues per coordinate.

No timing: this is what the compiler decided. From the instruction counts it derives a
*lower bound* on the time of a 100M-coordinate step on an H200 (see ``H200`` below): the
largest of the instruction-issue time, the special-function (exp/reciprocal) time, the
load/store-unit time and the tensor-core time, each at the card's peak rate with no stall,
next to the DRAM floor at the copy bandwidth measured on the H200
(benchmarks/results/gpu_check_h200.log). ``copy BW % <=`` is the floor over that bound: the
most of the copy bandwidth a configuration could reach even if it never waited on anything;
below 60% a configuration cannot meet issue 5's GPU target whatever the tuning. The non
persistent grid runs the kernel's block loop once per program, so static counts are the
dynamic ones (no other loops: Triton unrolls the small dots).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton

from benchmarks.triton_aot import compile_kernel, launch_ints
from flatl2o.kernels import rule_program
from flatl2o.kernels import triton_step as ts
from flatl2o.kernels.layout import padded
from flatl2o.rules import make_rule

CONFIGS = [  # (variant, precision, block, warps, maxnreg: 0 = ptxas's own choice)
    ("strided", "ieee", 32, 2, 0),  # the layout timed on the H200
    ("packed", "ieee", 32, 2, 0),
    ("packed", "ieee", 32, 4, 0),
    ("packed", "ieee", 32, 2, 255),  # the default without TF32 tensor cores
    *[("packed", "ieee", b, w, 255) for b, w in ((16, 8), (32, 8), (64, 4))],
    *[("packed", "tf32x3", b, w, 255) for b, w in ((32, 2), (32, 4), (64, 4))],
    ("packed", "3xtf32", 64, 4, 168),  # the default with TF32 tensor cores (sm_80+)
    *[("packed", "3xtf32", 64, 4, r) for r in (0, 255, 128)],
    *[("packed", "3xtf32", b, w, 255) for b, w in ((32, 2), (64, 2), (64, 8), (128, 4))],
    *[("packed", "3xtf32", 128, w, 168) for w in (4, 8)],
    ("packed", "tf32", 64, 4, 255),  # one TF32 pass: not fp32-accurate, shown for the bound
]  # "persistent" compiles to the same kernel as "packed" (only the grid differs)
#: H200 SXM figures the bound uses: SMs, boost clock, per-SM per-clock issue (4 schedulers x
#: 1 warp instruction), special-function lanes (16: one warp exp/rcp per 2 clocks per SM),
#: load/store-unit warp instructions (1), dense TF32 tensor peak (FLOP/s, NVIDIA's H100/H200
#: SXM data sheet), and the copy bandwidth measured on one (gpu_check_h200.log).
H200 = dict(
    sms=132, clock=1.98e9, issue=4, mufu_lanes=16, lsu=1, tf32_flops=494.7e12, copy_gbs=4156.5
)
#: Bytes of DRAM traffic per coordinate of an fp32-state step: read + write of the state
#: (4 LSTM tensors of 20 floats; RNNprop also m, v; NormProp 2 of 4 and m_fast, m_slow, v),
#: the gradient read, the parameter read + write; NormProp also writes its direction and its
#: second pass reads it (the parameter is read and written there, not in this kernel).
DRAM_BYTES = {
    "l2o-dm": 4 * 20 * 4 * 2 + 4 + 8,
    "rnnprop": (4 * 20 + 2) * 4 * 2 + 4 + 8,
    "normprop": (2 * 4 + 3) * 4 * 2 + 4 + 8 + 8,
}
MEMORY_OPS = ("LDG", "STG", "LDS", "STS", "LDL", "STL", "LDSM", "STSM", "ATOMS", "RED")


def rule_consts(rule: str, prec: str, block: int, variant: str = "packed") -> dict:
    """The constexpr arguments a GPU launch passes for ``rule`` (its default size)."""
    config = ts.LaunchConfig(variant, prec, block, warps=0, maxnreg=0)  # warps: not constexpr
    return ts.launch_constexprs(rule_program(make_rule(rule)), config, plain=False)


def resources(
    rule: str, variant: str, prec: str, block: int, warps: int, maxnreg: int, arch: int
) -> dict:
    consts = rule_consts(rule, prec, block, variant)
    k = compile_kernel(ts._step_kernel, consts, warps, maxnreg, arch, launch_ints(10**8, block))
    return dict(
        rule=rule,
        variant=variant,
        precision=prec,
        block=block,
        warps=warps,
        maxnreg=maxnreg,
        registers=k.registers,
        stack_bytes=k.stack_bytes,
        shared_bytes=k.shared_bytes,
        warps_per_sm=warps_per_sm(k.registers, k.shared_bytes, warps),
        **bound(rule, block, warps, k.opcodes, k.tensor_macs),
    )


def warps_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident warps per SM on sm_90 (65,536 registers allocated per warp in units of 256;
    228 KB shared memory, 1 KB reserved per program; at most 32 programs and 64 warps): the
    latency hiding a configuration gets. The H200 timings had 8 warps/SM at 9.8x the bound."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (65536 // per_warp) // warps
    by_shared = (228 * 1024) // (shared + 1024)
    return min(by_regs, by_shared, 32, 64 // warps) * warps


def bound(rule: str, block: int, warps: int, ops: collections.Counter, macs: int) -> dict:
    """Per-coordinate instruction counts and the static lower bound on a 100M-coordinate step
    (ms) on an H200: per program, each thread issues the static count once."""
    g = H200
    programs = 1e8 / block
    total = sum(ops.values())
    mem = sum(ops[k] for k in MEMORY_OPS)
    per_sm = programs * warps / g["sms"]  # warp instructions per SM, per static instruction
    issue = total * per_sm / (g["issue"] * g["clock"])
    mufu = ops["MUFU"] * per_sm * 32 / (g["mufu_lanes"] * g["clock"])
    lsu = mem * per_sm / (g["lsu"] * g["clock"])
    tensor = 2 * macs * programs / g["tf32_flops"]
    dram = DRAM_BYTES[rule] * 1e8 / (g["copy_gbs"] * 1e9)
    lower = max(issue, mufu, lsu, tensor, dram)
    lanes = 32 * warps / block  # thread-instructions per coordinate, per static instruction
    return dict(
        instr_per_coord=round(total * lanes),
        ffma_per_coord=round(ops["FFMA"] * lanes),
        mufu_per_coord=round(ops["MUFU"] * lanes),
        mem_per_coord=round(mem * lanes),
        spill_ops_per_coord=round((ops["LDL"] + ops["STL"]) * lanes),
        tensor_macs_per_coord=round(macs / block),
        issue_ms=round(issue * 1e3, 1),
        mufu_ms=round(mufu * 1e3, 1),
        lsu_ms=round(lsu * 1e3, 1),
        tensor_ms=round(tensor * 1e3, 1),
        dram_ms=round(dram * 1e3, 1),
        bound_ms=round(lower * 1e3, 1),
        copy_bw_pct_max=round(100 * dram / lower),
    )


COLUMNS = {  # table column -> row key
    "registers": "registers",
    "stack (spills) B/thread": "stack_bytes",
    "shared B/program": "shared_bytes",
    "warps/SM": "warps_per_sm",
    "instr": "instr_per_coord",
    "FFMA": "ffma_per_coord",
    "MUFU": "mufu_per_coord",
    "ld/st": "mem_per_coord",
    "spill ld/st": "spill_ops_per_coord",
    "tensor MAC": "tensor_macs_per_coord",
    "issue ms": "issue_ms",
    "MUFU ms": "mufu_ms",
    "LSU ms": "lsu_ms",
    "tensor ms": "tensor_ms",
    "bound ms": "bound_ms",
    "copy BW % <=": "copy_bw_pct_max",
}
#: The kernel timed on the H200 (benchmarks/results/gpu_check_h200.log) is this commit's.
TIMED_COMMIT = "3ef41a5"
TIMED_LOG = Path(__file__).parent / "results" / "gpu_check_h200.log"


def calibrate(arch: int) -> list[dict]:
    """The bound next to what the H200 measured: compiles the kernel as it was when timed
    (``git show TIMED_COMMIT``) for every block/warps the log timed, and prints the bound,
    the measured time (read from the log) and their ratio. Needs the repository's history."""
    import ast
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "-C", str(root), "show", f"{TIMED_COMMIT}:flatl2o/kernels/triton_step.py"],
        capture_output=True,
        text=True,
    )
    if src.returncode != 0:
        raise SystemExit(f"--calibrate needs the git history ({TIMED_COMMIT}): {src.stderr}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timed_triton_step.py"  # Triton reads the kernel's source file
        path.write_text(src.stdout)
        spec = importlib.util.spec_from_file_location("timed_triton_step", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        timed = [
            ast.literal_eval(line.split(" ", 1)[1])
            for line in TIMED_LOG.read_text().splitlines()
            if line.startswith("bench {") and "flatl2o-triton" in line
        ]
        print(f"kernel of {TIMED_COMMIT} (timed on an H200), l2o-dm fp32 state, 100M coordinates")
        print("| block | warps | registers | stack B | warps/SM | bound ms | measured ms | ratio |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in timed:
            if t["rule"] != "l2o-dm" or t["n"] != 10**8 or "float32" not in t["state"]:
                continue
            consts = rule_consts("l2o-dm", t["precision"], t["block"])
            ints = launch_ints(t["n"], t["block"])
            k = compile_kernel(mod._step_kernel, consts, t["warps"], 0, arch, ints)
            b = bound("l2o-dm", t["block"], t["warps"], k.opcodes, k.tensor_macs)
            ms = t["seconds"] * 1e3
            row = dict(
                block=t["block"],
                warps=t["warps"],
                registers=k.registers,
                stack_bytes=k.stack_bytes,
                warps_per_sm=warps_per_sm(k.registers, k.shared_bytes, t["warps"]),
                bound_ms=b["bound_ms"],
                measured_ms=round(ms, 1),
                ratio=round(ms / b["bound_ms"], 1),
            )
            rows.append(row)
            print("| " + " | ".join(str(v) for v in row.values()) + " |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 100")
    ap.add_argument("--rule", choices=list(DRAM_BYTES), default="l2o-dm")
    ap.add_argument("--out", default="benchmarks/results/triton_resources.json")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="also compare the bound with the H200 timings of the kernel version they measured",
    )
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    hidden = make_rule(args.rule).config.hidden_size
    print(
        f"Triton {triton.__version__}, sm_{args.arch}, rule {args.rule}"
        f" (hidden {hidden} -> {padded(hidden)})"
    )
    print(
        "Per coordinate: SASS instructions issued (thread-level), of them FFMA, exp/rcp (MUFU),"
        " loads/stores and spill loads/stores; tensor-core MACs. Bound: ms per 100M-coordinate"
        " step on an H200 at peak issue/MUFU/LSU/tensor rates (largest shown), DRAM floor"
        f" {DRAM_BYTES[args.rule] * 1e8 / (H200['copy_gbs'] * 1e9) * 1e3:.1f} ms"
        f" ({DRAM_BYTES[args.rule]} B/coord at {H200['copy_gbs']:.0f} GB/s)."
    )
    head = ["variant", "tl.dot precision", "block", "warps", "maxnreg", *COLUMNS]
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    rows = []
    for variant, prec, block, warps, maxnreg in CONFIGS:
        r = resources(args.rule, variant, prec, block, warps, maxnreg, args.arch)
        rows.append(r)
        cells = [variant, prec, block, warps, maxnreg or "ptxas", *(r[k] for k in COLUMNS.values())]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    result = dict(triton=triton.__version__, arch=args.arch, h200=H200, rows=rows)
    if args.calibrate:
        result["calibration"] = calibrate(args.arch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:  # compile fresh, leave no cache behind
        os.environ.setdefault("TRITON_CACHE_DIR", cache)
        main()
