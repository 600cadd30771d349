"""fedchat's secure sum at scale: simulation resources, the SuperLink's lock wait, and a round of many synthetic
nodes (bench/scale_app.py) through Flower's simulation engine whose unmasked weighted mean is checked value by
value. Every pair of nodes shares keys: sparse graphs are off (docs/threat-model.md says why)."""

import numpy as np
import pytest

from fedchat.federation.simulation import backend_config
from shared.config import RunConfig
from shared.errors import ConfigError, FederationError

# ------------------------------------------------------------------ the SuperLink's database


def test_the_superlinks_database_waits_two_minutes_for_a_lock(tmp_path, monkeypatch):
    """Flower 1.41 waits 5 s; three nodes pushing 160 MB updates hold the lock longer on a busy host."""
    import flwr.supercore.sql_mixin as sql
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    from fedchat.federation.deployment import SQLITE_BUSY_TIMEOUT_MS, wait_longer_for_sqlite_locks

    def busy_timeout(name: str) -> int:
        store = SqlObjectStore(str(tmp_path / name))
        store.initialize()
        return store.query("PRAGMA busy_timeout")[0]["timeout"]

    assert busy_timeout("flower.db") == 5000
    monkeypatch.setattr(sql, "SQLITE_PRAGMAS", sql.SQLITE_PRAGMAS)  # restored after the test
    wait_longer_for_sqlite_locks()
    assert busy_timeout("fedchat.db") == SQLITE_BUSY_TIMEOUT_MS == 120_000


# ------------------------------------------------------------------ simulation resources


def test_simulation_resources_come_from_the_run_config(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # tests/conftest.py sets it
    backend, threads = backend_config(RunConfig(), cores=2)  # default: one node at a time, every core
    assert backend["client_resources"]["num_cpus"] == 2 and threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an environment that asks for fewer threads is heard
    assert backend_config(RunConfig(), cores=2)[1] == 1
    assert backend_config(RunConfig(sim_threads_per_node=2), cores=2)[1] == 2  # the run config's own value wins
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert backend_config(RunConfig(), cores=2)[1] == 2
    backend, threads = backend_config(RunConfig(sim_cpus_per_node=2 / 3, sim_threads_per_node=1), cores=2)
    assert backend["init_args"]["num_cpus"] // backend["client_resources"]["num_cpus"] == 3 and threads == 1
    assert backend_config(RunConfig(sim_cpus_per_node=1.0), cores=2)[1] == 1
    with pytest.raises(FederationError, match="sim-cpus-per-node=4 is more than the 2 cores"):
        backend_config(RunConfig(sim_cpus_per_node=4.0), cores=2)
    for key in ("sim-cpus-per-node", "sim-threads-per-node"):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flower({key: -1})


def test_a_secure_sum_stage_waits_for_every_wave_of_virtual_nodes():
    from fedchat.federation.simulation import stage_timeout_for_waves

    default = RunConfig().secagg_timeout
    assert stage_timeout_for_waves(RunConfig(), 3, cores=2).secagg_timeout == 3 * default  # one node at a time
    two_at_once = RunConfig(sim_cpus_per_node=1.0)
    assert stage_timeout_for_waves(two_at_once, 3, cores=2).secagg_timeout == 2 * default
    assert stage_timeout_for_waves(two_at_once, 2, cores=2).secagg_timeout == default  # one wave
    assert stage_timeout_for_waves(RunConfig(secagg_timeout=50.0), 6, cores=2).secagg_timeout == 50.0  # as set


# ------------------------------------------------------------------ many nodes, end to end


@pytest.mark.slow
def test_a_many_node_secure_sum_unmasks_the_exact_weighted_mean(tmp_path):
    """Twenty-five synthetic nodes, every pair sharing keys, through Flower's simulation engine with fedchat's
    node mod and coordinator workflow (roster and identity keys provisioned as a simulation does): the round
    completes and the unmasked mean is the true weighted mean of the clipped updates, within the quantisation
    bound; each node's upload is its float32 update's size plus kilobytes (key shares and signed statements)."""
    from bench.scale_app import (
        ADAPTER_KEY,
        CONVERSATIONS,
        adapter_shapes,
        make_client_app,
        make_server_app,
        synthetic_update,
    )
    from fedchat.federation.simulation import provision_roster, run_apps
    from server.secagg_workflow import quantisation_error_bound
    from shared.secagg_rules import derive_parameters

    n, params = 25, 20_000
    nodes = {i: {"node-name": f"node-{i}", "state-dir": str(tmp_path / f"node-{i}"), "require-dp": False}
             for i in range(n)}
    roster, nodes = provision_roster(tmp_path / "run", nodes)
    cfg = RunConfig(num_rounds=1, min_nodes=n, dp=False, merge=False, eval_data="", out_dir=str(tmp_path / "run"),
                    secagg_roster=str(roster))
    report = run_apps(cfg, make_server_app({**cfg.to_flower(), ADAPTER_KEY: params}),
                      make_client_app("fedchat", nodes), n)
    row = report["rounds"][0]
    assert row["status"] == "ok" and len(row["clients"]) == n
    assert row["secagg"]["survivors"] == n and row["secagg"]["dropped"] == 0
    assert list(row["secagg"]["stage_seconds"]) == ["advertise", "share-keys", "collect", "consistency", "unmask"]
    for c in row["clients"]:  # five stages up: the masked update as uint32, plus under 1 KB per peer (a sealed
        assert 4 * params < c["bytes_up"] <= 4 * params + 1024 * n  # key share each, the signed statements)
    shapes = adapter_shapes(params)
    updates = [synthetic_update(shapes, cfg.update_bound, f"node-{i}", 1, np.float64) for i in range(n)]
    expected = [np.mean([u[t] for u in updates], axis=0) for t in range(len(shapes))]
    got = np.load(tmp_path / "run" / "adapter.npz")
    bound = quantisation_error_bound(derive_parameters(cfg, n, (n - 1) // 2), [CONVERSATIONS] * n)
    error = max(float(np.abs(got[f"arr_{t}"] - e).max()) for t, e in enumerate(expected))
    print(f"fedchat's secure sum over {n} nodes: max |error| {error:.3g}, bound {bound:.3g}")
    assert error <= bound + float(np.spacing(np.float32(cfg.update_bound)))
    assert max(float(np.abs(e).max()) for e in expected) > 100 * bound  # the comparison is not trivially met
