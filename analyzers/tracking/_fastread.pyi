"""Compiled tracked reads (``_fastread.c``); see :mod:`analyzers.tracking.proxies`."""

from collections.abc import Callable
from typing import Any

def init(
    proxies_globals: dict[str, Any],
    getitem_fallback: Callable[[Any, Any], Any],
    len_fallback: Callable[[Any], int],
    fast_types: tuple[type, ...],
    /,
) -> None: ...
def descriptors(cls: type, dict_safe: bool, /) -> tuple[Any, Any]: ...
def unpack(reads: list[tuple[Any, ...]], /) -> tuple[bytes, bytes, bytes]: ...
