"""SecAgg+ at scale: the sparse graph (when it is chosen, that its bound holds on Flower's real ring,
that nodes judge it by their own assumptions), uint32 masked vectors, simulation resources, and one
sparse SecAgg+ round in Flower's simulation engine whose unmasked mean is checked value by value."""

import math
import random

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.secagg_guard import secagg_guard
from fedchat.simulation import backend_config
from server.secagg import protocol_parameters
from shared import secagg_wire
from shared.config import NodeConfig, RunConfig
from shared.errors import ConfigError, FederationError, PrivacyError
from shared.secagg_graph import failure_bounds, sparse_refusal

# ------------------------------------------------------------------ choosing the graph


def test_a_sparse_graph_only_where_every_party_assumes_it_and_rounds_are_large():
    for n in (3, 40, 100, 1000):  # the default assumes only a minority: all pairs, whatever the size
        p = protocol_parameters(RunConfig(), n)
        assert (p["graph"], p["num_shares"], p["reconstruction_threshold"]) == ("all-pairs", n, n // 2 + 1)
    assumed = RunConfig(secagg_colluding_fraction=0.1)
    assert protocol_parameters(assumed, 39)["graph"] == "all-pairs"  # below secagg-sparse-from (40)
    shares = {n: protocol_parameters(assumed, n) for n in (40, 100, 200, 1000)}
    assert all(p["graph"] == "sparse" and p["reconstruction_threshold"] == p["num_shares"] // 2 + 1
               for p in shares.values())
    assert (shares[100]["num_shares"], shares[100]["reconstruction_threshold"]) == (21, 11)
    k = {n: p["num_shares"] for n, p in shares.items()}
    assert k[1000] < 3 * k[100] < 100  # about log n, not n
    for n, p in shares.items():  # each is the fewest shares meeting the 2^-40 bound
        k = p["num_shares"]
        assert failure_bounds(n, k, p["reconstruction_threshold"], 0.1, 0.1)[0] <= 2.0 ** -40
        assert sparse_refusal(n, k - 2, (k - 2) // 2 + 1, 0.1, 0.1) is not None
    with pytest.raises(ConfigError, match="secagg-num-shares=9 .*could expose one node's update: 9 shares for 100 "
                                          "nodes: if 0.1 of them collude"):
        protocol_parameters(assumed.replace(secagg_num_shares=9), 100)
    assert protocol_parameters(RunConfig(secagg_colluding_fraction=1 / 3), 100)["num_shares"] == 69


def _flower_ring(ids: list[int], shares: int) -> dict[int, set[int]]:
    """Flower 1.41's SecAgg+ graph (SecAggPlusWorkflow.setup_stage): a shuffled ring, shares // 2 either side."""
    ids = list(ids)
    random.shuffle(ids)
    half = shares >> 1
    return {nid: {ids[(i + o) % len(ids)] for o in range(-half, half + 1)} for i, nid in enumerate(ids)}


def _exposed(n: int, shares: int, threshold: int, colluding: int, dropped: int) -> bool:
    """Whether, on one random ring, colluders hold `threshold` shares of an honest node, or the honest
    survivors fall apart (each part's sum is then unmasked alone)."""
    ring = _flower_ring(list(range(n)), shares)
    bad, gone = set(range(colluding)), set(range(colluding, colluding + dropped))
    honest = [i for i in range(n) if i not in bad | gone]
    if any(len((ring[i] - {i}) & bad) >= threshold for i in honest):
        return True
    seen, todo = {honest[0]}, [honest[0]]
    while todo:
        for j in ring[todo.pop()] & set(honest):
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) < len(honest)


@pytest.mark.parametrize("n,shares,colluding,dropout", [(30, 5, 0.1, 0.1), (40, 7, 0.15, 0.1)])
def test_the_privacy_bound_holds_on_flowers_ring(n, shares, colluding, dropout):
    """Parameters where failures are frequent enough to count: the bound is above what happens, and
    not far above (a bound that forgot a way to fail, or counted one run instead of two, is caught)."""
    random.seed(n)
    threshold = shares // 2 + 1
    trials = 3000
    seen = sum(_exposed(n, shares, threshold, math.ceil(colluding * n), math.ceil(dropout * n))
               for _ in range(trials)) / trials
    bound, _ = failure_bounds(n, shares, threshold, colluding, dropout)
    print(f"n={n} k={shares}: exposed in {seen:.3f} of {trials} random rings, bound {bound:.3f}")
    assert 0.03 < seen <= bound + 3 * math.sqrt(seen * (1 - seen) / trials)
    assert bound < 4 * seen


# ------------------------------------------------------------------ the node's own judgement


@pytest.fixture
def coordinator_identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _setup(node: dict, n: int, shares: int, threshold: int) -> dict:
    """A setup message to a node with `node` settings, through its guard and Flower's mod."""
    mod = secagg_guard(lambda context: NodeConfig(node_name="org-1", **node))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    configs = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
               Key.CLIPPING_RANGE: 0.08, Key.TARGET_RANGE: 2**24, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1e5}
    msg = Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), dst_node_id=7,
                  message_type=MessageType.TRAIN, group_id="1")
    return dict(mod(msg, context, lambda m, c: None).content.config_records[RECORD_KEY_CONFIGS])


