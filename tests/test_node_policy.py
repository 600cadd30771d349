"""What a node accepts from a coordinator it does not trust, and what it sends back.

Each test drives the node's real ClientApp client (`FedchatClient.fit`) with a fit config
as a coordinator would send it, on the tiny model and a real dialogue file.
"""

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from client.client_app import FedchatClient, NodeCache
from client.policy import RoundRefused
from shared import ledger
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
    return FedchatClient(node, secagg_active=False).fit(params, config)


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


@pytest.mark.parametrize("key,value,cap,limit", [("local_steps", 3, "max-local-steps", 2),
                                                 ("batch_size", 5, "max-batch-size", 4),
                                                 ("max_seq_len", 257, "max-seq-len", 256),
                                                 ("micro_batch_tokens", 2049, "max-micro-batch-tokens", 2048),
                                                 ("lora_r", 5, "max-lora-r", 4)])
def test_unbounded_work_asked_by_the_coordinator_is_refused(tmp_path, key, value, cap, limit):
    """Threat: a coordinator exhausts a node's machine with unbounded steps, batch or sequence length. Each
    cap is set just below what the run asks (a node without the check would train at once, and the test
    fails instead of exhausting the test machine)."""
    with pytest.raises(RoundRefused, match=cap):
        _fit(_node(tmp_path, **{cap: limit}), **{key: value})


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
    client = FedchatClient(node, secagg_active=True)
    _, _, metrics = client.fit(get_arrays(loaded.model, loaded.names), fit_config(cfg, 1, "run-b", loaded.frozen_a))
    assert not {"train-loss", "seconds", "clipped-values"} & set(metrics), metrics


# ------------------------------------------------------------------ the budget outlives the state dir

def _round(node: NodeConfig, rnd: int, head=None, run="run-a"):
    """Round `rnd` of `run`, the coordinator sending `head` ((entries, head, key fingerprint) or None)."""
    cfg = RunConfig(base_model="tiny", local_steps=2, batch_size=4, secagg=False, num_rounds=5)
    loaded = NodeCache.model(cfg, node)
    config = fit_config(cfg, rnd, run, loaded.frozen_a, head)
    _, _, metrics = FedchatClient(node, secagg_active=False).fit(get_arrays(loaded.model, loaded.names), config)
    return metrics["ledger-entries"], metrics["ledger-head"], metrics["ledger-key"]


def _refused(caplog, node: NodeConfig, rnd: int, head=None, run="run-a") -> str:
    """The round is refused: the reason the node logged (the coordinator sees only its kind and an id)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(RoundRefused, match="LedgerError"):
        _round(node, rnd, head, run)
    return caplog.text


def _entries(node: NodeConfig) -> list[dict]:
    path = Path(node.state_dir) / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_state_dir_restored_from_a_backup_is_not_a_fresh_budget(tmp_path, caplog):
    """Threat: the operator restores an older copy of the whole state dir (ledger, head file and key, as a
    restore does) and the rounds trained since are forgotten. The node's registry, outside the state dir,
    still holds the newer head: refused, with or without the coordinator's record."""
    node = _node(tmp_path)
    state = Path(node.state_dir)
    _round(node, 1)
    shutil.copytree(state, tmp_path / "backup")
    _round(node, 2)
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "backup", state)
    assert "has 1 entries, but this node's ledger registry" in _refused(caplog, node, 3)
    assert len(_entries(node)) == 1  # nothing was trained or written


def test_a_new_or_empty_state_dir_over_the_same_data_is_not_a_fresh_budget(tmp_path, caplog):
    """Threat: a config pointed at a new state dir (or the old one emptied) starts from epsilon 0 on the
    conversations the node already trained on."""
    node = _node(tmp_path)
    _round(node, 1)
    for other in (node.replace(state_dir=str(tmp_path / "new-state")), node):
        if other is node:  # the same state dir, emptied
            shutil.rmtree(node.state_dir)
            Path(node.state_dir).mkdir()
        assert "already have their budget in another ledger" in _refused(caplog, other, 1)
        assert not _entries(other)


