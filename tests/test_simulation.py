"""End to end in Flower's simulation engine with the tiny model."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app.message_type import MessageType

import server.server_app
from fedchat.audit.ledger_audit import audit_ledger, check_against_report
from fedchat.demo_data import write_demo_data
from fedchat.federation.simulation import simulate
from server.traffic import TrafficMeter
from shared.config import RunConfig
from shared.model import load_model
from shared.protocol import META_LEDGER_ENTRIES, META_LEDGER_HEAD, META_ROUND
from tests.support.processes import Child

pytestmark = pytest.mark.slow


def _nodes(data: Path, state: Path, n: int, **extra) -> dict:
    return {i: {"data-path": str(data / f"org-{i + 1}.jsonl"), "state-dir": str(state / f"org-{i + 1}"),
                "node-name": f"org-{i + 1}", **extra} for i in range(n)}


def test_plaintext_fedavg_run_writes_report_checkpoints_and_merged_model(tmp_path):
    write_demo_data(tmp_path / "data", 2)
    run = RunConfig(base_model="tiny", num_rounds=2, local_steps=3, batch_size=4, dp=False, secagg=False,
                    aggregation="fedavg", lora_r=8, lora_alpha=16, learning_rate=2e-3, min_nodes=2,
                    eval_data=str(tmp_path / "data" / "eval.jsonl"), eval_max_conversations=30,
                    out_dir=str(tmp_path / "run"))
    report = simulate(run, _nodes(tmp_path / "data", tmp_path / "nodes", 2, **{"require-dp": False,
                                                                              "require-secagg": False}))
    for key in ("base_model", "clients", "base_eval_loss", "final_eval_loss", "adapter", "merged_model", "rounds"):
        assert key in report
    assert report["clients"] == 2 and len(report["rounds"]) == 2
    assert report["final_eval_loss"] < report["base_eval_loss"]
    for row in report["rounds"]:
        for key in ("round", "eval_loss", "train_loss", "seconds", "bytes_up", "bytes_down", "clients"):
            assert row[key] is not None
        assert {c["node"] for c in row["clients"]} == {"org-1", "org-2"}
        for c in row["clients"]:
            assert c["num_examples"] > 0 and c["train_loss"] > 0
            # plaintext: each node sends its float32 update plus metrics and framing (a few hundred bytes)
            assert report["adapter_update_bytes"] <= c["bytes_up"] < report["adapter_update_bytes"] + 4096
    out = Path(report["merged_model"])
    assert load_model(out, torch.device("cpu"), torch.float32) is not None
    assert (tmp_path / "run" / "checkpoints" / "round-0002" / "adapter_model.safetensors").exists()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


class SentMeter(TrafficMeter):
    """The coordinator's meter, keeping the fit config of every training instruction it sends."""

    fit_configs: list[dict] = []

    def _count_out(self, messages):
        for m in messages:
            if m.metadata.message_type == MessageType.TRAIN and "fitins.config" in m.content.config_records:
                SentMeter.fit_configs.append({"node_id": m.metadata.dst_node_id,
                                              **m.content.config_records["fitins.config"]})
        return super()._count_out(messages)


def test_secure_dp_ffa_run_keeps_budgets_and_ledgers(tmp_path, monkeypatch):
    write_demo_data(tmp_path / "data", 3)
    run = RunConfig(base_model="tiny", num_rounds=2, local_steps=2, batch_size=4, aggregation="ffa",
                    eval_data=str(tmp_path / "data" / "eval.jsonl"), eval_max_conversations=20,
                    out_dir=str(tmp_path / "run"), merge=False)
    SentMeter.fit_configs = []
    monkeypatch.setattr(server.server_app, "TrafficMeter", SentMeter)
    report = simulate(run, _nodes(tmp_path / "data", tmp_path / "nodes", 3, **{"target-epsilon": 3.0}))
    assert report["secagg"] and report["dp"] and report["aggregation"] == "ffa"
    for row in report["rounds"]:
        assert row["status"] == "ok" and row["secagg"]["nodes"] == 3 and row["left_out"] == []
        assert row["train_loss"] is None  # threat: per-node statistics of private data reach the coordinator
        for c in row["clients"]:
            assert 0 < c["epsilon"] <= 3.0 and c["target_epsilon"] == 3.0
            assert not {"train_loss", "train_seconds", "fit_seconds"} & set(c), c
    # Each node gets back, with its next instruction, the ledger head it reported the round before.
    first, second = report["rounds"]
    sent = {(f[META_ROUND], f["node_id"]): f for f in SentMeter.fit_configs}
    for c in first["clients"]:
        assert META_LEDGER_HEAD not in sent[(1, c["node_id"])]
        assert sent[(2, c["node_id"])][META_LEDGER_HEAD] == c["ledger_head"]
        assert sent[(2, c["node_id"])][META_LEDGER_ENTRIES] == c["ledger_entries"] == 1
    audits = []
    for i in range(3):
        state = tmp_path / "nodes" / f"org-{i + 1}"
        lines = (state / "ledger.jsonl").read_text().splitlines()
        assert len(lines) == 2
        assert [json.loads(line)["round"] for line in lines] == [1, 2]
        audits.append(audit_ledger(state / "ledger.jsonl", state / "ledger-key.pub"))
    assert check_against_report(audits, tmp_path / "run" / "report.json").ok  # rows bound by ledger key
    reported = {c["node"]: c["epsilon"] for c in report["rounds"][-1]["clients"]}
    for audit in audits:  # what the nodes wrote verifies independently, and matches what they reported
        assert audit.ok, audit.problems
        assert audit.epsilon_recomputed == pytest.approx(reported[audit.node], rel=0.01)


