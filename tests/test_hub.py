"""Finding, loading and publishing rules through the real huggingface_hub client.

Nothing is mocked: ``push_to_hub`` and ``load_rule`` run huggingface_hub's own
``create_repo`` / ``create_branch`` / ``upload_folder`` / ``hf_hub_download`` against a loopback
emulation of the Hub API (``tests/hub_server.py``, fixture ``fake_hub``), with an isolated
cache (fixture ``hf_env``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub, git_blob_oid
from huggingface_hub import ModelCard, constants
from safetensors.torch import save as safetensors_bytes

import flatl2o
from flatl2o.checkpoint import CONFIG_NAME, MODEL_CARD_NAME, WEIGHTS_NAME, CheckpointError
from flatl2o.hub import CheckpointNotFoundError, list_pretrained, render_model_card

TOKEN = "hf_fake_write_token"
REPO = "alice/flat-rnnprop"


def _rule(arch: str = "rnnprop", seed: int = 0) -> flatl2o.UpdateRule:
    torch.manual_seed(seed)
    options = {"hidden_size": 4, "input_size": 3} if arch == "rnnprop" else {"hidden_size": 4}
    return flatl2o.make_rule(arch, **options)


def _push(rule, repo_id: str = REPO, **kwargs) -> str:
    return flatl2o.push_to_hub(rule, repo_id, token=TOKEN, **kwargs)


def _repo_cache(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _not_found(name, **kwargs) -> str:
    with pytest.raises(CheckpointNotFoundError) as info:
        flatl2o.load_rule(name, **kwargs)
    assert isinstance(info.value, FileNotFoundError)
    return str(info.value)


# ----------------------------------------------------------------------------- push + load
@pytest.fixture(params=["xet-installed", "no-xet"])
def upload_path(request, monkeypatch) -> str:
    """Both upload code paths of huggingface_hub: the streamed pipeline used when hf_xet is
    installed, and the single ``create_commit`` used without it (HF_HUB_DISABLE_XET)."""
    if request.param == "no-xet":
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return request.param


@pytest.mark.parametrize("arch", ["rnnprop", "l2o-dm"])
def test_push_then_load_round_trip(fake_hub: FakeHub, hf_env, upload_path, arch):
    rule = _rule(arch, seed=1)
    url = _push(rule, metrics={"test_loss": 0.25})

    repo = fake_hub.repos[REPO]
    sha = repo.branches["main"]
    assert url == f"{fake_hub.endpoint}/{REPO}/commit/{sha}"
    assert set(repo.commits[sha]) == {".gitattributes", CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME}
    # writes were authenticated and identified as flatl2o
    create = fake_hub.requests_for("POST", "/api/repos/create")[0]
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    assert f"flatl2o/{flatl2o.__version__}" in create.headers["user-agent"]

    fake_hub.requests.clear()
    loaded = flatl2o.load_rule(REPO)
    assert type(loaded) is type(rule)
    assert loaded.fingerprint() == rule.fingerprint()
    # downloaded through hf_hub_download: HEAD for metadata, then GET, as library flatl2o
    gets = fake_hub.requests_for("GET", "/resolve/")
    assert sorted(r.path.rsplit("/", 1)[-1] for r in gets) == [CONFIG_NAME, WEIGHTS_NAME]
    assert all(f"flatl2o/{flatl2o.__version__}" in r.headers["user-agent"] for r in gets)

    # ... into a cache laid out as the Hub documents
    root = _repo_cache(hf_env.cache, REPO)
    assert (root / "refs" / "main").read_text() == sha
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        pointer = root / "snapshots" / sha / name
        blob = root / "blobs" / git_blob_oid(fake_hub.file(REPO, name))
        assert pointer.is_symlink() and pointer.resolve() == blob.resolve()
        assert blob.read_bytes() == fake_hub.file(REPO, name)


def test_rule_methods_push_and_load_through_the_hub(fake_hub: FakeHub, hf_env):
    """``UpdateRule.push_to_hub`` / ``from_pretrained`` (the rules' persistence methods, which
    ``flatl2o.hub`` provides from the layer above the rules) reach the Hub like the functions."""
    rule = _rule("l2o-dm", seed=3)
    url = rule.push_to_hub(REPO, token=TOKEN)
    assert url == f"{fake_hub.endpoint}/{REPO}/commit/{fake_hub.repos[REPO].branches['main']}"
    assert flatl2o.UpdateRule.from_pretrained(REPO).fingerprint() == rule.fingerprint()
    assert flatl2o.L2ODM.from_pretrained(REPO).fingerprint() == rule.fingerprint()
    with pytest.raises(TypeError, match=f"{REPO!r} holds a L2ODM rule, not a RNNprop"):
        flatl2o.rules.RNNprop.from_pretrained(REPO)


def test_weights_are_fetched_at_the_commit_of_the_config(fake_hub: FakeHub, hf_env):
    _push(_rule())
    sha = fake_hub.repos[REPO].branches["main"]
    flatl2o.load_rule(REPO)
    heads = [r.path for r in fake_hub.requests_for("HEAD", "/resolve/")]
    # the first HEAD is flatl2o's own no-retry probe (nothing cached yet), then the download's
    config_head = f"/{REPO}/resolve/main/{CONFIG_NAME}"
    assert heads == [config_head, config_head, f"/{REPO}/resolve/{sha}/{WEIGHTS_NAME}"]


def test_second_load_comes_from_the_cache(fake_hub: FakeHub, hf_env):
    rule = _rule()
    _push(rule)
    flatl2o.load_rule(REPO)
    fake_hub.requests.clear()
    assert flatl2o.load_rule(REPO).fingerprint() == rule.fingerprint()
    # one metadata check of the branch head, nothing downloaded again
    assert [r.method for r in fake_hub.requests] == ["HEAD"]

    fake_hub.requests.clear()
    flatl2o.load_rule(REPO, force_download=True)
    assert len(fake_hub.requests_for("GET", "/resolve/")) == 2


def test_a_new_push_is_picked_up(fake_hub: FakeHub, hf_env):
    _push(_rule(seed=1))
    flatl2o.load_rule(REPO)
    newer = _rule(seed=2)
    _push(newer)
    assert flatl2o.load_rule(REPO).fingerprint() == newer.fingerprint()


def test_revision_selects_a_branch_or_commit(fake_hub: FakeHub, hf_env):
    main, v2 = _rule(seed=1), _rule(seed=2)
    _push(main)
    main_sha = fake_hub.repos[REPO].branches["main"]
    _push(v2, revision="v2")  # push_to_hub creates the branch (the Hub needs it to exist)
    assert fake_hub.repos[REPO].branches["main"] == main_sha
    assert fake_hub.requests_for("POST", f"/api/models/{REPO}/branch/v2")

    assert flatl2o.load_rule(REPO).fingerprint() == main.fingerprint()
    assert flatl2o.load_rule(REPO, revision="v2").fingerprint() == v2.fingerprint()
    assert flatl2o.load_rule(REPO, revision="main").fingerprint() == main.fingerprint()
    assert flatl2o.load_rule(REPO, revision=main_sha).fingerprint() == main.fingerprint()
    refs = _repo_cache(hf_env.cache, REPO) / "refs"
    assert (refs / "v2").read_text() == fake_hub.repos[REPO].branches["v2"]

    # a second push to the existing branch works too (create_branch(exist_ok=True))
    v3 = _rule(seed=3)
    _push(v3, revision="v2")
    assert flatl2o.load_rule(REPO, revision="v2").fingerprint() == v3.fingerprint()
    assert flatl2o.load_rule(REPO).fingerprint() == main.fingerprint()


def test_pushing_an_unchanged_rule_makes_no_commit(fake_hub: FakeHub, hf_env, upload_path):
    rule = _rule()
    first = _push(rule)
    commits = len(fake_hub.repos[REPO].commits)
    assert _push(rule) == first
    assert len(fake_hub.repos[REPO].commits) == commits


def test_model_card_metadata(fake_hub: FakeHub, hf_env):
    rule = _rule()
    _push(rule, metrics={"test_loss": 0.25, "sharpness": 3.0})
    card = ModelCard.load(REPO)  # fetched from the loopback Hub by huggingface_hub
    data = card.data.to_dict()
    assert data["library_name"] == "flatl2o"
    assert data["license"] == "apache-2.0"
    assert {"flatl2o", "learned-optimizer", "l2o", "pytorch", "rnnprop"} <= set(data["tags"])
    assert data["metrics"] == ["sharpness", "test_loss"]
    assert f'L2O.from_pretrained(model.parameters(), "{REPO}")' in card.text
    assert "| test_loss | 0.25 |" in card.text
    assert card.content == fake_hub.file(REPO, MODEL_CARD_NAME).decode()


def test_custom_model_card(fake_hub: FakeHub, hf_env):
    text = render_model_card(_rule(), repo_id=REPO, body="Trained on MNIST.", license="mit")
    _push(_rule(), model_card=text)
    card = ModelCard.load(REPO)
    assert card.data.license == "mit" and "Trained on MNIST." in card.text


def test_push_refuses_a_rule_that_would_not_load(fake_hub: FakeHub, hf_env):
    rule = _rule()
    with torch.no_grad():
        rule.readout.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        _push(rule)
    assert fake_hub.requests == []  # nothing was sent, no repo created


def test_push_folder_uploads_only_checkpoint_files(fake_hub: FakeHub, hf_env, tmp_path):
    import pickle

    from flatl2o.hub import push_folder_to_hub

    rule = _rule()
    card = render_model_card(rule, repo_id=REPO)
    folder = flatl2o.checkpoint.save_rule(rule, tmp_path / "run" / "best", model_card=card)
    (folder / "recipe.toml").write_text("[rule]\n")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "uploaded"}))
    push_folder_to_hub(folder, REPO, token=TOKEN)
    assert set(fake_hub.repos[REPO].commits[fake_hub.repos[REPO].branches["main"]]) == {
        ".gitattributes",
        CONFIG_NAME,
        WEIGHTS_NAME,
        MODEL_CARD_NAME,
        "recipe.toml",
    }
    assert flatl2o.load_rule(REPO).fingerprint() == rule.fingerprint()

    (folder / WEIGHTS_NAME).write_bytes(b"broken")
    fake_hub.requests.clear()
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        push_folder_to_hub(folder, REPO, token=TOKEN)
    assert fake_hub.requests == []


def test_l2o_from_pretrained_end_to_end(fake_hub: FakeHub, hf_env):
    rule = _rule()
    _push(rule)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = flatl2o.L2O.from_pretrained(model.parameters(), REPO, lr=0.1)
    assert opt.rule.fingerprint() == rule.fingerprint()
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # the rule-level entry point and revision pass-through work as well
    assert flatl2o.UpdateRule.from_pretrained(REPO).fingerprint() == rule.fingerprint()
    assert (
        flatl2o.RNNprop.from_pretrained(REPO, revision="main").fingerprint() == rule.fingerprint()
    )
    with pytest.raises(TypeError, match="not a L2ODM"):
        flatl2o.L2ODM.from_pretrained(REPO)


# ----------------------------------------------------------------------------- offline / cache
def _write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str):
    """Lay out a cache by hand, as https://huggingface.co/docs/huggingface_hub/guides/manage-cache
    documents it: blobs named by their git/LFS oid, snapshots of symlinks, refs/<branch>."""
    root = _repo_cache(cache, repo_id)
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for name, content in files.items():
        oid = (
            hashlib.sha256(content).hexdigest()
            if name.endswith(".safetensors")  # an LFS file: blob named by its sha256
            else git_blob_oid(content)
        )
        (root / "blobs" / oid).write_bytes(content)
        os.symlink(Path("..", "..", "blobs", oid), root / "snapshots" / commit / name)
    (root / "refs" / ref).write_text(commit)


def _checkpoint_files(rule, tmp_path: Path) -> dict[str, bytes]:
    folder = flatl2o.checkpoint.save_rule(rule, tmp_path / f"ckpt-{rule.fingerprint()}")
    return {name: (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


@pytest.fixture
def offline_cache(hf_env, tmp_path):
    """Two commits of one repo in a hand-made cache: main and branch v2."""
    main, v2 = _rule(seed=1), _rule(seed=2)
    _write_hub_cache(hf_env.cache, REPO, _checkpoint_files(main, tmp_path), "a" * 40, "main")
    _write_hub_cache(hf_env.cache, REPO, _checkpoint_files(v2, tmp_path), "b" * 40, "v2")
    return main, v2


def test_offline_load_from_a_hub_cache(hf_env, offline_cache, monkeypatch):
    main, v2 = offline_cache
    load = flatl2o.load_rule
    assert load(REPO, local_files_only=True).fingerprint() == main.fingerprint()
    assert load(REPO, local_files_only=True, revision="v2").fingerprint() == v2.fingerprint()
    assert load(REPO, local_files_only=True, revision="b" * 40).fingerprint() == v2.fingerprint()
    hf_env.set_offline(monkeypatch)  # HF_HUB_OFFLINE=1
    assert load(REPO).fingerprint() == main.fingerprint()
    assert load(REPO, revision="v2").fingerprint() == v2.fingerprint()


def test_unreachable_hub_falls_back_to_the_cache(hf_env, offline_cache):
    main, _ = offline_cache  # hf_env's endpoint refuses connections
    assert flatl2o.load_rule(REPO).fingerprint() == main.fingerprint()


def test_explicit_cache_dir(hf_env, tmp_path, monkeypatch):
    rule = _rule(seed=3)
    other = tmp_path / "elsewhere"
    _write_hub_cache(other, REPO, _checkpoint_files(rule, tmp_path), "c" * 40, "main")
    hf_env.set_offline(monkeypatch)
    assert flatl2o.load_rule(REPO, cache_dir=other).fingerprint() == rule.fingerprint()
    msg = _not_found(REPO)  # not in the default cache
    assert str(hf_env.cache) in msg


@pytest.fixture
def no_retry_wait(monkeypatch):
    """Skip the sleeps of huggingface_hub's exponential backoff (1 + 2 + 4 + 8 + 8 s) when it
    retries an unreachable Hub; the retries themselves still happen."""
    import time

    from huggingface_hub.utils import _http

    class NoSleep:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            pass

    monkeypatch.setattr(_http, "time", NoSleep())


def test_after_the_server_stops_the_cache_still_serves(
    fake_hub: FakeHub, hf_env, monkeypatch, no_retry_wait
):
    rule = _rule()
    _push(rule)
    _push(_rule(seed=9), "alice/never-downloaded")
    flatl2o.load_rule(REPO)
    fake_hub.stop()
    assert not fake_hub.running
    assert not [t for t in threading.enumerate() if "process_request" in t.name]

    assert flatl2o.load_rule(REPO, local_files_only=True).fingerprint() == rule.fingerprint()
    assert flatl2o.load_rule(REPO).fingerprint() == rule.fingerprint()  # connection refused
    msg = _not_found("alice/never-downloaded")
    assert f"could not reach {fake_hub.endpoint}" in msg and "ConnectError" in msg
    hf_env.set_offline(monkeypatch)
    assert flatl2o.load_rule(REPO).fingerprint() == rule.fingerprint()


def test_offline_mode_sends_no_request(fake_hub: FakeHub, hf_env, monkeypatch):
    _push(_rule())
    fake_hub.requests.clear()
    hf_env.set_offline(monkeypatch)
    msg = _not_found(REPO)
    assert "HF_HUB_OFFLINE is set" in msg
    assert fake_hub.requests == []
    msg = _not_found(REPO, local_files_only=True)
    assert "local_files_only=True" in msg


# ----------------------------------------------------------------------------- not found
def test_unknown_repo_id_offline_lists_everything_tried(hf_env, monkeypatch):
    hf_env.set_offline(monkeypatch)
    msg = _not_found("alice/no-such-rule")
    lines = msg.splitlines()
    assert lines[0] == "Could not find the update rule 'alice/no-such-rule'. Tried, in order:"
    where = str(Path("alice/no-such-rule").resolve())
    assert f"local folder {where!r}: does not exist" in lines[1]
    shipped = ", ".join(list_pretrained()) or "none"
    assert f"shipped checkpoints: no 'alice/no-such-rule' (shipped: {shipped})" in lines[2]
    assert "Hugging Face Hub repo 'alice/no-such-rule' at the default revision" in lines[3]
    assert "HF_HUB_OFFLINE" in lines[3] and str(hf_env.cache) in lines[3]
    assert lines[4].startswith("Fix: ")


@pytest.mark.parametrize("name", ["rnnprop-entorpy", "nope", "./runs/nope", "a/b/c"])
def test_a_name_that_is_no_repo_id_fails_at_once(fake_hub: FakeHub, hf_env, name):
    """Issue 15 item 7: neither a folder, nor shipped, nor ``owner/name``: one line, close
    matches and the shipped names, and the Hub is never asked (it used to be, with retries)."""
    msg = _not_found(name)
    assert len(msg.splitlines()) == 1, msg
    assert f"Could not find the update rule {name!r}" in msg
    assert "not a Hugging Face Hub repo id ('owner/name'), so the Hub was not asked" in msg
    assert f"Shipped checkpoints: {', '.join(list_pretrained()) or 'none'}." in msg
    if name == "rnnprop-entorpy" and "rnnprop-entropy" in list_pretrained():
        assert "Did you mean 'rnnprop-entropy'" in msg
    assert fake_hub.requests == []
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(CheckpointNotFoundError, match="so the Hub was not asked"):
        flatl2o.L2O(params, rule=name)
    assert fake_hub.requests == []


def test_a_mistyped_folder_suggests_its_neighbours(hf_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flatl2o.checkpoint.save_rule(_rule(), tmp_path / "runs" / "dm-entropy")
    msg = _not_found("./runs/dm-entorpy")
    assert "Did you mean './runs/dm-entropy'" in msg and len(msg.splitlines()) == 1


@pytest.fixture
def backoff_sleeps(monkeypatch) -> list[float]:
    """The sleeps of huggingface_hub's retry backoff (recorded, not slept)."""
    import time

    from huggingface_hub.utils import _http

    slept: list[float] = []

    class Recording:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)

    monkeypatch.setattr(_http, "time", Recording())
    return slept


