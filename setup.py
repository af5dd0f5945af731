"""Builds the one C extension, FMEL's tracked reads and the writer's resolving of them
(analyzers/tracking/_fastread.c, _resolve.c), in place.

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
            ["analyzers/tracking/_fastread.c", "analyzers/tracking/_resolve.c"],
            depends=["analyzers/tracking/_resolve.h"],
            extra_compile_args=["-Wall"],
        )
    ],
)
