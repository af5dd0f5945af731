"""Shared fixtures: repository paths and a helper that runs ``runner.py`` as a subprocess.

Every fixture is defined here (emulators, fake servers, tiny models); heavy imports happen inside
the fixtures, so the unit tests stay fast. The servers and builders themselves live in role-named
modules beside this file (``bqemu_harness.py``, ``chronos_models.py``, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from tests.bqemu_harness import BigQueryEmulator
    from tests.pubsub_emulator import PubSubEmulator
    from tests.secretmanager_server import SecretManagerServer

# Property tests check behaviour, not speed (timings belong in benchmarks/): no per-example
# deadline and no too-slow health check, which only fail on a loaded machine. Tests that set
# their own settings keep them.
settings.register_profile(
    "repo", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("repo")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
TEST_DATA = REPO / "tests" / "data"

# Variables of ours that must not leak from the developer's shell into subprocess runs.
_OURS = (
    "MODE",
    "SYMBOLS",
    "AGENT",
    "AGENT_PARAMS",
    "AGENT_ID",
    "CASH",
    "COMMISSION",
    "BROKER",
    "PROGRESS",
    "DATA_DIR",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HEALTH_PORT",
    "GOOGLE_CLOUD_PROJECT",
    "PROJECT_ID",
    "BIGQUERY_EMULATOR_HOST",
    "PUBSUB_EMULATOR_HOST",
)
_PREFIXES = (
    "FMEL_",
    "ALPACA_",
    "APCA_",
    "CSV_",
    "RISK_",
    "CHRONOS_",
    "BACKTEST_",
    "PUBSUB_",
    "SHUTDOWN_",
    "INGEST_",
    "OPTIMIZE_",
    "WALK_FORWARD",
    "RAY_",
)


# The disk cache of CSV bars' hashes (core.bar_hash_cache): off for the whole suite, in this
# process and in the runs it starts; the tests of the cache give it a folder of their own.
_HASH_CACHE = "FMEL_HASH_CACHE_DIR"
os.environ[_HASH_CACHE] = "off"


def _hash_cache_off_by_default() -> None:
    """Configs built in-process (``load_config({...})``) hand their ``FMEL_HASH_CACHE_DIR``
    to processes this one spawns (a study's pool and Ray workers), where no fixture reaches:
    unset, it means ``off`` here, not the user's cache folder."""
    from analyzers.config import FMELConfig

    post_init = FMELConfig.__post_init__

    def off_by_default(self: FMELConfig) -> None:
        if self.hash_cache_dir == "":
            object.__setattr__(self, "hash_cache_dir", "off")
        post_init(self)

    FMELConfig.__post_init__ = off_by_default  # type: ignore[method-assign]


_hash_cache_off_by_default()


@pytest.fixture(autouse=True)
def _bar_hash_cache_off(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A runner built in-process configures the cache from its own settings (their default:
    the user's cache folder): here a folder of the test session's instead. Every test starts
    and ends with the cache off."""
    from core import bar_hash_cache

    monkeypatch.setattr(
        bar_hash_cache, "default_folder", lambda: tmp_path_factory.getbasetemp() / "bar-hashes"
    )
    bar_hash_cache.configure("off")
    yield
    bar_hash_cache.configure("off")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any of our settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _OURS and not k.startswith(_PREFIXES)}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("PROGRESS", "off")
    env[_HASH_CACHE] = os.environ[_HASH_CACHE]  # tests never write the user's cache folder
    env.update(extra or {})
    return env


def run_runner(
    cwd: Path,
    extra: Mapping[str, str] | None = None,
    timeout_s: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``python runner.py`` in ``cwd`` with a clean environment plus ``extra``."""
    return subprocess.run(
        [sys.executable, str(REPO / "runner.py")],
        cwd=cwd,
        env=clean_env(extra),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def sigterm_when_ready(
    args: list[str],
    cwd: Path,
    extra: Mapping[str, str],
    ready: Callable[[], bool],
    *,
    settle_s: float = 0.0,
    ready_timeout_s: float = 120.0,
) -> tuple[int, str, float]:
    """Start ``python *args`` in ``cwd`` (clean environment plus ``extra``), send it SIGTERM
    once ``ready()`` is true (and ``settle_s`` more seconds), wait for its end.

    Returns:
        ``(exit code, stderr, seconds from the signal to the exit)``. Fails the test when the
        process ends before it is ready, never gets ready, or outlives the signal by 60 s (it
        is then killed).
    """
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=clean_env(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"ended before it was ready: {proc.communicate()[1][-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready within {ready_timeout_s:g} s")
            time.sleep(0.05)
        time.sleep(settle_s)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        return proc.returncode, stderr, time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory for a run (its fmel.duckdb and spill folder land here)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its folder: ``tests/integration`` -> ``integration``, ``tests/e2e`` ->
    ``e2e`` (``-m "not integration and not e2e"`` selects the unit tests)."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("integration", "e2e"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


# -- BigQuery emulator (bqemulator in its own venv, see tests/bqemu_harness.py) ----------------


@pytest.fixture(scope="session")
def bq_emulator() -> Iterator[BigQueryEmulator]:
    """One running emulator for the session (ephemeral storage; use
    :func:`tests.bqemu_harness.unique_dataset` per test). Ended by process group at teardown."""
    from tests.bqemu_harness import BigQueryEmulator

    emu = BigQueryEmulator()
    try:
        emu.start()
        yield emu
    finally:
        emu.close()


@pytest.fixture
def bq_emulator_factory() -> Iterator[Callable[..., BigQueryEmulator]]:
    """Make emulators owned by one test: ``make(start=True, persistent=True)`` (kill/restart;
    persistent storage by default, so a restart keeps the data)."""
    from tests.bqemu_harness import BigQueryEmulator

    made: list[BigQueryEmulator] = []

    def make(*, start: bool = True, persistent: bool = True) -> BigQueryEmulator:
        emu = BigQueryEmulator(persistent=persistent)
        made.append(emu)
        if start:
            emu.start()
        return emu

    try:
        yield make
    finally:
        for emu in made:
            emu.close()


# -- Chronos: tiny local checkpoints, an offline Hub, an empty model cache ----------------------


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
    from runtime.models.chronos import clear_cache

    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="session")
def bolt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Chronos-Bolt checkpoint (context 256, horizon 16, patches of 16)."""
    from tests.chronos_models import build_bolt

    return build_bolt(tmp_path_factory.mktemp("bolt") / "chronos-bolt-test")


@pytest.fixture(scope="session")
def chronos2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Chronos-2 checkpoint (context 256, horizon 32, patches of 16)."""
    from tests.chronos_models import build_chronos2

    return build_chronos2(tmp_path_factory.mktemp("chronos2") / "chronos-2-test")


# -- Secret Manager (a local server speaking its REST API, see tests/secretmanager_server.py) ---


@pytest.fixture(name="sm")
def sm_fixture() -> Iterator[SecretManagerServer]:
    """Fixture ``sm``: a started :class:`SecretManagerServer`, stopped after the test."""
    from tests.secretmanager_server import SecretManagerServer

    server = SecretManagerServer().start()
    try:
        yield server
    finally:
        server.stop()


# -- Pub/Sub emulator (the real one: tests/pubsub_emulator.py, docs/field-notes.md) --------


@pytest.fixture(scope="module")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """A running emulator shared by the tests of one module (use unique topic names)."""
    from tests.pubsub_emulator import PubSubEmulator

    emu = PubSubEmulator()
    try:
        emu.start()
        yield emu
    finally:
        emu.close()


@pytest.fixture
def emulator_factory() -> Iterator[Callable[[], PubSubEmulator]]:
    """Start emulators owned by one test (for tests that kill/restart them)."""
    from tests.pubsub_emulator import PubSubEmulator

    started: list[PubSubEmulator] = []

    def make() -> PubSubEmulator:
        emu = PubSubEmulator()
        started.append(emu)
        emu.start()
        return emu

    try:
        yield make
    finally:
        for emu in started:
            emu.close()
