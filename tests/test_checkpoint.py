"""The checkpoint folder format: round trips, atomic writes, strict loading, never pickle."""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

import flatl2o
from flatl2o.checkpoint import (
    CONFIG_NAME,
    MODEL_CARD_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    load_rule_from_dir,
    load_weights_strict,
    read_config,
    save_rule,
)
from flatl2o.rules import FORMAT_VERSION

ARCHS = {"l2o-dm": {"hidden_size": 6}, "rnnprop": {"hidden_size": 6, "input_size": 5}}


def _rule(arch: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    return flatl2o.make_rule(arch, **{**ARCHS[arch], **options})


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def saved(tmp_path, arch) -> tuple[flatl2o.UpdateRule, Path]:
    """A rule of each architecture, saved to a folder."""
    rule = _rule(arch, seed=1)
    return rule, save_rule(rule, tmp_path / "ckpt")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    (folder / WEIGHTS_NAME).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DELETE = object()


def _load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_rule_from_dir(folder)
    return str(info.value)


# ----------------------------------------------------------------------------- round trips
def test_round_trip_is_exact(saved, arch):
    rule, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = load_rule_from_dir(folder)
    assert type(loaded) is type(rule) and loaded.architecture == arch
    assert loaded.config == rule.config
    assert loaded.fingerprint() == rule.fingerprint()
    for name, tensor in rule.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not loaded.training  # returned in eval mode
    # the public entry points agree
    assert flatl2o.load_rule(folder).fingerprint() == rule.fingerprint()
    assert flatl2o.load_rule(str(folder), device="cpu").fingerprint() == rule.fingerprint()
    assert type(rule).from_pretrained(str(folder)).fingerprint() == rule.fingerprint()


def test_round_trip_behaves_identically(saved):
    rule, folder = saved
    loaded = load_rule_from_dir(folder)
    grad = torch.linspace(-1, 1, 7)
    with torch.no_grad():
        a, sa = rule(grad, rule.init_state(7), 1)
        b, sb = loaded(grad, loaded.init_state(7), 1)
    assert torch.equal(a, b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_files_are_hub_ready(saved, arch):
    rule, folder = saved
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert config["architecture"] == arch
    assert config["flatl2o_version"] == flatl2o.__version__
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["architecture"] == arch
        assert sorted(f.keys()) == sorted(rule.state_dict())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


def test_saved_bytes_are_deterministic(tmp_path):
    """Same rule, same bytes, also from another process (safetensors alone orders its
    metadata differently from run to run): stable hashes, no empty Hub commits."""
    import subprocess
    import sys

    script = (
        "import sys, torch, flatl2o\n"
        "for arch, options in {ARCHS!r}.items():\n"
        "    torch.manual_seed(1)\n"
        "    rule = flatl2o.make_rule(arch, **options)\n"
        "    flatl2o.checkpoint.save_rule(rule, sys.argv[1] + '/' + arch)\n"
    ).replace("{ARCHS!r}", repr(ARCHS))
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other")], check=True)
    for arch in ARCHS:
        folder = save_rule(_rule(arch, seed=1), tmp_path / "here" / arch)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            assert (folder / name).read_bytes() == (tmp_path / "other" / arch / name).read_bytes()
        data = (folder / WEIGHTS_NAME).read_bytes()
        header = json.loads(data[8 : 8 + _header_len(data)])
        assert list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_save_pretrained_writes_model_card_and_float32(tmp_path, arch):
    rule = _rule(arch).double()
    rule.save_pretrained(str(tmp_path), model_card="---\nlicense: mit\n---\n# card\n")
    assert (tmp_path / MODEL_CARD_NAME).read_text().startswith("---\nlicense: mit")
    assert {t.dtype for t in _tensors(tmp_path).values()} == {torch.float32}
    assert load_rule_from_dir(tmp_path).fingerprint() == rule.float().fingerprint()


def test_loading_does_not_touch_the_global_rng(saved):
    _, folder = saved
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    load_rule_from_dir(folder)
    flatl2o.load_rule(folder)
    assert torch.equal(torch.rand(5), expected)


def test_loading_builds_on_cpu_whatever_the_default_device(saved):
    rule, folder = saved
    previous = torch.get_default_device()
    torch.set_default_device("meta")  # a rule built there would hold no data at all
    try:
        loaded = load_rule_from_dir(folder)
    finally:
        torch.set_default_device(previous)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert loaded.fingerprint() == rule.fingerprint()


# ----------------------------------------------------------------------------- atomic writes
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_leaves_no_temporary_files_and_overwrites(tmp_path, arch):
    folder = tmp_path / "ckpt"
    save_rule(_rule(arch, seed=1), folder)
    second = _rule(arch, seed=2)
    save_rule(second, folder, model_card="# card\n")
    assert _leftovers(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_CARD_NAME, CONFIG_NAME, WEIGHTS_NAME]
    assert load_rule_from_dir(folder).fingerprint() == second.fingerprint()


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failing_write_keeps_the_previous_file(tmp_path, exc):
    target = tmp_path / WEIGHTS_NAME
    atomic_write_bytes(target, b"previous content")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new cont")  # a partial write, then the failure
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write)
    assert target.read_bytes() == b"previous content"
    assert _leftovers(tmp_path) == []


def test_failing_save_keeps_the_previous_checkpoint(saved, arch):
    rule, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    bad = _rule(arch, output_scale=float("nan"))  # JSON cannot store it
    with pytest.raises(CheckpointError, match=r"config\.json.*NaN or infinite"):
        save_rule(bad, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert load_rule_from_dir(folder).fingerprint() == rule.fingerprint()


def test_atomic_write_permissions(tmp_path):
    new = tmp_path / "new.json"
    atomic_write_text(new, "{}")
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0600
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    os.chmod(kept, 0o640)
    atomic_write_text(kept, '{"a": 1}')
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert json.loads(kept.read_text()) == {"a": 1}


# ----------------------------------------------------------------------------- strict loading
def test_missing_tensor(saved):
    _, folder = saved
    tensors = _tensors(folder)
    del tensors["readout.bias"]
    _write_tensors(folder, tensors)
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "missing: ['readout.bias']" in msg


def test_unexpected_tensor(saved):
    _, folder = saved
    _write_tensors(folder, {**_tensors(folder), "extra.weight": torch.zeros(2)})
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "unexpected: ['extra.weight']" in msg


def test_wrong_shape(saved):
    _, folder = saved
    tensors = _tensors(folder)
    tensors["readout.weight"] = torch.zeros(1, 3)
    _write_tensors(folder, tensors)
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg
    assert "'readout.weight' has shape (1, 3), expected (1, 6)" in msg


def test_config_from_another_checkpoint(saved):
    _, folder = saved
    _edit_config(folder, hidden_size=7)
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "has shape" in msg and CONFIG_NAME in msg


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_wrong_dtype(saved, dtype):
    _, folder = saved
    tensors = _tensors(folder)
    tensors["readout.bias"] = tensors["readout.bias"].to(dtype)
    _write_tensors(folder, tensors)
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg
    assert f"'readout.bias' has dtype {dtype}, expected torch.float32" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(saved, value):
    _, folder = saved
    tensors = _tensors(folder)
    tensors["readout.weight"][0, 2] = value
    _write_tensors(folder, tensors)
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "'readout.weight'" in msg and "NaN" in msg


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[:-7], id="truncated-data"),
        pytest.param(lambda b: b[: 8 + _header_len(b) // 2], id="truncated-header"),
        pytest.param(lambda b: b[:5], id="truncated-length"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(
            lambda b: b[:8] + b"\xff" * _header_len(b) + b[8 + _header_len(b) :],
            id="garbage-header",
        ),
        pytest.param(lambda b: struct.pack("<Q", 1 << 40) + b[8:], id="huge-header-length"),
    ],
)
def test_corrupted_safetensors(saved, corrupt):
    _, folder = saved
    path = folder / WEIGHTS_NAME
    path.write_bytes(corrupt(path.read_bytes()))
    msg = _load_error(folder)
    assert str(path) in msg and "truncated or corrupted" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "not valid JSON"),
        ('{"format_version": 1, "architecture": "rnnprop", "hidden_size": NaN}', "NaN"),
        ("[1, 2]", "expected a JSON object"),
        ("", "not valid JSON"),
    ],
)
def test_invalid_config_json(saved, text, expected):
    _, folder = saved
    (folder / CONFIG_NAME).write_text(text)
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and expected in msg


