"""What every learned update rule shares: its config (round-trips through ``config.json``)
and the module interface used by both meta-training (differentiably) and the optimizer
(under ``no_grad``).

Sign convention, fixed once for the whole project: a rule maps a gradient ``g`` to a step
``s`` and the optimizer applies ``theta <- theta - lr * s``. A rule that learned plain
gradient descent would emit ``s = c * g`` with ``c > 0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: Version of the ``config.json`` / ``model.safetensors`` layout. Bumped on any change
#: that makes old checkpoints load differently; unknown versions are refused.
FORMAT_VERSION = 1

State = dict[str, Tensor]
#: Sizes of the tensors a flat gradient holds one after the other (``None``: one tensor).
Segments = Sequence[int] | None

#: Per-tensor sums are taken in blocks of this many coordinates (a fixed pairwise tree in each
#: block, then one sum over the blocks' partial sums), so that a step computed chunk by chunk
#: (chunks that are whole blocks: ``flatl2o.kernels.reference.ROW_TILE``) sums the same numbers
#: in the same order as one call on the whole tensor: the result is the same to the bit.
REDUCTION_BLOCK = 64

#: Architecture name (as written in ``config.json``) -> rule class. Declared here, where
#: :meth:`RuleConfig.from_dict` reads it, and filled by ``flatl2o.rules`` with the architectures
#: it imports, so that no module of the package imports the package back.
RULES: dict[str, type[UpdateRule]] = {}


class ConfigError(ValueError):
    """A rule config that cannot be understood (unknown architecture, key, or version)."""


#: Upper bounds of the size keys: far above any useful coordinatewise rule (the defaults are
#: 20 units, 2 layers; every coordinate of an optimized model carries ``2 * layers * width``
#: floats of state), low enough that a mistyped or hostile config cannot ask for terabytes.
MAX_WIDTH = 4096
MAX_LAYERS = 32


def check_upper_bound(config: RuleConfig, key: str, limit: int) -> None:
    """Refuse a size key above ``limit`` (it would allocate unbounded memory)."""
    value = getattr(config, key)
    if value > limit:
        raise ConfigError(
            f"{type(config).__name__}: key {key!r} must be <= {limit}, got {_short(value)}; "
            "a config this large is a typo or a corrupted file"
        )


def _short(value: object) -> str:
    """``repr(value)`` cut to 40 characters (a config may hold a 400-digit integer)."""
    try:
        text = repr(value)
    except ValueError:  # int too large for str() (sys.set_int_max_str_digits)
        return f"an integer of more than {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= 40 else text[:37] + "..."


@dataclasses.dataclass
class RuleConfig:
    """Hyper-parameters of a rule's architecture; subclasses add their own fields."""

    architecture: ClassVar[str] = ""
    hidden_size: int = 20
    num_layers: int = 2
    output_scale: float = 0.01

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{name}: key {field.name!r} must be a finite number, got {value!r}"
                )
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ConfigError(
                f"{name}: hidden_size and num_layers must be >= 1, got "
                f"hidden_size={self.hidden_size}, num_layers={self.num_layers}"
            )
        for key, limit in (("hidden_size", MAX_WIDTH), ("num_layers", MAX_LAYERS)):
            check_upper_bound(self, key, limit)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to ``config.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            **dataclasses.asdict(self),
        }

    @staticmethod
    def from_dict(data: dict[str, Any], *, source: str = "config") -> RuleConfig:
        """Build the right config subclass from a ``config.json`` dict, strictly."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a rule config must be a JSON object, got {data!r}")
        data = dict(data)
        version = data.pop("format_version", None)
        if type(version) is not int:  # true and 1.0 compare equal to 1 but are not versions
            raise ConfigError(
                f"{source}: unsupported format_version {_short(version)}; it must be the "
                f"integer {FORMAT_VERSION} (this flatl2o reads format_version {FORMAT_VERSION}). "
                "Re-save the checkpoint with flatl2o."
            )
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: unsupported format_version {version!r}; this flatl2o reads "
                f"format_version {FORMAT_VERSION}. Upgrade flatl2o or re-export the checkpoint."
            )
        arch = data.pop("architecture", None)
        if arch is not None and not isinstance(arch, str):  # None: missing, reported below
            raise ConfigError(
                f"{source}: key 'architecture' must be a string, one of "
                f"{', '.join(sorted(RULES))}; got {_short(arch)}"
            )
        if arch not in RULES:
            raise ConfigError(
                f"{source}: unknown architecture {arch!r}; known architectures: "
                f"{', '.join(sorted(RULES))}"
            )
        data.pop("flatl2o_version", None)  # informational only
        cls = RULES[arch].config_class
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {unknown} for architecture {arch!r}; "
                f"accepted keys: {sorted(fields)}"
            )
        defaults = cls()
        for name, value in data.items():
            expected = type(getattr(defaults, name))
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
            if not ok or isinstance(value, bool) != (expected is bool):
                raise ConfigError(
                    f"{source}: key {name!r} must be {expected.__name__}, got {_short(value)}"
                )
            if expected is float:
                # 5 and 5.0 are the same config: store floats so that to_dict() and the
                # fingerprint do not depend on how a number was spelled.
                try:
                    data[name] = float(value)
                except OverflowError:
                    raise ConfigError(
                        f"{source}: key {name!r} must be a finite number, got {_short(value)} "
                        "(too large for a float)"
                    ) from None
        return cls(**data)


class LSTMStack(nn.Module):
    """Stacked ``nn.LSTMCell`` layers applied coordinatewise (each row is one coordinate)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(s, hidden_size) for s in sizes)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        new: State = {}
        for i, cell in enumerate(self.cells):
            h, c = cell(x, (state[f"h{i}"], state[f"c{i}"]))
            new[f"h{i}"], new[f"c{i}"] = h, c
            x = h
        return x, new


