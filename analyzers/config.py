"""Configuration of decision recording (FMEL): which sink, and how the writer batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core import bar_hash_cache
from core.errors import ConfigError
from core.settings import setting

# = analyzers.sinks.duckdb.MAX_MEMORY_LIMIT_MB (1 PiB; tests check they agree)
MAX_LOCAL_MEMORY_LIMIT_MB = 2**30
# Records per write to the local store unless FMEL_BATCH_SIZE says otherwise: one row group of
# the store (analyzers.sinks.duckdb.ROW_GROUP_SIZE; tests check they agree). DuckDB writes a
# commit of a whole row group straight to the file and one of fewer rows to its log first, to
# be written again at the next checkpoint: 4,096 read-heavy decisions in batches of 500 left a
# 30 MB log, in batches of 2,048 a 23 kB one; DuckDB's insert CPU per decision 85 -> 38 us
# (read-heavy), 16 -> 10 us (SMA-cross); docs/benchmarks.md, twelfth pass. Backtests fill
# whole batches; live runs write what FMEL_FLUSH_INTERVAL_S gathered.
LOCAL_BATCH_SIZE = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class FMELConfig:
    """Decision recording.

    Attributes:
        sink: ``"local"`` (DuckDB file) or ``"bigquery"``.
        local_path: DuckDB database file of the local store.
        local_memory_limit_mb: DuckDB's buffer pool for the local store, MiB (blocks it wrote
            stay cached up to it; one write must fit in it).
        batch_size: records per sink write. Unset in the environment, the loader picks 10 for
            BigQuery and :data:`LOCAL_BATCH_SIZE` (2,048: one row group) for the local store.
        flush_interval_s: longest a record waits in the writer before a write, seconds.
        queue_size: records buffered between ``next()`` and the writer; when full, ``next()``
            waits (back-pressure), nothing is dropped.
        spill_dir: records a sink could not take are kept here and replayed at the next start.
        hash_cache_dir: the disk cache of CSV bars' data hashes (:mod:`core.bar_hash_cache`):
            a folder, ``"off"``, or ``""`` for the user's cache folder.
        strict_lookahead: raise :class:`~core.errors.LookAheadError` on a future read.
    """

    sink: Literal["local", "bigquery"] = setting(
        "local",
        env="FMEL_SINK",
        help="where decision records go: local (DuckDB file) or bigquery",
    )
    local_path: Path = setting(
        Path("fmel.duckdb"), env="FMEL_LOCAL_PATH", help="DuckDB file of the local decision store"
    )
    local_memory_limit_mb: int = setting(
        512,
        env="FMEL_LOCAL_MEMORY_LIMIT_MB",
        help="DuckDB memory for the local decision store, MiB (bounds its cache of the file)",
        minimum=64,
    )
    batch_size: int = setting(
        10,
        env="FMEL_BATCH_SIZE",
        help="records per sink write; default 10 for bigquery, 2048 for local",
        minimum=1,
        default_text="",  # computed by the loader from FMEL_SINK; unset in .env.example
    )
    flush_interval_s: float = setting(
        5.0,
        env="FMEL_FLUSH_INTERVAL_S",
        help="longest a record waits before it is written, seconds",
        gt=0,
    )
    queue_size: int = setting(
        10_000,
        env="FMEL_QUEUE_SIZE",
        help="records buffered before next() waits (back-pressure)",
        minimum=1,
    )
    spill_dir: Path = setting(
        Path(".fmel_spill"),
        env="FMEL_SPILL_DIR",
        help="folder for records a sink could not take; replayed at the next start",
    )
    hash_cache_dir: str = setting(
        "",
        env="FMEL_HASH_CACHE_DIR",
        help="folder keeping CSV bars' data hashes between runs (off: none; empty: the user's "
        "cache folder, ~/.cache/fmel/bar-hashes)",
    )
    strict_lookahead: bool = setting(
        False,
        env="FMEL_STRICT_LOOKAHEAD",
        help="raise LookAheadError when an agent reads a future bar (otherwise flag and warn)",
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"FMEL batch_size must be >= 1, got {self.batch_size}")
        if self.flush_interval_s <= 0:
            raise ConfigError(f"FMEL flush_interval_s must be > 0, got {self.flush_interval_s}")
        if not 64 <= self.local_memory_limit_mb <= MAX_LOCAL_MEMORY_LIMIT_MB:
            raise ConfigError(
                f"FMEL_LOCAL_MEMORY_LIMIT_MB={self.local_memory_limit_mb}: expected a whole "
                f"number of MiB from 64 to {MAX_LOCAL_MEMORY_LIMIT_MB}"
            )
        if (why := bar_hash_cache.check(self.hash_cache_dir)) is not None:
            raise ConfigError(f"FMEL_HASH_CACHE_DIR={self.hash_cache_dir!r}: {why}")
        if self.queue_size < 1:
            raise ConfigError(f"FMEL queue_size must be >= 1, got {self.queue_size}")
