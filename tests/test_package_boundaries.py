"""Imports point down: the role packages use shared/, shared/ uses none of them, serving/ never uses server/.

A static check over each module's syntax tree, lazy imports inside functions included, so it costs no import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the top-level packages of this repository it must never import
FORBIDDEN = {
    "shared": {"client", "server", "serving", "fedchat", "bench", "tests"},
    "client": {"server", "serving", "fedchat", "bench", "tests"},
    "server": {"client", "serving", "fedchat", "bench", "tests"},
    "serving": {"client", "server", "fedchat", "bench", "tests"},
}


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules under {package}/"
    leaks = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in modules for line, name in sorted(imported_packages(path))
             if name in FORBIDDEN[package]]
    assert not leaks, "\n".join(leaks)


def test_checker_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from server.merge import x\n    import serving.api\n")
    assert imported_packages(module) == {(2, "server"), (3, "serving")}