class UpdateRule(nn.Module):
    """A learned update rule: ``(grad, state, step, segments) -> (update, new_state)``.

    ``grad`` is a 1-D float32 tensor of n coordinates, ``state`` a dict of tensors whose
    first dimension is n (see :meth:`state_shapes`), ``step`` the 1-based index of the step
    being taken, ``segments`` the sizes of the tensors that ``grad`` holds one after the other
    (``None``: one tensor). A coordinatewise rule ignores ``segments``; a
    :class:`TensorwiseRule` normalizes its update per tensor. The same module runs
    differentiably in meta-training and under ``torch.no_grad`` in :class:`flatl2o.L2O`.
    """

    config_class: ClassVar[type[RuleConfig]] = RuleConfig
    #: The ``lr`` that :class:`flatl2o.L2O` uses when none is given: what the rule's output is
    #: multiplied by. 1.0 for a rule whose output is already a step (L2O-DM, RNNprop).
    default_lr: ClassVar[float] = 1.0

    def __init__(self, config: RuleConfig | None = None) -> None:
        super().__init__()
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config

    @property
    def architecture(self) -> str:
        """The registry name of this rule's architecture (e.g. ``"l2o-dm"``)."""
        return self.config.architecture

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-coordinate shape of each recurrent state tensor (the state is ``(n, *shape)``)."""
        h = self.config.hidden_size
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(self.config.num_layers):
            shapes[f"h{i}"] = (h,)
            shapes[f"c{i}"] = (h,)
        return shapes

    def state_floats_per_coordinate(self) -> int:
        """How many floats of recurrent state each coordinate carries."""
        return sum(int(torch.Size(s).numel()) for s in self.state_shapes().values())

    def init_state(
        self,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> State:
        """Fresh (all-zero) recurrent state for ``n`` coordinates."""
        return {
            k: torch.zeros((n, *s), device=device, dtype=dtype)
            for k, s in self.state_shapes().items()
        }

    def forward(
        self, grad: Tensor, state: State, step: int | Tensor, segments: Segments = None
    ) -> tuple[Tensor, State]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of architecture, config and weights: identifies the exact rule."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    # Hub-style persistence (the shape of huggingface_hub's ModelHubMixin), implemented by the
    # persistence layer above the rules: see provide_persistence.
    def save_pretrained(self, save_directory: str, *, model_card: str | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and a model card into a folder; the card,
        recipe, metrics, log and plot of an earlier checkpoint there are removed
        (:func:`flatl2o.checkpoint.save_rule`)."""
        _persistence("save")(self, save_directory, model_card=model_card)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> UpdateRule:
        """Load a rule from a local folder, a shipped checkpoint name or a Hub repo id
        (:func:`flatl2o.hub.load_rule`)."""
        rule = _persistence("load")(name_or_path, **kwargs)
        if cls is not UpdateRule and not isinstance(rule, cls):
            raise TypeError(
                f"{name_or_path!r} holds a {type(rule).__name__} rule, not a {cls.__name__}"
            )
        return rule

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload this rule (config, weights, model card) to a Hub repo; returns the commit URL
        (:func:`flatl2o.hub.push_to_hub`)."""
        return _persistence("push")(self, repo_id, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}"


def untouched(grad: Tensor, state: State) -> Tensor:
    """The zero-gradient contract: which coordinates (rows) a step leaves exactly as they are,
    parameter and state. A row is left alone when its gradient is exactly 0 (either sign) and
    every value of its state is exactly +0.0, the initial state (``UpdateRule.init_state``).
    By induction, a coordinate whose gradient has been 0 at every step so far (a padding row,
    a masked weight) never moves and keeps its initial state, as with Adam or SGD; every other
    coordinate takes the rule's step. The CPU and Triton kernels test the same bits."""
    keep = grad == 0
    for v in state.values():
        zero = (v == 0) & ~torch.signbit(v)
        keep &= zero.flatten(1).all(dim=1) if v.dim() > 1 else zero
    return keep


