"""Secrets: the Secret type, the resolution chain, and Google Secret Manager through the real
``google-cloud-secret-manager`` client (REST transport) against a local server speaking its API.
"""

from __future__ import annotations

import copy
import pickle

import pytest

from core.errors import ConfigError
from core.secret import MASK, Secret
from runtime.config import load_config
from runtime.secrets import (
    SecretManagerResolver,
    resolve_setting,
    secret_resource,
    tried_places,
)
from tests.secretmanager_server import SecretManagerServer

PROJECT = "test-project"
KEY_VALUE = "PKTESTKEY0123456789"
SECRET_VALUE = "sEcReT/value+0123456789abcdefghij"


@pytest.fixture
def resolver(sm: SecretManagerServer) -> SecretManagerResolver:
    return SecretManagerResolver(client=sm.client(), deadline_s=10.0)


def paper_env(**extra: str) -> dict[str, str]:
    """The least a MODE=paper, BROKER=alpaca configuration needs besides the keys."""
    return {
        "MODE": "paper",
        "BROKER": "alpaca",
        "SYMBOLS": "AAPL",
        "PUBSUB_TOPIC": "bars",
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        **extra,
    }


# -- the Secret type --------------------------------------------------------------------------


def test_secret_never_prints_its_value() -> None:
    s = Secret(SECRET_VALUE, source="env:ALPACA_SECRET_KEY")
    percent = "%s" % s  # noqa: UP031 - old-style formatting must mask too
    for text in (repr(s), str(s), f"{s}", f"{s:>40}", percent, repr([s]), repr({"k": s})):
        assert SECRET_VALUE not in text
        assert MASK in text
    assert "env:ALPACA_SECRET_KEY" in repr(s)
    assert s.reveal() == SECRET_VALUE
    assert copy.deepcopy(s) is s
    with pytest.raises(TypeError):
        pickle.dumps(s)


# -- secret_resource ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "project", "want"),
    [
        ("alpaca-key", "p", "projects/p/secrets/alpaca-key/versions/latest"),
        ("alpaca-key/versions/3", "p", "projects/p/secrets/alpaca-key/versions/3"),
        ("projects/q/secrets/k", None, "projects/q/secrets/k/versions/latest"),
        ("projects/q/secrets/k/versions/7", "p", "projects/q/secrets/k/versions/7"),
        (
            "projects/q/locations/us-east1/secrets/k",
            None,
            "projects/q/locations/us-east1/secrets/k/versions/latest",
        ),
    ],
)
def test_secret_resource_shapes(ref: str, project: str | None, want: str) -> None:
    assert secret_resource(ref, project) == want


