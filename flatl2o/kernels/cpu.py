"""The CPU fast path: ``cpu_step.c`` compiled at first use and called through ctypes.

One call runs the whole rule step (preprocessing, every LSTM layer, read-out, parameter
update) for a range of coordinates, tile by tile, so nothing of size (coordinates x hidden)
is ever materialized beyond the state itself. Coordinates are split across
``torch.get_num_threads()`` threads; ctypes releases the GIL during the call, and every
coordinate is computed independently, so the result does not depend on the split.

NormProp's step is per tensor, in two passes: the first (the same fused call) updates the
state, writes each coordinate's direction to a scratch buffer kept by the kernel and sums
the tensor's statistics per block of :data:`BLOCK` coordinates; the block sums are added up
in a fixed order, the tensor's scale follows NormProp's ``finish``, and the second pass moves
the parameter. Neither the sums nor the step depend on the thread split.

The shared library is cached under ``$FLATL2O_CACHE_DIR`` (default
``~/.cache/flatl2o/kernels``), keyed by the source, compiler and flags. Without a working
C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``) the optimizer uses the reference path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from flatl2o.kernels.errors import KernelUnavailable
from flatl2o.kernels.layout import C_LAYOUTS, pack
from flatl2o.kernels.program import (
    PREP_DM,
    PREP_NORMPROP,
    PREP_RNNPROP,
    RuleProgram,
    dm_exp_k,
)
from flatl2o.kernels.reference import apply_step
from flatl2o.rules.base import REDUCTION_BLOCK
from flatl2o.rules.normprop import TINY

SOURCE = Path(__file__).with_name("cpu_step.c")
TILE = 16
MAX_LAYERS = 4
MAX_HIDDEN = 64
MAX_INPUT = 64
#: NormProp's per-tensor sums are per block of this many coordinates (cpu_step.c: BLOCK), by
#: the reference's pairwise tree (``flatl2o.rules.base.block_partials``).
BLOCK = REDUCTION_BLOCK
#: Below this many coordinates per thread, splitting across threads costs more than it saves.
MIN_COORDS_PER_THREAD = 8192


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_library_error: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("FLATL2O_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "flatl2o" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _flag_sets() -> list[list[str]]:
    base = [
        "-O3",
        "-std=c99",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-ffinite-math-only",
        "-fno-signed-zeros",
        "-ffp-contract=fast",
        "-fPIC",
        "-shared",
    ]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        native = ["-march=native", "-mprefer-vector-width=512"]
    elif machine in ("aarch64", "arm64"):
        native = ["-mcpu=native"]
    else:
        native = ["-march=native"]
    return [base + native, base]  # the portable set when the compiler refuses `native`


def _build(defines: tuple[str, ...] = (), source: Path = SOURCE) -> ctypes.CDLL:
    """Compile (or reuse from the cache) and :func:`load` the kernel. ``defines`` select
    another code path (``FLATL2O_PORTABLE``, ``FLATL2O_NO_AVX512``: tests) or a profiling
    build (benchmarks/cpu_profile.py); ``source``: another version of ``cpu_step.c``."""
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable(
            "no C compiler found (tried $CC, cc, gcc, clang); install one (e.g. gcc) for the "
            "fast CPU step, or pass backend='reference' to silence this"
        )
    text = Path(source).read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    errors = []
    for flags in _flag_sets():
        flags = flags + [f"-D{d}" for d in defines]
        key = hashlib.sha256(
            b"\0".join(
                [
                    text,
                    version.encode(),
                    " ".join(flags).encode(),
                    platform.machine().encode(),
                    _cpu_model().encode(),
                ]
            )
        ).hexdigest()[:16]
        target = cache_dir() / f"cpu_step-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            proc = subprocess.run(
                [cc, *flags, str(source), "-o", tmp], capture_output=True, text=True
            )
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, target)  # atomic: concurrent processes never load a partial file
        return load(target)
    raise KernelUnavailable("compiling the CPU kernel failed:\n" + "\n".join(errors))


#: ctypes type of each ``kind`` in the library's argument table (cpu_step.c: ARGS).
_KINDS = {ord("p"): ctypes.c_void_p, ord("f"): ctypes.c_float, ord("i"): ctypes.c_int32}
#: The argument fields this module writes (CPUKernel._args and _run); the library must have
#: each, and has no other (tests/test_kernels.py checks both against the C declaration).
ARGS_WRITTEN = frozenset(
    "grad param delta lr negate prep dm_inv_k dm_eps dm_exp_k m m_slow v beta1 beta_slow beta2 "
    "one_minus_beta1 one_minus_beta_slow one_minus_beta2 inv_bc1 inv_bc_slow inv_bc2 rp_eps "
    "in_size w_in b_in adam_skip w_gain b_gain stats layers hidden h c w b k w_out b_out "
    "out_tanh scale state_bf16".split()
)
_args_types: dict[int, type[ctypes.Structure]] = {}
#: The argument fields of each rule's moving averages, and the state each one points into.
MOMENTS = {
    PREP_DM: (),
    PREP_RNNPROP: (("m", "m"), ("v", "v")),
    PREP_NORMPROP: (("m", "m_fast"), ("m_slow", "m_slow"), ("v", "v")),
}


def load(path: str | Path) -> ctypes.CDLL:
    """Load a compiled ``cpu_step.c`` and check its argument layout (:func:`args_type`)."""
    lib = ctypes.CDLL(str(path))
    args_type(lib)
    return lib


def args_type(lib: ctypes.CDLL) -> type[ctypes.Structure]:
    """The ctypes mirror of ``lib``'s argument struct, built from the table the library
    exports (the struct is declared once, in cpu_step.c) and checked field by field against
    the compiler's offsets and size. A library that does not match this module is refused
    with :class:`KernelUnavailable` (one line) and never called."""
    key = lib._handle
    if key in _args_types:
        _declare(lib, _args_types[key])
        return _args_types[key]

    def refuse(why: str) -> KernelUnavailable:
        return KernelUnavailable(
            f"the CPU kernel library {lib._name} does not match this flatl2o ({why}); delete "
            f"it (it is rebuilt at first use, cache: {cache_dir()}) or pass backend='reference'"
        )

    try:
        count_fn, field_fn, size_fn = (
            lib.flatl2o_abi_fields,
            lib.flatl2o_abi_field,
            lib.flatl2o_args_size,
        )
    except AttributeError:
        raise refuse("it exports no argument table, flatl2o_abi_fields") from None
    count_fn.argtypes, count_fn.restype = [], ctypes.c_int32
    field_fn.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_int64)]
    field_fn.restype = ctypes.c_char_p
    size_fn.argtypes, size_fn.restype = [], ctypes.c_int64
    fields, offsets = [], {}
    for i in range(count_fn()):
        out = (ctypes.c_int64 * 4)()
        name = field_fn(i, out).decode()
        offset, size, count, kind = out
        ctype = _KINDS.get(kind)
        if ctype is None or ctypes.sizeof(ctype) != size:
            raise refuse(f"field {name!r} is {size} bytes of kind {chr(kind)!r}")
        fields.append((name, ctype * count if count > 1 else ctype))
        offsets[name] = offset
    if set(offsets) != ARGS_WRITTEN:
        missing, extra = sorted(ARGS_WRITTEN - set(offsets)), sorted(set(offsets) - ARGS_WRITTEN)
        raise refuse(f"argument fields missing: {missing}, unknown: {extra}")
    struct = type("FlatL2OArgs", (ctypes.Structure,), {"_fields_": fields})
    for name, offset in offsets.items():
        if getattr(struct, name).offset != offset:
            raise refuse(
                f"field {name!r} is at offset {offset} in the library, "
                f"{getattr(struct, name).offset} in ctypes"
            )
    if ctypes.sizeof(struct) != size_fn():
        raise refuse(f"the argument struct is {size_fn()} bytes, {ctypes.sizeof(struct)} in ctypes")
    _declare(lib, struct)
    _args_types[key] = struct
    return struct


def _declare(lib: ctypes.CDLL, struct: type[ctypes.Structure]) -> None:
    """Declare the library's functions on ``lib``. Every ``CDLL`` object has functions of its
    own, also one more of a library already loaded: undeclared, ctypes would pass a pointer
    or an int64 as a 32-bit int."""
    ptr, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    signatures = {
        "flatl2o_step": ([ctypes.POINTER(struct), i64], ctypes.c_int),
        "flatl2o_all_finite_f32": ([ptr, i64], ctypes.c_int),
        "flatl2o_layout": ([], ctypes.c_int),
        "flatl2o_block_totals": ([ptr, i64, ptr], None),
        "flatl2o_scale_step": ([ptr, ptr, f32, f32, i64], None),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def library() -> ctypes.CDLL:
    """The compiled kernel (built once per process, cached on disk across processes)."""
    global _library, _library_error
    with _lock:
        if _library is None:
            if _library_error is not None:
                raise KernelUnavailable(_library_error)
            try:
                _library = _build()
            except (KernelUnavailable, OSError) as e:
                _library_error = str(e)
                raise KernelUnavailable(_library_error) from None
        return _library


def all_finite(t: Tensor) -> bool | None:
    """Whether a contiguous fp32 CPU tensor is all finite, checked by the compiled kernel.

    ``None`` when it does not apply (another dtype, device or layout) or the kernel has not
    been loaded in this process (the check never triggers a compile). A torch op here would
    wake torch's OpenMP workers, which then spin on the core the kernel's threads need.
    """
    lib = _library
    if lib is None or t.device.type != "cpu" or t.dtype != torch.float32:
        return None
    if not t.is_contiguous():
        return None
    return bool(lib.flatl2o_all_finite_f32(t.data_ptr(), t.numel()))


def _threads(count: int) -> int:
    return max(1, min(torch.get_num_threads(), count // MIN_COORDS_PER_THREAD))


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="flatl2o"), size
        return _pool


def supports(program: RuleProgram) -> bool:
    """Whether the compiled kernel handles this rule's sizes."""
    widest = max([*program.layer_inputs, program.w_in.shape[0] if program.w_in is not None else 0])
    return (
        program.layers <= MAX_LAYERS
        and program.hidden <= MAX_HIDDEN
        and widest <= MAX_INPUT
        and program.layer_inputs[1:] == (program.hidden,) * (program.layers - 1)
    )


