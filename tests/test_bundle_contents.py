"""The app bundle holds only what the apps run: every module it ships is imported by the ClientApp or the
ServerApp, at module level or lazily inside a function (a node operator reads all of it before approving it).

Static: the import graph from the two components pyproject.toml names (`[tool.flwr.app.components]`), over
the files `fab-include` packs, as fedchat.node.app_bundle builds them. Observed: the built bundle, unpacked,
runs a secure DP round with a merge in Flower's simulation engine in a process of its own, and every process
of the run (the ServerApp's and each virtual node's) logs the modules it imports.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedchat.node.app_bundle import build_bundle, unpack_bundle

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


@pytest.mark.slow
def test_a_round_of_the_built_bundle_loads_every_module_it_ships(tmp_path, tiny_dir):
    from fedchat.demo_data import write_demo_data
    from fedchat.federation.simulation import provision_roster
    from shared.config import RunConfig

    bundle = unpack_bundle(build_bundle(ROOT), tmp_path / "bundle")
    write_demo_data(tmp_path / "data", 3)
    nodes = {i: {"data-path": str(tmp_path / "data" / f"org-{i + 1}.jsonl"), "node-name": f"org-{i + 1}",
                 "state-dir": str(tmp_path / "nodes" / f"org-{i + 1}"), "target-epsilon": 3.0,
                 "ledger-registry": str(tmp_path / "registry")} for i in range(3)}
    roster, nodes = provision_roster(tmp_path / "roster", nodes)
    # every path a run can take through the apps' code on a first run: secure sum, DP, held-out evaluation,
    # checkpoints, the merge at the end (resume and refusals load no module of their own)
    run = RunConfig(base_model="tiny", num_rounds=1, local_steps=1, batch_size=4, aggregation="ffa", merge=True,
                    eval_data=str(tmp_path / "data" / "eval.jsonl"), eval_max_conversations=5,
                    secagg_roster=str(roster), ledger_heads=str(tmp_path / "heads.json"),
                    out_dir=str(tmp_path / "run"))
    logs = tmp_path / "imports"
    logs.mkdir()
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps({"run": run.to_flower(), "nodes": nodes, "out": str(tmp_path)}))
    env = {**os.environ, "FEDCHAT_TEST_IMPORT_LOG": str(logs), "RAY_DEDUP_LOGS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(bundle), str(ROOT / "tests" / "support" / "import_log")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "bundle_round.py"), str(setup)],
                          cwd=bundle, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["status"] == "finished"

    driver = json.loads((tmp_path / "driver-modules.json").read_text())
    processes = {int(f.stem): set(f.read_text().split()) for f in logs.glob("*.txt")}
    virtual_nodes = [names for pid, names in processes.items() if pid != driver["pid"]]
    # the training happened in a virtual node's process, which loaded the ClientApp's lazy imports there
    assert any({"client.client_app", "client.train"} <= names for names in virtual_nodes), \
        "no virtual node logged its imports: the import log did not reach Ray's processes"
    imported = set().union(*processes.values())
    shipped = _bundle_modules()
    unused = sorted(shipped.keys() - imported)
    assert unused == [], f"the bundle ships modules no process of a whole round imported: {unused}"
    # the apps need nothing of fedchat's tooling or serving, and run the bundle's copy of their own code
    assert not {n for n in imported if n.split(".")[0] in ("fedchat", "serving")}
    outside = {n: f for n, f in driver["modules"].items()
               if f and not Path(f).resolve().is_relative_to(bundle.resolve())}
    assert not outside, f"the ServerApp's process loaded these from outside the bundle: {outside}"
