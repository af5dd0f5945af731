"""``python -m runtime.drain``: write a decision spill file to its store without running an agent.

When a sink was unavailable, a run keeps the decisions it could not write in
``$FMEL_SPILL_DIR/spill-<sink>.jsonl`` (and a killed paper run may leave its journal there). The
next run writes them first; this command does it now, with the same environment as the run
(``FMEL_SINK``, ``FMEL_SPILL_DIR``, ``FMEL_DATASET``/``FMEL_TABLE``, ``GOOGLE_CLOUD_PROJECT``,
``BIGQUERY_EMULATOR_HOST``, ``FMEL_LOCAL_PATH``, ``LOG_*``, ``SHUTDOWN_TIMEOUT_S``), read by
:func:`runtime.config.load_process_config`. Rows already in the store (sent before a crash) are
recognised by ``decision_id`` and not written twice.

It drains until the spill is empty, ``--timeout-s`` passes (default
:data:`DEFAULT_TIMEOUT_S`, 900 s: an unreachable store does not keep it running forever), or
SIGINT/SIGTERM; what is left stays in the file and is reported. Do not run it while a runner uses
the same ``FMEL_SPILL_DIR``.

Prints one JSON line on stdout: ``{"drained": N, "already_stored": S, "rejected": R, "torn": T,
"left": L, "spill": PATH}`` (``torn``: lines cut by a crash during an append, unreadable, dropped
and logged; so ``drained + rejected + torn + left`` is what the file held; ``already_stored``: of
``drained``, rows the store held already, found by ``decision_id`` and not sent again: a write
cut short by a stop, or one that got no answer).

Exit codes: 0 nothing left, 1 rows left (store unreachable, stopped, or out of time), 2 bad
configuration.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a signal during start-up is held
    from core.held_signals import hold_early

    hold_early()

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from core.errors import AppError, ConfigError, StopRequestedError
from core.signals import StopSignals
from runtime.assembly import claim_spill_dir, make_sink, make_writer
from runtime.config import AppConfig, load_process_config, process_log_format
from runtime.logs import setup_logging
from runtime.secrets import secrets_in

logger = logging.getLogger(__name__)

WAIT_STEP_S = 0.5  # how often the main thread looks at its stop flag while the writer drains
DEFAULT_TIMEOUT_S = 900.0  # --timeout-s when not given, seconds


def drain(config: AppConfig, *, timeout_s: float | None, stop: threading.Event) -> dict[str, Any]:
    """Drain the spill file of ``config.fmel`` into its sink.

    Args:
        config: the run configuration (``fmel``, ``bigquery``, ``ops`` are used).
        timeout_s: give up after this many seconds (None: no limit; the command always
            passes one, :data:`DEFAULT_TIMEOUT_S` unless told).
        stop: set to end early (a signal).

    Returns:
        ``{"drained": rows stored, "rejected": rows refused for good, "torn": torn lines
        dropped, "left": rows still in the file, "spill": its path}``.

    Raises:
        SinkError: the store can never take these rows (see the message).
        ConfigError: a runner (or another drain) uses ``FMEL_SPILL_DIR``.
    """
    claim = claim_spill_dir(config.fmel.spill_dir)  # not while a runner uses the folder
    try:
        return _drain(config, timeout_s=timeout_s, stop=stop)
    finally:
        if claim is not None:
            claim.release()


def _drain(config: AppConfig, *, timeout_s: float | None, stop: threading.Event) -> dict[str, Any]:
    sink = make_sink(config.fmel, config.bigquery)
    # journal=True: a killed paper run's journal is moved into the spill and drained with it.
    writer = make_writer(config.fmel, sink, journal=True)
    waiting = writer.spill.pending()
    journal = writer.journal.path if writer.journal is not None else None
    if not waiting and not (journal and journal.exists()):
        logger.info("nothing to drain in %s", writer.spill_path)
        return {
            "drained": 0,
            "already_stored": 0,
            "rejected": 0,
            "torn": 0,
            "left": 0,
            "spill": str(writer.spill_path),
        }
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    writer.start()
    try:
        while not stop.is_set():
            if writer.wait_drained(WAIT_STEP_S):
                break
            if deadline is not None and time.monotonic() >= deadline:
                logger.warning("--timeout-s (%.0f s) passed; stopping the drain", timeout_s)
                break
    finally:
        stats = writer.stop(timeout_s=config.ops.shutdown_timeout_s)
    sink_stats = getattr(sink, "stats", None)
    return {
        "drained": stats.replayed,
        "already_stored": int(getattr(sink_stats, "skipped_written", 0)),
        "rejected": stats.earlier_rejected,
        "torn": stats.earlier_torn,
        "left": stats.in_spill,
        "spill": str(writer.spill_path),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m runtime.drain",
        description="Write the decision spill file to its store (FMEL_SINK) without running "
        "an agent.",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"stop after this many seconds (default {DEFAULT_TIMEOUT_S:.0f}); rows left stay "
        "in the spill file and the exit code is 1",
    )
    args = parser.parse_args(argv)
    try:
        config = load_process_config()
    except StopRequestedError as e:  # a SIGTERM while secrets were read: nothing ran
        setup_logging("INFO", process_log_format())
        logger.warning("%s: exiting", e)
        return 0
    except ConfigError as e:
        setup_logging("INFO", process_log_format())
        logger.error("configuration error: %s", e)
        return 2
    logs = setup_logging(config.ops.log_level, config.ops.log_format)
    logs.add_secrets(secrets_in(config))
    logs.bind(session="drain", agent="drain")
    stop = threading.Event()

    def on_stop(name: str) -> None:  # on the relay thread (core.signals): Event.set takes a lock
        logger.warning(
            "%s: stopping the drain; writing for at most SHUTDOWN_TIMEOUT_S (%g s) more, what "
            "is left stays in the spill (a second signal exits at once)",
            name,
            config.ops.shutdown_timeout_s,
        )
        stop.set()

    def on_force(name: str) -> None:  # in the handler: as the runner's second signal
        logger.error("second %s: exiting at once; what is left stays in the spill", name)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(128 + signal.Signals[name].value)

    # Kept until the process ends: a signal while it exits only logs (not 128 + N).
    StopSignals(on_stop, on_force).install()
    try:
        result = drain(config, timeout_s=args.timeout_s, stop=stop)
    except (ConfigError, AppError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2 if isinstance(e, ConfigError) else 1
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    if result["torn"]:
        logger.warning("%d torn lines were dropped from %s", result["torn"], result["spill"])
    if result["left"]:
        logger.warning("%d decision records are still in %s", result["left"], result["spill"])
        return 1
    return 0


if __name__ == "__main__":
    from core.held_signals import ignore_for_exit

    try:
        exit_code = main()
    finally:
        ignore_for_exit()  # the outcome is printed: a signal must not change the exit code
    sys.exit(exit_code)
