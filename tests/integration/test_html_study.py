"""The optimisation page, written against the ``trials``/``folds`` tables of
runtime.research.store (rows made by hand, stored with its DuckDBTrialStore), read back by
``python -m runtime.reporting --study`` and opened in a real headless Chromium: no JavaScript
errors, every plot drawn, the parameter surface a heatmap over the two parameters."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from runtime.reporting.__main__ import main as report_main
from runtime.research.store import FOLD_COLUMNS, TRIAL_COLUMNS, DuckDBTrialStore
from tests.chromium import WAIT_FOR_PLOTS_JS, Chromium, colour_stats


def make_study(db: Path, study: str) -> None:
    store = DuckDBTrialStore(db)
    store.open()
    try:
        for fold in range(3):
            best: dict[str, Any] | None = None
            t = 0
            for fast in (5, 10, 20):
                for slow in (40, 80):
                    row: dict[str, Any] = {c.name: None for c in TRIAL_COLUMNS}
                    objective = fast / 10 - slow / 100 + 0.1 * fold
                    row.update(
                        study_id=study,
                        fold=fold,
                        trial=t,
                        session_id=f"{study}-f{fold}-t{t}",
                        status="complete",
                        params=json.dumps({"fast": fast, "slow": slow}),
                        metric="sharpe",
                        objective=objective,
                        train_start=datetime(2000 + fold, 1, 1, tzinfo=UTC),
                        train_end=datetime(2002 + fold, 1, 1, tzinfo=UTC),
                        test_end=datetime(2002 + fold, 7, 1, tzinfo=UTC),
                        is_sharpe=objective,
                        oos_sharpe=objective * 0.4,
                        finished_at=datetime.now(UTC),
                    )
                    store.add_trial(row)
                    if best is None or objective > best["objective"]:
                        best = row
                    t += 1
            assert best is not None
            frow: dict[str, Any] = {c.name: None for c in FOLD_COLUMNS}
            frow.update(
                study_id=study,
                fold=fold,
                metric="sharpe",
                complete=True,
                trials=t,
                best_trial=best["trial"],
                best_params=best["params"],
                best_session_id=best["session_id"],
                objective=best["objective"],
                is_sharpe=best["is_sharpe"],
                oos_sharpe=best["oos_sharpe"],
                train_start=best["train_start"],
                train_end=best["train_end"],
                test_end=best["test_end"],
                finished_at=datetime.now(UTC),
            )
            store.add_fold(frow)
    finally:
        store.close()


def test_study_page_in_chromium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "fmel.duckdb"
    make_study(db, "study-1")
    out = tmp_path / "study.html"
    assert report_main(["--db", str(db), "--study", "study-1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert report_main(["--db", str(db), "--study", "nope", "--out", str(out)]) == 2
    text = out.read_text(encoding="utf-8")
    assert text.count("{&quot;fast&quot;: 20, &quot;slow&quot;: 40}") == 3  # chosen per fold

    async def check(chromium: Chromium) -> tuple[list[str], Any, list[tuple[int, float]]]:
        ws, page = await chromium.open(out.as_uri(), width=1200, height=900)
        try:
            plots = await page.evaluate(WAIT_FOR_PLOTS_JS)
            shots = [
                colour_stats(
                    await page.screenshot(
                        {"x": p["x"], "y": p["y"], "width": p["width"], "height": p["height"]}
                    )
                )
                for p in plots or []
            ]
            return page.errors, plots, shots
        finally:
            await ws.close()

    with Chromium(tmp_path / "chromium").running() as chromium:
        errors, plots, shots = asyncio.run(check(chromium))
    assert errors == []
    assert plots is not None
    assert [(p["id"], p["type"]) for p in plots] == [
        ("folds-chart", "bar"),
        ("surface-chart", "heatmap"),
        ("is-oos-chart", "scatter"),
    ]
    for p, (colours, ink) in zip(plots, shots):
        assert colours > 20 and ink > 0.02, (p["id"], colours, ink)
