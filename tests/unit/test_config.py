"""Configuration: defaults, typed values, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analyzers.config import FMELConfig
from core.errors import ConfigError
from core.settings import parse
from runtime.config import DEFAULT_SYMBOLS, SETTINGS, find_csv, load_config
from tests.conftest import DATA


def test_defaults_run_a_backtest_on_bundled_data() -> None:
    cfg = load_config({})
    assert cfg.run.mode == "backtest"
    assert cfg.run.symbols == DEFAULT_SYMBOLS
    assert [f.path for f in cfg.csv_feeds] == [DATA / f"{s}.csv" for s in DEFAULT_SYMBOLS]
    assert cfg.fmel.sink == "local" and cfg.fmel.local_path == Path("fmel.duckdb")
    assert cfg.run.broker == "sim" and cfg.alpaca is None and cfg.pubsub is None


def test_typed_values() -> None:
    cfg = load_config(
        {
            "SYMBOLS": " GOOG , SP500 ",
            "CASH": "2500.5",
            "COMMISSION": "0",
            "AGENT_PARAMS": '{"fast": 5, "slow": 20}',
            "FMEL_BATCH_SIZE": "7",
            "FMEL_STRICT_LOOKAHEAD": "yes",
            "BACKTEST_START": "2010-01-01",
        }
    )
    assert cfg.run.symbols == ("GOOG", "SP500")
    assert cfg.run.cash_usd == 2500.5 and cfg.run.commission == 0.0
    assert dict(cfg.run.agent_params) == {"fast": 5, "slow": 20}
    assert cfg.fmel.batch_size == 7 and cfg.fmel.strict_lookahead is True
    assert cfg.csv_feeds[0].start is not None and cfg.csv_feeds[0].start.year == 2010


def test_the_local_store_is_written_a_row_group_at_a_time() -> None:
    """Unset, FMEL_BATCH_SIZE is one row group of the local store (the writes DuckDB puts
    straight into the file: tests/unit/test_writer.py), and 10 for BigQuery."""
    from analyzers.config import LOCAL_BATCH_SIZE
    from analyzers.sinks import duckdb as store

    assert LOCAL_BATCH_SIZE == store.ROW_GROUP_SIZE
    assert load_config({}).fmel.batch_size == LOCAL_BATCH_SIZE
    env = {"FMEL_SINK": "bigquery", "GOOGLE_CLOUD_PROJECT": "p", "FMEL_DATASET": "d"}
    assert load_config(env).fmel.batch_size == 10
    assert load_config({**env, "FMEL_SINK": "local", "FMEL_BATCH_SIZE": "3"}).fmel.batch_size == 3


def test_the_local_stores_memory_reaches_duckdb(tmp_path: Path) -> None:
    """``FMEL_LOCAL_MEMORY_LIMIT_MB`` is the sink's DuckDB memory limit; the config's lower
    bound is the sink's."""
    from analyzers.sinks import duckdb as store
    from runtime.assembly import make_sink

    assert FMELConfig.__dataclass_fields__["local_memory_limit_mb"].default == (
        store.MEMORY_LIMIT_MB
    )
    cfg = load_config(
        {"FMEL_LOCAL_MEMORY_LIMIT_MB": "96", "FMEL_LOCAL_PATH": str(tmp_path / "f.duckdb")}
    )
    sink = make_sink(cfg.fmel, None)
    sink.open()
    try:
        con = sink._con  # type: ignore[attr-defined]
        assert con.execute("SELECT current_setting('memory_limit')").fetchall() == [("96.0 MiB",)]
    finally:
        sink.close()
    with pytest.raises(ConfigError, match="expected a whole number >= 64"):
        load_config({"FMEL_LOCAL_MEMORY_LIMIT_MB": str(store.MIN_MEMORY_LIMIT_MB - 1)})
    from analyzers.config import MAX_LOCAL_MEMORY_LIMIT_MB

    assert MAX_LOCAL_MEMORY_LIMIT_MB == store.MAX_MEMORY_LIMIT_MB
    load_config({"FMEL_LOCAL_MEMORY_LIMIT_MB": str(store.MAX_MEMORY_LIMIT_MB)})
    with pytest.raises(ConfigError, match=r"FMEL_LOCAL_MEMORY_LIMIT_MB=1073741825: expected"):
        load_config({"FMEL_LOCAL_MEMORY_LIMIT_MB": str(store.MAX_MEMORY_LIMIT_MB + 1)})


