"""Which Chronos model to load and how: :class:`ChronosConfig` (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.errors import ConfigError
from core.settings import setting


@dataclass(frozen=True, slots=True, kw_only=True)
class ChronosConfig:
    """Chronos model shared by every agent that asks for one (loaded once by the runner).

    Attributes:
        model: Hugging Face Hub id (``amazon/chronos-bolt-tiny``) or local checkpoint folder.
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available, else cpu).
        dtype: weights dtype.
        revision: hub branch, tag or commit; ``None`` = ``main``. Ignored for a local path.
        cache_dir: Hugging Face cache folder for hub ids; ``None`` = the library default.

    Raises:
        ConfigError: at construction, for an empty model or an unknown device or dtype.
    """

    model: str = setting(
        "amazon/chronos-bolt-tiny", env="CHRONOS_MODEL", help="Chronos checkpoint id or local path"
    )
    device: Literal["cpu", "cuda", "auto"] = setting(
        "cpu", env="CHRONOS_DEVICE", help="cpu, cuda or auto"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = setting(
        "float32", env="CHRONOS_DTYPE", help="float32, bfloat16 or float16"
    )
    revision: str | None = setting(
        None,
        env="CHRONOS_REVISION",
        help="Hub revision (branch, tag or commit) of CHRONOS_MODEL; default: main; ignored for "
        "a local path",
    )
    cache_dir: Path | None = setting(
        None,
        env="CHRONOS_CACHE_DIR",
        help="Hugging Face cache folder to load hub ids from; default: the Hugging Face default "
        "(HF_HUB_CACHE / HF_HOME)",
    )

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("CHRONOS_MODEL must not be empty: expected a hub id or a path")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"CHRONOS_DEVICE={self.device!r}: expected cpu, cuda or auto")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"CHRONOS_DTYPE={self.dtype!r}: expected float32, bfloat16 or float16"
            )
