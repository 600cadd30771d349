"""The app bundle holds only what the apps run: every module it ships is imported by the ClientApp or the
ServerApp, at module level or lazily inside a function (a node operator reads all of it before approving it).

Static: the import graph from the two components pyproject.toml names (`[tool.flwr.app.components]`), over
the files `fab-include` packs, as fedchat.node.app_bundle builds them.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from fedchat.node.app_bundle import build_bundle

ROOT = Path(__file__).resolve().parents[1]


def _bundle_modules() -> dict[str, Path]:
    """{dotted module name: file} of every Python file in the bundle built from this checkout."""
    names = [f.path for f in build_bundle(ROOT).files]  # what Flower packs, as the node receives it
    modules = {}
    for name in names:
        if name.endswith(".py"):
            dotted = name[:-3].replace("/", ".").removesuffix(".__init__")
            modules[dotted] = ROOT / name
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Bundle modules `path` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            candidates = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in candidates:
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()  # packages too
    return found


def _loaded_by_the_apps(modules: dict[str, Path]) -> set[str]:
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    todo = [ref.split(":")[0] for ref in components.values()]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        todo += sorted(_imports(modules[name], modules))
    return seen


def test_every_module_in_the_bundle_is_imported_by_the_client_or_server_app():
    modules = _bundle_modules()
    assert {"client.client_app", "server.server_app", "shared.ledger"} <= modules.keys()
    unused = sorted(modules.keys() - _loaded_by_the_apps(modules))
    assert unused == [], (f"the app bundle ships modules neither app imports: {unused}. Move them out of the "
                          "packages fab-include packs (pyproject.toml), to fedchat/ or bench/")


def test_the_check_finds_a_module_no_app_imports(tmp_path):
    """The check can fail: a bundle module that nothing imports is named."""
    modules = _bundle_modules()
    stray = tmp_path / "stray.py"
    stray.write_text("import shared.ledger\n")
    modules["shared.stray"] = stray
    assert "shared.stray" not in _loaded_by_the_apps(modules)
    assert "shared.ledger" in _loaded_by_the_apps(modules)
