"""A disk cache of CSV bars' data hashes, keyed by the bars' content.

Hashing a CSV file's bars (:func:`core.bars.bar_hashes`, ~4-10 us a bar) is the one cost of a
recorded backtest that repeats, unchanged, on every run over the same file: a second backtest,
every trial of a study, a report. The hashes of a whole series are kept in one small file
(16 bytes a bar) named by a BLAKE2b-128 digest of what they are computed from: the symbol, the
bar times, every number column's float64 bytes and every text column, in order, plus the
source of :mod:`core.bars` itself (a change to how bars are hashed starts a new cache). Any
difference in the bars, down to one bit of one value, is a different key; a stored file is
used only when its length and its own checksum (a BLAKE2b-128 trailer over the digests) match,
so a truncated or damaged file is computed again, never trusted.

Where: ``FMEL_HASH_CACHE_DIR`` (``off`` disables the cache); unset or empty, the user's cache
folder (:func:`platformdirs.user_cache_dir`, ``~/.cache/fmel/bar-hashes`` on Linux). Files
are written atomically (a temporary file renamed over the target); a folder that cannot be
written (a read-only image, a full disk) is logged once at INFO and the run goes on without
the cache. Series under 256 bars are not kept (hashing them is cheaper than a file). The folder
is kept under :data:`MAX_BYTES` by removing the files least recently used (their
modification time is refreshed on every use) when a new one is stored.

Thread context: any thread. Two processes storing the same key write the same bytes; the
rename makes either whole file the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import platformdirs

import core.bars

logger = logging.getLogger(__name__)

ENV = "FMEL_HASH_CACHE_DIR"
OFF = "off"
MAX_BYTES = 256 * 2**20  # the folder's size bound, bytes
DIGEST_BYTES = 16  # a data hash is BLAKE2b-128: 32 hex characters
SUFFIX = ".barhashes"
_MIN_BARS = 256  # fewer bars: hashed again rather than a file per series (core.bars is fast)

_lock = threading.Lock()
_folder: Path | None = None
_configured = False
_warned: set[str] = set()
_scheme: bytes | None = None


def configure(value: Path | str | None) -> None:
    """Use this cache folder from now on: a path, ``""`` (the user's cache folder) or ``"off"``
    / ``None`` (no cache). The runner calls it with ``FMEL_HASH_CACHE_DIR``; without a call,
    :func:`folder` reads that variable."""
    global _folder, _configured
    with _lock:
        _folder = None if value is None else _parse(str(value))
        _configured = True


def default_folder() -> Path:
    """The user's cache folder for bar hashes (``~/.cache/fmel/bar-hashes`` on Linux)."""
    return Path(platformdirs.user_cache_dir("fmel")) / "bar-hashes"


def _parse(text: str) -> Path | None:
    text = text.strip()
    if text.lower() == OFF:
        return None
    return Path(text).expanduser() if text else default_folder()


def folder() -> Path | None:
    """The cache folder in use, or ``None`` when the cache is off."""
    if _configured:
        return _folder
    return _parse(os.environ.get(ENV, ""))


def _scheme_digest() -> bytes:
    """BLAKE2b of core/bars.py: how a bar is hashed (a new version of it is a new key)."""
    global _scheme
    if _scheme is None:
        source = Path(core.bars.__file__).read_bytes()
        _scheme = hashlib.blake2b(source, digest_size=16).digest()
    return _scheme


def cache_key(
    symbol: str,
    times_ns: np.ndarray,
    numeric: Mapping[str, np.ndarray],
    text: Mapping[str, Sequence[str | None]],
) -> str:
    """The key of a series: 32 hex characters of BLAKE2b-128 over what its hashes are made of.

    Args:
        symbol: every bar's symbol.
        times_ns: bar times, int64 nanoseconds since 1970 UTC, shape ``(n,)``.
        numeric: number columns by field name, each shape ``(n,)``.
        text: text columns by field name, each ``n`` long (None: missing).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(_scheme_digest())
    head = {"symbol": symbol, "n": len(times_ns), "numeric": list(numeric), "text": list(text)}
    h.update(json.dumps(head, ensure_ascii=False).encode())
    h.update(np.ascontiguousarray(times_ns, dtype="<i8").tobytes())
    for col in numeric.values():
        h.update(np.ascontiguousarray(col, dtype="<f8").tobytes())
    for tcol in text.values():
        h.update(json.dumps(list(tcol), ensure_ascii=False).encode())
    return h.hexdigest()


def load(key: str, n: int) -> list[str] | None:
    """The ``n`` hashes stored under ``key``, or ``None`` (no cache, no file, or a file whose
    length or checksum is wrong: it is removed)."""
    where = folder()
    if where is None or n < _MIN_BARS:
        return None
    path = where / f"{key}{SUFFIX}"
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    body, trailer = raw[:-DIGEST_BYTES], raw[-DIGEST_BYTES:]
    if (
        len(raw) != (n + 1) * DIGEST_BYTES
        or hashlib.blake2b(body, digest_size=DIGEST_BYTES).digest() != trailer
    ):
        logger.info("bar hash cache: %s is damaged; computing the hashes again", path)
        _remove(path)
        return None
    try:
        os.utime(path)  # recently used: kept when the folder is trimmed
    except OSError:
        pass
    text = body.hex()
    width = 2 * DIGEST_BYTES
    return [text[i : i + width] for i in range(0, len(text), width)]


def store(key: str, hashes: Sequence[str | None]) -> bool:
    """Keep ``hashes`` under ``key`` (only a complete series: no ``None``). Never raises: a
    folder that cannot be written is logged once at INFO. Returns whether it was stored."""
    where = folder()
    if where is None or len(hashes) < _MIN_BARS or any(h is None for h in hashes):
        return False
    try:
        body = bytes.fromhex("".join(hashes))  # type: ignore[arg-type]  # no None (above)
    except ValueError:
        return False  # not hex digests: nothing this module made
    if len(body) != len(hashes) * DIGEST_BYTES:
        return False
    data = body + hashlib.blake2b(body, digest_size=DIGEST_BYTES).digest()
    path = where / f"{key}{SUFFIX}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{key}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            _remove(Path(tmp))
            raise
        _trim(where, keep=path)
    except OSError as e:
        _warn_once(str(where), f"bar hash cache: cannot write {where} ({e}); runs go on without it")
        return False
    return True


def _trim(where: Path, keep: Path) -> None:
    """Remove the least recently used files until the folder holds at most :data:`MAX_BYTES`."""
    files = []
    total = 0
    for p in where.glob(f"*{SUFFIX}"):
        try:
            st = p.stat()
        except OSError:
            continue
        files.append((st.st_mtime, st.st_size, p))
        total += st.st_size
    files.sort()
    for _, size, p in files:
        if total <= MAX_BYTES:
            break
        if p != keep:
            _remove(p)
            total -= size


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _warn_once(where: str, message: str) -> None:
    with _lock:
        if where in _warned:
            return
        _warned.add(where)
    logger.info("%s", message)