def test_an_unreachable_hub_fails_in_one_attempt(hf_env, backoff_sleeps, caplog):
    """hf_env's endpoint is a closed local port: one attempt, no backoff, no retry warnings,
    and a message that says the Hub could not be reached (it used to retry five times)."""
    caplog.set_level("WARNING")
    msg = _not_found("alice/never-pushed")
    assert backoff_sleeps == []
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert not [r for r in caplog.records if "thrown while requesting" in r.getMessage()]
    hub_line = [line for line in msg.splitlines() if "Hugging Face Hub repo" in line]
    assert len(hub_line) == 1 and f"could not reach {constants.ENDPOINT}" in hub_line[0]
    # a cached copy is still served when the Hub is down (no probe, no retry either)
    main = _rule(seed=4)
    _write_hub_cache(hf_env.cache, REPO, _checkpoint_files(main, hf_env.home), "d" * 40, "main")
    assert flatl2o.load_rule(REPO).fingerprint() == main.fingerprint()
    assert backoff_sleeps == []


def test_a_missing_repo_costs_one_request(fake_hub: FakeHub, hf_env, backoff_sleeps):
    msg = _not_found("alice/missing")
    assert f"no such repo on {fake_hub.endpoint}" in msg
    assert len(fake_hub.requests) == 1 and backoff_sleeps == []


