"""The paper run's CSV backfill when pyarrow cancels a read because of a signal.

pyarrow's CSV reader checks for SIGINT/SIGTERM while it reads (when a Python handler is
installed), cancels the read and hands the signal on to the handler. The runner's handler asks
for the stop on a relay thread (``core.signals``), so the subscriber's ``stop_requested`` may
still be False when ``ArrowCancelled`` arrives: a cancel that carries a signal number is that
stop, any other is an error. CI caught the race (a SIGTERM during the backfill ended the run
with exit 1, "uncaught ArrowCancelled")."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import runtime.live as live
from runtime.config import load_config


class FakeSubscriber:
    """What start_live_input asks of the subscriber, without Pub/Sub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stop_requested = False
        self.started: dict[str, Any] | None = None
        self.closed = False
        self.resume_path: Path | None = None
        self.drain_timeout_s = 1.0

    def set_bar_size(self, *args: Any) -> None:
        pass

    def start(self, backfill: dict[str, Any]) -> None:
        self.started = backfill

    def discover_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.closed = True


def _config(tmp_path: Path) -> Any:
    data = tmp_path / "data"
    data.mkdir()
    for sym in ("AAA", "BBB"):
        (data / f"{sym}.csv").write_text(
            "Date,Open,High,Low,Close,Volume\n2020-01-02,1,2,0.5,1.5,100\n"
        )
    return load_config(
        {
            "SYMBOLS": "AAA,BBB",
            "MODE": "paper",
            "DATA_DIR": str(data),
            "PUBSUB_TOPIC": "bars",
            "GOOGLE_CLOUD_PROJECT": "p",
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",
            "PUBSUB_BACKFILL_BARS": "10",
            "FMEL_SPILL_DIR": str(tmp_path / "spill"),
        }
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_read_cancelled_by_a_signal_ends_the_backfill_before_the_stop_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    config = _config(tmp_path)
    reads: list[str] = []

    def cancelled(fc: Any, n: int) -> Any:
        reads.append(fc.symbol)
        raise pa.ArrowCancelled(f"Operation cancelled. Detail: received signal {signum}", signum)

    monkeypatch.setattr(live, "PubSubBarSubscriber", FakeSubscriber)
    monkeypatch.setattr(live, "backfill_bars", cancelled)
    sub = live.start_live_input(config)
    assert reads == ["AAA"]  # the backfill stopped at the cancelled file
    assert isinstance(sub, FakeSubscriber) and sub.started == {} and not sub.closed


def test_a_cancel_without_a_signal_or_a_stop_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)

    def cancelled(fc: Any, n: int) -> Any:
        raise pa.ArrowCancelled("Operation cancelled")

    monkeypatch.setattr(live, "PubSubBarSubscriber", FakeSubscriber)
    monkeypatch.setattr(live, "backfill_bars", cancelled)
    with pytest.raises(pa.ArrowCancelled):
        live.start_live_input(config)
