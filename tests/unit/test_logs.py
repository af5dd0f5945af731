"""Logging setup: JSON lines off a terminal, text on one, context fields, redaction, hooks."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from core.secret import Secret
from runtime.logs import REDACTED, LogSetup, setup_logging

log = logging.getLogger("tests.logs")


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def setups() -> Iterator[list[LogSetup]]:
    made: list[LogSetup] = []
    yield made
    for s in made:
        s.close()


def lines(stream: io.StringIO) -> list[str]:
    return [ln for ln in stream.getvalue().splitlines() if ln]


def test_json_when_not_a_terminal(setups: list[LogSetup]) -> None:
    out = io.StringIO()
    setups.append(setup := setup_logging("INFO", "auto", stream=out))
    assert setup.json
    setup.bind(session="20261121T000000Z-abcd", agent="sma-cross")
    log.info("bought %d shares of %s", 10, "GOOG")
    log.debug("not shown at INFO")
    [line] = lines(out)
    entry = json.loads(line)
    assert entry["message"] == "bought 10 shares of GOOG"
    assert entry["level"] == entry["severity"] == "INFO"
    assert entry["logger"] == "tests.logs"
    assert entry["session"] == "20261121T000000Z-abcd"
    assert entry["agent"] == "sma-cross"
    assert entry["timestamp"].endswith("Z") and "T" in entry["timestamp"]
    assert entry["thread"] == threading.current_thread().name


def test_text_on_a_terminal(setups: list[LogSetup]) -> None:
    out = TTY()
    setups.append(setup := setup_logging("INFO", "auto", stream=out))
    assert not setup.json
    log.warning("feed %s delayed", "GOOG")
    [line] = lines(out)
    assert "WARNING" in line and "tests.logs: feed GOOG delayed" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_explicit_format_and_level(setups: list[LogSetup]) -> None:
    out = TTY()
    setups.append(setup_logging("DEBUG", "json", stream=out))
    log.debug("debug line")
    assert json.loads(lines(out)[0])["level"] == "DEBUG"
    with pytest.raises(ValueError, match="level"):
        setup_logging("LOUD", "json", stream=out)
    with pytest.raises(ValueError, match="format"):
        setup_logging("INFO", "xml", stream=out)  # type: ignore[arg-type]


def test_exception_is_one_json_entry(setups: list[LogSetup]) -> None:
    out = io.StringIO()
    setups.append(setup_logging("INFO", "json", stream=out))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("step failed")
    [line] = lines(out)  # the traceback is inside the entry, not extra lines
    entry = json.loads(line)
    assert entry["level"] == "ERROR"
    assert "RuntimeError: boom" in entry["exception"]


def test_registered_secrets_are_masked_everywhere(setups: list[LogSetup]) -> None:
    out = io.StringIO()
    canary = "CANARY-5f0c2b7e9d"
    setups.append(
        setup := setup_logging("INFO", "json", stream=out, secrets=[Secret(canary), None])
    )
    setup.add_secrets(["short"])  # too short to mask safely: left alone
    log.info("key is %s", canary)
    try:
        raise ValueError(f"bad key {canary}")
    except ValueError:
        log.exception("auth failed")
    log.info("a short word")
    text = out.getvalue()
    assert canary not in text
    assert text.count(REDACTED) >= 2
    assert "a short word" in text


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize(
    "secret",
    [
        'Quote"Secret1234',
        "Back\\slashSecret99",
        "Tab\tSecretValue7",
        "KeyEnds\n\n",
        "\ufeffBomKey123",
    ],
)
def test_secrets_that_json_or_repr_escape_are_masked_too(
    setups: list[LogSetup], fmt: str, secret: str
) -> None:
    """helper-82: the redactor matched the secret as written only. JSON lines escape ``"``,
    ``\\`` and control characters, and exception messages show ``repr``: a Secret Manager
    payload ending in a blank line reached the log whole in ``requests``' InvalidHeader, with
    one newline stripped."""
    out = io.StringIO()
    setups.append(setup_logging("INFO", fmt, stream=out, secrets=[Secret(secret)]))
    log.error("plain %s / repr %r / stripped %r", secret, secret, secret.strip())
    try:
        sent = secret.removesuffix("\n")  # requests strips one newline
        raise ValueError(f"Invalid leading whitespace in header value {sent!r}")
    except ValueError:
        log.exception("uncaught")
    text = out.getvalue()
    core = secret.strip()
    assert core not in text and repr(core)[1:-1] not in text
    assert json.dumps(core)[1:-1] not in text
    assert text.count(REDACTED) >= 4


def test_setup_is_idempotent_and_close_restores(setups: list[LogSetup]) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level, hook = root.level, sys.excepthook
    first, second = io.StringIO(), io.StringIO()
    a = setup_logging("INFO", "json", stream=first)
    b = setup_logging("INFO", "json", stream=second)
    log.info("once")
    assert first.getvalue() == "" and len(lines(second)) == 1
    b.close()
    a.close()
    assert root.handlers == before
    assert root.level == level
    assert sys.excepthook is hook


def test_uncaught_thread_exception_is_logged(setups: list[LogSetup]) -> None:
    out = io.StringIO()
    setups.append(setup_logging("INFO", "json", stream=out))

    def crash() -> None:
        raise KeyError("lost")

    t = threading.Thread(target=crash, name="worker-x")
    t.start()
    t.join()
    entries = [json.loads(ln) for ln in lines(out)]
    [entry] = [e for e in entries if e["level"] == "CRITICAL"]
    assert "worker-x" in entry["message"]
    assert "KeyError" in entry["exception"]


def test_warnings_go_to_the_log(setups: list[LogSetup]) -> None:
    import warnings

    out = io.StringIO()
    setups.append(setup_logging("INFO", "json", stream=out))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    entries = [json.loads(ln) for ln in lines(out)]
    assert any(e["logger"] == "py.warnings" and "deprecated thing" in e["message"] for e in entries)


def test_debug_wire_frames_of_websockets_never_reach_the_log(setups: list[LogSetup]) -> None:
    """helper-79: at LOG_LEVEL=DEBUG, websockets' frame trace printed alpaca-py's binary auth
    frame as hex, its last 8 bytes the end of the secret key (the redactor matches plain text).
    A real websockets client and server on 127.0.0.1 exchange a binary frame ending with a
    secret: no line holds it, in text or hex; our own DEBUG lines still pass."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    secret = "SeCrEt0123456789abcdefghijklmnopqrstuvwxyz"
    out = io.StringIO()
    setups.append(setup_logging("DEBUG", "json", stream=out, secrets=[Secret(secret)]))

    async def echo(ws: object) -> None:
        async for message in ws:  # type: ignore[attr-defined]
            await ws.send(message)  # type: ignore[attr-defined]

    async def main() -> bytes:
        async with serve(echo, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                await ws.send(b"\x83\xa6action\xa4auth\xa6secret" + secret.encode())
                return await ws.recv()  # type: ignore[return-value]

    assert asyncio.run(main()).endswith(secret.encode())
    logging.getLogger("runtime.test").debug("our own debug line")
    text = out.getvalue()
    tail_hex = " ".join(f"{b:02x}" for b in secret.encode()[-8:])
    assert secret not in text and secret[-8:] not in text and tail_hex not in text
    assert "our own debug line" in text


@pytest.mark.parametrize(
    ("value", "fmt"), [("text", "text"), (" JSON ", "json"), ("xml", "auto"), (None, "auto")]
)
def test_a_config_error_is_logged_in_the_format_asked_for(
    monkeypatch: pytest.MonkeyPatch, value: str | None, fmt: str
) -> None:
    """helper-82: the one line of a configuration that failed to load was JSON even with
    LOG_FORMAT=text (the configuration, LOG_FORMAT with it, was not loaded)."""
    from runtime.config import process_log_format

    if value is None:
        monkeypatch.delenv("LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("LOG_FORMAT", value)
    assert process_log_format() == fmt


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("cut", [8, 9, 14])
def test_a_secret_cut_short_in_an_error_text_is_masked(
    setups: list[LogSetup], fmt: str, cut: int
) -> None:
    """helper-84: an error page echoing the request headers, cut to 300 characters by the
    caller, ended inside the secret: 8 of its 15 characters were printed. A run of its first
    8 or more characters is masked too."""
    secret = "SkSeCrEt_9876zz"
    out = io.StringIO()
    setups.append(setup_logging("INFO", fmt, stream=out, secrets=[Secret(secret)]))
    page = f"<pre>APCA-API-SECRET-KEY: {secret}</pre>"
    cut_at = page.index(secret) + cut
    log.error("refused: %s; refusing to run", page[:cut_at])
    log.info("an unrelated SkSeCr word stays")  # 6 characters: not masked
    text = out.getvalue()
    assert secret[:8] not in text.replace("SkSeCr word", "")
    assert "refusing to run" in text and "SkSeCr word stays" in text