def _demo(out: Path, rounds: int, log: Path) -> Child:
    cmd = [sys.executable, "-m", "fedchat", "demo", "--base-model", "tiny", "--clients", "2", "--rounds", str(rounds),
           "--local-steps", "2", "--no-dp", "--no-secagg", "--out", str(out),
           "--run-config", "eval-max-conversations=10"]
    return Child.start(cmd, log)


def test_coordinator_resumes_after_being_killed(tmp_path):
    out = tmp_path / "run"
    first_run = _demo(out, 2, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    try:
        while not (out / "checkpoints" / "round-0001" / "state.json").exists():
            assert first_run.proc.poll() is None, first_run.output()
            assert time.monotonic() < deadline, "no checkpoint of round 1 within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(first_run.pid, signal.SIGKILL)  # a crash: no cleanup, no final report
        first_run.proc.wait(timeout=30)
    first = json.loads((out / "checkpoints" / "round-0001" / "state.json").read_text())
    resumed = _demo(out, 2, tmp_path / "resumed.log")
    output = resumed.finish(timeout=400)
    assert resumed.proc.returncode == 0, output
    assert "resuming run" in output
    report = json.loads((out / "report.json").read_text())
    assert report["run_id"] == first["run_id"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0] == first["rounds"][0]  # round 1 was not trained again


def test_an_exhausted_node_is_left_out_before_key_sharing(tmp_path):
    data, state = tmp_path / "data", tmp_path / "nodes"
    write_demo_data(data, 4)
    nodes = _nodes(data, state, 4, **{"target-epsilon": 3.0})
    nodes[0]["target-epsilon"] = 0.001  # org-1's operator allows less than any round costs: no budget left
    run = RunConfig(base_model="tiny", num_rounds=2, local_steps=2, batch_size=4, merge=False,
                    out_dir=str(tmp_path / "run"))
    report = simulate(run, nodes)
    first, second = report["rounds"]
    for row in (first, second):  # the run goes on with the three nodes that can train
        assert row["status"] == "ok" and {c["node"] for c in row["clients"]} == {"org-2", "org-3", "org-4"}
        assert row["secagg"]["nodes"] == 3 and row["secagg"]["active_after_stage"]["advertise"] == 3
        assert all(c["status"] == "ok" for c in row["clients"]) and row["secagg"]["total_weight"] > 0
    # org-1 said so before key sharing (one bit, its own guard), and was not asked again.
    assert len(first["left_out"]) == 1 and "privacy budget is spent" in first["left_out"][0]["reason"]
    assert second["left_out"] == []
    exhausted = first["left_out"][0]["node_id"]
    assert exhausted not in {c["node_id"] for c in first["clients"] + second["clients"]}
    assert first["failures"] == [] and first["dropped"] == 0  # it never joined, so it never dropped out
    assert not (state / "org-1" / "ledger.jsonl").exists() or not (state / "org-1" / "ledger.jsonl").read_text()


def test_a_round_where_every_node_is_exhausted_fails_clearly(tmp_path):
    write_demo_data(tmp_path / "data", 3)
    run = RunConfig(base_model="tiny", num_rounds=1, local_steps=1, batch_size=4, merge=False,
                    out_dir=str(tmp_path / "run"))
    report = simulate(run, _nodes(tmp_path / "data", tmp_path / "nodes", 3, **{"target-epsilon": 0.001}))
    row = report["rounds"][0]
    assert row["status"] == "failed" and report["failed_rounds"] == [1]
    assert row["error"].startswith("0 node(s) can train this round; secure aggregation needs at least 3")
    assert len(row["left_out"]) == 3 and row["clients"] == [] and row["failures"] == []
    assert "setup" not in row["secagg"]["stage_seconds"] or row["secagg"]["active_after_stage"]["setup"] == 0
    assert report["status"] == "finished"
