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
import flatl2o.checkpoint as checkpoint_module
from flatl2o.checkpoint import (
    CONFIG_DIGEST_KEY,
    CONFIG_NAME,
    MODEL_CARD_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    config_digest,
    load_rule_from_dir,
    load_weights_strict,
    read_config,
    save_rule,
)
from flatl2o.rules import FORMAT_VERSION, ConfigError
from flatl2o.rules.base import MAX_LAYERS, MAX_WIDTH

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
    bad = _rule(arch)
    bad.config.output_scale = float("nan")  # set after the config checks; JSON cannot store it
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


def test_save_expands_the_home_folder(tmp_path, monkeypatch):
    """``load_rule("~/x")`` reads ``$HOME/x``; saving there must write there too."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    rule = _rule("l2o-dm")
    rule.save_pretrained("~/ckpt")
    assert not (tmp_path / "~").exists()
    assert (tmp_path / "home" / "ckpt" / CONFIG_NAME).is_file()
    assert flatl2o.load_rule("~/ckpt").fingerprint() == rule.fingerprint()


def test_save_onto_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "taken"
    target.write_text("mine")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        save_rule(_rule("l2o-dm"), target)
    with pytest.raises(CheckpointError, match="part of the path is a file"):
        save_rule(_rule("l2o-dm"), target / "below")
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _killed_writer(path: Path) -> None:
    """Run an atomic write of ``path`` in another process and SIGKILL it mid-write."""
    import subprocess
    import sys

    code = (
        "import sys, time\n"
        "from flatl2o.checkpoint import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_bytes(b'half a file')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"writing\n"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_temporary_files_of_a_killed_save_are_removed_by_the_next(saved, arch):
    rule, folder = saved
    _killed_writer(folder / WEIGHTS_NAME)
    _killed_writer(folder / CONFIG_NAME)
    left = _leftovers(folder)
    assert len(left) == 2 and all(
        n.startswith((f".{WEIGHTS_NAME}.", f".{CONFIG_NAME}.")) for n in left
    )
    # a write in progress (this process) and files that are not ours are left alone
    live = folder / f".{WEIGHTS_NAME}.{checkpoint_module._HOST}-{os.getpid()}-abcdefgh.tmp"
    live.write_bytes(b"in progress")
    (folder / ".notes.txt.tmp").write_text("not ours")
    save_rule(rule, folder)
    assert _leftovers(folder) == sorted([live.name, ".notes.txt.tmp"])
    assert load_rule_from_dir(folder).fingerprint() == rule.fingerprint()


def test_old_style_temporary_files_are_removed_when_old(tmp_path):
    """Files named by flatl2o before the host and pid were recorded: removed after an hour."""
    target = tmp_path / WEIGHTS_NAME
    old, recent = (
        tmp_path / f".{WEIGHTS_NAME}.x7h7u9xz.tmp",
        tmp_path / f".{WEIGHTS_NAME}.a1b2c3d4.tmp",
    )
    old.write_bytes(b"x")
    recent.write_bytes(b"x")
    os.utime(old, (1, 1))
    atomic_write_bytes(target, b"new")
    assert _leftovers(tmp_path) == [recent.name]
    assert target.read_bytes() == b"new"


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


def _replace_in_config(folder: Path, old: str, new: str) -> None:
    """Edit ``config.json`` as text (JSON writers cannot produce e.g. ``1e400``)."""
    path = folder / CONFIG_NAME
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1e400", "must be a finite number, got inf"),  # JSON overflow: float("inf")
        ("-1e400", "must be a finite number, got -inf"),
        ("1" + "0" * 400, "(too large for a float)"),  # float(int) would raise OverflowError
    ],
    ids=["1e400", "-1e400", "400-digit-int"],
)
def test_config_floats_must_be_finite(saved, value, expected):
    _, folder = saved
    _replace_in_config(folder, '"output_scale": 0.01', f'"output_scale": {value}')
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and "'output_scale'" in msg and expected in msg
    assert len(msg) < 400  # the 400-digit number is cut short


@pytest.mark.parametrize(
    "value",
    [float("inf"), -float("inf"), float("nan"), 10**400],
    ids=["inf", "-inf", "nan", "400-digit-int"],
)
def test_make_rule_and_configs_refuse_non_finite_floats(arch, value):
    with pytest.raises(ConfigError, match="'output_scale' must be a finite number"):
        flatl2o.make_rule(arch, output_scale=value)
    config_class = flatl2o.RULES[arch].config_class
    if not isinstance(value, int):  # the dataclass itself checks what from_dict did not see
        with pytest.raises(ConfigError, match="'eps' must be a finite number"):
            config_class(eps=value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("format_version", True, "unsupported format_version True; it must be the integer 1"),
        ("format_version", 1.0, "unsupported format_version 1.0; it must be the integer 1"),
        ("architecture", ["rnnprop"], "key 'architecture' must be a string"),
        ("architecture", 1, "key 'architecture' must be a string"),
    ],
)
def test_config_types_are_strict(saved, key, value, expected):
    _, folder = saved
    _edit_config(folder, **{key: value})
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and expected in msg


@pytest.mark.parametrize(("key", "limit"), [("hidden_size", MAX_WIDTH), ("num_layers", MAX_LAYERS)])
def test_config_sizes_have_upper_bounds(arch, key, limit):
    flatl2o.make_rule(arch, **{key: 1})
    with pytest.raises(ConfigError, match=rf"'{key}' must be <= {limit}, got {limit + 1}"):
        flatl2o.make_rule(arch, **{key: limit + 1})
    if arch == "rnnprop":
        with pytest.raises(ConfigError, match=rf"'input_size' must be <= {MAX_WIDTH}"):
            flatl2o.make_rule(arch, input_size=MAX_WIDTH + 1)


@pytest.fixture
def built_devices(monkeypatch) -> list[str]:
    """The device of every rule the loader builds (meta: shapes only, nothing allocated)."""
    import flatl2o.checkpoint as checkpoint

    devices: list[str] = []
    real = checkpoint.build_rule

    def spy(config):
        rule = real(config)
        devices.append(next(rule.parameters()).device.type)
        return rule

    monkeypatch.setattr(checkpoint, "build_rule", spy)
    return devices


def test_weights_header_is_checked_before_the_rule_is_built(saved, built_devices):
    rule, folder = saved
    assert load_rule_from_dir(folder).fingerprint() == rule.fingerprint()
    assert built_devices == ["meta", "cpu"]
    built_devices.clear()
    _edit_config(folder, hidden_size=4000)  # a 6-wide file: 4000 would allocate ~0.5 GB
    msg = _load_error(folder)
    assert str(folder / WEIGHTS_NAME) in msg and "has shape" in msg and "(16000," in msg
    assert built_devices == ["meta"]  # refused before anything was built for real


def test_absurd_config_sizes_are_refused_with_the_key(saved, built_devices):
    _, folder = saved
    _edit_config(folder, hidden_size=10**12)  # was a raw allocator error
    msg = _load_error(folder)
    assert str(folder / CONFIG_NAME) in msg and f"'hidden_size' must be <= {MAX_WIDTH}" in msg
    assert built_devices == []


def test_torn_save_is_refused(saved, arch, monkeypatch):
    """A save killed between model.safetensors and config.json: new weights, old config."""
    import flatl2o.checkpoint as checkpoint

    _, folder = saved
    new = _rule(arch, seed=2, output_scale=0.5)

    write = checkpoint.atomic_write_bytes

    def killed_at_the_config(path, data):
        if Path(path).name == CONFIG_NAME:
            raise KeyboardInterrupt
        write(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "atomic_write_bytes", killed_at_the_config)
        with pytest.raises(KeyboardInterrupt):
            new.save_pretrained(str(folder))
    msg = _load_error(folder)
    assert str(folder) in msg and "torn save" in msg and "Save the rule into this folder" in msg
    with pytest.raises(CheckpointError, match="torn save"):
        flatl2o.load_rule(folder)
    new.save_pretrained(str(folder))  # the fix the message gives
    assert load_rule_from_dir(folder).fingerprint() == new.fingerprint()


def test_weights_record_the_config_hash(saved):
    rule, folder = saved
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()[CONFIG_DIGEST_KEY] == config_digest(rule.config)
    # reformatting config.json or editing only flatl2o_version keeps the same config
    _edit_config(folder, flatl2o_version="0.0.1")
    assert load_rule_from_dir(folder).fingerprint() == rule.fingerprint()


def test_weights_without_the_config_hash_still_load(saved):
    rule, folder = saved
    _write_tensors(folder, _tensors(folder))  # metadata {"format": "pt"} only: an older save
    assert load_rule_from_dir(folder).fingerprint() == rule.fingerprint()


@pytest.mark.parametrize("name", flatl2o.list_pretrained())
def test_shipped_checkpoints_load_as_they_are(name):
    folder = flatl2o.hub._shipped_dir(name)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert CONFIG_DIGEST_KEY not in (f.metadata() or {})  # saved before the hash existed
    assert (
        flatl2o.load_rule(name).architecture
        == json.loads((folder / CONFIG_NAME).read_text())["architecture"]
    )


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


_HUB_MODULES = sorted(
    "flatl2o.hub" + ("" if p.stem == "__init__" else f".{p.stem}")
    for p in Path(flatl2o.hub.__file__).parent.glob("*.py")
)


@pytest.mark.parametrize("module", ["flatl2o.checkpoint", *_HUB_MODULES])
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


# ------------------------------------------------------------- no stale files (issue 15 item 9)
#: What an earlier checkpoint (e.g. a meta-training export) left in the folder.
_OLD_DESCRIPTIONS = {
    MODEL_CARD_NAME: "# old rule\n",
    "metrics.json": '{"test_accuracy@100": 0.99}\n',
    "recipe.toml": 'name = "old"\n',
    "log.jsonl": '{"iteration": 1}\n',
    "meta_training.png": "not really a png",
}


def _with_old_descriptions(folder: Path) -> None:
    for name, text in _OLD_DESCRIPTIONS.items():
        (folder / name).write_text(text)
    (folder / "notes.txt").write_text("the user's own file\n")


def test_a_save_removes_the_files_that_described_other_weights(saved, arch):
    """save_pretrained into a checkpoint folder used to leave the old card, metrics, recipe,
    log and plot beside the new weights; only flatl2o's own files go, the user's stay."""
    _, folder = saved
    _with_old_descriptions(folder)
    new = _rule(arch, seed=2)
    new.save_pretrained(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]
    assert load_rule_from_dir(folder).fingerprint() == new.fingerprint()

    _with_old_descriptions(folder)
    save_rule(new, folder, model_card="# new\n", files={"metrics.json": "{}\n"}, keep=["log.jsonl"])
    assert (folder / MODEL_CARD_NAME).read_text() == "# new\n"
    assert (folder / "metrics.json").read_text() == "{}\n"
    assert (folder / "log.jsonl").read_text() == _OLD_DESCRIPTIONS["log.jsonl"]  # kept
    assert not (folder / "recipe.toml").exists() and not (folder / "meta_training.png").exists()
    assert (folder / "notes.txt").is_file()
    with pytest.raises(ValueError, match=r"notes\.txt"):
        save_rule(new, folder, files={"notes.txt": "x"})


def test_a_killed_save_never_pairs_new_weights_with_an_old_card(saved, arch, monkeypatch):
    import flatl2o.checkpoint as checkpoint

    _, folder = saved
    _with_old_descriptions(folder)
    write = checkpoint.atomic_write_bytes

    def killed_after_the_weights(path, data):
        write(path, data)
        if Path(path).name == WEIGHTS_NAME:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        _rule(arch, seed=2).save_pretrained(str(folder), model_card="# new\n")
    assert not [name for name in _OLD_DESCRIPTIONS if (folder / name).exists()]


def test_export_replaces_the_whole_set_of_an_earlier_export(tmp_path):
    from test_meta_training import tiny

    from flatl2o.meta.recipe import recipe_from_dict
    from flatl2o.meta.trainer import MetaTrainer

    recipe = recipe_from_dict(tiny(train={"iterations": 2}))
    out = MetaTrainer(recipe, tmp_path / "run", progress=False, command="pytest").run()
    (out / "meta_training.png").unlink(missing_ok=True)  # e.g. made without matplotlib
    target = tmp_path / "pretrained-copy"
    target.mkdir()
    _with_old_descriptions(target)
    trainer = MetaTrainer(recipe, out, resume=True, progress=False)
    trainer.export(target)
    assert not (target / "meta_training.png").exists()  # the old plot is gone
    for name in (MODEL_CARD_NAME, "metrics.json", "recipe.toml", "log.jsonl"):
        assert (target / name).read_text() != _OLD_DESCRIPTIONS[name], name
    assert (target / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()
    assert (target / "notes.txt").is_file()
    assert load_rule_from_dir(target).fingerprint() == load_rule_from_dir(out).fingerprint()
