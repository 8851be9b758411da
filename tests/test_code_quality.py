"""The habits that keep the tree clean, run with the tests: the import layering, ruff lint and format, mypy.

Each check runs the real tool on the whole tree (the configuration is in pyproject.toml) and fails with its report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _tool(name: str) -> str:
    found = shutil.which(name) or (Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' installs it")
    return str(found)


def test_import_layering_contracts_hold():
    result = _run(_tool("lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_ruff_lint_is_clean():
    result = _run(_tool("ruff"), "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = _run(_tool("ruff"), "format", "--no-cache", "--check", ".")
    assert result.returncode == 0, "run `ruff format .`:\n" + result.stdout + result.stderr


def _mypy_packages() -> Path:
    """A tree stagerun/{core,trainer,operator} of links to the folders: mypy cannot follow package-dir."""
    tree = ROOT / ".mypy_cache" / "packages"  # mypy's cache folder ignores itself in git; stable, so the cache hits
    (tree / "stagerun").mkdir(parents=True, exist_ok=True)
    for name in ("core", "trainer", "operator"):
        link = tree / "stagerun" / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    return tree


def test_mypy_is_clean():
    env = {**os.environ, "MYPYPATH": str(_mypy_packages())}
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
