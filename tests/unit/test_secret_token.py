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


# -- a key put where a secret's name goes (runtime.secrets.shown_ref) ---------------------------

ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@given(st.text(st.sampled_from(ALNUM), min_size=14), st.sampled_from("0123456789"), st.data())
def test_a_key_shaped_reference_is_never_shown(body: str, digit: str, data: st.DataObject) -> None:
    """16+ letters and digits with a digit and a capital, anywhere in the path: hidden."""
    from runtime.secrets import shown_ref

    at = data.draw(st.integers(0, len(body)))
    key = body[:at] + digit + "Q" + body[at:]
    prefix = data.draw(st.sampled_from(["", "projects/p/secrets/", "x/"]))
    suffix = data.draw(st.sampled_from(["", "/versions/latest", "/versions/3"]))
    out = shown_ref(prefix + key + suffix)
    assert key not in out
    assert f"<{len(key)} characters hidden" in out
    assert out.startswith(prefix) and out.endswith(suffix)


@given(st.text(min_size=1))
def test_a_reference_with_characters_no_name_has_is_not_shown(ref: str) -> None:
    """A segment holding anything but letters, digits, '-', '_' and '.' is hidden whole; what is
    shown is made only of such characters and '/' (never a piece of the value)."""
    import re

    from runtime.secrets import shown_ref

    out = shown_ref(ref)
    for seg, shown in zip(ref.split("/"), out.split("/"), strict=True):
        if re.fullmatch(r"[A-Za-z0-9_.-]*", seg):
            assert shown in (
                seg,
                f"<{len(seg)} characters hidden: a credential, not a secret name?>",
            )
        else:
            assert shown == f"<{len(seg)} characters hidden: a credential, not a secret name?>"