def test_slash_symbols_find_their_file() -> None:
    assert find_csv(DATA, "BTC/USD").name == "BTCUSD.csv"
    assert load_config({"SYMBOLS": "BTC/USD"}).csv_feeds[0].symbol == "BTC/USD"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CASH": "lots"}, "CASH='lots': expected a number"),
        ({"CASH": "-5"}, "CASH=-5.0: expected a number > 0"),
        ({"MODE": "live"}, "MODE='live': expected one of backtest, paper"),
        ({"AGENT_PARAMS": "[1, 2]"}, "AGENT_PARAMS: expected a JSON object"),
        ({"AGENT_PARAMS": "{fast: 1}"}, "AGENT_PARAMS: expected a JSON object, got invalid JSON"),
        # helper-74: the last of two equal keys won without a word (a search lost an axis),
        # and huge numbers, deep nesting and lone surrogates ended in tracebacks
        (
            {"AGENT_PARAMS": '{"period": 5, "period": 7}'},
            "AGENT_PARAMS: key 'period' is given twice",
        ),
        (
            {"MODE": "optimize", "OPTIMIZE_SPACE": '{"fast": [5, 10], "fast": [20]}'},
            "OPTIMIZE_SPACE: key 'fast' is given twice",
        ),
        (
            {"WALK_FORWARD": '{"train": "2y", "test": "1y", "train": "6y"}'},
            "WALK_FORWARD: key 'train' is given twice",
        ),
        ({"AGENT_PARAMS": '{"a": {"b": 1, "b": 2}}'}, "AGENT_PARAMS: key 'b' is given twice"),
        ({"AGENT_PARAMS": '{"n": ' + "9" * 5000 + "}"}, "AGENT_PARAMS: invalid JSON number"),
        ({"AGENT_PARAMS": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"}, "nested too deeply"),
        ({"AGENT_PARAMS": '{"name": "\\ud800"}'}, "AGENT_PARAMS: a string is not valid Unicode"),
        ({"FMEL_SINKS": "local"}, "FMEL_SINKS is not a known setting; did you mean FMEL_SINK?"),
        ({"CSV_TIMEZONE": "Mars/Base"}, "CSV_TIMEZONE='Mars/Base': expected an IANA timezone"),
        ({"CSV_BAR_SIZE": "fortnight"}, "CSV_BAR_SIZE='fortnight'"),
        ({"SYMBOLS": "NOPE"}, "SYMBOLS: no CSV for 'NOPE'"),
        ({"SYMBOLS": "GOOG,GOOG"}, "expected each symbol once"),
        # an empty item was dropped without a word: a deleted symbol, or a missing one?
        ({"SYMBOLS": "GOOG,,SP500"}, "SYMBOLS='GOOG,,SP500': expected a comma list without"),
        ({"SYMBOLS": "GOOG, ,SP500"}, "expected a comma list without empty items"),
        ({"FMEL_BATCH_SIZE": "0"}, "FMEL_BATCH_SIZE=0: expected a whole number >= 1"),
        # helper-82: beyond threading.TIMEOUT_MAX a run failed at its end (OverflowError)
        ({"SHUTDOWN_TIMEOUT_S": "1e10"}, "SHUTDOWN_TIMEOUT_S=1e10: expected at most 1e+09"),
        ({"FMEL_FLUSH_INTERVAL_S": "1e300"}, "FMEL_FLUSH_INTERVAL_S=1e300: expected at most"),
        (
            {"FMEL_LOCAL_MEMORY_LIMIT_MB": "63"},
            "FMEL_LOCAL_MEMORY_LIMIT_MB=63: expected a whole number >= 64",
        ),
        (
            {"FMEL_LOCAL_MEMORY_LIMIT_MB": "1_024"},
            "FMEL_LOCAL_MEMORY_LIMIT_MB='1_024': expected a whole number in ASCII digits",
        ),
        (
            {"FMEL_LOCAL_MEMORY_LIMIT_MB": "١٢٨"},
            "FMEL_LOCAL_MEMORY_LIMIT_MB='١٢٨': expected a whole number in ASCII digits",
        ),
        ({"CASH": "1_000"}, "CASH='1_000': expected a number in ASCII digits"),
        (
            {"FMEL_HASH_CACHE_DIR": "false"},
            "FMEL_HASH_CACHE_DIR='false': expected a folder, off (no cache) or empty",
        ),
        ({"BACKTEST_START": "2010-02-01", "BACKTEST_END": "2010-01-01"}, "BACKTEST_END"),
        ({"BROKER": "alpaca"}, "BROKER=alpaca needs MODE=paper"),
        ({"FMEL_SINK": "bigquery"}, "GOOGLE_CLOUD_PROJECT is required when FMEL_SINK=bigquery"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert needle in str(err.value)


def test_a_comma_list_may_end_with_a_comma() -> None:
    assert load_config({"SYMBOLS": "GOOG,SP500,"}).run.symbols == ("GOOG", "SP500")
    assert load_config({"SYMBOLS": " GOOG , SP500 "}).run.symbols == ("GOOG", "SP500")


def test_foreign_variables_are_ignored() -> None:
    load_config({"PATH": "/bin", "PUBSUB_EMULATOR_HOST": "127.0.0.1:1", "HOME": "/root"})


def test_every_setting_has_help() -> None:
    for name, setting in SETTINGS.items():
        assert setting.help, name
        assert name == setting.name


def test_two_symbols_resolving_to_one_file_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"SYMBOLS": "GOOG,goog"})
    assert "SYMBOLS: 'GOOG' and 'goog' both resolve to GOOG.csv" in str(err.value)


def test_csv_number_and_separator_settings() -> None:
    cfg = load_config(
        {
            "SYMBOLS": "GOOG",
            "CSV_DELIMITER": "tab",
            "CSV_DECIMAL": ",",
            "CSV_THOUSANDS": ".",
            "CSV_NUMBER_SUFFIXES": "true",
            "CSV_DATETIME_FORMAT": "epoch_ms",
        }
    ).csv_feeds[0]
    assert (cfg.delimiter, cfg.decimal, cfg.thousands, cfg.suffixes) == ("\t", ",", ".", True)
    assert cfg.datetime_format == "epoch_ms"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CSV_DELIMITER": ";;"}, "CSV_DELIMITER=';;': expected one character"),
        ({"CSV_DECIMAL": ","}, "CSV_DECIMAL=',' is also CSV_DELIMITER"),
        ({"CSV_THOUSANDS": "."}, "CSV_THOUSANDS='.': expected one character other than"),
        ({"CSV_DATETIME_FORMAT": "epoch_days"}, "CSV_DATETIME_FORMAT='epoch_days'"),
    ],
)
def test_bad_csv_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"SYMBOLS": "GOOG", **env})
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        ({"fast": 5}, True),
        ({"allocation": 1}, True),  # a whole number fits a float param
        ({"allocation": 0.5}, True),
        ({"fast": 5.0}, False),  # a float does not fit an int param
        ({"fast": "5"}, False),
        ({"fast": True}, False),  # bool is not int here
        ({"allocation": False}, False),
        ({"fast": None}, True),  # null: backtrader's "unset"
    ],
)
def test_agent_params_are_checked_against_the_param_defaults(
    params: dict[str, object], ok: bool
) -> None:
    from runtime.assembly import load_agent

    if ok:
        load_agent("agents.sma_cross:SmaCrossAgent", dict(params))
        return
    name = next(iter(params))
    with pytest.raises(ConfigError, match=f"AGENT_PARAMS: param '{name}' of SmaCrossAgent"):
        load_agent("agents.sma_cross:SmaCrossAgent", dict(params))


