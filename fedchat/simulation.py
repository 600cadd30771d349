"""Run a federation in Flower's simulation engine (in-process SuperLink, virtual SuperNodes)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from client.app import make_client_app
from server.app import make_server_app
from shared.config import RunConfig
from shared.errors import FederationError

log = logging.getLogger("fedchat")


def simulate(run: RunConfig, sim_nodes: dict[int, dict], *, cpus_per_node: float | None = None,
             gpus_per_node: float = 0.0) -> dict:
    """Run `run` with one virtual SuperNode per entry of `sim_nodes` (partition id -> node config).

    Nodes train one after another by default (each gets every CPU core), which is the
    fastest on a small machine; give cpus_per_node to run several at once.
    """
    from flwr.simulation import run_simulation

    cores = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus_per_node or cores, "num_gpus": gpus_per_node},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "logging_level": "error",
                      "_node_ip_address": "127.0.0.1",
                      "log_to_driver": True},
    }
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=make_server_app(run.to_flower()), client_app=make_client_app(sim_nodes),
                   num_supernodes=len(sim_nodes), backend_config=backend)
    report_path = Path(run.out_dir) / "report.json"
    if not report_path.exists():
        raise FederationError(f"the simulation ended without a report in {report_path}: see the log above.")
    report = json.loads(report_path.read_text())
    if report.get("status") != "finished":
        raise FederationError(f"the simulation stopped before the end (status {report.get('status')!r}); "
                              f"see the log above. Checkpoints in {run.out_dir} let it resume.")
    return report
