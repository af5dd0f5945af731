"""``MODE=optimize``: a signal while the study's store opens ends the start-up with 128 + N,
even when DuckDB, checking for signals inside its query, turns the raised start-up interruption
into its own ``RuntimeError: Query interrupted`` (an attack's finding: exit 1 with a traceback).
In-process (``run_optimize`` installs its handlers on this main thread and restores them)."""

from __future__ import annotations

import os
import signal
import threading
from io import StringIO
from pathlib import Path
from typing import Any

import duckdb
import pytest

import runtime.research.cli as cli
from runtime.config import load_config


def test_a_signal_inside_the_stores_first_query_stops_the_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = cli.make_store
    seen: list[BaseException] = []

    def store_hit_while_opening(**kw: Any) -> Any:
        store = real(**kw)
        open_store = store.open

        def open_() -> None:
            con = duckdb.connect()
            # from another thread, so the handler runs inside the query (at DuckDB's check)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                con.execute("SELECT count(*) FROM range(20000000000)").fetchall()
            except BaseException as e:
                seen.append(e)
                raise
            open_store()

        store.open = open_
        return store

    monkeypatch.setattr(cli, "make_store", store_hit_while_opening)
    env = {
        "MODE": "optimize",
        "OPTIMIZE_SPACE": '{"fast": [5, 10]}',
        "OPTIMIZE_WORKERS": "1",
        "FMEL_LOCAL_PATH": str(tmp_path / "study.duckdb"),
        "FMEL_SPILL_DIR": str(tmp_path / "spill"),
        "PROGRESS": "off",
    }
    before = signal.getsignal(signal.SIGINT)
    rc = cli.run_optimize(load_config(env), session_id="s", out=StringIO())
    assert rc == 128 + signal.SIGINT
    assert seen, "the query was not interrupted"
    assert signal.getsignal(signal.SIGINT) is before
    assert any("during start-up" in r.getMessage() for r in caplog.records)
