"""Run a federation in Flower's simulation engine (in-process SuperLink, virtual SuperNodes)."""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

from client.client_app import make_client_app
from server.server_app import make_server_app
from shared.config import RunConfig
from shared.errors import FederationError, require_extra

log = logging.getLogger("fedchat.federation")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch's CPU kernels read when a process starts


def backend_config(run: RunConfig, cores: int | None = None) -> tuple[dict, int]:
    """Flower's Ray backend settings for `run` (its sim-cpus-per-node), and the torch threads of each
    virtual node (sim-threads-per-node; else OMP_NUM_THREADS where the environment sets it; else the cores it
    reserves, rounded down, at least 1).

    Nodes run one after another by default (each reserves every core); with sim-cpus-per-node
    c, floor(cores / c) of them run at once (Ray's actors, one process each).
    """
    cores = cores or os.cpu_count() or 1
    cpus = run.sim_cpus_per_node or cores
    if cpus > cores:
        raise FederationError(f"sim-cpus-per-node={cpus:g} is more than the {cores} cores of this machine: no virtual "
                              f"node could start; set it to {cores} or less (0 = every core).")
    threads = run.sim_threads_per_node or _environment_threads() or max(1, math.floor(cpus))
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False, "logging_level": "error",
                      "_node_ip_address": "127.0.0.1", "log_to_driver": True},
    }
    return backend, threads


def _environment_threads() -> int | None:
    """OMP_NUM_THREADS where the environment sets a positive number (a machine shared with other work, as
    under `make test`'s two workers, keeps each process on fewer threads than it has cores)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def stage_timeout_for_waves(run: RunConfig, num_nodes: int, cores: int | None = None) -> RunConfig:
    """`run` with its secure-sum stage timeout fitted to the simulation: the virtual nodes train in waves
    (floor(cores / sim-cpus-per-node) at a time, one by one by default), so a stage's replies take as long as
    every wave together; a secagg-timeout left at its default is multiplied by the number of waves. (On a
    loaded machine the demo's 3 nodes one after another once took longer than the 600 s one node would.)"""
    backend, _ = backend_config(run, cores)
    parallel = max(1, int(backend["init_args"]["num_cpus"] // backend["client_resources"]["num_cpus"]))
    waves = math.ceil(num_nodes / parallel)
    if waves <= 1 or run.secagg_timeout != RunConfig().secagg_timeout:
        return run
    log.info("simulation: %d nodes train in %d waves, so each secure-sum stage waits up to %d x %g s", num_nodes,
             waves, waves, run.secagg_timeout)
    return run.replace(secagg_timeout=run.secagg_timeout * waves)


@contextmanager
def _environment(**values: str):
    """Environment variables set for the duration (Ray's worker processes inherit them), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def one_ray_session():
    """Keep one Ray session for every simulation run inside (fedchat tune's trials, all with the same
    resources): Flower 1.41's Ray backend shuts Ray down at the end of each run, and starting it again
    costs tens of seconds on 2 cores. The virtual nodes (Ray actors) are still made anew for each run."""
    require_extra("simulation", "Flower's simulation engine (the demo, fedchat tune, bench/)")
    import ray

    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()


def simulate(run: RunConfig, sim_nodes: dict[int, dict], colluders: int | None = None) -> dict:
    """Run `run` with one virtual SuperNode per entry of `sim_nodes` (partition id -> node config).

    With secure aggregation and no roster given, the simulation is its own roster keeper and every
    node's operator: `provision_roster` gives each node an identity key and approves one roster. The
    virtual nodes' ledger registry and the coordinator's ledger heads live in the run's out-dir unless
    set: a simulation is one experiment, not a host's nodes (whose records outlive their state dirs)."""
    out = Path(run.out_dir).absolute()  # a simulation's own records of the budget, not the host's
    run = run.replace(ledger_heads=run.ledger_heads or str(out / "ledger-heads.json"))
    sim_nodes = {p: {"ledger-registry": str(out / "ledger-registry"), **node} for p, node in sim_nodes.items()}
    if run.secagg and not run.secagg_roster:
        roster, sim_nodes = provision_roster(Path(run.out_dir), sim_nodes, colluders)
        run = run.replace(secagg_roster=str(roster))
    run = stage_timeout_for_waves(run, len(sim_nodes))
    return run_apps(run, make_server_app(run.to_flower()), make_client_app(sim_nodes), len(sim_nodes))


def provision_roster(folder: Path, nodes: dict[int, dict], colluders: int | None = None,
                     federation: str = "simulation") -> tuple[Path, dict[int, dict]]:
    """An identity key per node (its identity-key, or STATE_DIR/identity-key.pem, made if missing), one
    roster of them all in FOLDER/roster.json (colluder bound: `colluders`, or the largest minority), and
    the node configs with that roster approved. The same keys give the same roster, byte for byte."""
    from shared.crypto import create_identity_key, load_identity_key, raw_public_hex
    from shared.roster import Member, Roster, write_roster

    members, configured = [], {}
    for partition, node in nodes.items():
        key_path = Path(node.get("identity-key") or Path(node["state-dir"]) / "identity-key.pem")
        key = load_identity_key(key_path) if key_path.exists() else create_identity_key(key_path)
        members.append(Member(node["node-name"], raw_public_hex(key)))
        configured[partition] = {**node, "identity-key": str(key_path)}
    bound = (len(members) - 1) // 2 if colluders is None else colluders
    roster = Roster(federation, 1, bound, tuple(members), None)
    folder.mkdir(parents=True, exist_ok=True)
    write_roster(folder / "roster.json", roster)
    for node in configured.values():
        node.setdefault("roster", str((folder / "roster.json").absolute()))
        node.setdefault("roster-sha256", roster.sha256)
    return folder / "roster.json", configured


def run_apps(run: RunConfig, server_app, client_app, num_nodes: int) -> dict:
    """Run a ServerApp and a ClientApp with `num_nodes` virtual SuperNodes, with `run`'s simulation
    resources; the report the ServerApp wrote in run.out_dir/report.json."""
    require_extra("simulation", "Flower's simulation engine (the demo, fedchat tune, bench/)")
    from flwr.simulation import run_simulation

    backend, threads = backend_config(run)
    parallel = int(backend["init_args"]["num_cpus"] // backend["client_resources"]["num_cpus"])
    log.info("simulation: %d virtual nodes, %d at a time, %d torch thread(s) each", num_nodes,
             min(parallel, num_nodes), threads)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts its workers (the virtual nodes) at nice 15: any other process on the machine, even the
    # coordinator's own, would then starve the federation's training of CPU.
    os.environ.setdefault("RAY_worker_niceness", "0")
    with _environment(**{k: str(threads) for k in THREAD_VARIABLES}):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_config=backend)
    report_path = Path(run.out_dir) / "report.json"
    if not report_path.exists():
        raise FederationError(f"the simulation ended without a report in {report_path}: see the log above.")
    report = json.loads(report_path.read_text())
    if report.get("status") != "finished":
        raise FederationError(f"the simulation stopped before the end (status {report.get('status')!r}); "
                              f"see the log above. Checkpoints in {run.out_dir} let it resume.")
    return report
