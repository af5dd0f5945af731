"""Builds the one C extension in place: FMEL's tracked reads, the per-bar record and the writer's
resolving of reads (analyzers/tracking/_fastread.c, _record.c, _resolve.c).

``make`` runs ``python setup.py build_ext --inplace``; nothing else is packaged here. Without a C
compiler the build fails and FMEL tracks reads in pure Python (same records, slower)."""

from setuptools import Extension, setup

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
        )
    ],
)
