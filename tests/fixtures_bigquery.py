"""Fixtures that run bqemulator for tests (see ``tests/bqemu_harness.py`` and NOTES.md).

Use with ``pytest_plugins = ("tests.fixtures_bigquery",)``:

    bq_emulator: one emulator for the whole test session (ephemeral storage; use
        :func:`tests.bqemu_harness.unique_dataset` per test).
    bq_emulator_factory: emulators owned by one test (kill/restart; persistent storage by
        default, so a restart keeps the data).

Every process is ended by process group at teardown, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.bqemu_harness import BigQueryEmulator


@pytest.fixture(scope="session")
def bq_emulator() -> Iterator[BigQueryEmulator]:
    """One running emulator for the session (ephemeral storage; use :func:`unique_dataset`)."""
    emu = BigQueryEmulator()
    try:
        emu.start()
        yield emu
    finally:
        emu.close()


@pytest.fixture
def bq_emulator_factory() -> Iterator[Callable[..., BigQueryEmulator]]:
    """Make emulators owned by one test: ``make(start=True, persistent=True)``."""
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