def test_a_second_node_config_over_the_same_data_is_refused(tmp_path, caplog):
    """Threat: a second node config (another name and state dir) over the same conversations, even in a
    copied, reordered and extended data file, trains them on a budget of its own."""
    node = _node(tmp_path)
    _round(node, 1)
    lines = Path(node.data_path).read_text().splitlines()
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    extra = json.dumps(conversation("a new question", "a new answer"))
    copy.write_text("\n".join([*reversed(lines), extra]) + "\n")
    second = node.replace(data_path=str(copy), state_dir=str(tmp_path / "elsewhere" / "state"), node_name="org-y")
    assert "40 of the 41 conversations of this node's data file already have their budget" in \
        _refused(caplog, second, 1)
    # other conversations on the same host are another budget: they train
    other = tmp_path / "other" / "d.jsonl"
    other.parent.mkdir()
    write_jsonl(other, [conversation(f"other question {i}", f"other answer {i}") for i in range(40)])
    _round(node.replace(data_path=str(other), state_dir=str(tmp_path / "other" / "state")), 1)


def test_a_state_dir_copied_to_another_host_keeps_its_budget_and_cannot_fork(tmp_path, caplog, monkeypatch):
    """Threat: the state dir is copied to another host (no registry there). The copy keeps the spent budget
    (its ledger goes on), and the coordinator's head, kept per ledger key across runs, refuses the copy
    left behind once the other has trained: one budget is never spent twice."""
    node = _node(tmp_path)
    head = _round(node, 1)
    eps_1 = _entries(node)[-1]["epsilon"]
    shutil.copytree(node.state_dir, tmp_path / "host-b" / "state")
    monkeypatch.setenv("FEDCHAT_STATE_HOME", str(tmp_path / "host-b" / "registry"))  # another host
    moved = node.replace(state_dir=str(tmp_path / "host-b" / "state"))
    heads = str(tmp_path / "coordinator" / "heads.json")
    _coordinator_records(heads, "run-a", head)
    head = _round(moved, 1, _coordinator_head(heads, "run-b"), run="run-b")
    _coordinator_records(heads, "run-b", head)
    assert len(_entries(moved)) == 2 and _entries(moved)[-1]["epsilon"] > eps_1  # the budget went with it
    monkeypatch.setenv("FEDCHAT_STATE_HOME", str(tmp_path / "host-c" / "registry"))  # the first copy, no registry
    refused = _refused(caplog, node, 1, _coordinator_head(heads, "run-c"), "run-c")
    assert "has 1 entries, but the coordinator recorded 2" in refused


def _strategy(heads: str, run: str):
    from server.strategy import FedchatStrategy

    return FedchatStrategy(RunConfig(base_model="tiny", secagg=False, ledger_heads=heads), run, [], "", None)


def _coordinator_records(heads: str, run: str, head: tuple) -> None:
    """The coordinator of `run` records the head node id 42 reported with its update."""
    from flwr.common import Code, FitRes, Status

    class Proxy:
        node_id = 42

    metrics = {"ledger-entries": head[0], "ledger-head": head[1], "ledger-key": head[2], "node": "org-x"}
    _strategy(heads, run)._client(Proxy(), FitRes(Status(Code.OK, ""), None, 40, metrics))


def _coordinator_head(heads: str, run: str):
    """What the coordinator of a new `run` sends node id 42 before its first reply in that run."""
    return _strategy(heads, run).heads_across_runs.for_node(42)


def test_the_coordinator_keeps_ledger_heads_across_runs(tmp_path, caplog):
    """The coordinator's record of a node's head survives the run (a new strategy, a new out-dir): a node
    whose state dir was restored and whose registry was lost too is still refused."""
    node = _node(tmp_path)
    heads = str(tmp_path / "coordinator" / "heads.json")
    head = _round(node, 1)
    shutil.copytree(node.state_dir, tmp_path / "backup")
    head = _round(node, 2, head)
    _coordinator_records(heads, "run-1", head)
    shutil.rmtree(node.state_dir)
    shutil.copytree(tmp_path / "backup", node.state_dir)
    registry = ledger.state_home() / "ledgers"
    shutil.rmtree(registry)  # the registry lost too (it is not the state dir's to restore)
    recorded = _coordinator_head(heads, "run-2")  # the next run
    assert recorded == head
    assert "has 1 entries, but the coordinator recorded 2" in _refused(caplog, node, 1, recorded, "run-2")


