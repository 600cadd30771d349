"""What a node accepts from a coordinator it does not trust, and what it sends back.

Each test drives the node's real ClientApp client (`FedChatClient.fit`) with a fit config
as a coordinator would send it, on the tiny model and a real dialogue file.
"""

import json

import pytest

from client.app import FedChatClient, NodeCache
from client.policy import RoundRefused
from shared.adapter import get_arrays
from shared.config import NodeConfig, RunConfig
from shared.protocol import fit_config
from tests.support.data import conversation, write_jsonl

SECRET = "the patient's name is Zebulon Quaxworth"


def _node(tmp_path, **extra) -> NodeConfig:
    (tmp_path / "private-org").mkdir(exist_ok=True)
    data = tmp_path / "private-org" / "dialogues.jsonl"
    if not data.exists():
        write_jsonl(data, [conversation(f"question {i} {SECRET}", f"answer {i}") for i in range(40)])
    return NodeConfig.from_flower({"data-path": str(data), "state-dir": str(tmp_path / "private-org" / "state"),
                                   "node-name": "org-x", "require-secagg": False, "target-epsilon": 50.0,
                                   "validation-fraction": 0.0, **extra})


def _fit(node: NodeConfig, **run):
    cfg = RunConfig(**{"base_model": "tiny", "local_steps": 2, "batch_size": 4, "secagg": False, **run})
    loaded = NodeCache.model(cfg, node) if cfg.base_model == "tiny" else None
    params = get_arrays(loaded.model, loaded.names) if loaded else []
    config = fit_config(cfg, 1, "run-a", loaded.frozen_a if loaded else "")
    return FedChatClient(node, secagg_active=False).fit(params, config)


def _assert_nothing_private(text: str, tmp_path) -> None:
    assert str(tmp_path) not in text and "private-org" not in text and "dialogues.jsonl" not in text
    assert "Zebulon" not in text


def test_a_run_naming_a_local_path_as_base_model_is_refused_before_any_file_is_opened(tmp_path):
    """Threat: a coordinator names node-local paths as base model and reads the node's disk from the errors."""
    node = _node(tmp_path)
    for probe in ("/etc/shadow", str(tmp_path / "private-org"), "../../home"):
        with pytest.raises(RoundRefused) as refused:
            _fit(node, base_model=probe)
        message = str(refused.value)
        assert "allowed-base-models" in message
        # the answer is the same whether the path exists or not: nothing was looked up
        assert "exist" not in message and "No such" not in message


@pytest.mark.parametrize("key,value,cap", [("local_steps", 100_000, "max-local-steps"),
                                           ("batch_size", 1_000_000, "max-batch-size"),
                                           ("max_seq_len", 1_000_000, "max-seq-len"),
                                           ("micro_batch_tokens", 10**9, "max-micro-batch-tokens"),
                                           ("lora_r", 4096, "max-lora-r")])
def test_unbounded_work_asked_by_the_coordinator_is_refused(tmp_path, key, value, cap):
    """Threat: a coordinator exhausts a node's machine with unbounded steps, batch or sequence length."""
    with pytest.raises(RoundRefused, match=cap):
        _fit(_node(tmp_path), **{key: value})


def test_an_allowed_model_within_the_caps_trains(tmp_path):
    node = _node(tmp_path, **{"max-local-steps": 2, "allowed-base-models": "tiny"})
    update, weight, metrics = _fit(node)
    assert weight == 40 and metrics["status"] == "ok" and len(update) > 0


def test_a_failed_round_sends_no_local_path_or_data_back(tmp_path):
    """Threat: error messages carry node-local paths or lines of private data to the coordinator."""
    node = _node(tmp_path)
    bad = tmp_path / "private-org" / "dialogues.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": SECRET}]}) + "\n")
    NodeCache.data.clear()
    with pytest.raises(RoundRefused) as refused:
        _fit(node)
    message = str(refused.value)
    assert "DataError" in message and "error " in message  # the kind and an id the operator can look up
    _assert_nothing_private(message, tmp_path)


def test_a_full_disk_is_named_in_the_refusal_without_its_path(tmp_path):
    """A node whose state dir is full refuses with the system's words for it (tests/test_faults.py fills one for
    real before the ledger append), not as an "internal error", and still names no path."""
    import errno
    import os

    from client.policy import refusal

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "private-org" / "ledger.jsonl"))
    message = str(refusal("org-1", full))
    assert "No space left on device" in message and "error " in message
    _assert_nothing_private(message, tmp_path)


def test_under_dp_no_statistic_of_the_data_leaves_the_node(tmp_path):
    """Threat: a coordinator that crafts the adapter it sends reads membership from each node's train loss
    (or from data-dependent timings). Under DP only the update, the weight and DP-safe bookkeeping leave."""
    update, weight, metrics = _fit(_node(tmp_path))
    assert set(metrics) <= {"node", "num-conversations", "status", "ledger-key", "ledger-head", "ledger-entries",
                            "epsilon", "target-epsilon", "delta", "noise-multiplier", "clipped-values"}
    assert 0 < metrics["epsilon"] <= 50.0
    # without DP nothing is promised, and the node says how training went
    _, _, plain = _fit(_node(tmp_path, **{"require-dp": False}), dp=False)
    assert "train-loss" in plain


def test_require_dp_and_require_secagg_refuse_with_a_message_the_coordinator_sees(tmp_path):
    with pytest.raises(RoundRefused, match="requires DP"):
        _fit(_node(tmp_path), dp=False)
    with pytest.raises(RoundRefused, match="requires secure aggregation"):
        _fit(_node(tmp_path, **{"require-secagg": True}))


def test_a_round_without_dp_is_recorded_and_no_dp_promise_survives_it(tmp_path):
    """Threat: a node whose operator allowed a non-private round trains it invisibly, and its ledger still
    shows a finite epsilon. The round is a ledger line with no noise, and the node's budget is spent."""
    node = _node(tmp_path, **{"require-dp": False})
    _fit(node)  # a DP round first
    _fit(node, dp=False)
    lines = (tmp_path / "private-org" / "state" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 2
    last = json.loads(lines[-1])
    assert last["noise_multiplier"] == 0 and last["epsilon"] is None  # None: infinite epsilon
    with pytest.raises(RoundRefused, match="past its budget"):
        _fit(node)


def test_a_ledger_deleted_with_its_head_is_not_a_fresh_budget(tmp_path):
    """Threat: an operator deletes (or a partial restore loses) both the ledger and its head file; the node
    must not start again from epsilon 0 beside the same ledger key."""
    node = _node(tmp_path)
    _fit(node)
    state = tmp_path / "private-org" / "state"
    (state / "ledger.jsonl").unlink()
    (state / "ledger.head").unlink()
    with pytest.raises(RoundRefused, match="LedgerError"):
        _fit(node)
    assert not (state / "ledger.jsonl").exists()  # nothing was trained or written


def test_without_dp_under_secagg_no_plaintext_statistic_leaves_the_node(tmp_path):
    """Threat: a round without DP but inside SecAgg+ sent its train loss, timing and clipped count in the
    clear, beside an update the coordinator may only ever see summed."""
    node = _node(tmp_path, **{"require-dp": False, "require-secagg": True})
    cfg = RunConfig(base_model="tiny", local_steps=2, batch_size=4, dp=False)
    loaded = NodeCache.model(cfg, node)
    client = FedChatClient(node, secagg_active=True)
    _, _, metrics = client.fit(get_arrays(loaded.model, loaded.names), fit_config(cfg, 1, "run-b", loaded.frozen_a))
    assert not {"train-loss", "seconds", "clipped-values"} & set(metrics), metrics
