"""fedchat's secure sum in Flower's simulation engine: precision against plaintext FedAvg, what the
coordinator sees, dropouts, and the rules that keep every unmasked sum a sum of at least three nodes'
updates. Its adversaries: tests/test_secagg_protocol.py (in one process) and tests/test_secagg_attacks.py."""

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.compat.common.recorddict_compat import recorddict_to_fitres
from safetensors.numpy import load_file

import server.server_app
from fedchat.demo import run_demo
from fedchat.demo_data import write_demo_data
from fedchat.federation.simulation import simulate
from server.secagg_workflow import quantisation_error_bound
from server.traffic import TrafficMeter
from shared import secagg_wire as wire
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.secagg_rules import derive_parameters

pytestmark = pytest.mark.slow


class RecordingMeter(TrafficMeter):
    """The coordinator's view: a copy of every message content that reaches it, as it arrives."""

    received: list = []

    def _count_in(self, messages):
        RecordingMeter.received.extend(recorddict_from_proto(recorddict_to_proto(m.content))
                                       for m in messages if m.has_content())
        return super()._count_in(messages)


@pytest.fixture
def record(monkeypatch):
    RecordingMeter.received = []
    monkeypatch.setattr(server.server_app, "TrafficMeter", RecordingMeter)
    return RecordingMeter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_demo_data(folder, 4)
    return folder


def _run(tmp_path, data, name, n, secagg, broken=(), **extra):
    cfg = RunConfig(base_model="tiny", num_rounds=1, local_steps=2, batch_size=4, dp=False, secagg=secagg,
                    merge=False, out_dir=str(tmp_path / name), **extra)
    nodes = {i: {"data-path": str(data / ("missing.jsonl" if i in broken else f"org-{i + 1}.jsonl")),
                 "state-dir": str(tmp_path / name / "nodes" / f"org-{i + 1}"), "node-name": f"org-{i + 1}",
                 "require-dp": False, "require-secagg": secagg} for i in range(n)}
    report = simulate(cfg, nodes)
    adapter = load_file(str(tmp_path / name / "checkpoints" / "round-0001" / "adapter_model.safetensors"))
    return cfg, report, adapter


