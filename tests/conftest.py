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
