"""A disk cache of CSV bars' data hashes, keyed by the bars' content.

Hashing a CSV file's bars (:func:`core.bars.bar_hashes`, ~4-10 us a bar) is the one cost of a
recorded backtest that repeats, unchanged, on every run over the same file: a second backtest,
every trial of a study, a report. The hashes of a whole series are kept in one small file
(16 bytes a bar) named by a BLAKE2b-128 digest of what they are computed from: the symbol, the
bar times, every number column's float64 bytes and every text column, in order, plus the
compiled code of :mod:`core.bars` and :mod:`core.time` as this process runs it (a change to how
bars are hashed starts a new cache). Any difference in the bars, down to one bit of one value,
is a different key. A stored file is used only when it is a regular file of exactly the
series' length whose trailer (BLAKE2b-128 over the key, the bar count and the digests)
matches: a truncated or damaged file, or one copied under another series' name, is computed
again and replaced, never trusted; a pipe or a device at the path is ignored.

Where: :func:`configure` (the runner, a study's workers and ``bench_fmel.py`` pass it
``FMEL_HASH_CACHE_DIR``, read by the configuration like every setting: a folder, ``off``, or
empty); in a process that never configures it (a notebook), the user's cache folder
(:func:`platformdirs.user_cache_dir`, ``~/.cache/fmel/bar-hashes`` on Linux). Files are
written atomically (a temporary file renamed over the target); a folder that cannot be written
(a read-only image, a full disk) or named (no home directory) is logged once at INFO and the
run goes on without the cache. Series under 256 bars are not kept (hashing them is cheaper
than a file). The folder is kept under :data:`MAX_BYTES` by removing the files least recently
used (their modification time is refreshed on every use) when a new one is stored.

Thread context: any thread. Two processes storing the same key write the same bytes; the
rename makes either whole file the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import CodeType, FunctionType, ModuleType

import numpy as np
import platformdirs

import core.bars
import core.time

logger = logging.getLogger(__name__)

ENV = "FMEL_HASH_CACHE_DIR"
OFF = "off"
MAX_BYTES = 256 * 2**20  # the folder's size bound, bytes
DIGEST_BYTES = 16  # a data hash is BLAKE2b-128: 32 hex characters
SUFFIX = ".barhashes"
_TMP = ".tmp"
_OWN_TMP = re.compile(r"\.[0-9a-f]{32}-[^/]*\.tmp")  # store()'s mkstemp names
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a process that died, seconds
_MIN_BARS = 256  # fewer bars: hashed again rather than a file per series (core.bars is fast)

_lock = threading.Lock()
_folder: Path | None = None
_configured = False
_warned: set[str] = set()
_scheme: bytes | None = None  # see _scheme_digest


def configure(value: Path | str | None) -> Path | None:
    """Use this cache folder from now on: a path (made absolute now, so a later change of
    directory does not move it), ``""`` (the user's cache folder) or ``"off"`` / ``None`` (no
    cache). The runner, a study's workers and ``bench_fmel.py`` call it with
    ``FMEL_HASH_CACHE_DIR`` (read by the configuration, like every setting); without a call,
    the user's cache folder is used. A folder that cannot be named (no home directory for
    ``~`` or for the user's cache folder) is said once at INFO and means no cache. Returns the
    folder in use.

    Raises:
        ValueError: ``value`` looks like a switch (``false``, ``no``, ``0``, ``none``...) rather
            than a folder (only ``off`` turns the cache off), or holds a NUL character (see
            :func:`check`); the setting in use is unchanged.
    """
    global _folder, _configured
    if value is not None and (why := check(str(value))) is not None:
        raise ValueError(f"{ENV}={str(value)!r}: {why}")
    where = None if value is None else _parse(str(value))
    if where is not None:
        try:
            where = where.absolute()
        except (OSError, ValueError):  # the working directory is gone
            where = None
    with _lock:
        _folder = where
        _configured = True
    return where


def check(value: str) -> str | None:
    """Why ``value`` is not a setting of ``FMEL_HASH_CACHE_DIR`` (a folder, ``off`` or empty),
    or ``None``: a word that reads as a switch would otherwise be a folder of that name in
    the working directory."""
    if value.strip().lower() in _SWITCHES:
        return "expected a folder, off (no cache) or empty (the user's cache folder)"
    if "\0" in value:
        return "expected a folder (this holds a NUL character)"
    return None


_SWITCHES = frozenset(
    {"0", "1", "false", "true", "no", "yes", "none", "null", "disable", "disabled", "on"}
)


def default_folder() -> Path | None:
    """The user's cache folder for bar hashes (``~/.cache/fmel/bar-hashes`` on Linux), or
    ``None`` when there is none (no home directory: said once at INFO)."""
    try:
        return Path(platformdirs.user_cache_dir("fmel")) / "bar-hashes"
    except (RuntimeError, OSError, KeyError) as e:
        _warn_once("<home>", f"bar hash cache: no user cache folder ({e}); runs go on without it")
        return None


def _parse(text: str) -> Path | None:
    text = text.strip()
    if text.rstrip("/").lower() == OFF:  # "off/" too: a folder named off is "./off"
        return None
    if not text:
        return default_folder()
    try:
        return Path(text).expanduser()
    except (RuntimeError, OSError, ValueError) as e:  # "~nosuchuser/x"
        _warn_once(text, f"bar hash cache: cannot use {text!r} ({e}); runs go on without it")
        return None


def folder() -> Path | None:
    """The cache folder in use (until :func:`configure` is called, the user's cache folder),
    or ``None`` when the cache is off."""
    if _configured:
        return _folder
    return default_folder()


def _code_bytes(code: CodeType) -> bytes:
    """A compiled function's instructions, names and constants (nested code included), the
    same in every process (no line numbers, no object identities, sets sorted)."""
    parts = [code.co_code, repr((code.co_names, code.co_varnames, code.co_freevars)).encode()]
    for const in code.co_consts:
        if isinstance(const, CodeType):
            parts.append(_code_bytes(const))
        elif isinstance(const, frozenset):
            parts.append(repr(sorted(map(repr, const))).encode())
        else:
            parts.append(repr(const).encode())
    return b"\x00".join(parts)


def _code_digest(*modules: ModuleType) -> bytes:
    """BLAKE2b of the compiled code of every function the modules define, as loaded in this
    process (an edit of their files after import does not change it), and of the interpreter's
    version."""
    h = hashlib.blake2b(digest_size=16)
    h.update(sys.version.encode())
    for module in modules:
        for name, obj in sorted(vars(module).items()):
            if isinstance(obj, FunctionType) and obj.__module__ == module.__name__:
                h.update(name.encode() + b"\x00" + _code_bytes(obj.__code__))
    return h.digest()


def _scheme_digest() -> bytes:
    """How a bar is hashed: the code of :mod:`core.bars` and :mod:`core.time` (ISO times) that
    this process runs (a new version of either is a new key)."""
    global _scheme
    if _scheme is None:
        _scheme = _code_digest(core.bars, core.time)
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


def _checksum(key: str, body: bytes) -> bytes:
    """The file's trailer: BLAKE2b-128 over the key, the bar count and the digests (a file
    copied under another series' key fails it, whatever its length)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(f"{key}:{len(body) // DIGEST_BYTES}:".encode())
    h.update(body)
    return h.digest()


def load(key: str, n: int) -> list[str] | None:
    """The ``n`` hashes stored under ``key``, or ``None``: no cache, no file, or anything
    but a regular file of exactly ``(n + 1) * 16`` bytes whose trailer matches
    (:func:`_checksum`); a damaged file is removed. Never raises, never blocks on a pipe."""
    where = folder()
    if where is None or n < _MIN_BARS:
        return None
    path = where / f"{key}{SUFFIX}"
    size = (n + 1) * DIGEST_BYTES
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None  # a pipe, a device, a folder: not ours
        raw = os.read(fd, size + 1) if st.st_size == size else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    body, trailer = raw[:-DIGEST_BYTES], raw[-DIGEST_BYTES:]
    if len(raw) != size or _checksum(key, body) != trailer:
        logger.info("bar hash cache: %s is damaged or not this series'; hashing again", path)
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
    data = body + _checksum(key, body)
    path = where / f"{key}{SUFFIX}"
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{key}-", suffix=_TMP)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            _remove(Path(tmp))
            raise
        _trim(where, keep=path)
    except (OSError, ValueError) as e:
        _warn_once(str(where), f"bar hash cache: cannot write {where} ({e}); runs go on without it")
        return False
    return True


def _trim(where: Path, keep: Path) -> None:
    """Remove the least recently used files until the folder holds at most :data:`MAX_BYTES`,
    and temporary files a killed process left (older than :data:`STALE_TMP_S`)."""
    files = []
    total = 0
    now = time.time()
    for p in where.glob(f".*{_TMP}"):
        if not _OWN_TMP.fullmatch(p.name):
            continue  # not ours (a folder shared with other files)
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                _remove(p)
        except OSError:
            continue
    for p in where.glob(f"*{SUFFIX}"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
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
