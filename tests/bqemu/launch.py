"""Start bqemulator offline: ``<bqemu-venv>/bin/python tests/bqemu/launch.py start ...``.

Runs inside the emulator's own venv (see ``setup.sh``), never the project's. bqemulator 1.4.0
installs DuckDB's spatial extension at start and refuses to run without it; this machine has no
network but the package registries, so the loader is replaced with a no-op first (GEOGRAPHY is
then unavailable; nothing here uses it). Every other argument goes to bqemulator's own CLI.
"""

from __future__ import annotations

import sys

from bqemulator.cli import main
from bqemulator.storage.engine import DuckDBEngine


def _no_spatial(self: DuckDBEngine) -> None:
    return None


DuckDBEngine._load_spatial = _no_spatial  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "bqemulator"
    sys.exit(main())
