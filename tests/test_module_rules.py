"""The module boundaries DESIGN.md sets, enforced on the source: only the CLI prints, exits or
imports typer/rich; only source.py talks to the Hub; the numerics stay pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fp8q"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__main__.py",))
IDS = [p.relative_to(PACKAGE).as_posix() for p in MODULES]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0] if not node.module.startswith("fp8q") else node.module)
    return names


def _calls(path: Path) -> set[str]:
    return {
        node.func.id
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_module_boundaries(path):
    imports = _imports(path)
    wing = path.relative_to(PACKAGE).parts[0]
    if wing != "cli":
        assert not imports & {"typer", "rich", "click"}, f"{path.name}: only the CLI renders"
        assert "print" not in _calls(path) and "exit" not in _calls(path), f"{path.name}: the library never prints"
    if wing != "source":
        assert "huggingface_hub" not in imports, f"{path.name}: only the source wing talks to the Hub"
    if path.name in ("numerics.py", "planner.py", "selection.py", "formats.py", "experts.py", "tensor_parallel.py"):
        assert not imports & {"os", "shutil", "subprocess", "socket"}, f"{path.name} must stay free of I/O"
