"""``HEALTH_HOST``: which texts name an address to bind (IP literals and RFC 1123 host names),
the default, and bad values failing at start with a ConfigError that names the variable."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigError
from runtime.config import SETTINGS, OpsConfig, is_bind_host, load_config

# RFC 1123 section 2.1 label: letters, digits, hyphens, 1..63 characters, no hyphen at an end.
LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", fullmatch=True)
HOST_NAME = st.lists(LABEL, min_size=1, max_size=4).filter(
    lambda labels: not labels[-1].isdigit() and len(".".join(labels)) <= 253
)


def test_default_binds_every_ipv4_address_as_kubernetes_probes_need() -> None:
    cfg = load_config({})
    assert cfg.ops.health_host == "0.0.0.0"
    assert SETTINGS["HEALTH_HOST"].help


@given(st.ip_addresses())
def test_every_ip_literal_is_accepted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert is_bind_host(str(address))
    assert OpsConfig(health_host=str(address)).health_host == str(address)


@given(HOST_NAME, st.booleans())
def test_well_formed_host_names_are_accepted(labels: list[str], trailing_dot: bool) -> None:
    name = ".".join(labels) + ("." if trailing_dot else "")
    assert is_bind_host(name)


@given(HOST_NAME, st.sampled_from(" _/:@!*,;\\\"'\t\n\x00é"), st.data())
def test_a_character_outside_host_names_and_ips_is_refused(
    labels: list[str], bad: str, data: st.DataObject
) -> None:
    name = ".".join(labels)
    at = data.draw(st.integers(0, len(name)))
    text = name[:at] + bad + name[at:]
    try:
        ipaddress.ip_address(text)  # "::" style text with a ':' inserted may be an IPv6 literal
    except ValueError:
        assert not is_bind_host(text)


@pytest.mark.parametrize(
    "value",
    [
        ".",
        "bad host",
        "-leading.example",
        "trailing-.example",
        "a..b",
        "x" * 64 + ".example",  # a label over 63 characters
        ".".join(["abcdefgh"] * 29),  # 260 characters
        "999.1.1.1",  # all-digit last label: a bad IPv4, not a name
        "10.0.0.256",
        "01.2.3.4",  # leading zeros are ambiguous (octal); Python refuses them
        "http://0.0.0.0",
        "0.0.0.0:8080",
        "[::1]",
    ],
)
def test_bad_values_fail_at_start_naming_health_host(value: str) -> None:
    assert not is_bind_host(value)
    with pytest.raises(ConfigError, match="HEALTH_HOST="):
        load_config({"HEALTH_HOST": value})


def test_an_empty_host_is_refused_and_an_empty_variable_means_the_default() -> None:
    with pytest.raises(ConfigError, match="HEALTH_HOST="):
        OpsConfig(health_host="")
    assert load_config({"HEALTH_HOST": ""}).ops.health_host == "0.0.0.0"


@pytest.mark.parametrize("value", ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "pod-a.ns"])
def test_usual_values_are_accepted(value: str) -> None:
    assert load_config({"HEALTH_HOST": value}).ops.health_host == value