def test_not_cached_with_local_files_only(hf_env):
    msg = _not_found("bob/rule", local_files_only=True, revision="v1")
    assert "Hugging Face Hub repo 'bob/rule' at revision 'v1'" in msg
    assert "local_files_only=True" in msg and "Fix: " in msg


def test_nonexistent_repo_on_the_hub(fake_hub: FakeHub, hf_env):
    msg = _not_found("alice/missing")
    assert f"no such repo on {fake_hub.endpoint}" in msg
    assert "server said: Repository not found" in msg  # the Hub's X-Error-Message
    assert "token=" in msg and "Fix: " in msg
    assert fake_hub.requests_for("HEAD", "/alice/missing/resolve/main/config.json")


def test_nonexistent_revision_on_the_hub(fake_hub: FakeHub, hf_env):
    _push(_rule())
    msg = _not_found(REPO, revision="no-such-branch")
    assert "at revision 'no-such-branch'" in msg and "has no revision 'no-such-branch'" in msg


def test_hub_repo_that_is_not_a_checkpoint(fake_hub: FakeHub, hf_env, tmp_path):
    fake_hub.commit_files("alice/readme-only", {"README.md": b"# nothing here\n"})
    with pytest.raises(CheckpointError, match=r"'alice/readme-only'.*has no config\.json"):
        flatl2o.load_rule("alice/readme-only")
    files = _checkpoint_files(_rule(), tmp_path)
    fake_hub.commit_files("alice/no-weights", {CONFIG_NAME: files[CONFIG_NAME]})
    with pytest.raises(CheckpointError, match=r"has no model\.safetensors"):
        flatl2o.load_rule("alice/no-weights")