@pytest.mark.parametrize(
    ("ref", "project", "needle"),
    [
        ("alpaca-key", None, "GOOGLE_CLOUD_PROJECT"),
        ("a/b", "p", "expected"),
        ("projects/q/topics/t", None, "expected"),
        ("projects/q/secrets/k/aliases/x", None, "versions"),
    ],
)
def test_secret_resource_refuses_bad_shapes(ref: str, project: str | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        secret_resource(ref, project)


# -- the chain without Secret Manager ----------------------------------------------------------


def test_variable_wins_over_alternative_and_secret_manager(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "alpaca-key", "from-secret-manager")
    env = paper_env(
        ALPACA_API_KEY=KEY_VALUE,
        APCA_API_KEY_ID="from-alternative",
        ALPACA_API_KEY_SECRET="alpaca-key",
        ALPACA_SECRET_KEY=SECRET_VALUE,
    )
    cfg = load_config(env, secret_resolver=resolver)
    assert cfg.alpaca is not None
    assert cfg.alpaca.api_key.reveal() == KEY_VALUE
    assert cfg.alpaca.api_key.source == "env:ALPACA_API_KEY"
    assert sm.reads("alpaca-key") == 0  # never asked: the variable was enough


def test_alternative_name_wins_over_secret_manager(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "alpaca-key", "from-secret-manager")
    env = paper_env(
        APCA_API_KEY_ID=KEY_VALUE,
        ALPACA_API_KEY_SECRET="alpaca-key",
        APCA_API_SECRET_KEY=SECRET_VALUE,
    )
    cfg = load_config(env, secret_resolver=resolver)
    assert cfg.alpaca is not None
    assert cfg.alpaca.api_key.reveal() == KEY_VALUE
    assert cfg.alpaca.api_key.source == "env:APCA_API_KEY_ID"
    assert cfg.alpaca.secret_key.source == "env:APCA_API_SECRET_KEY"
    assert sm.reads("alpaca-key") == 0


def test_empty_variable_counts_as_unset() -> None:
    found = resolve_setting("X", {"X": "  ", "Y": " v "}, alternatives=("Y",))
    assert found == ("v", "env:Y")
    assert resolve_setting("X", {"X": ""}) is None


def test_missing_required_secret_names_every_place_tried(resolver: SecretManagerResolver) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(paper_env(ALPACA_SECRET_KEY=SECRET_VALUE), secret_resolver=resolver)
    msg = str(err.value)
    for place in ("ALPACA_API_KEY", "APCA_API_KEY_ID", "ALPACA_API_KEY_SECRET", "Secret Manager"):
        assert place in msg
    assert SECRET_VALUE not in msg
    assert tried_places("A", ("B",)) == "A, B, Secret Manager via A_SECRET"


def test_missing_required_setting_names_alternatives() -> None:
    env = {"MODE": "paper", "SYMBOLS": "AAPL", "PUBSUB_TOPIC": "bars"}
    with pytest.raises(ConfigError) as err:
        load_config(env)
    for place in (
        "GOOGLE_CLOUD_PROJECT",
        "PROJECT_ID",
        "GCLOUD_PROJECT",
        "GOOGLE_CLOUD_PROJECT_SECRET",
    ):
        assert place in str(err.value)


# -- Secret Manager through the real client ----------------------------------------------------


def test_keys_from_secret_manager(sm: SecretManagerServer, resolver: SecretManagerResolver) -> None:
    sm.add(PROJECT, "alpaca-key", "an-old-key")
    sm.add(PROJECT, "alpaca-key", KEY_VALUE + "\n")  # as `echo ... | gcloud ...` stores it
    sm.add(PROJECT, "alpaca-secret", SECRET_VALUE)
    env = paper_env(
        ALPACA_API_KEY_SECRET="alpaca-key",
        ALPACA_SECRET_KEY_SECRET=f"projects/{PROJECT}/secrets/alpaca-secret",
    )
    cfg = load_config(env, secret_resolver=resolver)
    assert cfg.alpaca is not None
    assert cfg.alpaca.api_key.reveal() == KEY_VALUE
    assert cfg.alpaca.api_key.source == (
        f"secretmanager:projects/{PROJECT}/secrets/alpaca-key/versions/2"
    )
    assert cfg.alpaca.secret_key.reveal() == SECRET_VALUE
    assert cfg.secret_refs == {
        "ALPACA_API_KEY": "alpaca-key",
        "ALPACA_SECRET_KEY": f"projects/{PROJECT}/secrets/alpaca-secret",
    }
    for text in (repr(cfg), str(cfg.alpaca)):
        assert KEY_VALUE not in text and SECRET_VALUE not in text
    assert sm.requests == [
        ("GET", f"/v1/projects/{PROJECT}/secrets/alpaca-key/versions/latest:access"),
        ("GET", f"/v1/projects/{PROJECT}/secrets/alpaca-secret/versions/latest:access"),
    ]


def test_a_payload_ending_in_a_blank_line_is_refused_at_start_without_the_value(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    """helper-82: ``gcloud secrets versions add --data-file=key.txt`` of a file ending in a
    blank line: one newline is removed, and the other went into the HTTP header, where
    ``requests`` refused it with the whole key in an uncaught ``InvalidHeader``. Refused at
    start, by kind and place, never by value."""
    sm.add(PROJECT, "alpaca-secret", SECRET_VALUE + "\n\n")
    env = paper_env(ALPACA_API_KEY=KEY_VALUE, ALPACA_SECRET_KEY_SECRET="alpaca-secret")
    with pytest.raises(ConfigError) as err:
        load_config(env, secret_resolver=resolver)
    msg = str(err.value)
    assert msg.startswith(
        f"ALPACA_SECRET_KEY (from secretmanager:projects/{PROJECT}/secrets/alpaca-secret/"
    )
    assert "a line break at the end" in msg
    assert SECRET_VALUE not in msg and SECRET_VALUE[:8] not in msg


def test_pinned_version_and_other_project(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add("vault-project", "k", "v1-value")
    sm.add("vault-project", "k", "v2-value")
    text, resource = resolver.access("projects/vault-project/secrets/k/versions/1", PROJECT)
    assert (text, resource) == ("v1-value", "projects/vault-project/secrets/k/versions/1")


def test_values_are_cached_per_resource(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "k", "value-123456")
    assert resolver.access("k", PROJECT)[0] == "value-123456"
    assert resolver.access("k", PROJECT)[0] == "value-123456"
    assert sm.reads("k") == 1


def test_any_setting_can_come_from_secret_manager(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "agent-id", "desk-7")
    cfg = load_config(
        {"AGENT_ID_SECRET": "agent-id", "GOOGLE_CLOUD_PROJECT": PROJECT}, secret_resolver=resolver
    )
    assert cfg.run.agent_id == "desk-7"


def test_unavailable_is_retried_by_the_client(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "flaky", "finally-123456")
    sm.fail_next(PROJECT, "flaky", 2)
    assert resolver.access("flaky", PROJECT)[0] == "finally-123456"
    assert sm.reads("flaky") == 3


def test_not_found_names_the_secret_and_the_chain(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    env = paper_env(ALPACA_API_KEY_SECRET="no-such-key", ALPACA_SECRET_KEY=SECRET_VALUE)
    with pytest.raises(ConfigError) as err:
        load_config(env, secret_resolver=resolver)
    msg = str(err.value)
    assert f"projects/{PROJECT}/secrets/no-such-key/versions/latest not found" in msg
    assert "ALPACA_API_KEY, APCA_API_KEY_ID" in msg
    assert SECRET_VALUE not in msg


def test_permission_denied_says_which_role(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "locked", "x" * 20)
    sm.deny(PROJECT, "locked")
    with pytest.raises(ConfigError, match=r"secretmanager\.secretAccessor"):
        resolver.access("locked", PROJECT)


def test_corrupted_payload_is_refused(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    sm.add(PROJECT, "garbled", "payload-123456")
    sm.bad_crc.add((PROJECT, "garbled"))
    with pytest.raises(ConfigError, match="checksum") as err:
        resolver.access("garbled", PROJECT)
    assert "payload-123456" not in str(err.value)


def test_secret_manager_untouched_when_not_needed(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    # A backtest never builds the broker config, so its key references are never read.
    cfg = load_config({"ALPACA_API_KEY_SECRET": "alpaca-key"}, secret_resolver=resolver)
    assert cfg.alpaca is None
    assert sm.requests == []


def test_endpoint_setting_builds_the_real_client(sm: SecretManagerServer) -> None:
    # The production path: no resolver passed, SECRET_MANAGER_ENDPOINT points the client here.
    sm.add(PROJECT, "alpaca-key", KEY_VALUE)
    sm.add(PROJECT, "alpaca-secret", SECRET_VALUE)
    env = paper_env(
        ALPACA_API_KEY_SECRET="alpaca-key",
        ALPACA_SECRET_KEY_SECRET="alpaca-secret",
        SECRET_MANAGER_ENDPOINT=sm.url,
    )
    cfg = load_config(env)
    assert cfg.alpaca is not None
    assert cfg.alpaca.api_key.reveal() == KEY_VALUE
    assert cfg.alpaca.secret_key.reveal() == SECRET_VALUE
    assert sm.reads("alpaca-key") == 1


@pytest.mark.parametrize("answer", ["refused", "silent"])
def test_an_unreachable_endpoint_is_retried_then_a_config_error_naming_the_variable(
    answer: str,
) -> None:
    """helper-82: with ``SECRET_MANAGER_ENDPOINT`` refusing connections (or accepting and never
    answering), the REST transport's own ``requests`` errors were not retried nor caught: a
    raw traceback and exit 1 after 2 s. Retried as UNAVAILABLE is, up to the deadline; then a
    ConfigError naming the variable (exit 2)."""
    import socket
    import time

    from tests.pubsub_emulator import free_port

    listener = None
    if answer == "silent":
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(50)  # accepts (the kernel does), never answers
        port = listener.getsockname()[1]
    else:
        port = free_port()  # nothing listens there
    try:
        resolver = SecretManagerResolver(
            endpoint=f"http://127.0.0.1:{port}", timeout_s=0.5, deadline_s=2.0
        )
        env = paper_env(ALPACA_API_KEY_SECRET="alpaca-key", ALPACA_SECRET_KEY=SECRET_VALUE)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            load_config(env, secret_resolver=resolver)
        elapsed = time.monotonic() - t0
    finally:
        if listener is not None:
            listener.close()
    msg = str(err.value)
    assert msg.startswith("ALPACA_API_KEY: tried ")
    assert "ALPACA_API_KEY_SECRET: Secret Manager: cannot read" in msg
    assert elapsed < 10.0  # within the deadline and one attempt's timeout (retries may stop early)


@pytest.mark.parametrize("endpoint", ["html", "http://[::1", "http://127.0.0.1:99999"])
def test_an_endpoint_that_is_not_secret_manager_is_a_config_error_naming_it(
    endpoint: str,
) -> None:
    """helper-84: SECRET_MANAGER_ENDPOINT pointed at another service (an HTML page) or not a
    URL ended in a raw traceback (ParseError, InvalidURL), exit 1. A ConfigError naming it."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # a web page, as a wrong service answers
            body = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = None
    if endpoint == "html":
        server = HTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        resolver = SecretManagerResolver(endpoint=endpoint, timeout_s=2.0, deadline_s=2.0)
        env = paper_env(ALPACA_API_KEY_SECRET="alpaca-key", ALPACA_SECRET_KEY=SECRET_VALUE)
        with pytest.raises(ConfigError) as err:
            load_config(env, secret_resolver=resolver)
    finally:
        if server is not None:
            server.shutdown()
    assert f"SECRET_MANAGER_ENDPOINT={endpoint}" in str(err.value)
    assert str(err.value).startswith("ALPACA_API_KEY: tried ")


@pytest.mark.parametrize(
    "mistake",
    ["PKTESTKEY0123456789X", "AbCdEfGh1234567890abcdEFGH1234567890abcd", "c2VjcmV0+dmFsdWU="],
)
def test_a_key_put_in_the_secret_reference_is_not_echoed(
    sm: SecretManagerServer, resolver: SecretManagerResolver, mistake: str
) -> None:
    """helper-82, helper-84 F8: the key itself put in ``ALPACA_API_KEY_SECRET`` (instead of a
    secret's name) was echoed whole by "not found". Named by its length only."""
    env = paper_env(ALPACA_API_KEY_SECRET=mistake, ALPACA_SECRET_KEY=SECRET_VALUE)
    with pytest.raises(ConfigError) as err:
        load_config(env, secret_resolver=resolver)
    msg = str(err.value)
    assert mistake not in msg
    assert mistake[:8] not in msg
    resource = f"projects/{PROJECT}/secrets/{mistake}/versions/latest"
    assert f"<{len(resource)} characters hidden: a credential, not a secret name?>" in msg
    assert msg.startswith("ALPACA_API_KEY: tried ")


def test_a_secret_name_is_still_shown(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    """Names as people write them (hyphens, underscores, lower case) are shown as given."""
    for name in ("alpaca-api-key", "ALPACA_API_KEY_2026", "AlpacaKeyProd2024"):
        env = paper_env(ALPACA_API_KEY_SECRET=name, ALPACA_SECRET_KEY=SECRET_VALUE)
        with pytest.raises(ConfigError) as err:
            load_config(env, secret_resolver=resolver)
        assert f"secrets/{name}/versions/latest not found" in str(err.value)


def test_an_endpoint_that_trickles_its_answer_is_given_up_on() -> None:
    """helper-84 F5: an endpoint that answers a byte at a time, each within the request
    timeout, was never given up on (202 s, or for good): the client's deadline only applies
    between attempts. The whole read now ends within deadline + one request's timeout."""
    import time

    from tests.trickle_server import trickling_server

    with trickling_server() as server:
        port = server.port
        resolver = SecretManagerResolver(endpoint=server.url, timeout_s=0.5, deadline_s=1.0)
        env = paper_env(ALPACA_API_KEY_SECRET="alpaca-key", ALPACA_SECRET_KEY=SECRET_VALUE)
        t0 = time.monotonic()
        with pytest.raises(ConfigError) as err:
            load_config(env, secret_resolver=resolver)
        elapsed = time.monotonic() - t0
        # a second read does not start another endless request
        with pytest.raises(ConfigError, match="an earlier request did not end"):
            resolver.access("other-key", PROJECT)
    msg = str(err.value)
    assert "no whole answer within 1.5 s" in msg
    assert f"SECRET_MANAGER_ENDPOINT=http://127.0.0.1:{port}" in msg
    assert elapsed < 5.0


def test_secret_references_stay_out_of_the_config_repr(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    """The configuration is logged at DEBUG as its repr: a ``*_SECRET`` value (which may be a
    key put there by mistake) is not part of it."""
    sm.add(PROJECT, "alpaca-key", KEY_VALUE)
    env = paper_env(ALPACA_API_KEY_SECRET="alpaca-key", ALPACA_SECRET_KEY=SECRET_VALUE)
    cfg = load_config(env, secret_resolver=resolver)
    assert cfg.secret_refs == {"ALPACA_API_KEY": "alpaca-key"}
    assert "secret_refs" not in repr(cfg)
    assert "'alpaca-key'" not in repr(cfg)  # the resource it read names it, as Secret's source


def test_an_empty_secret_is_refused(
    sm: SecretManagerServer, resolver: SecretManagerResolver
) -> None:
    """helper-86 F3: a secret whose payload is empty (or a newline) was taken as the key, and
    failed later as Alpaca's 401; an empty variable counts as unset."""
    sm.add(PROJECT, "empty-key", "\n")
    env = paper_env(ALPACA_API_KEY_SECRET="empty-key", ALPACA_SECRET_KEY=SECRET_VALUE)
    with pytest.raises(ConfigError, match=r"secrets/empty-key/versions/latest is empty"):
        load_config(env, secret_resolver=resolver)


def test_a_password_in_the_endpoint_is_not_shown() -> None:
    """helper-86 F4: ``SECRET_MANAGER_ENDPOINT`` was echoed whole, a proxy password included."""
    from tests.pubsub_emulator import free_port

    endpoint = f"http://proxyuser:Hunter2ProxyPassw0rd@127.0.0.1:{free_port()}"
    resolver = SecretManagerResolver(endpoint=endpoint, timeout_s=0.3, deadline_s=0.5)
    env = paper_env(ALPACA_API_KEY_SECRET="alpaca-key", ALPACA_SECRET_KEY=SECRET_VALUE)
    with pytest.raises(ConfigError) as err:
        load_config(env, secret_resolver=resolver)
    assert "Hunter2ProxyPassw0rd" not in str(err.value)
    assert "proxyuser" not in str(err.value)
    assert "SECRET_MANAGER_ENDPOINT=http://****@127.0.0.1:" in str(err.value)