def test_a_node_judges_a_sparse_graph_by_its_own_assumptions(coordinator_identity):
    with pytest.raises(PrivacyError, match="21 shares with threshold 11 for 100 nodes hold only if fewer than half "
                                           ".*secagg-colluding-fraction 0.5"):
        _setup({}, 100, 21, 11)  # by default a node accepts only what holds against any minority
    assert Key.PUBLIC_KEY_1 in _setup({"secagg_colluding_fraction": 0.1}, 100, 21, 11)
    assert Key.PUBLIC_KEY_1 in _setup({}, 100, 100, 51)  # all pairs, as before
    with pytest.raises(PrivacyError, match="9 shares for 100 nodes: if 0.1 of them collude .* revealed"):
        _setup({"secagg_colluding_fraction": 0.1}, 100, 9, 5)
    with pytest.raises(PrivacyError, match="threshold 10 is not a strict majority of the 21 shares"):
        _setup({"secagg_colluding_fraction": 0.1}, 100, 21, 10)
    with pytest.raises(PrivacyError, match="21 shares for 100 nodes: if 0.2 of them collude"):
        _setup({"secagg_colluding_fraction": 0.2}, 100, 21, 11)  # a warier node: the coordinator's 0.1 is not its
    with pytest.raises(PrivacyError, match="threshold 2 is half the sample of 4 or less"):
        _setup({"secagg_colluding_fraction": 0.1}, 4, 4, 2)


def test_the_assumptions_are_validated():
    for key, value in (("secagg-colluding-fraction", 0.6), ("secagg-colluding-fraction", 0.0),
                       ("secagg-dropout-fraction", 0.5), ("secagg-sparse-from", 2), ("sim-cpus-per-node", -1.0),
                       ("sim-threads-per-node", -1)):
        with pytest.raises(ConfigError, match=key):
            RunConfig.from_flower({key: value})
    with pytest.raises(ConfigError, match="secagg-colluding-fraction' must be in \\(0, 0.5\\]"):
        NodeConfig(secagg_colluding_fraction=0.7)


# ------------------------------------------------------------------ bytes


def test_masked_vectors_travel_as_uint32_and_sum_the_same():
    rng = np.random.default_rng(0)
    nodes = [[rng.integers(0, 2**32, size=s, dtype=np.int64) for s in ((1,), (64, 8), (300,))] for _ in range(5)]
    flower = [[ndarray_to_bytes(a) for a in v] for v in nodes]  # what Flower's mod returns: int64
    packed = [secagg_wire.pack(v) for v in flower]
    assert all(bytes_to_ndarray(b).dtype == np.uint32 for v in packed for b in v)
    assert sum(map(len, packed[0])) < 0.55 * sum(map(len, flower[0]))

    def coordinator_sum(replies):  # SecAggPlusWorkflow.collect_masked_vectors_stage's arithmetic
        total = None
        for reply in replies:
            vec = [bytes_to_ndarray(b) for b in reply]
            total = vec if total is None else parameters_addition(total, vec)
        return parameters_mod(total, 2**32)

    for wide, narrow in zip(coordinator_sum(flower), coordinator_sum(packed)):
        assert narrow.dtype == np.uint32 and np.array_equal(wide, narrow.astype(np.int64))
    odd = [ndarray_to_bytes(np.array([-1, 5])), ndarray_to_bytes(np.array([2**32])), ndarray_to_bytes(np.ones(2))]
    assert secagg_wire.pack(odd) == odd  # nothing that does not fit is touched
    assert [s for _, s in secagg_wire.shapes(packed[0])] == [(1,), (64, 8), (300,)]
    with pytest.raises(ValueError, match="shorter than its header"):
        secagg_wire.shapes([packed[0][1][:-4]])


