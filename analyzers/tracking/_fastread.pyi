"""Compiled tracked reads (``_fastread.c``); see :mod:`analyzers.tracking.proxies`."""

from collections.abc import Callable
from typing import Any

def init(
    proxies_globals: dict[str, Any],
    getitem: Callable[[Any, Any], Any],
    getitem_tail: Callable[[Any, Any, Any], Any],
    length: Callable[[Any], int],
    fast_types: tuple[type, ...],
    /,
) -> None: ...
def descriptors(cls: type, /) -> tuple[Any, Any]: ...
def unpack(reads: list[tuple[Any, ...]], /) -> tuple[bytes, bytes, bytes]: ...
def capture(captured: list[tuple[Any, Any]], /) -> tuple[tuple[int, int, int, int], ...]: ...
