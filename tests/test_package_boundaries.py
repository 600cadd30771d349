"""Imports point down: the role packages use shared/, shared/ uses none of them, serving/ never uses server/.

A static check over each module's syntax tree, lazy imports inside functions included, so it costs no import;
and one import, in a child process: the node runtime's runner, which must import none of the bundle's packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_the_node_runtimes_runner_imports_none_of_the_bundles_packages():
    """The runner `fedchat node start` starts per task loads client/ and shared/ from the approved bundle: had it
    imported them before, Flower would resolve the bundle's imports to the installed modules."""
    from fedchat.node.runtime import runner_command

    argv = runner_command("127.0.0.1:9094", "token", Path("node.toml"))
    assert argv[1:3] == ["-I", "-m"]
    code = (f"import runpy, sys; runpy.run_module({argv[3]!r}, run_name='not_main'); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=120)
    loaded = set(out.stdout.split())
    assert "fedchat" in loaded and not loaded & {"client", "server", "shared", "serving"}, sorted(loaded)
