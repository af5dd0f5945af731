"""Builds the one C extension in place: FMEL's tracked reads, the per-bar record and the writer's
resolving of reads (analyzers/tracking/_fastread.c, _record.c, _resolve.c).

``make`` runs ``python setup.py build_ext --inplace``; nothing else is packaged here. Without a C
compiler the build fails and FMEL tracks reads in pure Python (same records, slower)."""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup

# the sources' stamp (analyzers/tracking/_build.py), loaded by path: importing the package would
# need its dependencies
_spec = importlib.util.spec_from_file_location("_build", "analyzers/tracking/_build.py")
assert _spec is not None and _spec.loader is not None
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
STAMP = _build.source_sha256(Path("analyzers/tracking"))

setup(
    name="bt-fmel-runtime-ext",
    packages=[],
    py_modules=[],
    ext_modules=[
        Extension(
            "analyzers.tracking._fastread",
            [
                "analyzers/tracking/_fastread.c",
                "analyzers/tracking/_resolve.c",
                "analyzers/tracking/_record.c",
            ],
            depends=["analyzers/tracking/_resolve.h", "analyzers/tracking/_record.h"],
            extra_compile_args=["-Wall"],
            define_macros=[("FASTREAD_SOURCE_SHA256", f'"{STAMP}"')],
        )
    ],
)