def test_corrupted_checkpoint_on_the_hub(fake_hub: FakeHub, hf_env, tmp_path):
    files = _checkpoint_files(_rule(), tmp_path)
    fake_hub.commit_files(
        "alice/truncated", {CONFIG_NAME: files[CONFIG_NAME], WEIGHTS_NAME: files[WEIGHTS_NAME][:-9]}
    )
    with pytest.raises(CheckpointError) as info:
        flatl2o.load_rule("alice/truncated")
    assert "models--alice--truncated" in str(info.value) and WEIGHTS_NAME in str(info.value)
    assert "truncated or corrupted" in str(info.value)

    bad = dict(_rule().state_dict())
    bad["readout.bias"] = bad["readout.bias"].double()
    fake_hub.commit_files(
        "alice/float64", {CONFIG_NAME: files[CONFIG_NAME], WEIGHTS_NAME: safetensors_bytes(bad)}
    )
    with pytest.raises(CheckpointError, match=r"'readout\.bias' has dtype torch\.float64"):
        flatl2o.load_rule("alice/float64")


def test_invalid_repo_id_and_paths(hf_env, tmp_path):
    msg = _not_found(str(tmp_path / "missing" / "folder"))
    assert "does not exist" in msg and "not a Hugging Face Hub repo id" in msg
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    msg = _not_found(a_file)
    assert "is a file; pass the folder that holds config.json" in msg


