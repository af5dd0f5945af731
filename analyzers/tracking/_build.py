"""Whether the compiled extension (``_fastread``) was built from the C sources beside it.

``setup.py`` stamps the extension with :func:`source_sha256` of its sources (the module's
``SOURCE_SHA256``). A work tree whose sources changed after the last build (a ``git checkout``
without ``make``) would otherwise run the old C against the new Python: 2026-12-07, a Hypothesis
case failed against packed feed positions the old C did not know. :func:`drop_stale_extension`
makes such a build unimportable, so every user of it takes its pure-Python path (the same
records, slower) and one warning says to rebuild. An installation without the sources is not
checked.

Thread context: import time (``analyzers.tracking``), main thread.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

__all__ = ["SOURCES", "drop_stale_extension", "source_sha256"]

logger = logging.getLogger(__name__)

#: the extension's sources, in the order they are hashed (setup.py builds the .c files)
SOURCES = ("_fastread.c", "_resolve.c", "_record.c", "_resolve.h", "_record.h")
_MODULE = "analyzers.tracking._fastread"


def source_sha256(folder: Path) -> str | None:
    """SHA-256 (hex) of the sources' names and bytes in ``folder``; None when one is missing."""
    digest = hashlib.sha256()
    for name in SOURCES:
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            return None
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def drop_stale_extension(want: str | None = None) -> bool:
    """Make a stale build of the extension unimportable (see the module docstring).

    Args:
        want: the expected stamp (default: :func:`source_sha256` of this folder).

    Returns:
        True when a built extension was found stale and dropped.
    """
    if want is None:
        want = source_sha256(Path(__file__).parent)
    if want is None:
        return False
    try:
        from analyzers.tracking import _fastread
    except ImportError:
        return False
    got = getattr(_fastread, "SOURCE_SHA256", None)
    if got == want:
        return False
    sys.modules[_MODULE] = None  # type: ignore[assignment]  # later imports raise ImportError
    package = sys.modules.get("analyzers.tracking")
    if package is not None and "_fastread" in vars(package):
        delattr(package, "_fastread")
    logger.warning(
        "%s was built from other sources than the C files beside it (a checkout without a "
        "build): FMEL tracks reads in Python until it is rebuilt (`make ext`, or `python "
        "setup.py build_ext --inplace --force`)",
        _fastread.__file__,
    )
    return True