# ------------------------------------------------------------------ the SuperLink's database


def test_the_superlinks_database_waits_two_minutes_for_a_lock(tmp_path, monkeypatch):
    """Flower 1.41 waits 5 s; three nodes pushing 160 MB updates hold the lock longer on a busy host."""
    import flwr.supercore.sql_mixin as sql
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    from fedchat.deployment import SQLITE_BUSY_TIMEOUT_MS, wait_longer_for_sqlite_locks

    def busy_timeout(name: str) -> int:
        store = SqlObjectStore(str(tmp_path / name))
        store.initialize()
        return store.query("PRAGMA busy_timeout")[0]["timeout"]

    assert busy_timeout("flower.db") == 5000
    monkeypatch.setattr(sql, "SQLITE_PRAGMAS", sql.SQLITE_PRAGMAS)  # restored after the test
    wait_longer_for_sqlite_locks()
    assert busy_timeout("fedchat.db") == SQLITE_BUSY_TIMEOUT_MS == 120_000


# ------------------------------------------------------------------ simulation resources


def test_simulation_resources_come_from_the_run_config():
    backend, threads = backend_config(RunConfig(), cores=2)  # default: one node at a time, every core
    assert backend["client_resources"]["num_cpus"] == 2 and threads == 2
    backend, threads = backend_config(RunConfig(sim_cpus_per_node=2 / 3, sim_threads_per_node=1), cores=2)
    assert backend["init_args"]["num_cpus"] // backend["client_resources"]["num_cpus"] == 3 and threads == 1
    assert backend_config(RunConfig(sim_cpus_per_node=1.0), cores=2)[1] == 1
    with pytest.raises(FederationError, match="sim-cpus-per-node=4 is more than the 2 cores"):
        backend_config(RunConfig(sim_cpus_per_node=4.0), cores=2)


# ------------------------------------------------------------------ a sparse round, end to end


@pytest.mark.slow
def test_a_sparse_secagg_round_unmasks_the_exact_weighted_mean(tmp_path):
    """Seven nodes of bench/scale_app.py (fedchat's coordinator and node guard around seeded random updates),
    each assuming at most 10% colluders: 5 key shares each, not 7; the unmasked mean is the true one."""
    from bench.scale_app import (
        ADAPTER_KEY,
        CONVERSATIONS,
        adapter_shapes,
        make_client_app,
        make_server_app,
        synthetic_update,
    )
    from fedchat.simulation import run_apps
    from server.secagg import quantisation_error_bound

    n, params = 7, 70_000
    cfg = RunConfig(num_rounds=1, min_nodes=n, dp=False, merge=False, out_dir=str(tmp_path / "run"),
                    secagg_colluding_fraction=0.1, secagg_sparse_from=3)
    report = run_apps(cfg, make_server_app({**cfg.to_flower(), ADAPTER_KEY: params}),
                      make_client_app({"secagg-colluding-fraction": 0.1, "require-dp": False}), n)
    row = report["rounds"][0]
    assert row["status"] == "ok" and len(row["clients"]) == n
    assert (row["secagg"]["graph"], row["secagg"]["num_shares"], row["secagg"]["reconstruction_threshold"]) == \
        ("sparse", 5, 3)
    for c in row["clients"]:  # four stages up, the masked update as uint32: about the float32 update
        assert 4 * params < c["bytes_up"] <= 1.1 * 4 * params
    shapes = adapter_shapes(params)
    updates = [synthetic_update(shapes, cfg.update_bound, f"node-{i}", 1, np.float64) for i in range(n)]
    expected = [np.mean([u[t] for u in updates], axis=0) for t in range(len(shapes))]
    got = np.load(tmp_path / "run" / "adapter.npz")
    bound = quantisation_error_bound(cfg, [CONVERSATIONS] * n)
    error = max(float(np.abs(got[f"arr_{t}"] - e).max()) for t, e in enumerate(expected))
    print(f"sparse SecAgg+ over {n} nodes: max |error| {error:.3g}, bound {bound:.3g}")
    assert error <= bound + float(np.spacing(np.float32(cfg.update_bound)))
    assert max(float(np.abs(e).max()) for e in expected) > 100 * bound  # the comparison is not trivially met