def test_fake_hub_stops_every_thread():
    before = set(threading.enumerate())
    with FakeHub() as hub:
        hub.create_repo("a/b")
        import urllib.request

        with urllib.request.urlopen(f"{hub.endpoint}/a/b/resolve/main/.gitattributes") as r:
            assert r.headers["X-Repo-Commit"] == hub.repos["a/b"].branches["main"]
            assert "X-Xet-Hash" not in r.headers
    assert set(threading.enumerate()) <= before


def test_cli_push_passes_token_revision_and_private(fake_hub: FakeHub, hf_env, tmp_path, capsys):
    from flatl2o.cli import main as cli_main

    rule = _rule()
    card = render_model_card(rule, title="mine", load_from="runs/mine")
    folder = flatl2o.checkpoint.save_rule(rule, tmp_path / "run", model_card=card)
    args = ["push", str(folder), "--repo-id", REPO]
    # no token anywhere (isolated HF home): the Hub refuses the write, one line, exit 2
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert REPO not in fake_hub.repos

    assert cli_main([*args, "--token", TOKEN, "--revision", "dev", "--private"]) == 0
    repo = fake_hub.repos[REPO]
    assert repo.private and "dev" in repo.branches
    assert (
        capsys.readouterr().out.strip()
        == f"{fake_hub.endpoint}/{REPO}/commit/{repo.branches['dev']}"
    )
    create = fake_hub.requests_for("POST", "/api/repos/create")[-1]
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    assert MODEL_CARD_NAME not in repo.commits[repo.branches["main"]]  # only "dev" got it
    assert flatl2o.load_rule(REPO, revision="dev").fingerprint() == rule.fingerprint()
    # the uploaded card's usage line loads the repo; the local folder is left as it was
    pushed = fake_hub.file(REPO, MODEL_CARD_NAME, revision="dev").decode()
    assert f'L2O.from_pretrained(model.parameters(), "{REPO}")' in pushed and "# mine" in pushed
    assert (folder / MODEL_CARD_NAME).read_text() == card


