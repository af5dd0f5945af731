"""Alpaca keys are checked at start (core.secret.check_token): exactly printable ASCII without
spaces passes; anything else is a ConfigError naming the variable that never shows the value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigError
from core.secret import Secret, check_token
from runtime.config import load_config

PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@given(PRINTABLE)
def test_printable_ascii_keys_pass(value: str) -> None:
    check_token("ALPACA_SECRET_KEY", Secret(value))


@given(PRINTABLE, st.characters(), st.data())
def test_any_other_character_is_refused_by_kind_and_place_never_by_value(
    value: str, bad: str, data: st.DataObject
) -> None:
    if "!" <= bad <= "~":
        bad = "\n"
    at = data.draw(st.integers(0, len(value)))
    key = value[:at] + bad + value[at:]
    other = "x" * at + bad + "y" * (len(value) - at)  # same length, same bad char, same place
    with pytest.raises(ConfigError) as one:
        check_token("ALPACA_SECRET_KEY", Secret(key, source="env:ALPACA_SECRET_KEY"))
    with pytest.raises(ConfigError) as two:
        check_token("ALPACA_SECRET_KEY", Secret(other, source="env:ALPACA_SECRET_KEY"))
    message = str(one.value)
    assert message == str(two.value)  # nothing of the value but its length and the bad place
    assert message.startswith("ALPACA_SECRET_KEY (from env:ALPACA_SECRET_KEY): the key has ")


@pytest.mark.parametrize(
    ("value", "says"),
    [
        # (a variable's surrounding whitespace is stripped: runtime.secrets.resolve_setting)
        ("PKABC\nDEF123", "a line break at character 6 of 12"),
        ("PKABC\tDEF123", "a space or tab at character 6 of 12"),
        ("\ufeffPKABCDEF123", "a byte-order mark at character 1"),
        ("PKABC\x00DEF", "a control character at character 6"),
        ("PKABCDÉF", "a non-ASCII character at character 7"),
    ],
)
def test_the_runner_refuses_such_a_key_at_start(value: str, says: str) -> None:
    env = {
        "MODE": "paper",
        "BROKER": "alpaca",
        "SYMBOLS": "GOOG",
        "PUBSUB_TOPIC": "bars",
        "GOOGLE_CLOUD_PROJECT": "p",
        "ALPACA_API_KEY": "PKTESTKEY123",
        "ALPACA_SECRET_KEY": value,
    }
    with pytest.raises(ConfigError) as err:
        load_config(env)
    assert says in str(err.value) and "ALPACA_SECRET_KEY" in str(err.value)
