"""Ahead-of-time compilation of the Triton step kernel for an NVIDIA GPU, on a machine without one.

Triton ships ptxas and cuobjdump, so the kernel can be compiled for, say, sm_90 (H100/H200) on
any Linux x86-64 machine. That is how CI checks that the GPU-only code (inline PTX, register
cap) compiles (tests/test_kernels.py), and how ``benchmarks/triton_resources.py`` reads
registers, spills and machine instructions before a GPU is available to time the kernel. A
measuring tool, not part of the optimizer: it lives here, outside the installed package.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Kernel arguments that are integers (their type when not given a launch value); other
#: non-pointer arguments are fp32 scalars.
INTS = {"n": "i64", "negate": "i32", "iters": "i32", "nprog": "i32"}
#: Pointer arguments that are not to fp32: NormProp's per-tensor sums (fp64).
POINTERS = {"tot_ptr": "*fp64"}


def launch_ints(n: int, block: int) -> dict[str, int]:
    """The step kernel's integer arguments for ``n`` coordinates on the non-persistent grid."""
    return {"n": n, "negate": 0, "iters": 1, "nprog": -(-n // block)}


_SASS = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_MMA = re.compile(r"(?:wgmma\.mma_async|mma)\.sync\.aligned\.m(\d+)n(\d+)k(\d+)")


@dataclass
class CompiledKernel:
    """What ptxas made of one configuration."""

    ptx: str
    registers: int
    stack_bytes: int  # per-thread local memory: register spills
    shared_bytes: int  # per program
    opcodes: collections.Counter  # SASS instruction counts (static; NOP excluded)
    tensor_macs: int  # multiply-adds of the tensor-core instructions, per program


def compile_kernel(
    fn,
    constexprs: dict,
    warps: int,
    maxnreg: int = 0,
    arch: int = 90,
    ints: dict[str, int] | None = None,
) -> CompiledKernel:
    """Compile Triton kernel ``fn`` for sm_``arch`` as a launch would and read the cubin back
    with cuobjdump. ``constexprs``: only those ``fn`` declares are passed. Like a launch's
    specialization, pointers (to fp32 unless POINTERS says otherwise) are taken as 16-byte
    aligned (torch's allocator) and the integer arguments in ``ints`` are specialized on their
    values (1 becomes a constant, multiples of 16 are marked so); without that, loads are not
    vectorized and the counts would not be the launched kernel's."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    names = fn.arg_names
    declared = {n for n, p in zip(names, fn.params, strict=True) if p.is_constexpr}
    given = {k: v for k, v in constexprs.items() if k in declared}
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in declared:
            signature[name] = "constexpr"
        elif ints and name in ints:
            kind, spec = native_specialize_impl(BaseBackend, ints[name], False, True, True)
            signature[name] = kind
            if kind == "constexpr":
                given[name] = spec
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in INTS:
            signature[name] = INTS[name]
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    constants = {(names.index(k),): v for k, v in given.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])

        def cuobjdump(*flags: str) -> str:
            cmd = [str(bindir / "cuobjdump"), *flags, str(cubin)]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        line = next(x for x in cuobjdump("--dump-resource-usage").splitlines() if "REG:" in x)
        sass = cuobjdump("-sass")
    fields = dict(item.split(":", 1) for item in line.split())
    ops = collections.Counter(m.group(1) for m in map(_SASS.match, sass.splitlines()) if m)
    ops.pop("NOP", None)  # alignment padding, never issued
    macs = 0  # per program: mma.sync runs per warp, wgmma per warp group of 4
    for mm in _MMA.finditer(kernel.asm["ptx"]):
        m, n, k = map(int, mm.groups())
        macs += m * n * k * (warps // 4 if mm.group(0).startswith("wgmma") else warps)
    return CompiledKernel(
        ptx=kernel.asm["ptx"],
        registers=int(fields["REG"]),
        stack_bytes=int(fields["STACK"]),
        shared_bytes=int(kernel.metadata.shared),
        opcodes=ops,
        tensor_macs=macs,
    )