def test_retarget_fixes_cards_with_the_old_placeholder():
    from flatl2o.hub import retarget_model_card

    old = (
        "# PATH_OR_REPO_ID\n\n```python\n"
        'opt = flatl2o.L2O.from_pretrained(model.parameters(), "PATH_OR_REPO_ID")\n```\n'
    )
    new = retarget_model_card(old, "dm-entropy")
    assert "PATH_OR_REPO_ID" not in new
    assert new.startswith("# dm-entropy\n")
    assert 'from_pretrained(model.parameters(), "dm-entropy")' in new
    assert retarget_model_card("a custom card\n", "x") == "a custom card\n"


def test_retarget_edits_the_body_never_the_metadata():
    """A card whose YAML metadata quotes the usage line (or holds the old title as a comment)
    gets its body's snippet and title retargeted and its metadata left byte for byte."""
    from flatl2o.hub import retarget_model_card

    front = (
        "---\nlibrary_name: flatl2o\n# PATH_OR_REPO_ID\n"
        "usage: 'flatl2o.L2O.from_pretrained(model.parameters(), \"alice/old\")'\n---\n"
    )
    body = (
        "\n# PATH_OR_REPO_ID\n\n```python\n"
        'opt = flatl2o.L2O.from_pretrained(model.parameters(), "alice/old")\n```\n'
    )
    new = retarget_model_card(front + body, "bob/new")
    assert new == front + body.replace("PATH_OR_REPO_ID", "bob/new").replace("alice/old", "bob/new")
    assert ModelCard(new).data.to_dict() == ModelCard(front + body).data.to_dict()


# ----------------------------------------------------------------------------- audit fixes
def test_damaged_cache_copy_advises_force_download(fake_hub: FakeHub, hf_env):
    """``hf_hub_download`` re-links a deleted snapshot file to the same damaged blob: the
    advice must be ``force_download=True`` (which replaces the blob), and it must work."""
    rule = _rule()
    _push(rule)
    flatl2o.load_rule(REPO)
    sha = fake_hub.repos[REPO].branches["main"]
    snapshot = _repo_cache(hf_env.cache, REPO) / "snapshots" / sha / WEIGHTS_NAME
    blob = snapshot.resolve()
    with open(blob, "r+b") as f:
        f.truncate(100)
    for _ in range(2):  # the second time after deleting the snapshot link
        with pytest.raises(CheckpointError) as info:
            flatl2o.load_rule(REPO)
        msg = str(info.value)
        assert "truncated or corrupted" in msg and "Delete it" not in msg
        assert f"flatl2o.load_rule({REPO!r}, force_download=True)" in msg
        assert str(blob) in msg
        snapshot.unlink()
    assert flatl2o.load_rule(REPO, force_download=True).fingerprint() == rule.fingerprint()
    assert blob.read_bytes() == fake_hub.file(REPO, WEIGHTS_NAME)


