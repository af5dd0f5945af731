"""``HEALTH_HOST`` wired from the environment to the socket the runner's health endpoint binds:
real HTTP on free ports, over IPv4 and IPv6, and an address this machine does not have failing
at start with a ConfigError that names the variable (exit 2)."""

from __future__ import annotations

import ipaddress
import socket
import urllib.request
from collections.abc import Iterator

import psutil
import pytest

from core.errors import ConfigError
from runtime.config import load_config
from runtime.runner import Runner
from tests.pubsub_emulator import free_port

# TEST-NET-3 (RFC 5737): documentation only, never an address of this machine (checked below).
FOREIGN_IPV4 = "203.0.113.7"


def local_addresses() -> set[str]:
    return {
        a.address.split("%", 1)[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }


def healthz(host: str, port: int) -> int:
    literal = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{literal}:{port}/healthz", timeout=5) as r:
        return int(r.status)


@pytest.fixture
def runner_factory() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for r in made:
        r._stop_health()


def start(made: list[Runner], **env: str) -> Runner:
    runner = Runner(load_config({"HEALTH_PORT": str(free_port()), **env}))
    made.append(runner)
    runner._start_health()
    assert runner.health is not None
    return runner


def test_default_binds_every_ipv4_address(runner_factory: list[Runner]) -> None:
    runner = start(runner_factory)
    assert runner.health is not None and runner.health._server is not None
    assert runner.health._server.server_address[0] == "0.0.0.0"
    assert healthz("127.0.0.1", runner.health.port) == 200


def test_a_loopback_host_is_reachable_there_and_nowhere_else(runner_factory: list[Runner]) -> None:
    runner = start(runner_factory, HEALTH_HOST="127.0.0.1")
    assert runner.health is not None
    port = runner.health.port
    assert healthz("127.0.0.1", port) == 200
    others = [
        a
        for a in local_addresses()
        if isinstance(ipaddress.ip_address(a), ipaddress.IPv4Address)
        and not ipaddress.ip_address(a).is_loopback
    ]
    for address in others:  # the machine's other interfaces refuse the connection
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5).close()


def test_ipv6_and_host_names_are_served(runner_factory: list[Runner]) -> None:
    if "::1" not in local_addresses():
        pytest.skip("no IPv6 loopback on this machine")
    v6 = start(runner_factory, HEALTH_HOST="::1")
    assert v6.health is not None and healthz("::1", v6.health.port) == 200
    named = start(runner_factory, HEALTH_HOST="localhost")
    assert named.health is not None and named.health._server is not None
    bound = str(named.health._server.server_address[0])
    assert ipaddress.ip_address(bound).is_loopback
    assert healthz(bound, named.health.port) == 200


def test_an_address_this_machine_does_not_have_is_a_configuration_error() -> None:
    assert FOREIGN_IPV4 not in local_addresses()
    runner = Runner(load_config({"HEALTH_PORT": str(free_port()), "HEALTH_HOST": FOREIGN_IPV4}))
    with pytest.raises(ConfigError, match=f"HEALTH_HOST={FOREIGN_IPV4}, HEALTH_PORT="):
        runner._start_health()
    assert runner.health is None
