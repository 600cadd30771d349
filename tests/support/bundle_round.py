"""One federated round of the app bundle's own ServerApp and ClientApp in Flower's simulation engine, in a
process that imports nothing else of fedchat: what the bundle's modules are for, observed.

    python tests/support/bundle_round.py SETUP.json

Run by tests/test_bundle_contents.py with the built bundle's folder as working directory, first on
PYTHONPATH, and tests/support/import_log/ beside it (its sitecustomize), so every process of the run
(this one and Ray's virtual nodes) logs the modules it imports. SETUP.json: {"run": run-config overrides,
"nodes": {partition: node config}, "out": folder}. Writes OUT/driver-modules.json: this process's pid and
{module: file} of fedchat's packages loaded here. Standard library and Flower only: the apps must bring the rest.
"""

import json
import os
import sys
from pathlib import Path

BUNDLE_PACKAGES = ("client", "server", "shared")


def main(setup_file: str) -> None:
    setup = json.loads(Path(setup_file).read_text())
    sys.path.insert(0, str(Path.cwd()))  # the bundle's folder, as Flower puts it first for a FAB
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app  # the factories the components `app` are made with
    from server.server_app import make_server_app

    nodes = {int(p): node for p, node in setup["nodes"].items()}
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 1, "include_dashboard": False, "logging_level": "error",
                             "_node_ip_address": "127.0.0.1"}}
    run_simulation(server_app=make_server_app(setup["run"]), client_app=make_client_app(nodes),
                   num_supernodes=len(nodes), backend_config=backend)
    loaded = {name: getattr(m, "__file__", None) for name, m in sorted(sys.modules.items())
              if name.split(".")[0] in BUNDLE_PACKAGES + ("fedchat", "serving")}
    Path(setup["out"], "driver-modules.json").write_text(json.dumps({"pid": os.getpid(), "modules": loaded}))


if __name__ == "__main__":
    main(sys.argv[1])
