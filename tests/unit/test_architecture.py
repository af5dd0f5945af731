"""The layer contract (pyproject.toml, [tool.importlinter]) holds, and it is not a test that cannot
fail: the same check on a copy of the tree with one upward import added, or with a cycle between
two sibling modules, is refused."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "feeds", "analyzers", "runtime", "agents")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture()
def tree_copy(tmp_path: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"Contracts: \d+ kept, 0 broken", result.stdout), result.stdout[-2000:]


def test_an_upward_import_from_the_bottom_layer_is_refused(tree_copy: Path) -> None:
    errors = tree_copy / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nimport runtime.runner  # noqa: E402,F401\n")
    result = lint(tree_copy)
    assert result.returncode != 0
    assert "core is not allowed to import runtime" in result.stdout


def test_a_cycle_between_sibling_modules_is_refused(tree_copy: Path) -> None:
    (tree_copy / "core" / "cycle_a.py").write_text("import core.cycle_b  # noqa: F401\n")
    (tree_copy / "core" / "cycle_b.py").write_text("import core.cycle_a  # noqa: F401\n")
    result = lint(tree_copy)
    assert result.returncode != 0
    assert "cycle_a" in result.stdout and "cycle_b" in result.stdout
