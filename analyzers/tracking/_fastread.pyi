"""Compiled tracked reads (``_fastread.c``); see :mod:`analyzers.tracking.proxies`."""

from collections.abc import Callable, Iterable, Iterator, Sequence
from types import NotImplementedType
from typing import Any, overload

_Read = tuple[int, int, int, int, Any]

SOURCE_SHA256: str  # setup.py's stamp of the sources (analyzers/tracking/_build.py)

class ReadBuffer(Sequence[_Read]):
    """One bar's raw reads packed in C arrays; to Python a list of 5-tuples (``append``,
    ``len``, iteration, indexing, slicing to a list, ``==`` with a list). Main thread appends
    and takes; a taken buffer is read by any thread."""

    def __init__(self, reads: Iterable[Any] = ..., /) -> None: ...
    def append(self, read: Any, /) -> None: ...
    def clear(self) -> None: ...
    def take(self) -> ReadBuffer: ...
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: int, /) -> _Read: ...
    @overload
    def __getitem__(self, index: slice, /) -> list[_Read]: ...
    def __iter__(self) -> Iterator[_Read]: ...

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
def unpack_buffers(buffers: list[Any], /) -> tuple[bytes, bytes, bytes]: ...
def capture(captured: list[tuple[Any, Any]], /) -> tuple[tuple[int, int, int, int], ...]: ...
def capture_packed(
    captured: list[tuple[Any, Any]], /
) -> tuple[tuple[int, int, int, int], ...] | bytes: ...
def count_by_attribute(cls: type, name: str, /) -> None: ...
def resolve_buffers(
    buffers: list[Any],
    states: list[tuple[tuple[int, int, int, int], ...] | bytes],
    n_slots: int,
    src: Any,
    len_src: Any,
    field_code_of_tag: Any,
    sym_of_slot: Any,
    n_syms: int,
    n_fields: int,
    /,
) -> tuple[bytes, ...] | NotImplementedType | None: ...
def record_init(
    fmel_globals: dict[str, Any],
    ind_key: Any,
    read_buffer: type,
    access_tracker: type,
    fmel_analyzer: type,
    instance_reads: tuple[str, ...],
    /,
) -> None: ...
def record_bar(analyzer: Any, stage: str, /) -> None: ...
