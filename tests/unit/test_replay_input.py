"""The replay publisher refuses, before publishing, input the live feed would refuse."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from feeds import replay

HEADER = "Date,Open,High,Low,Close,Volume\n"


def _csv(tmp_path: Path, stamps: list[str]) -> Path:
    path = tmp_path / "ticks.csv"
    rows = "".join(f"{t},10,11,9,10.5,100\n" for t in stamps)
    path.write_text(HEADER + rows)
    return path


def test_bar_times_on_whole_milliseconds_load(tmp_path: Path) -> None:
    path = _csv(tmp_path, ["2024-01-02 09:30:00.001", "2024-01-02 09:30:00.002"])
    args = replay.build_parser().parse_args(["--topic", "bars", "--csv", f"{path}:X"])
    [bars] = replay.load_sources(args)
    assert len(bars) == 2


def test_a_bar_time_under_a_millisecond_is_refused_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the live feed refuses such bars (bad_timestamp), so a replay of them published messages
    # every subscriber skipped; now nothing is published and the file is named (the CSV reader
    # itself refuses only bars under a millisecond apart: these are 1.5 and 1.2 ms apart)
    path = _csv(
        tmp_path,
        ["2024-01-02 09:30:00.000", "2024-01-02 09:30:00.0015", "2024-01-02 09:30:00.0027"],
    )
    with caplog.at_level(logging.ERROR):
        # no emulator or project is reachable: a refusal must come before any publishing
        code = replay.main(
            ["--topic", "bars", "--project", "p", "--csv", f"{path}:X"],
            emulator_host="127.0.0.1:1",
        )
    assert code == 2
    text = caplog.text
    assert "2 bar time(s) not on a whole millisecond" in text
    assert "2024-01-02T09:30:00.001500" in text and "(bar 2)" in text
    assert str(path) in text
