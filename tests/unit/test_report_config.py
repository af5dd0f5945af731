"""Issue 11 item 6: ``CASH=inf`` ran and printed ``nan``. A starting cash that is not a finite
number is refused when the configuration is read, naming the variable."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.settings import parse
from runtime.config import load_config


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", "nan", "1e400"])
def test_settings_parse_refuses_non_finite_numbers(text: str) -> None:
    with pytest.raises(ConfigError, match="CASH"):
        parse("CASH", text, float)


@pytest.mark.parametrize("text", ["inf", "nan", "1e400"])
def test_cash_must_be_finite(text: str) -> None:
    with pytest.raises(ConfigError, match="CASH"):
        load_config({"SYMBOLS": "GOOG", "CASH": text})
