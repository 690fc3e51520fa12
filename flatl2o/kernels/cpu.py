"""The CPU fast path: ``cpu_step.c`` compiled at first use and called through ctypes.

One call runs the whole rule step (preprocessing, every LSTM layer, read-out, parameter
update) for a range of coordinates, tile by tile, so nothing of size (coordinates x hidden)
is ever materialized beyond the state itself. Coordinates are split across
``torch.get_num_threads()`` threads; ctypes releases the GIL during the call, and every
coordinate is computed independently, so the result does not depend on the split.

The shared library is cached under ``$FLATL2O_CACHE_DIR`` (default
``~/.cache/flatl2o/kernels``), keyed by the source, compiler and flags. Without a working
C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``) the optimizer uses the reference path.
"""

from __future__ import annotations

import ctypes
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
from flatl2o.kernels.program import PREP_DM, RuleProgram, dm_exp_k
from flatl2o.kernels.reference import apply_step

SOURCE = Path(__file__).with_name("cpu_step.c")
TILE = 16
MAX_LAYERS = 4
MAX_HIDDEN = 64
MAX_INPUT = 64
#: Below this many coordinates per thread, splitting across threads costs more than it saves.
MIN_COORDS_PER_THREAD = 8192


class _Args(ctypes.Structure):
    _fields_ = [
        ("grad", ctypes.c_void_p),
        ("param", ctypes.c_void_p),
        ("delta", ctypes.c_void_p),
        ("lr", ctypes.c_float),
        ("negate", ctypes.c_int32),
        ("prep", ctypes.c_int32),
        ("dm_inv_k", ctypes.c_float),
        ("dm_eps", ctypes.c_float),
        ("dm_exp_k", ctypes.c_float),
        ("m", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("inv_bc1", ctypes.c_float),
        ("inv_bc2", ctypes.c_float),
        ("rp_eps", ctypes.c_float),
        ("in_size", ctypes.c_int32),
        ("w_in", ctypes.c_void_p),
        ("b_in", ctypes.c_void_p),
        ("layers", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("h", ctypes.c_void_p * MAX_LAYERS),
        ("c", ctypes.c_void_p * MAX_LAYERS),
        ("w", ctypes.c_void_p * MAX_LAYERS),
        ("b", ctypes.c_void_p * MAX_LAYERS),
        ("k", ctypes.c_int32 * MAX_LAYERS),
        ("w_out", ctypes.c_void_p),
        ("b_out", ctypes.c_float),
        ("out_tanh", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("state_bf16", ctypes.c_int32),
    ]


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


def _build(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or reuse from the cache) the kernel; ``defines`` are for profiling builds."""
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable(
            "no C compiler found (tried $CC, cc, gcc, clang); install one (e.g. gcc) for the "
            "fast CPU step, or pass backend='reference' to silence this"
        )
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    errors = []
    for flags in _flag_sets():
        flags = flags + [f"-D{d}" for d in defines]
        key = hashlib.sha256(
            b"\0".join(
                [
                    source,
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
                [cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True
            )
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, target)  # atomic: concurrent processes never load a partial file
        lib = ctypes.CDLL(str(target))
        lib.flatl2o_step.argtypes = [ctypes.POINTER(_Args), ctypes.c_int64]
        lib.flatl2o_step.restype = ctypes.c_int
        lib.flatl2o_all_finite_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.flatl2o_all_finite_f32.restype = ctypes.c_int
        lib.flatl2o_layout.argtypes = []
        lib.flatl2o_layout.restype = ctypes.c_int
        return lib
    raise KernelUnavailable("compiling the CPU kernel failed:\n" + "\n".join(errors))


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


#: ``flatl2o_layout()`` of a library built with the AVX-512 or AVX2 path (see cpu_step.c).
LAYOUT_PACKED = 1
#: Gate pre-activations are pre-multiplied so every gate is ``1 / (1 + 2^t)``:
#: sigmoid(x) = 1 / (1 + 2^(-x log2 e)), tanh(x) = 2 / (1 + 2^(-2x log2 e)) - 1.
_GATE_SCALE = (-math.log2(math.e), -math.log2(math.e), -2 * math.log2(math.e), -math.log2(math.e))


def pack_program(program: RuleProgram) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Layer weights, biases and read-out weights in the AVX-512/AVX2 kernels' packed layout.

    With ``A = H // 16`` full blocks and ``Q = ceil((H % 16) / 4)`` tail quads, a
    coordinate's gates are ``NV = 4A + Q`` vectors of 16: vector ``4b + g`` is gate ``g`` of
    units ``16b .. 16b+15``; vector ``4A + s`` holds gate ``g`` of unit ``16A + 4s + u`` in
    lane ``4g + u``. Weights become ``(k + H, NV, 16)`` (each input's column vectors
    together), scaled per gate by ``_GATE_SCALE`` (computed in float64, rounded once).
    """
    h = program.hidden
    full, tail = h // 16, -(-(h % 16) // 4)
    nv = 4 * full + tail
    # slot[r] = flat index (vector * 16 + lane) of gate row r = g * H + unit
    slot = torch.empty(4 * h, dtype=torch.long)
    for g in range(4):
        for unit in range(h):
            b, u = divmod(unit, 16)
            if b < full:
                slot[g * h + unit] = (4 * b + g) * 16 + u
            else:
                s, u = divmod(unit - 16 * full, 4)
                slot[g * h + unit] = (4 * full + s) * 16 + 4 * g + u
    scale = torch.tensor(_GATE_SCALE, dtype=torch.float64).repeat_interleave(h)
    weights, biases = [], []
    for w, b in zip(program.layer_weights, program.layer_biases, strict=True):
        cols = w.shape[1]
        wp = torch.zeros(nv * 16, cols, dtype=torch.float64)
        wp[slot] = w.double() * scale[:, None]
        weights.append(wp.t().contiguous().float())  # (k + H, NV * 16)
        bp = torch.zeros(nv * 16, dtype=torch.float64)
        bp[slot] = b.double() * scale
        biases.append(bp.float())
    w_out = torch.zeros(16 * (full + tail), dtype=torch.float32)
    w_out[: 16 * full] = program.w_out[: 16 * full]
    for s in range(tail):
        quad = torch.zeros(4, dtype=torch.float32)
        units = program.w_out[16 * full + 4 * s : 16 * full + 4 * s + 4]
        quad[: units.numel()] = units
        w_out[16 * (full + s) : 16 * (full + s + 1)] = quad.repeat(4)
    return weights, biases, w_out


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
        self.program = program.to(torch.device("cpu"))
        self._set_layout()

    def _set_layout(self) -> None:
        """The weights in the layout the loaded library expects (kept alive on ``self``)."""
        p = self.program
        if self.lib.flatl2o_layout() == LAYOUT_PACKED:
            self.weights, self.biases, self.w_out = pack_program(p)
        else:
            self.weights, self.biases, self.w_out = p.layer_weights, p.layer_biases, p.w_out

    def _args(self, step: int, lr: float, maximize: bool) -> _Args:
        p = self.program
        a = _Args()
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
        else:
            a.beta1, a.beta2, a.rp_eps = p.beta1, p.beta2, p.rp_eps
            a.inv_bc1 = 1.0 / (1.0 - p.beta1**step)
            a.inv_bc2 = 1.0 / (1.0 - p.beta2**step)
            a.in_size = p.w_in.shape[0]
            a.w_in, a.b_in = p.w_in.data_ptr(), p.b_in.data_ptr()
        return a

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
            self._run(base, state, grad, param, None, 0, n)
            return
        # another dtype or layout (bf16 state or params, a strided shard): convert bounded
        # chunks to fp32 and back, so transient memory stays ~ chunk_size coordinates
        chunk = max(TILE, chunk_size)
        delta = None if direct else torch.empty(min(chunk, n), dtype=torch.float32)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            g = grad[start:stop].to(torch.float32).contiguous()
            if fp32_state:
                rows, first = state, start
            else:
                rows = {k: state[k][start:stop].to(torch.float32).contiguous() for k in names}
                first = 0
            if direct:
                self._run(base, rows, g, param[start:stop], None, first, stop - start)
            else:
                d = delta[: stop - start]
                self._run(base, rows, g, None, d, first, stop - start)
                apply_step(param[start:stop], d, lr)
            if not fp32_state:
                for k in names:
                    state[k][start:stop].copy_(rows[k])

    def _run(
        self,
        base: _Args,
        state: dict[str, Tensor],
        grad: Tensor,
        param: Tensor | None,
        delta: Tensor | None,
        first: int,
        count: int,
    ) -> None:
        """Run coordinates ``first .. first+count`` of the state; grad/param/delta start at 0."""
        p = self.program
        threads = _threads(count)
        per = -(-count // threads)
        per = -(-per // TILE) * TILE
        jobs = []
        for lo in range(0, count, per):
            hi = min(lo + per, count)
            a = _Args.from_buffer_copy(base)
            a.grad = grad.data_ptr() + 4 * lo
            if param is not None:
                a.param = param.data_ptr() + 4 * lo
            else:
                a.delta = delta.data_ptr() + 4 * lo
            row = first + lo
            size = 2 if base.state_bf16 else 4  # bytes per state value
            if p.prep != PREP_DM:
                a.m = state["m"].data_ptr() + size * row
                a.v = state["v"].data_ptr() + size * row
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