class CPUKernel:
    """Runs a :class:`RuleProgram` with the compiled CPU kernel."""

    name = "cpu"

    def __init__(self, program: RuleProgram, lib: ctypes.CDLL | None = None) -> None:
        """``lib``: a specific build of the kernel (tests and profiling); default the cached one."""
        if not supports(program):
            raise KernelUnavailable(
                f"the CPU kernel supports at most {MAX_LAYERS} layers, hidden size "
                f"{MAX_HIDDEN} and input width {MAX_INPUT}; this rule runs on the reference path"
            )
        self.lib = library() if lib is None else lib
        self.args_type = args_type(self.lib)  # refuses a library of another layout
        self.program = program.to(torch.device("cpu"))
        # the weights in the layout the loaded library reads, kept alive on self
        layout = C_LAYOUTS[self.lib.flatl2o_layout()]
        packed = pack(self.program, layout)
        self.weights, self.biases, self.w_out = packed.weights, packed.biases, packed.w_out
        self.tensorwise = self.program.prep == PREP_NORMPROP
        if self.tensorwise:  # the gain head is a second read-out: laid out as the first
            self.w_gain = pack(
                dataclasses.replace(self.program, w_out=self.program.w_gain), layout
            ).w_out
        # NormProp's first pass writes each coordinate's direction and each block's sums here
        # (grown to the largest tensor stepped, then reused by every step)
        self._direction = torch.empty(0, dtype=torch.float32)
        self._block_stats = torch.empty(0, dtype=torch.float32)

    def _args(self, step: int, lr: float, maximize: bool) -> ctypes.Structure:
        p = self.program
        a = self.args_type()
        a.lr, a.negate, a.prep = lr, int(maximize), p.prep
        a.layers, a.hidden = p.layers, p.hidden
        for i in range(p.layers):
            a.w[i] = self.weights[i].data_ptr()
            a.b[i] = self.biases[i].data_ptr()
            a.k[i] = p.layer_inputs[i]
        a.w_out, a.b_out, a.out_tanh, a.scale = (
            self.w_out.data_ptr(),
            p.b_out,
            int(p.out_tanh),
            p.scale,
        )
        if p.prep == PREP_DM:
            a.dm_inv_k, a.dm_eps, a.dm_exp_k = 1.0 / p.dm_k, p.dm_eps, dm_exp_k(p)
            return a
        # bias corrections of the 1-based step, as the rules compute them
        beta1 = p.beta_fast if self.tensorwise else p.beta1
        a.beta1, a.beta2, a.rp_eps = beta1, p.beta2, p.rp_eps
        a.inv_bc1 = 1.0 / (1.0 - beta1**step)
        a.inv_bc2 = 1.0 / (1.0 - p.beta2**step)
        a.in_size = p.w_in.shape[0]
        a.w_in, a.b_in = p.w_in.data_ptr(), p.b_in.data_ptr()
        if self.tensorwise:
            a.beta_slow, a.inv_bc_slow = p.beta_slow, 1.0 / (1.0 - p.beta_slow**step)
            a.one_minus_beta1, a.one_minus_beta2 = 1.0 - p.beta_fast, 1.0 - p.beta2
            a.one_minus_beta_slow = 1.0 - p.beta_slow
            a.adam_skip, a.w_gain, a.b_gain = p.adam_skip, self.w_gain.data_ptr(), p.b_gain
        return a

    def _scratch(self, n: int) -> tuple[Tensor, Tensor]:
        """NormProp's direction buffer (``n``) and block sums (``(blocks, 4)``), reused."""
        blocks = -(-n // BLOCK)
        if self._direction.numel() < n:
            self._direction = torch.empty(n, dtype=torch.float32)
            self._block_stats = torch.empty(4 * blocks, dtype=torch.float32)
        return self._direction[:n], self._block_stats[: 4 * blocks]

    def _tensor_scale(self, block_stats: Tensor) -> float:
        """One tensor's ``output_scale * rms(adam) * gain / rms(d)`` from its block sums (sums
        of d^2, adam^2, the gain head, and the count), as ``NormProp.finish`` computes it: the
        count clamped at 1, :data:`~flatl2o.rules.normprop.TINY` under the square roots."""
        p = self.program
        out = (ctypes.c_double * 4)()
        self.lib.flatl2o_block_totals(block_stats.data_ptr(), block_stats.numel() // 4, out)
        d2, adam2, gain_sum, count = out
        count = max(count, 1.0)
        gain = math.exp(p.log_gain_bound * math.tanh(gain_sum / count))
        return p.scale * math.sqrt(adam2 / count + TINY) * gain / math.sqrt(d2 / count + TINY)

    def update(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        step: int,
        lr: float,
        maximize: bool,
        chunk_size: int,
    ) -> None:
        """``param -= lr * rule(grad)`` in place, with ``state`` (rows of coordinates) updated.

        ``param`` and ``grad`` are 1-D; ``state`` values are ``(n, ...)`` CPU tensors (fp32 and
        or bf16 and contiguous run in place; other dtypes or strided ones go through fp32 chunks).
        """
        n = param.numel()
        if n == 0:
            return
        if step < 1:
            raise ValueError(f"step must be >= 1 (1-based step index), got {step}")
        names = self.program.state_names()
        for k in names:
            s = state[k]
            if s.device.type != "cpu" or not s.is_floating_point():
                raise KernelUnavailable(f"state {k!r} is not a floating-point CPU tensor")
        base = self._args(step, lr, maximize)
        if self.tensorwise:
            direction, block_stats = self._scratch(n)
        fp32_state = all(
            state[k].dtype == torch.float32 and state[k].is_contiguous() for k in names
        )
        # the library widens and rounds bf16 rows itself, per 16-coordinate tile
        bf16_state = all(
            state[k].dtype == torch.bfloat16 and state[k].is_contiguous() for k in names
        )
        direct = param.dtype == torch.float32 and param.is_contiguous()
        if (
            (fp32_state or bf16_state)
            and direct
            and grad.dtype == torch.float32
            and grad.is_contiguous()
        ):
            base.state_bf16 = int(bf16_state)
            if self.tensorwise:
                self._run(base, state, grad, None, direction, 0, n, block_stats)
                self._scale_step(param, direction, block_stats, lr)
            else:
                self._run(base, state, grad, param, None, 0, n)
            return
        # another dtype or layout (bf16 state or params, a strided shard): convert bounded
        # chunks to fp32 and back, so transient memory stays ~ chunk_size coordinates
        # (NormProp's chunks are whole blocks of its sums)
        chunk = max(BLOCK if self.tensorwise else TILE, chunk_size)
        chunk = -(-chunk // BLOCK) * BLOCK if self.tensorwise else chunk
        delta = None if direct else torch.empty(min(chunk, n), dtype=torch.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            g = grad[start:stop].to(torch.float32).contiguous()
            if fp32_state:
                rows, first = state, start
            else:
                rows = {k: state[k][start:stop].to(torch.float32).contiguous() for k in names}
                first = 0
            if self.tensorwise:
                d, sums = direction[start:stop], block_stats[4 * (start // BLOCK) :]
                self._run(base, rows, g, None, d, first, stop - start, sums)
            elif direct:
                self._run(base, rows, g, param[start:stop], None, first, stop - start)
            else:
                d = delta[: stop - start]
                self._run(base, rows, g, None, d, first, stop - start)
                apply_step(param[start:stop], d, lr)
            if not fp32_state:
                for k in names:
                    state[k][start:stop].copy_(rows[k])
        if self.tensorwise:
            self._scale_step(param, direction, block_stats, lr)

    def _scale_step(self, param: Tensor, direction: Tensor, block_stats: Tensor, lr: float) -> None:
        """NormProp's second pass: ``param -= lr * (scale * direction)``, the tensor's scale
        from its block sums (the direction is 0 where the zero-gradient contract applies)."""
        scale = self._tensor_scale(block_stats)
        if not (param.dtype == torch.float32 and param.is_contiguous()):
            apply_step(param, direction.mul_(scale), lr)
            return
        count = param.numel()
        per = self._split(count, TILE)
        jobs = [
            (param.data_ptr() + 4 * lo, direction.data_ptr() + 4 * lo, min(per, count - lo))
            for lo in range(0, count, per)
        ]
        fn = self.lib.flatl2o_scale_step
        if len(jobs) == 1:
            fn(jobs[0][0], jobs[0][1], scale, lr, jobs[0][2])
        else:
            pool = _executor(len(jobs))
            for f in [pool.submit(fn, p, d, scale, lr, c) for p, d, c in jobs]:
                f.result()

    @staticmethod
    def _split(count: int, align: int) -> int:
        """Coordinates per thread: :func:`_threads` parts, each a multiple of ``align``."""
        per = -(-count // _threads(count))
        return -(-per // align) * align

    def _run(
        self,
        base: ctypes.Structure,
        state: dict[str, Tensor],
        grad: Tensor,
        param: Tensor | None,
        delta: Tensor | None,
        first: int,
        count: int,
        block_stats: Tensor | None = None,
    ) -> None:
        """Run coordinates ``first .. first+count`` of the state; grad/param/delta start at 0,
        and NormProp's ``block_stats`` (4 per block of :data:`BLOCK` from ``first``) too."""
        p = self.program
        per = self._split(count, TILE if block_stats is None else BLOCK)
        jobs = []
        for lo in range(0, count, per):
            hi = min(lo + per, count)
            a = self.args_type.from_buffer_copy(base)
            a.grad = grad.data_ptr() + 4 * lo
            if param is not None:
                a.param = param.data_ptr() + 4 * lo
            else:
                a.delta = delta.data_ptr() + 4 * lo
            if block_stats is not None:
                a.stats = block_stats.data_ptr() + 4 * 4 * (lo // BLOCK)
            row = first + lo
            size = 2 if base.state_bf16 else 4  # bytes per state value
            for field, key in MOMENTS[p.prep]:
                setattr(a, field, state[key].data_ptr() + size * row)
            for i in range(p.layers):
                a.h[i] = state[f"h{i}"].data_ptr() + size * row * p.hidden
                a.c[i] = state[f"c{i}"].data_ptr() + size * row * p.hidden
            jobs.append((a, hi - lo))
        if len(jobs) == 1:
            codes = [self.lib.flatl2o_step(ctypes.byref(jobs[0][0]), jobs[0][1])]
        else:
            pool = _executor(len(jobs))
            futures = [pool.submit(self.lib.flatl2o_step, ctypes.byref(a), c) for a, c in jobs]
            codes = [f.result() for f in futures]
        if any(codes):
            raise KernelUnavailable("the CPU kernel refused this rule's sizes")
