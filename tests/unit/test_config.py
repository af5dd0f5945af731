"""Configuration: defaults, typed values, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
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
        ({"FMEL_SINKS": "local"}, "FMEL_SINKS is not a known setting; did you mean FMEL_SINK?"),
        ({"CSV_TIMEZONE": "Mars/Base"}, "CSV_TIMEZONE='Mars/Base': expected an IANA timezone"),
        ({"CSV_BAR_SIZE": "fortnight"}, "CSV_BAR_SIZE='fortnight'"),
        ({"SYMBOLS": "NOPE"}, "SYMBOLS: no CSV for 'NOPE'"),
        ({"SYMBOLS": "GOOG,GOOG"}, "expected each symbol once"),
        ({"FMEL_BATCH_SIZE": "0"}, "FMEL_BATCH_SIZE=0: expected a whole number >= 1"),
        ({"BACKTEST_START": "2010-02-01", "BACKTEST_END": "2010-01-01"}, "BACKTEST_END"),
        ({"BROKER": "alpaca"}, "BROKER=alpaca needs MODE=paper"),
        ({"FMEL_SINK": "bigquery"}, "GOOGLE_CLOUD_PROJECT is required when FMEL_SINK=bigquery"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert needle in str(err.value)


def test_foreign_variables_are_ignored() -> None:
    load_config({"PATH": "/bin", "PUBSUB_EMULATOR_HOST": "127.0.0.1:1", "HOME": "/root"})


def test_every_setting_has_help() -> None:
    for name, setting in SETTINGS.items():
        assert setting.help, name
        assert name == setting.name
