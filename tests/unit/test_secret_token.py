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
    """Letters after digits (a key's interleaving), anywhere in the path: the whole reference
    is named by its length only."""
    from runtime.secrets import shown_ref

    at = data.draw(st.integers(0, len(body)))
    key = body[:at] + digit + "Q" + body[at:]
    prefix = data.draw(st.sampled_from(["", "projects/p/secrets/", "x/"]))
    suffix = data.draw(st.sampled_from(["", "/versions/latest", "/versions/3"]))
    ref = prefix + key + suffix
    assert shown_ref(ref) == f"<{len(ref)} characters hidden: a credential, not a secret name?>"


@given(st.text(min_size=1))
def test_a_reference_is_shown_whole_or_not_at_all(ref: str) -> None:
    """What is shown is the reference itself, made only of letters, digits, '-', '_' and '/'
    with no run of 16 letters, or nothing of it but its length."""
    import re

    from runtime.secrets import shown_ref

    out = shown_ref(ref)
    if out != ref:
        assert out == f"<{len(ref)} characters hidden: a credential, not a secret name?>"
    else:
        assert re.fullmatch(r"[A-Za-z0-9_/-]*", ref)
        assert not re.search(r"[A-Za-z]{16}", ref)
        assert not re.search(r"[0-9][A-Za-z]", ref)


@pytest.mark.parametrize(
    "key",
    [
        "0123456789abcdef0123456789abcdef01234567",  # hex, lower case
        "k3j4h5g6f7d8s9a0q1w2e3r4t5y6u7i8",  # 32 lower-case letters and digits
        "sk-live-4eC39HqLyjWDarjtT1zdp7dc",  # a "sk-live-" key
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN",  # 40 letters
        "AbCd1234/efGh5678+ijKL9012=",  # base64 with '/'
        "q1w2-e3r4_t5y6-u7i8_o9p0",  # URL-safe base64
        "550e8400-e29b-41d4-a716-446655440000",  # a UUID
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",  # JWT-like
        "PKABCDEFGHIJKLMNOPQR",  # an Alpaca key id without a digit
        "ABCDEFGHIJKLMNOPQRST",  # upper case only
        "aB3dE5gH7jK9",  # short and mixed
    ],
)
def test_keys_of_every_common_shape_are_not_shown(key: str) -> None:
    """helper-86 F2: these were echoed in full (or in pieces) by the first rule."""
    from runtime.secrets import shown_ref

    assert key[:6] not in shown_ref(key)
    assert key[:6] not in shown_ref(f"projects/p/secrets/{key}/versions/latest")


@pytest.mark.parametrize(
    "name",
    ["alpaca-key", "ALPACA_API_KEY", "AlpacaKeyProd2024", "alpaca-key-2026", "key1", "v2"],
)
def test_names_people_give_are_shown(name: str) -> None:
    from runtime.secrets import shown_ref

    ref = f"projects/my-project-123/secrets/{name}/versions/3"
    assert shown_ref(ref) == ref


@pytest.mark.parametrize(
    ("endpoint", "secret"),
    [
        ("http://user:hunt#er2@127.0.0.1:1", "hunt"),
        ("http://user:hunt/er2@127.0.0.1:1", "hunt"),
        ("http://user:hunt?er2@127.0.0.1:1", "hunt"),
        ("user:hunter2@secretmanager.googleapis.com", "hunter2"),
        ("http:/user:hunter2@host", "hunter2"),
        ("http://ghp_TOKENabc123@127.0.0.1:1", "ghp_TOKEN"),
        ("https://host/?access_token=ya29.SECRET", "ya29"),
        ("https://host/#ya29.SECRET", "ya29"),
    ],
)
def test_no_credential_of_the_endpoint_is_shown(endpoint: str, secret: str) -> None:
    """helper-88 F1, F2: a password holding '#', '/' or '?', an endpoint without a scheme, a
    token as the user name or in the query were shown whole (the URL parser found no
    userinfo)."""
    from runtime.secrets import shown_endpoint

    shown = shown_endpoint(endpoint)
    assert secret not in shown and "****" in shown


@given(st.text(), st.text(min_size=1), st.text())
def test_nothing_before_the_last_at_sign_is_shown(head: str, secret: str, host: str) -> None:
    from runtime.secrets import shown_endpoint

    host = host.replace("@", "")
    shown = shown_endpoint(f"{head}{secret}@{host}")
    assert "@" not in shown.replace("****@", "", 1)
    assert shown.endswith("****") or shown.partition("****@")[2] in host
