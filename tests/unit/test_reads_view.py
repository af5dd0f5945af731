"""The DuckDB ``decision_reads`` view (``sql/duckdb/decision_reads_view.sql``): the same rows as
the lateral-join form it replaced, and usable over wide decisions within the store's memory."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from analyzers.schema import Access, DataAccess, DecisionRecord
from analyzers.sinks.duckdb import LocalDuckDBSink
from tests.unit.test_writer import _wide, record

# The view's earlier definition: unnests as lateral joins in FROM.
LATERAL = """
SELECT d.decision_id, d.session_id, d.agent_id, d.decision_point, d.bar_time, d.stage, d.action,
       da.symbol, ap.seq, ap.field, ap."index", ap.size, ap.bar_index, ap.data_hash, ap.value,
       ap.text_value, ap.lookahead, ap.bar_time AS read_bar_time
FROM decisions d, UNNEST(d.data_accessed) AS t(da), UNNEST(da.access_patterns) AS u(ap)
"""


def _odd(i: int) -> DecisionRecord:
    """Decisions of every shape the view meets: no reads, a symbol without reads, text values,
    NULL values, look-ahead reads, windows, repeated symbols."""
    h = f"{i:032x}"
    shapes = [
        (),
        (DataAccess("A", h, (), ()),),
        (
            DataAccess(
                "A",
                h,
                ("close", "name"),
                (
                    Access(0, "close", -3, 4, i, h, None, None, False),
                    Access(1, "name", 0, 1, i, None, None, "x y", False),
                ),
            ),
            DataAccess(
                "B", None, ("close",), (Access(2, "close", 1, 1, i + 1, h, 2.5, None, True),)
            ),
            DataAccess("A", h, ("open",), (Access(3, "open", 0, 1, i, h, 1.0, None, False),)),
        ),
    ]
    return record(i)._replace(data_accessed=shapes[i % 3], reads=4)


def test_the_view_gives_the_rows_of_the_lateral_form(tmp_path: Path) -> None:
    sink = LocalDuckDBSink(tmp_path / "v.duckdb")
    sink.open()
    sink.write_records([_odd(i) for i in range(30)] + [_wide(100 + i, 50) for i in range(3)])
    con = sink._con
    got = con.execute("SELECT * FROM decision_reads").fetchall()
    want = con.execute(LATERAL).fetchall()
    assert sorted(got, key=repr) == sorted(want, key=repr)
    assert len(got) == 10 * 4 + 3 * 100
    cols = [d[0] for d in con.execute("SELECT * FROM decision_reads LIMIT 0").description]
    assert cols == [d[0] for d in con.execute(LATERAL + " LIMIT 0").description]
    sink.close()


@pytest.mark.parametrize("form", ["view", "lateral (control)"])
def test_the_view_reads_wide_decisions_within_the_stores_memory(tmp_path: Path, form: str) -> None:
    """Eight decisions of 10,000 reads at 128 MiB: the view counts them; the lateral form
    sizes its buffers by the longest list and runs out of memory (fresh-context attack: a
    count over such a store failed at the store's 512 MiB, or took 19 GB without a limit)."""
    sink = LocalDuckDBSink(tmp_path / "w.duckdb", memory_limit_mb=128)
    sink.open()
    sink.write_records([_wide(i, 5000) for i in range(8)])
    if form == "view":
        assert sink._con.execute("SELECT count(*) FROM decision_reads").fetchall() == [(80_000,)]
        got = sink._con.execute("SELECT sum(value) FROM decision_reads").fetchall()
        assert got == [(8 * sum(199.0 + 2 * s for s in range(5000)),)]
    else:
        with pytest.raises(duckdb.OutOfMemoryException):
            sink._con.execute(f"SELECT count(*) FROM ({LATERAL})").fetchall()
    sink.close()