def test_config_not_utf8(saved):
    _, folder = saved
    (folder / CONFIG_NAME).write_bytes(b'{"architecture": "\xff"}')
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and "UTF-8" in msg


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"architecture": "adam"}, "unknown architecture 'adam'"),
        ({"architecture": _DELETE}, "unknown architecture None"),
        ({"format_version": 99}, "unsupported format_version 99"),
        ({"format_version": _DELETE}, "unsupported format_version None"),
        ({"format_version": "1"}, "unsupported format_version '1'"),
        ({"learning_rate": 0.1}, "unknown key(s) ['learning_rate']"),
        ({"hidden_size": "6"}, "key 'hidden_size' must be int"),
        ({"hidden_size": True}, "key 'hidden_size' must be int"),
        ({"hidden_size": 0}, "hidden_size and num_layers must be >= 1"),
    ],
)
def test_invalid_config_content(saved, changes, expected):
    _, folder = saved
    _edit_config(folder, **changes)
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and expected in msg
    # read_config alone reports the same problem
    with pytest.raises(CheckpointError, match=r"config\.json"):
        read_config(folder / CONFIG_NAME)


def test_missing_files(saved):
    _, folder = saved
    (folder / WEIGHTS_NAME).unlink()
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "missing" in msg
    (folder / CONFIG_NAME).unlink()
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and "missing" in msg


