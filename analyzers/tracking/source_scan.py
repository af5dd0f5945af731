"""What the agent's source says FMEL cannot see: reads through raw line buffers (``.array``,
``plotrange``) and reads of the strategy's observers (``self.stats``, ``self.observers``).

:func:`module_facts` parses a module's file once per version of it (path, size and
modification time; helper-120: a 5,000-line agent module was parsed again at every run, 0.45 s
a run of an optimisation) into the few facts the tracker needs: the classes with their line
spans, and the lines of those attribute reads and of ``self.stats`` assignments.
:func:`class_span` finds a class among them by its qualified name, choosing among classes of
the same name (a ``try``/``except ImportError`` fallback) the one its methods' code comes from
(helper-120: ``inspect`` took the first). A heuristic by name, not by type: ``df[c].array`` of
a pandas Series counts as a raw-buffer read in the agent's module.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# modules' facts kept (the least recently used dropped)
MAX_MODULES = 256


@dataclass(frozen=True, slots=True)
class ClassSpan:
    """A class statement: its qualified name (``f.<locals>.Agent`` as Python writes it) and
    its first and last lines (1-based, inclusive)."""

    qualname: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class ModuleFacts:
    """What :func:`module_facts` found in one module file.

    Attributes:
        path: the file.
        classes: every class statement, nested ones included.
        raw_reads: lines of ``<x>.array`` / ``<x>.plotrange`` (``x`` not an imported module
            name: ``np.array`` and ``array.array`` are not line buffers).
        self_reads: ``(line, attribute)`` of ``self.stats`` and ``self.observers``.
        stats_assigned: lines assigning ``self.stats`` (an attribute of the class's own).
    """

    path: str
    classes: tuple[ClassSpan, ...]
    raw_reads: tuple[int, ...]
    self_reads: tuple[tuple[int, str], ...] = field(default=())
    stats_assigned: tuple[int, ...] = field(default=())


_CACHE: OrderedDict[tuple[str, int, int, int, int], ModuleFacts] = OrderedDict()
_LOCK = threading.Lock()


def module_facts(module_name: str) -> ModuleFacts | None:
    """The facts of the source file of module ``module_name``, or None when it has none that
    Python can parse (an interactive session's ``__main__``, a compiled module). Any thread."""
    module = sys.modules.get(module_name)
    try:
        path = inspect.getsourcefile(module) if module is not None else None
    except TypeError:
        return None
    return file_facts(path) if path else None


def file_facts(path: str) -> ModuleFacts | None:
    """The facts of the Python source file ``path``, or None when it cannot be read or
    parsed. Cached per version of the file: path, inode, size and modification and change
    times (``cp -p`` or ``os.utime`` keep a modification time; not the change time:
    helper-122). Any thread."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _LOCK:
        found = _CACHE.get(key)
        if found is not None:
            _CACHE.move_to_end(key)
            return found
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    facts = _Collector(path).facts(tree)
    with _LOCK:
        _CACHE[key] = facts
        while len(_CACHE) > MAX_MODULES:
            _CACHE.popitem(last=False)
    return facts


def code_files(cls: type) -> list[str]:
    """The files the code of ``cls``'s own functions comes from (decorators unwrapped), in
    the order of its namespace: where the class statement is, whatever module name it was
    loaded under (helper-122: two files loaded as one module name)."""
    out: list[str] = []
    for value in vars(cls).values():
        fn = getattr(value, "__func__", value)
        try:
            fn = inspect.unwrap(fn)
        except ValueError:
            continue
        code = getattr(fn, "__code__", None)
        name = getattr(code, "co_filename", None)
        if isinstance(name, str) and name not in out:
            out.append(name)
    return out


def class_span(facts: ModuleFacts, cls: type) -> ClassSpan | None:
    """The class statement of ``cls`` in ``facts``: by qualified name, and among several of
    that name the one holding the first line of one of its methods (decorators unwrapped),
    else the last one (the one the module's name ends up bound to; helper-122); None when
    there is none (a class made by ``exec`` in a module with a file)."""
    named = [c for c in facts.classes if c.qualname == cls.__qualname__]
    if len(named) <= 1:
        return named[0] if named else None
    for value in vars(cls).values():
        try:
            fn = inspect.unwrap(getattr(value, "__func__", value))
        except ValueError:
            continue
        code = getattr(fn, "__code__", None)
        line = getattr(code, "co_firstlineno", None)
        if line is not None and getattr(code, "co_filename", None) == facts.path:
            for c in named:
                if c.first <= line <= c.last:
                    return c
    return named[-1]


class _Collector(ast.NodeVisitor):
    """One pass over a module: classes with their qualified names, and the reads sought."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.classes: list[ClassSpan] = []
        self.imported: set[str] = set()
        self.attributes: list[tuple[int, str, Any]] = []
        self.self_reads: list[tuple[int, str]] = []
        self.stats_assigned: list[int] = []

    def facts(self, tree: ast.AST) -> ModuleFacts:
        self.visit(tree)
        raw = sorted(
            {
                line
                for line, attr, value in self.attributes
                if attr in ("array", "plotrange")
                and not (isinstance(value, ast.Name) and value.id in self.imported)
            }
        )
        return ModuleFacts(
            self.path,
            tuple(self.classes),
            tuple(raw),
            tuple(sorted(set(self.self_reads))),
            tuple(sorted(set(self.stats_assigned))),
        )

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        name = ".".join([*self.scope, node.name])
        self.classes.append(ClassSpan(name, node.lineno, node.end_lineno or node.lineno))
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope += [node.name, "<locals>"]
        self.generic_visit(node)
        del self.scope[-2:]

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815 - ast's name

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.imported.update(a.asname or a.name.split(".")[0] for a in node.names)

    visit_ImportFrom = visit_Import  # noqa: N815 - ast's name

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attributes.append((node.lineno, node.attr, node.value))
        if node.attr in ("stats", "observers") and _is_self(node.value):
            self.self_reads.append((node.lineno, node.attr))
        self.generic_visit(node)

    def _assigned(self, targets: list[Any]) -> None:
        while targets:
            t = targets.pop()
            if isinstance(t, ast.Tuple | ast.List):
                targets.extend(t.elts)
            elif isinstance(t, ast.Attribute) and t.attr == "stats" and _is_self(t.value):
                self.stats_assigned.append(t.lineno)

    def visit_Assign(self, node: ast.Assign) -> None:
        self._assigned(list(node.targets))
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign | ast.AugAssign) -> None:
        self._assigned([node.target])
        self.generic_visit(node)

    visit_AugAssign = visit_AnnAssign  # noqa: N815 - ast's name


def _is_self(node: Any) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"