def block_partials(values: Tensor) -> Tensor:
    """Partial sums of ``values`` (rows: coordinates, a multiple of :data:`REDUCTION_BLOCK`)
    per block of rows, each by the same pairwise tree: ``(rows / block, *values.shape[1:])``.
    Elementwise additions only, so a block's sum does not depend on what else is summed."""
    x = values.reshape(values.shape[0] // REDUCTION_BLOCK, REDUCTION_BLOCK, *values.shape[1:])
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0]


def segment_sizes(segments: Segments, n: int) -> list[int]:
    """``segments`` as a list of sizes that cover ``n`` coordinates (``None``: ``[n]``)."""
    if segments is None:
        return [n]
    sizes = [int(s) for s in segments]
    if any(s < 0 for s in sizes) or sum(sizes) != n:
        raise ValueError(
            f"segments must be non-negative sizes that sum to the gradient's {n} coordinates, "
            f"got {len(sizes)} sizes summing to {sum(sizes)}; pass one size per tensor"
        )
    return sizes


class TensorwiseRule(UpdateRule):
    """A rule whose update is normalized per tensor: a coordinatewise part, which can run on
    any chunk of a tensor's coordinates, then a per-tensor finish that sees only sums.

    :meth:`coordinatewise` maps ``(grad, state, step)`` to a direction, the new state and
    ``stats``, ``(n, reductions)`` per-coordinate quantities; the sums of ``stats`` over a
    tensor's counted coordinates (see :func:`untouched`: a coordinate the zero-gradient
    contract leaves alone is neither moved nor counted) and their number go to
    :meth:`finish`, which returns the tensor's update. :meth:`forward` does both for the
    tensors of ``segments``; the reference kernel does the same chunk by chunk, to the bit.
    """

    #: Columns of ``stats``: the per-coordinate quantities summed over each tensor.
    reductions: ClassVar[int] = 1

    def coordinatewise(
        self, grad: Tensor, state: State, step: int | Tensor
    ) -> tuple[Tensor, State, Tensor]:
        """``(direction, new_state, stats)`` for any set of coordinates (chunkable)."""
        raise NotImplementedError

    def finish(self, direction: Tensor, totals: Tensor, count: Tensor) -> Tensor:
        """One tensor's update from its coordinates' directions, the sums ``totals``
        (``(reductions,)``) of their ``stats`` over the ``count`` counted coordinates."""
        raise NotImplementedError

    def forward(
        self, grad: Tensor, state: State, step: int | Tensor = 1, segments: Segments = None
    ) -> tuple[Tensor, State]:
        sizes = segment_sizes(segments, grad.shape[0])
        direction, new_state, stats = self.coordinatewise(grad, state, step)
        keep = untouched(grad, state)
        stats = torch.where(keep.unsqueeze(-1), 0.0, stats)
        parts = []
        split = (direction.split(sizes), stats.split(sizes), keep.split(sizes))
        for d, s, k in zip(*split, strict=True):
            pad = -d.shape[0] % REDUCTION_BLOCK
            if pad:
                s = torch.cat((s, s.new_zeros((pad, *s.shape[1:]))))
            totals = block_partials(s).sum(dim=0)
            parts.append(self.finish(d, totals, (~k).sum()))
        update = torch.where(keep, 0.0, parts[0] if len(parts) == 1 else torch.cat(parts))
        kept = {
            key: torch.where(keep.view(-1, *(1,) * (v.dim() - 1)), state[key], v)
            for key, v in new_state.items()
        }
        return update, kept


#: save / load / push, provided by the persistence layer (``flatl2o.hub``) when it is imported.
_PERSISTENCE: dict[str, Callable[..., Any]] = {}


def provide_persistence(
    *,
    save: Callable[..., None],
    load: Callable[..., UpdateRule],
    push: Callable[..., str],
) -> None:
    """Install the functions behind :meth:`UpdateRule.save_pretrained`, ``from_pretrained`` and
    ``push_to_hub``. Persistence sits above the rules (it builds rules from ``config.json``), so
    the rules cannot import it; ``flatl2o.hub`` calls this when imported, which importing any part
    of flatl2o does (the package's ``__init__`` imports it)."""
    _PERSISTENCE.update(save=save, load=load, push=push)


def _persistence(name: str) -> Callable[..., Any]:
    try:
        return _PERSISTENCE[name]
    except KeyError:
        raise RuntimeError(
            "no checkpoint support is installed for flatl2o's rules; import flatl2o (or "
            "flatl2o.hub) before saving or loading a rule"
        ) from None
