"""How the Triton kernel is compiled and launched on a device: :class:`LaunchConfig` (variant,
precision, block, warps, register cap), the per-device defaults, the one environment override
(``$FLATL2O_TRITON_CONFIG``, read when a kernel is built) and the kernel's compile-time
arguments. Plain Python: it needs neither Triton nor a GPU, so a configuration can be chosen,
checked and tested anywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from flatl2o.kernels.layout import padded
from flatl2o.kernels.program import PREP_DM, RuleProgram

#: How a program gets the LSTM weights (LaunchConfig.variant): ``"strided"`` loads its gate
#: tiles from the ``[W_ih | W_hh]`` rows with strided loads (the layout last timed on an
#: H200); ``"packed"`` from tiles pre-packed on the host (layout.py: ``"tiles"``), every load
#: contiguous; ``"persistent"`` packed, on a grid of PROGRAMS_PER_SM programs per
#: multiprocessor, each looping over blocks.
VARIANTS = ("strided", "packed", "persistent")
PROGRAMS_PER_SM = 4
#: Arithmetic of the gate products (LaunchConfig.precision): ``"ieee"`` plain fp32 FMA;
#: ``"tf32x3"`` Triton's fp32-accurate use of tensor cores (both operands split into TF32
#: parts inside every ``tl.dot``); ``"3xtf32"`` the same arithmetic with the weights split
#: once on the host and each layer's inputs once per block (packed variants only);
#: ``"tf32"`` one TF32 pass (10-bit mantissa products: NOT fp32-accurate).
PRECISIONS = ("ieee", "tf32x3", "3xtf32", "tf32")
#: The environment variable that overrides the per-device defaults of every kernel built
#: while it is set (read when a kernel is built, never at import): comma-separated
#: ``name=value`` settings of LaunchConfig, e.g. ``variant=strided,precision=ieee,block=32``.
CONFIG_ENV = "FLATL2O_TRITON_CONFIG"


@dataclass(frozen=True)
class LaunchConfig:
    """How the kernel is compiled and launched on one device: ``variant`` (VARIANTS),
    ``precision`` (PRECISIONS), ``block`` coordinates and ``warps`` warps per program,
    ``maxnreg`` the register cap passed to ptxas (0 leaves it to ptxas, which often settles
    on 32 registers for this kernel and spills 5-9 KB per thread:
    benchmarks/triton_resources.py)."""

    variant: str
    precision: str
    block: int
    warps: int
    maxnreg: int


_SETTINGS = {f.name: f.type for f in dataclasses.fields(LaunchConfig)}


def default_config(device: torch.device) -> LaunchConfig:
    """The configuration for ``device`` when nothing is overridden. Defaults chosen WITHOUT
    timing them on a GPU, from the kernel compiled for sm_90
    (benchmarks/triton_resources.py): GPUs with TF32 tensor cores (compute capability 8.0+)
    get "3xtf32" on 64 coordinates x 4 warps with a 168-register cap (about 5,200
    instructions per coordinate, 136 B of spills, 12 resident warps per SM: the no-stall
    bound is the H200's bandwidth floor; without the cap, 213 registers and 8 warps per SM,
    the occupancy at which the previous kernel ran 6-10x its bound); older GPUs fp32 FMA on
    32 x 2 with a 255 cap (about 19,100 instructions: at most 27% of copy bandwidth).
    benchmarks/gpu.sh times these against the alternatives."""
    return launch_config(device, _environment=False)


def launch_config(
    device: torch.device,
    *,
    variant: str | None = None,
    precision: str | None = None,
    block: int | None = None,
    warps: int | None = None,
    maxnreg: int | None = None,
    _environment: bool = True,
) -> LaunchConfig:
    """The configuration a kernel on ``device`` is built with: the settings given here, then
    those of ``$FLATL2O_TRITON_CONFIG`` (CONFIG_ENV), then the device's defaults
    (default_config; block, warps and register cap follow the precision). Invalid settings
    raise ValueError naming the setting and where it came from."""
    given = {
        k: v
        for k, v in dict(
            variant=variant, precision=precision, block=block, warps=warps, maxnreg=maxnreg
        ).items()
        if v is not None
    }
    env = _environment_settings() if _environment else {}
    source = {k: "the argument" for k in given} | {
        k: f"${CONFIG_ENV}" for k in env if k not in given
    }
    s = {**env, **given}
    if "precision" not in s:
        tensor_cores = (  # TF32 on NVIDIA; AMD GPUs take fp32 FMA
            device.type == "cuda"
            and not _amd()
            and torch.cuda.get_device_capability(device) >= (8, 0)
        )
        s["precision"] = "3xtf32" if tensor_cores else "ieee"
    fp32_fma = s["precision"] == "ieee"
    config = LaunchConfig(
        variant=s.get("variant", "packed"),
        precision=s["precision"],
        block=s.get("block", 32 if fp32_fma else 64),
        warps=s.get("warps", 2 if fp32_fma else 4),
        maxnreg=s.get("maxnreg", 255 if fp32_fma else 168),
    )

    def bad(name: str, rule: str) -> ValueError:
        where = source.get(name, "the default")
        return ValueError(
            f"Invalid Triton launch setting {name}={getattr(config, name)!r} (from {where}): {rule}"
        )

    if config.variant not in VARIANTS:
        raise bad("variant", f"choose one of {VARIANTS}")
    if config.precision not in PRECISIONS:
        raise bad("precision", f"choose one of {PRECISIONS}")
    if config.precision == "3xtf32" and config.variant == "strided":
        raise bad("precision", "'3xtf32' needs the packed or persistent variant")
    if config.block < 16 or config.block & (config.block - 1):
        raise bad("block", "use a power of two >= 16")
    if config.warps < 1 or config.warps & (config.warps - 1):
        raise bad("warps", "use a power of two")
    if not 0 <= config.maxnreg <= 255:
        raise bad("maxnreg", "use 0 (ptxas decides) up to 255")
    return config


def _environment_settings() -> dict[str, str | int]:
    """The settings of ``$FLATL2O_TRITON_CONFIG`` (empty when it is unset or blank)."""
    text = os.environ.get(CONFIG_ENV, "").strip()
    settings: dict[str, str | int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or name not in _SETTINGS:
            raise ValueError(
                f"Invalid ${CONFIG_ENV} item {item!r}: write name=value pairs separated by "
                f"commas, names from {tuple(_SETTINGS)}, or unset it"
            )
        if _SETTINGS[name] in (int, "int"):
            try:
                settings[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"Invalid ${CONFIG_ENV} item {item!r}: {name} takes an integer"
                ) from None
        else:
            settings[name] = value
    return settings


def _amd() -> bool:
    """A ROCm build of torch: its GPUs are device type "cuda" but take no PTX and no ptxas
    options."""
    return torch.version.hip is not None


def plain_math() -> bool:
    """Whether launches here use plain exp2 / division instead of the one-instruction PTX
    forms: in Triton's CPU interpreter (no inline assembly) and on AMD GPUs (no PTX)."""
    return os.environ.get("TRITON_INTERPRET") == "1" or _amd()


def launch_constexprs(program: RuleProgram, config: LaunchConfig, plain: bool) -> dict:
    """The kernel's compile-time arguments for ``program`` under ``config``; ``plain``: see
    plain_math."""
    inputs = 2 if program.prep == PREP_DM else program.w_in.shape[0]
    return dict(
        PREP=program.prep,
        LAYERS=program.layers,
        H=program.hidden,
        HP=padded(program.hidden),
        I=inputs,
        IP=padded(inputs),
        OUT_TANH=program.out_tanh,
        BLOCK=config.block,
        PREC=config.precision,
        PACKED=config.variant != "strided",
        FAST=not plain,
    )
