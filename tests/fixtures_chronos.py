"""Chronos fixtures: tiny local checkpoints, an offline Hub, an empty model cache.

Test modules use them with ``pytest_plugins = ("tests.fixtures_chronos",)``; the builders live in
:mod:`tests.chronos_models`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chronos_models import build_bolt, build_chronos2


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No Hub traffic: ``HF_HUB_OFFLINE=1`` for subprocesses and for huggingface_hub's constant
    (read at import, so set on the module too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    yield


@pytest.fixture
def fresh_models() -> Iterator[None]:
    """An empty process model cache before and after the test."""
    from runtime.models import clear_cache

    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="session")
def bolt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Chronos-Bolt checkpoint (context 256, horizon 16, patches of 16)."""
    return build_bolt(tmp_path_factory.mktemp("bolt") / "chronos-bolt-test")


@pytest.fixture(scope="session")
def chronos2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Chronos-2 checkpoint (context 256, horizon 32, patches of 16)."""
    return build_chronos2(tmp_path_factory.mktemp("chronos2") / "chronos-2-test")
