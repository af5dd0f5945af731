"""What the ingestor has published, kept across restarts: the time of the last bar per symbol
whose publish Pub/Sub confirmed, and the gaps that could not be filled.

The file is one JSON object, rewritten atomically (temporary file in the same folder, fsync,
``os.replace``), so a kill leaves either the old or the new version, never a torn one::

    {"version": 1,
     "last_bar": {"AAPL": "2024-01-02T15:04:00Z", ...},
     "start": {"MSFT": "2024-01-02T15:03:00Z", ...},
     "checked": {"HALTED": "2024-01-02T15:02:00Z", ...},
     "gaps": [{"symbol": "AAPL", "start": "...", "end": "...", "reason": "..."}, ...]}

A bar is published when its time is after ``last_bar`` of its symbol; Pub/Sub's ordering key
keeps a symbol's bars in order, so one time per symbol is the whole "already published" set.
``start`` (optional; files without it are read as before) holds the start point of symbols with
nothing published yet: bars after it are fetched from history at a (re)connection, by this
ingestor, a restart or a standby taking over; a symbol leaves it once it is in ``last_bar``.
``checked`` (optional, likewise) holds, per symbol, the end of the last history request that
answered with no bar of the symbol after its ``last_bar`` (or start point) while everything
sent of it was confirmed: no bar of it exists up to that time beyond those published. It only
narrows a gap older than ``INGEST_MAX_BACKFILL_S`` (which history is not asked for) to the
part after it, so a symbol that does not trade for longer than that (a halted stock) is not
counted a gap again at every restart. A symbol leaves it once a later bar is in ``last_bar``.

Thread context: the ingestor's worker thread only.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.errors import ConfigError, DataError
from core.time import iso_utc
from feeds.pubsub.messages import MalformedMessageError, parse_timestamp

__all__ = ["Gap", "IngestState", "StateLock"]

logger = logging.getLogger(__name__)

VERSION = 1
MAX_GAPS_KEPT = 1_000


@dataclass(frozen=True, slots=True)
class Gap:
    """Bars of ``symbol`` in ``[start, end)`` that may be missing for good.

    Attributes:
        symbol: the symbol.
        start: first bar time that could not be fetched (ISO-8601 UTC).
        end: time of the bar published after the gap (ISO-8601 UTC), exclusive.
        reason: why (``"history failed: ..."``, ``"longer than INGEST_MAX_BACKFILL_S"``).
    """

    symbol: str
    start: str
    end: str
    reason: str


def _read_gap(k: int, g: object) -> Gap:
    """Gap ``k`` of a state file: an object of four texts, ``start`` and ``end`` times
    (helper-109: ``null`` or numbers there, accepted, made a standby's merge raise TypeError
    and its save erase the other ingestor's gaps).

    Raises:
        ValueError: anything else, naming the gap.
    """
    names = [f.name for f in fields(Gap)]
    if not isinstance(g, dict) or sorted(g) != sorted(names):
        raise ValueError(f"gap {k}: expected an object with {', '.join(names)}, got {g!r:.200}")
    for name in names:
        if not isinstance(g[name], str):
            raise ValueError(f"gap {k}: {name} must be text, got {g[name]!r:.100}")
    for name in ("start", "end"):
        try:
            parse_timestamp(g[name])
        except MalformedMessageError as e:
            raise ValueError(f"gap {k}: {name} is not a time ({e})") from e
    return Gap(**g)


_TimeOrder = tuple[bool, datetime, str]


def _gap_order(gap: Gap) -> tuple[_TimeOrder, _TimeOrder, str, str, str, str]:
    """Sort key of a gap: start, end, then symbol and reason, then the times' texts (one time
    written two ways in a hand-edited file: helper-110), so the order of distinct gaps does not
    depend on which state took in the other."""
    return (
        _time_order(gap.start),
        _time_order(gap.end),
        str(gap.symbol),
        str(gap.reason),
        str(gap.start),
        str(gap.end),
    )


def _member(doc: dict[str, Any], name: str, kind: type) -> Any:
    """``doc[name]`` (absent: empty), which must be a JSON object (``dict``) or array
    (``list``): helper-110 found a list of pairs, ``""`` and ``{}`` read as empty or as keys.

    Raises:
        ValueError: another JSON type, naming the member.
    """
    value = doc.get(name, kind())
    if type(value) is not kind:
        want = "an object" if kind is dict else "an array"
        raise ValueError(f"{name} must be {want}, got {type(value).__name__}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of the state file as a ``dict``, refusing a name given twice: JSON
    leaves what duplicate names mean to the reader (RFC 8259, section 4) and Python keeps the
    last, so a hand-merged file with two ``last_bar`` entries of a symbol read one of them
    silently (helper-115, noted and left last session).

    Raises:
        ValueError: naming the duplicated key.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key!r} appears twice in one object")
        out[key] = value
    return out


def _time_order(text: str) -> _TimeOrder:
    """A gap time by time, not by text (:func:`iso_utc` omits a zero fraction, so
    ``...:00Z`` sorts after ``...:00.5Z`` as text); a value that is not a time (a gap built in
    code: :meth:`IngestState.load` refuses one in a file) after every time, by its text."""
    try:
        return False, parse_timestamp(text), ""
    except (MalformedMessageError, TypeError, ValueError):
        return True, datetime.min.replace(tzinfo=UTC), str(text)


@dataclass(slots=True)
class IngestState:
    """The state file's content (see the module docstring).

    Attributes:
        path: the file.
        last_bar: confirmed last bar time per symbol (aware UTC).
        gaps: unfilled gaps, oldest first: as recorded, by start once a merge brought new
            ones (at most :data:`MAX_GAPS_KEPT`, the oldest dropped).
        start: start point per symbol with nothing published yet (aware UTC).
        checked: per symbol, history answered up to this time with nothing left to publish
            (aware UTC; see the module docstring).
    """

    path: Path
    last_bar: dict[str, datetime] = field(default_factory=dict)
    gaps: list[Gap] = field(default_factory=list)
    start: dict[str, datetime] = field(default_factory=dict)
    checked: dict[str, datetime] = field(default_factory=dict)
    _dirty: bool = False

    @classmethod
    def load(cls, path: Path) -> IngestState:
        """Read ``path``; a missing file is an empty state (first start).

        Raises:
            DataError: the file exists but is not a state file (names the file and the reason).
        """
        if not path.exists():
            return cls(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
            # The version as the integer written (helper-110: true and 1.0 equal 1 in Python)
            if type(doc) is not dict or type(doc.get("version")) is not int:
                raise ValueError(f"expected an object with version {VERSION}")
            if doc["version"] != VERSION:
                raise ValueError(f"expected version {VERSION}, got {doc['version']}")
            last = {k: parse_timestamp(v) for k, v in _member(doc, "last_bar", dict).items()}
            gaps = [_read_gap(k, g) for k, g in enumerate(_member(doc, "gaps", list))]
            start = {k: parse_timestamp(v) for k, v in _member(doc, "start", dict).items()}
            checked = {k: parse_timestamp(v) for k, v in _member(doc, "checked", dict).items()}
        # RecursionError: JSON nested past the interpreter's limit (helper-110: uncaught, exit 1)
        except (OSError, ValueError, TypeError, RecursionError, MalformedMessageError) as e:
            raise DataError(f"INGEST_STATE_PATH={path}: not an ingest state file ({e})") from e
        if len(gaps) > MAX_GAPS_KEPT:
            # A file from before the limit, or a hand edit: the newest by start kept, as a
            # merge keeps them (helper-115: cut in the file's order, a late-found older gap
            # pushed out a newer one)
            logger.warning(
                "INGEST_STATE_PATH=%s: %d gaps recorded; the %d oldest by start are dropped "
                "(at most %d are kept)",
                path,
                len(gaps),
                len(gaps) - MAX_GAPS_KEPT,
                MAX_GAPS_KEPT,
            )
            gaps = sorted(gaps, key=_gap_order)[-MAX_GAPS_KEPT:]
        return cls(
            path,
            last,
            gaps,
            {s: t for s, t in start.items() if s not in last},
            {s: t for s, t in checked.items() if s not in last or t > last[s]},
        )

    def set_start(self, symbol: str, ts: datetime) -> None:
        """Start ``symbol`` (nothing published) after ``ts``; ignored once it is in ``last_bar``."""
        if symbol not in self.last_bar and self.start.get(symbol) != ts:
            self.start[symbol] = ts
            self._dirty = True

    def merge(self, other: IngestState) -> None:
        """Take in another writer's file (a standby taking over a shared file): every symbol's
        later ``last_bar``, the start points of symbols still without one, the gaps not already
        here (helper-104: a standby saving its start-time copy rolled other symbols back and
        erased the first one's gaps). With new gaps, the gaps are then ordered by start (then
        end, symbol, reason), so the :data:`MAX_GAPS_KEPT` limit drops the oldest."""
        for s, ts in other.last_bar.items():
            self.confirm(s, ts)
        for s, ts in other.start.items():
            mine = self.start.get(s)
            if mine is None or ts < mine:  # the earlier: bars from before, none twice
                self.set_start(s, ts)
        for s, ts in other.checked.items():
            self.mark_checked(s, ts)
        known = set(self.gaps)
        new = [g for g in dict.fromkeys(other.gaps) if g not in known]
        if new:
            # By start: the two files' record orders cannot be compared, and appended after
            # this state's own, older gaps of the other file were kept over newer ones here.
            self._keep_gaps(sorted([*self.gaps, *new], key=_gap_order))

    def confirm(self, symbol: str, ts: datetime) -> None:
        """Pub/Sub confirmed the bar of ``symbol`` at ``ts``."""
        prev = self.last_bar.get(symbol)
        if prev is None or ts > prev:
            self.last_bar[symbol] = ts
            self.start.pop(symbol, None)
            seen = self.checked.get(symbol)
            if seen is not None and seen <= ts:
                del self.checked[symbol]
            self._dirty = True

    def forget_checked(self, symbol: str) -> None:
        """Drop ``symbol``'s ``checked`` time (one that cannot be trusted)."""
        if self.checked.pop(symbol, None) is not None:
            self._dirty = True

    def mark_checked(self, symbol: str, ts: datetime) -> None:
        """History answered up to ``ts`` with nothing of ``symbol`` left to publish (see the
        module docstring); kept when later than what is kept and than its last bar."""
        prev = self.checked.get(symbol)
        last = self.last_bar.get(symbol)
        if (prev is None or ts > prev) and (last is None or ts > last):
            self.checked[symbol] = ts
            self._dirty = True

    def add_gap(self, gap: Gap) -> None:
        """Record an unfilled gap after those recorded before (see :meth:`_keep_gaps`)."""
        self._keep_gaps([*self.gaps, gap])

    def _keep_gaps(self, gaps: list[Gap]) -> None:
        """Make ``gaps`` (oldest first) the state's gaps: the last :data:`MAX_GAPS_KEPT` of
        them, the oldest dropped. Changed only when that differs (helper-109: a merge whose new
        gaps were all older than the kept ones marked the state changed, one needless save)."""
        kept = gaps[-MAX_GAPS_KEPT:]
        if kept != self.gaps:
            self.gaps[:] = kept
            self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "last_bar": {s: iso_utc(t) for s, t in sorted(self.last_bar.items())},
            "start": {s: iso_utc(t) for s, t in sorted(self.start.items())},
            "checked": {s: iso_utc(t) for s, t in sorted(self.checked.items())},
            "gaps": [asdict(g) for g in self.gaps],
        }

    def check_writable(self) -> None:
        """Create the file's folder and a temporary file in it, so a state file that cannot be
        written fails at start rather than after the first publishes.

        Raises:
            ConfigError: naming ``INGEST_STATE_PATH``.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            os.close(fd)
            Path(tmp).unlink()
        except OSError as e:
            raise ConfigError(f"INGEST_STATE_PATH={self.path}: cannot be written ({e})") from e

    def save(self) -> None:
        """Write the file atomically when something changed.

        Raises:
            OSError: the folder is not writable (the caller stops: without the file a restart
                would publish again what was published).
        """
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.as_dict(), indent=1, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._dirty = False


class StateLock:
    """An advisory lock (``flock``) on ``<state file>.lock`` beside the state file, held by the
    ingestor that publishes while it is connected: taken before a connection's catch-up,
    given back once a disconnection's or a stop's last confirmations are in the state file.

    A standby sharing the state file (``INGEST_ON_CONNECTION_LIMIT=wait``) is let in by Alpaca
    as soon as the first ingestor's connection closes, while that ingestor may still publish
    its queued bars and wait for their confirmations before it saves the file. Read then, the
    file is stale, and the standby's catch-up published those bars again (helper-100 F7:
    363-697 bars of 300 symbols twice). With the lock, the standby reads the file once the
    other one has saved it, and an ingestor without the lock publishes and saves nothing.
    The kernel releases the lock when its process ends, also by ``kill -9``; ``flock`` works
    across processes and pods on a local or NFSv4 volume (Linux emulates it with a byte-range
    lock there). Deleting the lock file while an ingestor runs defeats it.

    Raises:
        ConfigError: (constructor) the lock file can be neither created nor opened.

    Thread context: :meth:`acquire` and :meth:`release` on the worker thread; :meth:`release`
    also from ``stop()`` once the worker has ended.
    """

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            try:  # another user's file: a read-only handle takes the lock as well
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise ConfigError(f"INGEST_STATE_PATH: lock file {self.path}: {e}") from e
        except OSError as e:
            raise ConfigError(f"INGEST_STATE_PATH: lock file {self.path}: {e}") from e
        self._held = False

    @property
    def held(self) -> bool:
        """This object holds the lock."""
        return self._held

    def acquire(self, stop: threading.Event, poll_s: float = 0.05) -> bool:
        """Take the lock, waiting while another ingestor holds it.

        Returns:
            True once held (at once when already held); False when ``stop`` was set while
            waiting.
        """
        if self._fd < 0:
            return False  # closed by a stop
        waited = False
        while not self._held:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    waited = True
                    logger.warning(
                        "another ingestor holds %s (it is saving the state file, or two "
                        "ingestors share INGEST_STATE_PATH): waiting for it before the catch-up",
                        self.path,
                    )
                if stop.wait(poll_s):
                    return False
                continue
            self._held = True
            if waited:
                logger.info("state file lock %s taken; reading the state file again", self.path)
        return True

    def release(self) -> None:
        """Let another ingestor in (idempotent)."""
        if self._held:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Release and close the file (idempotent)."""
        self.release()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
