"""Shared pytest fixtures; each block is self-contained (add new fixtures in their own block)."""

from __future__ import annotations

# ---- BEGIN fake Hugging Face Hub fixtures (owner: hub/checkpoint tests) ----------------------
from collections.abc import Iterator

import pytest
from hub_server import FakeHub, HFEnv, isolate_hf


@pytest.fixture
def hf_env(tmp_path, monkeypatch) -> HFEnv:
    """An isolated Hugging Face home/cache/token; the endpoint refuses connections (no Hub)."""
    return isolate_hf(monkeypatch, tmp_path)


@pytest.fixture
def fake_hub(hf_env: HFEnv, monkeypatch) -> Iterator[FakeHub]:
    """A loopback Hub emulation (tests/hub_server.py) that huggingface_hub is pointed at."""
    hub = FakeHub().start()
    try:
        hf_env.set_endpoint(monkeypatch, hub.endpoint)
        yield hub
    finally:
        hub.stop()
        assert not hub.running, "the fake Hub's serving thread did not stop"
        from huggingface_hub.utils import close_session

        close_session()


# ---- END fake Hugging Face Hub fixtures -----------------------------------------------------


# ---- BEGIN slow-test opt-in (full recipe reruns) ---------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- END slow-test opt-in ----------------------------------------------------------------------