def test_first_contact_with_a_federation_is_recorded(tmp_path):
    """A round planned with no coordinator record of the node's ledger key (a new federation) is marked in
    its ledger line and in the node's registry; with the record, it is not."""
    node = _node(tmp_path)
    head = _round(node, 1)
    _round(node, 2, head)
    other_key = ("c" * 64,)
    _round(node, 3, (head[0], head[1], *other_key))  # a head for another key is no record of this one
    assert [e["first_contact"] for e in _entries(node)] == [True, False, True]
    assert {e["version"] for e in _entries(node)} == {ledger.VERSION}
    record = json.loads((ledger.state_home() / "ledgers" / f"{head[2]}.json").read_text())
    assert [e["event"] for e in record["events"]] == ["registered", "first-contact", "first-contact"]


# ------------------------------------------------------------------ what fit() itself does

_WATCHED: list = []  # (probe prefixes, events seen) while a probe runs; the audit hook stays installed


def _audit_hook(event: str, args: tuple) -> None:
    if _WATCHED and event in ("open", "os.listdir", "os.scandir", "os.chdir", "shutil.copyfile", "os.rename"):
        prefixes, seen = _WATCHED[-1]
        for arg in args:
            if isinstance(arg, (str, bytes, Path)) and str(arg if not isinstance(arg, bytes) else arg.decode(
                    errors="replace")).startswith(prefixes):
                seen.append((event, str(arg)))


sys.addaudithook(_audit_hook)


def test_a_base_model_path_is_refused_before_the_node_opens_anything_under_it(tmp_path, tiny_dir):
    """Row 8, by the OS's own account: Python's audit hooks see every file open and folder listing while
    fit() handles a run naming a local folder (a real model folder, which a node without the check would
    load) as base model; not one of them touches the folder."""
    probe = tmp_path / "probe-model"
    shutil.copytree(tiny_dir, probe)
    node = _node(tmp_path)
    seen: list = []
    _WATCHED.append(((str(probe), str(probe.resolve())), seen))
    try:
        with pytest.raises(RoundRefused, match="allowed-base-models"):
            _fit(node, base_model=str(probe))
    finally:
        _WATCHED.pop()
    assert seen == []
    # the hook does see what a node opens: the same folder, allowed, is opened to load the model
    allowed = node.replace(allowed_base_models=f"tiny,{probe}")
    _WATCHED.append(((str(probe), str(probe.resolve())), seen))
    try:
        NodeCache.model(RunConfig(base_model=str(probe), secagg=False), allowed)
    finally:
        _WATCHED.pop()
    assert any(event == "open" for event, _ in seen), seen


def test_the_dp_randomness_of_fit_is_not_a_function_of_what_the_coordinator_knows(tmp_path):
    """Row 2 on the path fit() takes: two nodes with the same name, data, global adapter, round and run seed
    (everything the coordinator knows or chooses) must draw different DP samples and noise, so their updates
    differ; a node seeded from the run seed, its name and the round would send identical updates."""
    updates, sent = [], None
    cfg = RunConfig(base_model="tiny", local_steps=2, batch_size=4, secagg=False, seed=7)
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
        node = _node(tmp_path / host, **{"ledger-registry": str(tmp_path / host / "registry")})
        loaded = NodeCache.model(cfg, node)
        sent = sent or get_arrays(loaded.model, loaded.names)  # the same global adapter to both
        update, _, _ = FedchatClient(node, secagg_active=False).fit(sent, fit_config(cfg, 1, "run-a", loaded.frozen_a))
        updates.append(update)
    assert max(float(np.abs(x - y).max()) for x, y in zip(*updates)) > 1e-5


def test_a_node_whose_registry_refuses_answers_the_can_train_question_with_the_refusal(tmp_path):
    """Before key sharing the coordinator asks whether a node can train: a node that fit() would refuse
    (a second state dir over conversations another ledger holds) must not answer yes and then fail the
    round for every node."""
    node = _node(tmp_path)
    _round(node, 1)
    cfg = RunConfig(base_model="tiny", local_steps=2, batch_size=4, secagg=False, num_rounds=5)
    config = fit_config(cfg, 2, "run-a", NodeCache.model(cfg, node).frozen_a)
    assert FedchatClient(node, secagg_active=False).get_properties(config) == {"can-train": True}
    second = node.replace(state_dir=str(tmp_path / "second-state"))
    with pytest.raises(RoundRefused, match="LedgerError"):
        FedchatClient(second, secagg_active=False).get_properties(config)