@pytest.fixture(scope="module")
def plain3(tmp_path_factory, data) -> dict:
    """Three nodes aggregated in plaintext, run once for the tests that compare with it: the
    adapter before and after, and each node's update as the coordinator received it."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        RecordingMeter.received = []
        patch.setattr(server.server_app, "TrafficMeter", RecordingMeter)
        _, _, adapter = _run(folder, data, "plain", 3, secagg=False)
    updates, weights = {}, {}
    for content in RecordingMeter.received:
        if content.array_records:
            res = recorddict_to_fitres(content, keep_input=True)
            updates[res.metrics["node"]] = parameters_to_ndarrays(res.parameters)
            weights[res.metrics["node"]] = res.num_examples
    initial = load_file(str(folder / "plain" / "checkpoints" / "round-0000" / "adapter_model.safetensors"))
    return {"adapter": adapter, "initial": initial, "updates": updates, "weights": weights}


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _float32_ulp(adapter: dict) -> float:
    """Both runs store global + mean update in float32: they may differ by one rounding step."""
    return float(np.spacing(np.float32(max(float(np.abs(v).max()) for v in adapter.values()))))


def _bound(cfg: RunConfig, sampled: int, weights: list[int], colluders: int) -> float:
    return quantisation_error_bound(derive_parameters(cfg, sampled, colluders), weights)


def test_secure_aggregate_equals_plaintext_average_and_reveals_no_update(tmp_path, data, plain3, record):
    plain_adapter, plaintext_updates = plain3["adapter"], plain3["updates"]
    assert len(plaintext_updates) == 3  # without the secure sum the coordinator does see each update

    cfg, secure, secure_adapter = _run(tmp_path, data, "secure", 3, secagg=True)
    row = secure["rounds"][0]
    assert row["secagg"]["total_weight"] == sum(plain3["weights"].values())  # only the total is known
    assert all("num_examples" not in c for c in row["clients"])
    bound = _bound(cfg, 3, list(plain3["weights"].values()), row["secagg"]["colluders"]) + _float32_ulp(plain_adapter)
    error = _max_diff(plain_adapter, secure_adapter)
    print(f"secure sum vs plaintext weighted mean: max |error| {error:.3g}, documented bound {bound:.3g}")
    assert error <= bound
    assert _max_diff(plain_adapter, plain3["initial"]) > 100 * bound

    # What the coordinator received: no array payload, masked integers only, nothing of any plaintext update.
    masked = []
    for content in record.received:
        for arrays in content.array_records.values():
            assert all(len(a.data) == 0 for a in arrays.values()), "an update reached the coordinator in plaintext"
        configs = content.config_records.get(wire.RECORD, {})
        if wire.MASKED in configs:
            masked.append(np.frombuffer(configs[wire.MASKED], "<u4")[1:].astype(np.float64))
        metrics = content.metric_records.get("fitres.num_examples")
        assert metrics is None or metrics["num_examples"] == 0  # a node's count travels masked only
        sent = recorddict_to_proto(content).SerializeToString()
        for update in plaintext_updates.values():
            assert update[0].tobytes()[:64] not in sent
    assert len(masked) == 3
    update_bytes = secure["adapter_update_bytes"]  # the float32 update, as it travels in plaintext
    for c in row["clients"]:
        assert update_bytes < c["bytes_up"] <= 1.1 * update_bytes + 8192
    for vec in masked:
        assert vec.min() >= 0 and vec.max() < 2**32
        assert abs(vec.mean() / 2**32 - 0.5) < 0.05  # uniform over the modulus, like the masks
        for update in plaintext_updates.values():
            flat = np.concatenate([u.ravel() for u in update]).astype(np.float64)
            # Uncorrelated: |r| stays within 5 standard errors (1/sqrt(n)) of 0; a leaked update gives ~1.
            assert abs(np.corrcoef(vec, flat)[0, 1]) < max(0.1, 5 / np.sqrt(flat.size))
    assert row["secagg"]["levels"] == 2**30


def test_dropout_after_key_sharing_leaves_a_correct_result(tmp_path, data, plain3):
    plain_adapter = plain3["adapter"]
    cfg, report, adapter = _run(tmp_path, data, "drop", 4, secagg=True, broken=(3,))
    row = report["rounds"][0]
    assert row["status"] == "ok"
    assert row["secagg"]["active_after_stage"]["share-keys"] == 4  # it took part in key sharing ...
    assert row["secagg"]["active_after_stage"]["collect"] == 3  # ... then dropped out
    assert row["dropped"] == 1 and row["secagg"]["dropped"] == 1
    assert len(row["failures"]) == 1  # the node's reason, without its local path (the details stay in its log)
    assert "the round failed on the node (DataError, error " in row["failures"][0]
    assert "missing.jsonl" not in row["failures"][0]
    assert {c["node"] for c in row["clients"]} == {"org-1", "org-2", "org-3"}
    bound = _bound(cfg, 4, list(plain3["weights"].values()), row["secagg"]["colluders"]) + _float32_ulp(plain_adapter)
    error = _max_diff(plain_adapter, adapter)
    print(f"one dropout of 4: max |error| vs plaintext mean of the other 3: {error:.3g} (bound {bound:.3g})")
    assert error <= bound


def test_too_many_dropouts_fail_the_round_with_a_clear_error(tmp_path, data):
    _, report, adapter = _run(tmp_path, data, "halt", 3, secagg=True, broken=(1, 2))
    row = report["rounds"][0]
    assert row["status"] == "failed"
    assert "halted at stage 'collect': 1 of the 3 sampled nodes remained, 3 are needed" in row["error"]
    assert report["failed_rounds"] == [1]
    initial = load_file(str(tmp_path / "halt" / "checkpoints" / "round-0000" / "adapter_model.safetensors"))
    assert _max_diff(initial, adapter) == 0.0  # nothing was applied


def test_a_two_node_secagg_round_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="'min-nodes' must be at least 3 with secagg"):
        RunConfig(min_nodes=2, secagg=True)
    with pytest.raises(ConfigError, match="'nodes-per-round' must be 0 \\(every node\\) or at least 3"):
        RunConfig(nodes_per_round=2, secagg=True)
    with pytest.raises(ConfigError, match="--clients must be at least 3 with secure aggregation"):
        run_demo(out=str(tmp_path / "demo"), clients=2, rounds=1, local_steps=1, base_model="tiny",
                 aggregation="ffa", dp=True, secagg=True, target_epsilon=8.0, fresh=False)
    RunConfig(min_nodes=2, secagg=False)  # plaintext with two nodes is the operators' explicit choice
