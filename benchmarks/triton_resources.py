"""Registers, spills and shared memory of the Triton step kernel, compiled for a GPU without one.

    python benchmarks/triton_resources.py             # ~5 minutes on 2 CPU cores
    python benchmarks/triton_resources.py --arch 90 --rule l2o-dm

Compiles ``flatl2o/kernels/triton_step.py``'s kernel ahead of time for an NVIDIA target
(default sm_90, the H100/H200) with Triton's bundled ptxas, for each (variant, tl.dot
precision, block, warps, ptxas register cap) below, and reads the cubin's resource usage
with cuobjdump: registers per thread, the per-thread stack (register spills to local
memory) and shared memory per program. No timing: this is what the compiler decided, which
shows which configurations spill before a GPU is available to time them (benchmarks/gpu.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flatl2o.kernels import triton_step as ts

CONFIGS = [  # (variant, precision, block, warps, maxnreg: 0 = ptxas's own choice)
    ("strided", "ieee", 32, 2, 0),
    ("packed", "ieee", 32, 2, 0),
    ("packed", "ieee", 32, 4, 0),
    *[("strided", "ieee", 32, w, 255) for w in (2, 8)],
    *[("packed", "ieee", b, w, 255) for b in (16, 32, 64) for w in (2, 4, 8)],
    *[("packed", "tf32x3", b, w, 255) for b in (32, 64) for w in (2, 4, 8)],
]  # "persistent" compiles to the same kernel as "packed" (only the grid differs)
POINTERS_IN_STATE_DTYPE = ("h0_ptr", "c0_ptr", "h1_ptr", "c1_ptr", "m_ptr", "v_ptr")
INTS = {"n": "i64", "negate": "i32", "iters": "i32", "nprog": "i32"}


def resources(
    rule: str, variant: str, prec: str, block: int, warps: int, maxnreg: int, arch: int
) -> dict:
    fn = ts._step_kernel
    names = fn.arg_names
    constexpr = {n for n, p in zip(names, fn.params, strict=True) if p.is_constexpr}
    signature = {}
    for name in names:
        if name in constexpr:
            signature[name] = "constexpr"
        elif name in INTS:
            signature[name] = INTS[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32"
    dm = rule == "l2o-dm"
    consts = dict(
        PREP=0 if dm else 1,
        LAYERS=2,
        H=20,
        HP=32,
        I=2 if dm else 20,
        IP=16 if dm else 32,
        OUT_TANH=not dm,
        BLOCK=block,
        PREC=prec,
        PACKED=variant != "strided",
    )
    src = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()}
    )
    options = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run(
            [str(bindir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    fields = dict(item.split(":", 1) for item in line.split())
    return dict(
        rule=rule,
        variant=variant,
        precision=prec,
        block=block,
        warps=warps,
        maxnreg=maxnreg,
        registers=int(fields["REG"]),
        stack_bytes=int(fields["STACK"]),
        shared_bytes=int(kernel.metadata.shared),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 100")
    ap.add_argument("--rule", choices=["l2o-dm", "rnnprop"], default="l2o-dm")
    ap.add_argument("--out", default="benchmarks/results/triton_resources.json")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"Triton {triton.__version__}, sm_{args.arch}, rule {args.rule} (hidden 20 -> 32)")
    print(
        "| variant | tl.dot precision | block | warps | maxnreg | registers "
        "| stack (spills) B/thread | shared B/program |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for variant, prec, block, warps, maxnreg in CONFIGS:
        r = resources(args.rule, variant, prec, block, warps, maxnreg, args.arch)
        rows.append(r)
        print(
            f"| {variant} | {prec} | {block} | {warps} | {maxnreg or 'ptxas'} "
            f"| {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} |",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch, rows=rows), indent=1))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as cache:  # compile fresh, leave no cache behind
        os.environ.setdefault("TRITON_CACHE_DIR", cache)
        main()