def test_damaged_file_in_a_hand_made_cache(hf_env, tmp_path, monkeypatch):
    """The same advice for a cache in the documented layout, offline, with a revision."""
    files = _checkpoint_files(_rule(), tmp_path)
    files[CONFIG_NAME] = b"{not json"
    _write_hub_cache(hf_env.cache, REPO, files, "d" * 40, "v3")
    hf_env.set_offline(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        flatl2o.load_rule(REPO, revision="v3")
    msg = str(info.value)
    assert "not valid JSON" in msg and f"commit {'d' * 40}" in msg
    assert f"flatl2o.load_rule({REPO!r}, revision='v3', force_download=True)" in msg
    blob = _repo_cache(hf_env.cache, REPO) / "blobs" / git_blob_oid(b"{not json")
    assert str(blob) in msg


def test_a_broken_hub_checkpoint_keeps_its_own_advice(fake_hub: FakeHub, hf_env, tmp_path):
    """Files that do not match each other on the Hub: downloading again would not help."""
    files = _checkpoint_files(_rule(), tmp_path)
    other = _checkpoint_files(_rule("l2o-dm"), tmp_path)
    fake_hub.commit_files(
        "alice/mixed", {CONFIG_NAME: other[CONFIG_NAME], **{WEIGHTS_NAME: files[WEIGHTS_NAME]}}
    )
    with pytest.raises(CheckpointError, match="different checkpoints") as info:
        flatl2o.load_rule("alice/mixed")
    assert "force_download" not in str(info.value)


def test_push_folder_checks_the_source_folder(fake_hub: FakeHub, hf_env, tmp_path):
    from flatl2o.hub import push_folder_to_hub

    folder = flatl2o.checkpoint.save_rule(_rule(), tmp_path / "mine")
    (folder / WEIGHTS_NAME).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickled")
    with pytest.raises(CheckpointError) as info:
        push_folder_to_hub(folder, REPO, token=TOKEN)
    msg = str(info.value)
    assert str(folder / WEIGHTS_NAME) in msg and "Found pytorch_model.bin" in msg
    assert fake_hub.requests == []


def test_push_folder_refuses_a_model_card_that_is_not_utf8(fake_hub: FakeHub, hf_env, tmp_path):
    from flatl2o.hub import push_folder_to_hub

    folder = flatl2o.checkpoint.save_rule(_rule(), tmp_path / "mine")
    (folder / MODEL_CARD_NAME).write_bytes(b"\xff\xfe caf\xe9\n")
    with pytest.raises(CheckpointError, match="not UTF-8 text") as info:
        push_folder_to_hub(folder, REPO, token=TOKEN)
    assert str(folder / MODEL_CARD_NAME) in str(info.value)
    assert fake_hub.requests == []


def test_push_folder_expands_the_home_folder(fake_hub: FakeHub, hf_env, tmp_path, monkeypatch):
    from flatl2o.hub import push_folder_to_hub

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # without expanduser, ./~/ckpt lands here, not in the checkout
    rule = _rule()
    rule.save_pretrained("~/ckpt")
    assert (tmp_path / "ckpt" / CONFIG_NAME).is_file()
    push_folder_to_hub("~/ckpt", REPO, token=TOKEN)
    assert flatl2o.load_rule(REPO).fingerprint() == rule.fingerprint()


def test_uploads_never_include_temporary_files(fake_hub: FakeHub, hf_env, tmp_path):
    """An interrupted save's ``.model.safetensors.*.tmp`` (or anything else) is not sent."""
    from flatl2o.hub.upload import _upload

    folder = flatl2o.checkpoint.save_rule(_rule(), tmp_path / "run")
    (folder / ".model.safetensors.host-1-abcdefgh.tmp").write_bytes(b"x" * 1000)
    (folder / "notes.txt").write_text("private")
    _upload(
        folder, REPO, commit_message="m", private=None, token=TOKEN, revision=None, create_pr=None
    )
    files = set(fake_hub.repos[REPO].commits[fake_hub.repos[REPO].branches["main"]])
    assert files == {".gitattributes", CONFIG_NAME, WEIGHTS_NAME}


@pytest.mark.parametrize("value", [None, float("nan")])
def test_model_card_with_a_missing_metric(fake_hub: FakeHub, hf_env, value):
    rule = _rule()
    metrics = {"test_accuracy@100": 0.9, "test_loss@1000": value}
    card = render_model_card(rule, metrics=metrics)
    expected = "n/a" if value is None else "nan"
    assert f"| test_loss@1000 | {expected} |" in card and "| test_accuracy@100 | 0.9 |" in card
    _push(rule, metrics=metrics)  # metrics.json stores non-finite values as null
    assert "| test_loss@1000 |" in fake_hub.file(REPO, MODEL_CARD_NAME).decode()


@pytest.mark.parametrize("source", ["shipped", "folder"])
def test_hub_only_options_for_a_local_source(hf_env, tmp_path, monkeypatch, source):
    if source == "shipped":
        name = list_pretrained()[0]
    else:
        monkeypatch.chdir(tmp_path)
        flatl2o.checkpoint.save_rule(_rule(), tmp_path / "alice" / "rule")
        name = "alice/rule"  # a local folder that shadows a repo id
    expected = flatl2o.load_rule(name).fingerprint()
    with pytest.raises(ValueError, match=r"revision='v2' applies only to Hugging Face Hub"):
        flatl2o.load_rule(name, revision="v2")
    with pytest.raises(ValueError, match=r"force_download=True applies only"):
        flatl2o.load_rule(name, force_download=True)
    with pytest.warns(UserWarning, match="cache_dir=.* only applies to Hugging Face Hub repos"):
        assert flatl2o.load_rule(name, cache_dir=tmp_path).fingerprint() == expected
    # options that only restrict or authorize network access are satisfied by a local source
    loaded = flatl2o.load_rule(name, token="hf_x", local_files_only=True)
    assert loaded.fingerprint() == expected


def _cli_push_error(folder: Path, capsys) -> str:
    from flatl2o.cli import main as cli_main

    assert cli_main(["push", str(folder), "--repo-id", REPO, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("flatl2o push: error: ")
    return err


def test_cli_push_offline_unreachable_and_bad_card(
    hf_env, tmp_path, capsys, monkeypatch, no_retry_wait
):
    folder = flatl2o.checkpoint.save_rule(_rule(), tmp_path / "run")
    # hf_env's endpoint refuses connections: after huggingface_hub's retries
    err = _cli_push_error(folder, capsys)
    assert f"cannot reach the Hub at {constants.ENDPOINT}" in err and "HF_ENDPOINT" in err
    hf_env.set_offline(monkeypatch)
    err = _cli_push_error(folder, capsys)
    assert "HF_HUB_OFFLINE is set" in err
    (folder / MODEL_CARD_NAME).write_bytes(b"\xff\xfe caf\xe9\n")
    err = _cli_push_error(folder, capsys)
    assert str(folder / MODEL_CARD_NAME) in err and "not UTF-8" in err


# ----------------------------------------------------------------- no stale files on the Hub
def _head_files(hub: FakeHub, repo_id: str = REPO) -> dict[str, bytes]:
    repo = hub.repos[repo_id]
    return repo.commits[repo.branches["main"]]


def test_cli_push_after_saving_new_weights_publishes_no_stale_file(
    fake_hub: FakeHub, hf_env, tmp_path, capsys
):
    """Issue 15 item 9: a folder that held a meta-training export (card, metrics, recipe,
    log) gets new weights through save_pretrained; ``flatl2o push`` used to publish the old
    card and metrics beside them."""
    from flatl2o.cli import main as cli_main

    old, new = _rule(seed=1), _rule(seed=2)
    card = render_model_card(old, title="old", metrics={"test_loss": 0.1})
    folder = flatl2o.checkpoint.save_rule(
        old,
        tmp_path / "ckpt",
        model_card=card,
        files={"metrics.json": '{"test_loss": 0.1}\n', "recipe.toml": "[rule]\n"},
    )
    (folder / "log.jsonl").write_text('{"iteration": 1}\n')
    push = ["push", str(folder), "--repo-id", REPO, "--token", TOKEN]
    assert cli_main(push) == 0
    assert {"metrics.json", "recipe.toml", "log.jsonl", MODEL_CARD_NAME} <= set(
        _head_files(fake_hub)
    )

    new.save_pretrained(str(folder))
    capsys.readouterr()
    assert cli_main(push) == 0, capsys.readouterr().err
    assert set(_head_files(fake_hub)) == {".gitattributes", CONFIG_NAME, WEIGHTS_NAME}
    assert _head_files(fake_hub)[WEIGHTS_NAME] == (folder / WEIGHTS_NAME).read_bytes()
    assert flatl2o.load_rule(REPO).fingerprint() == new.fingerprint()


def test_push_deletes_the_repos_copies_of_files_the_folder_lacks(
    fake_hub: FakeHub, hf_env, tmp_path
):
    from flatl2o.hub import push_folder_to_hub

    rule, newer = _rule(seed=1), _rule(seed=2)
    card_a, card_b = render_model_card(rule, title="a"), render_model_card(newer, title="b")
    first = flatl2o.checkpoint.save_rule(
        rule, tmp_path / "a", model_card=card_a, files={"metrics.json": "{}\n"}
    )
    push_folder_to_hub(first, REPO, token=TOKEN)
    fake_hub.commit_files(REPO, {"notes.md": b"the owner's own file\n"})
    second = flatl2o.checkpoint.save_rule(newer, tmp_path / "b", model_card=card_b)
    push_folder_to_hub(second, REPO, token=TOKEN)
    files = _head_files(fake_hub)
    assert "metrics.json" not in files and b"\n# b\n" in files[MODEL_CARD_NAME]
    assert "notes.md" in files  # not a checkpoint file: left alone


# ------------------------------------------------------------------ module size (issue 18)
#: The persistence layer's modules, each one job (docs/architecture.md).
_PERSISTENCE = [Path(flatl2o.checkpoint.__file__), *Path(flatl2o.hub.__file__).parent.glob("*.py")]


@pytest.mark.parametrize("path", _PERSISTENCE, ids=lambda p: p.name)
def test_persistence_modules_stay_small(path: Path):
    """No persistence module over 600 lines (``flatl2o/hub.py`` was 722, doing five jobs)."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"{path} has {lines} lines; split it by job"