def test_missing_agent_module_and_class_name_agent() -> None:
    from runtime.assembly import load_agent

    with pytest.raises(ConfigError, match=r"AGENT='nope\.agent:X': no module named 'nope'"):
        load_agent("nope.agent:X", {})
    with pytest.raises(ConfigError, match=r"sma_cross\.py has no 'Nope'; its Strategy classes: "):
        load_agent("agents.sma_cross:Nope", {})


_ITEM = st.text(
    st.characters(blacklist_characters=",", blacklist_categories=("Cs",)), min_size=1
).filter(lambda s: s.strip() == s and s != "")


@given(st.lists(_ITEM, min_size=1, max_size=6), st.booleans(), st.integers(0, 5))
def test_a_comma_list_is_read_exactly_or_refused(
    items: list[str], trailing: bool, hole: int
) -> None:
    """Any comma list: its items exactly (spaces around them and one trailing comma are
    ignored), or, with an empty item between two, a ConfigError naming the variable."""
    text = ", ".join(items) + ("," if trailing else "")
    assert parse("X", text, tuple[str, ...]) == tuple(items)
    if len(items) >= 2:
        at = 1 + hole % (len(items) - 1)
        holed = ",".join(items[:at]) + ",," + ",".join(items[at:])
        with pytest.raises(ConfigError, match=r"^X=.*expected a comma list without empty items"):
            parse("X", holed, tuple[str, ...])