def test_load_rule_reports_a_broken_local_checkpoint_not_a_missing_one(saved):
    _, folder = saved
    (folder / WEIGHTS_NAME).write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        flatl2o.load_rule(folder)


def test_load_weights_strict_leaves_rule_unchanged_on_error(saved, arch):
    _, folder = saved
    target = _rule(arch, seed=5)
    before = target.fingerprint()
    tensors = _tensors(folder)
    tensors["readout.weight"][0, 0] = float("nan")
    _write_tensors(folder, tensors)
    with pytest.raises(CheckpointError):
        load_weights_strict(target, folder / WEIGHTS_NAME)
    assert target.fingerprint() == before


# ----------------------------------------------------------------------------- never pickle
class _Trap:
    """Unpickling this creates ``marker``: proof that something unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make every torch/pickle loading entry point fail loudly if the loader touches it."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint loader must never unpickle anything")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)


def test_pickle_files_next_to_a_checkpoint_are_ignored(saved, tmp_path, no_unpickling):
    rule, folder = saved
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pkl"):
        (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
    assert load_rule_from_dir(folder).fingerprint() == rule.fingerprint()
    assert flatl2o.load_rule(folder).fingerprint() == rule.fingerprint()
    assert not marker.exists()


def test_pickle_only_folder_gives_the_missing_safetensors_error(saved, tmp_path, no_unpickling):
    _, folder = saved
    marker = tmp_path / "unpickled"
    (folder / WEIGHTS_NAME).unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "missing" in msg
    assert "pytorch_model.bin" in msg and "never loaded" in msg
    (folder / CONFIG_NAME).unlink()  # only the pickle left
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and "pytorch_model.bin" in msg
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_rejected(saved, tmp_path, no_unpickling):
    _, folder = saved
    marker = tmp_path / "unpickled"
    (folder / WEIGHTS_NAME).write_bytes(pickle.dumps({"readout.weight": _Trap(marker)}))
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "cannot be read as safetensors" in msg
    assert not marker.exists()


@pytest.mark.parametrize("module", ["flatl2o.checkpoint", "flatl2o.hub"])
def test_loader_source_has_no_pickle_path(module):
    """No ``import pickle`` and no ``torch.load``/``pickle.load`` call anywhere in the loader."""
    import ast
    import importlib

    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name for a in node.names} & {"pickle", "dill", "cloudpickle"}
        if isinstance(node, ast.ImportFrom):
            assert node.module not in {"pickle", "dill", "cloudpickle"}
            assert not (node.module == "torch" and "load" in {a.name for a in node.names})
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in {("torch", "load"), ("pickle", "load")}
