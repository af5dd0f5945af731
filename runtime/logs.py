"""Process logging: JSON lines in a container, readable text on a terminal.

:func:`setup_logging` installs one handler on the root logger (stderr by default):

* ``json``: one object per line with ``timestamp`` (RFC 3339, UTC, milliseconds), ``severity``
  and ``level`` (the same; ``severity`` is the field Cloud Logging on GKE reads), ``logger``,
  ``message``, ``session``, ``agent``, ``thread`` and, when there is one, ``exception`` (the
  formatted traceback). ``kubectl logs`` and Cloud Logging both take these as structured
  entries.
* ``text``: ``2026-11-21 05:01:02,123 INFO    runtime.runner: message``.
* ``auto`` (the default): text when the stream is a terminal, JSON otherwise.

Every line passes through a redactor that replaces the revealed text of registered
:class:`~runtime.secrets.Secret` values with ``****[redacted]``: a last line of defence, not the
reason secrets stay out of logs (they never print themselves). The marker differs from a
Secret's own ``****`` so tests can assert the redactor never had anything to do.

Uncaught exceptions on the main thread or any other thread are logged through the same handler
(``sys.excepthook`` / ``threading.excepthook``), so a crash is one JSON entry, not a raw
traceback. :meth:`LogSetup.close` undoes everything (tests call it).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TextIO

from core.secret import MASK, Secret

LogFormat = Literal["auto", "text", "json"]

REDACTED = MASK + "[redacted]"
# Secrets shorter than this are not redacted: replacing "a" in every line would garble logs and
# such a value is no secret anyway.
MIN_REDACT_LEN = 6
# A secret's first characters this many or more, cut off there, are masked too (a random
# 8-character run does not occur by chance in a log line).
PREFIX_REDACT_LEN = 8


class _Context(logging.Filter):
    """Adds ``session`` and ``agent`` to every record (unless the call passed its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.session = ""
        self.agent = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = self.session
        if not hasattr(record, "agent"):
            record.agent = self.agent
        return True


class _Redactor:
    """Replaces registered secret texts with :data:`REDACTED`; reads are thread-safe."""

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()

    def add(self, values: Iterable[str]) -> None:
        new = {
            form
            for v in values
            for form in _forms(v)
            if len(v) >= MIN_REDACT_LEN and len(form) >= MIN_REDACT_LEN
        }
        # Longest first so a secret containing another is masked whole.
        self._values = tuple(sorted(set(self._values) | new, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
            elif len(value) > PREFIX_REDACT_LEN and value[:PREFIX_REDACT_LEN] in text:
                text = _mask_prefixes(text, value)
        return text


def _mask_prefixes(text: str, value: str) -> str:
    """``text`` with every run of at least :data:`PREFIX_REDACT_LEN` leading characters of
    ``value`` masked: an error text cut to a length (``str(e)[:300]``) can end inside a secret
    (helper-84: an error page echoing the request headers showed 8 of a secret's 15
    characters)."""
    head = value[:PREFIX_REDACT_LEN]
    out: list[str] = []
    i = 0
    while (j := text.find(head, i)) >= 0:
        n = PREFIX_REDACT_LEN
        while n < len(value) and j + n < len(text) and text[j + n] == value[n]:
            n += 1
        out += [text[i:j], REDACTED]
        i = j + n
    return "".join(out) + text[i:]


def _forms(value: str) -> set[str]:
    """The texts a secret shows as in a line: itself and without surrounding whitespace (a
    library strips one newline of ``"key\\n\\n"`` and puts the rest in its error), each as
    written, as ``repr`` escapes it (exception messages), as JSON escapes it (the JSON lines),
    and ``repr`` inside JSON. A fresh-context attack found a Secret Manager payload ending in
    a blank line printed whole by ``requests``' ``InvalidHeader``, and secrets with ``"``,
    ``\\`` or a tab never masked in JSON lines."""
    out: set[str] = set()
    for v in {value, value.strip()}:
        escaped = repr(v)[1:-1]
        out |= {v, escaped, json.dumps(v, ensure_ascii=False)[1:-1]}
        out.add(json.dumps(escaped, ensure_ascii=False)[1:-1])
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record; see the module docstring for the fields."""

    def __init__(self, redact: _Redactor | None = None) -> None:
        super().__init__()
        self._redact = redact or _Redactor()

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "severity": record.levelname,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session": getattr(record, "session", ""),
            "agent": getattr(record, "agent", ""),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return self._redact(json.dumps(entry, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)-7s %(name)s: %(message)s`` with redaction."""

    def __init__(self, redact: _Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._redact = redact or _Redactor()

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(super().format(record))


class LogSetup:
    """What :func:`setup_logging` installed; lets the runner add context and secrets later.

    Attributes:
        handler: the root handler.
        json: True when lines are JSON.
    """

    _previous_level: int
    _old_excepthook: Callable[..., Any]
    _old_thread_hook: Callable[[threading.ExceptHookArgs], Any]

    def __init__(
        self,
        handler: logging.Handler,
        context: _Context,
        redactor: _Redactor,
        json_lines: bool,
        replaces: LogSetup | None = None,
    ) -> None:
        self.handler = handler
        self.json = json_lines
        self._context = context
        self._redactor = redactor
        self._closed = False
        if replaces is not None and not replaces._closed:
            # Take over what the replaced setup would have restored, and retire it.
            self._previous_level = replaces._previous_level
            self._old_excepthook = replaces._old_excepthook
            self._old_thread_hook = replaces._old_thread_hook
            replaces._closed = True
        else:
            self._previous_level = logging.getLogger().level
            self._old_excepthook = sys.excepthook
            self._old_thread_hook = threading.excepthook
        sys.excepthook = self._excepthook
        threading.excepthook = self._thread_excepthook

    def bind(self, *, session: str | None = None, agent: str | None = None) -> None:
        """Set the ``session``/``agent`` fields of every following line."""
        if session is not None:
            self._context.session = session
        if agent is not None:
            self._context.agent = agent

    def add_secrets(self, secrets: Iterable[Secret | str | None]) -> None:
        """Register secret values to mask in every following line (``None`` is ignored)."""
        self._redactor.add(
            s.reveal() if isinstance(s, Secret) else s for s in secrets if s is not None
        )

    def _excepthook(
        self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            self._old_excepthook(exc_type, exc, tb)
            return
        logging.getLogger("runtime").critical(
            "uncaught %s", exc_type.__name__, exc_info=(exc_type, exc, tb)
        )

    def _thread_excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("runtime").critical(
            "uncaught %s in thread %s",
            args.exc_type.__name__,
            args.thread.name if args.thread else "?",
            exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
        )

    def close(self) -> None:
        """Remove the handler, restore the hooks and the root level. Idempotent; a setup
        replaced by a later :func:`setup_logging` call is already closed."""
        if self._closed:
            return
        self._closed = True
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._previous_level)
        sys.excepthook = self._old_excepthook
        threading.excepthook = self._old_thread_hook
        logging.captureWarnings(False)


_INSTALLED = "_runtime_logs_handler"


# Libraries whose DEBUG lines carry wire frames: websockets prints each binary frame as its
# first 16 and last 8 bytes in hex, and alpaca-py's auth frame ends with the secret key (a
# fresh-context attack found its last 8 bytes in the log at LOG_LEVEL=DEBUG: the redactor
# matches the plain text only). Their lines below INFO are dropped whatever LOG_LEVEL is.
_WIRE_LOGGERS = ("websockets",)


def _not_wire_debug(record: logging.LogRecord) -> bool:
    """Handler filter: False for a wire-level library's line below INFO (:data:`_WIRE_LOGGERS`)."""
    if record.levelno >= logging.INFO:
        return True
    name = record.name
    return not any(name == w or name.startswith(w + ".") for w in _WIRE_LOGGERS)


def setup_logging(
    level: str = "INFO",
    fmt: LogFormat = "auto",
    *,
    stream: TextIO | None = None,
    secrets: Iterable[Secret | str | None] = (),
) -> LogSetup:
    """Configure the root logger for this process.

    Replaces a handler installed by an earlier call (idempotent), leaves handlers others added
    (pytest's capture) alone. Warnings go to the log (``py.warnings``).

    Args:
        level: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` (``OpsConfig.log_level``).
        fmt: ``auto``, ``text`` or ``json`` (``OpsConfig.log_format``).
        stream: where lines go; default ``sys.stderr`` (read at call time).
        secrets: values to mask in every line.

    Returns:
        The :class:`LogSetup`; call :meth:`LogSetup.bind` once the session id is known.

    Raises:
        ValueError: unknown level or format.
    """
    if fmt not in ("auto", "text", "json"):
        raise ValueError(f"log format must be auto, text or json, got {fmt!r}")
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        isatty = getattr(out, "isatty", None)
        fmt = "text" if callable(isatty) and isatty() else "json"
    root = logging.getLogger()
    replaces: LogSetup | None = None
    for old in [h for h in root.handlers if getattr(h, _INSTALLED, None) is not None]:
        replaces = getattr(old, _INSTALLED)
        root.removeHandler(old)
    context, redactor = _Context(), _Redactor()
    redactor.add(s.reveal() if isinstance(s, Secret) else s for s in secrets if s is not None)
    handler = logging.StreamHandler(out)
    handler.addFilter(_not_wire_debug)
    handler.addFilter(context)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    setup = LogSetup(handler, context, redactor, fmt == "json", replaces)
    setattr(handler, _INSTALLED, setup)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    return setup
