"""The TCP probe of RAY_ADDRESS before ``ray.init`` (attack15 ray_unreach/: an unreachable
address hung the study, ``ray.init`` has no timeout)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from runtime.research.engine import PoolEngine, probe_ray_address


def test_a_refused_address_is_a_config_error_naming_ray_address() -> None:
    with socket.socket() as s:  # a free port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(
            ConfigError, match=rf"RAY_ADDRESS=.*cannot connect to Ray at 127.0.0.1:{port}"
        ):
            probe_ray_address(address, timeout_s=2.0)


def test_a_silent_address_fails_within_the_deadline() -> None:
    """A listener whose accept queue is full does not answer the handshake (Linux drops the
    SYN), like a firewalled GCS: the probe gives up at its deadline."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the backlog; later connects hang until they time out
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                fillers.append(c)
            t0 = time.monotonic()
            with pytest.raises(ConfigError, match=r"within 0\.5 s"):
                probe_ray_address(f"127.0.0.1:{port}", timeout_s=0.5)
            assert time.monotonic() - t0 < 5.0
        finally:
            for c in fillers:
                c.close()


def test_a_listening_address_passes_and_symbolic_ones_are_left_to_ray() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        probe_ray_address(f"127.0.0.1:{server.getsockname()[1]}", timeout_s=2.0)
    for address in ("auto", "local", "", "localhost"):
        probe_ray_address(address, timeout_s=0.01)


def _ignored(pid: int, sig: signal.Signals = signal.SIGINT) -> bool:
    """Bit ``sig`` of ``SigIgn`` in /proc/<pid>/status (proc(5))."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    raise AssertionError("no SigIgn line")


def test_pool_workers_ignore_sigint_from_their_start(tmp_path: Path) -> None:
    """attack15 sig_exact/: a Ctrl-C while the workers import never reaches them. Every
    worker exists once the engine is built, SIGINT ignored since exec (before the
    initializer), and the driver's own handler is back."""
    from tests.integration.test_research_trial import job

    before = signal.getsignal(signal.SIGINT)
    engine = PoolEngine(job(tmp_path), 2)
    try:
        procs = list(engine._pool._processes.values())
        assert len(procs) == 2
        assert all(_ignored(p.pid) for p in procs)
        # and SIGTERM: one to the whole process group reaches only the driver
        assert all(_ignored(p.pid, signal.SIGTERM) for p in procs)
        assert signal.getsignal(signal.SIGINT) is before
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # nothing left blocked
    finally:
        engine.close()


def test_a_signal_during_start_up_unwinds_and_handlers_are_restored() -> None:
    """attack15 sig_ray_e12/16: before the study's handler exists, SIGINT/SIGTERM raise a
    BaseException that unwinds the start-up (``optimize`` returns 128 + signal)."""
    from runtime.research.cli import _StartInterrupted, _StartSignals

    before = signal.getsignal(signal.SIGTERM)
    guard = _StartSignals()
    guard.install()
    try:
        with pytest.raises(_StartInterrupted) as caught:
            signal.raise_signal(signal.SIGTERM)
        assert caught.value.signum == signal.SIGTERM
        assert not isinstance(caught.value, Exception)  # no `except Exception` swallows it
    finally:
        guard.restore()
    assert signal.getsignal(signal.SIGTERM) is before
