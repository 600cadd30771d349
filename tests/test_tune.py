"""fedchat tune: a 10-trial Optuna search on the tiny model whose best recipe loads and runs."""

import csv
import json
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedchat.cli import main
from fedchat.demo_data import write_demo_data
from fedchat.simulation import simulate
from fedchat.tune import SEARCHED
from shared.config import RunConfig
from shared.dialogue import read_dialogues, write_dialogues


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Coordinator-owned data in the --data-dir layout, small so a trial takes seconds (16 conversations a node:
    the search's batch sizes run 8 to 16, and a DP step's per-conversation gradients cost in proportion)."""
    full, data = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("data")
    write_demo_data(full, 2)
    for name, n in (("org-1", 16), ("org-2", 16), ("eval", 8)):
        write_dialogues(data / f"{name}.jsonl", read_dialogues(full / f"{name}.jsonl").conversations[:n])
    return data


def test_data_dir_must_hold_the_node_files_and_eval(tmp_path, capsys):
    write_dialogues(tmp_path / "org-1.jsonl", [[{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}]])
    assert main(["tune", "--base-model", "tiny", "--clients", "2", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lacks org-2.jsonl, eval.jsonl" in err and "the coordinator owns" in err
    assert main(["tune", "--base-model", "tiny", "--data-dir", str(tmp_path / "none"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["tune", "--base-model", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--run-config", "learning-rate=0.1"]) == 2
    assert "which the search chooses" in capsys.readouterr().err


@pytest.mark.slow
def test_ten_trial_search_writes_a_recipe_that_runs(tmp_path, small_data, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--trials", "10", "--base-model", "tiny", "--clients", "2", "--rounds", "1",
                 "--max-local-steps", "2", "--data-dir", str(small_data), "--out", str(out), "--seed", "1",
                 "--eval-max-conversations", "8"]) == 0
    printed = capsys.readouterr().out
    assert "recipe:" in printed and "ROUGE-L" in printed
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 10 and all(r["state"] == "complete" for r in rows)
    assert (out / "trials.md").read_text().count("\n") == 12 and (out / "tune.png").stat().st_size > 1000
    default, first = RunConfig(), rows[0]  # the default recipe runs first, its batch capped at the 16 a node has
    assert (first["aggregation"], int(first["lora-r"]), int(first["batch-size"])) == (default.aggregation,
                                                                                    default.lora_r, 16)
    assert float(first["learning-rate"]) == pytest.approx(default.learning_rate)
    for r in rows:
        assert 1 <= int(r["local-steps"]) <= 2 and r["aggregation"] in ("fedavg", "ffa")
        assert float(r["epsilon_spent"]) <= 8.0  # every trial within the target epsilon
    summary = json.loads((out / "tune.json").read_text())
    assert summary["best_loss"] == min(float(r["held_out_loss"]) for r in rows)
    assert 0 < summary["best_loss"] < 2 * summary["base_loss"]  # DP noise on the tiny model may not beat the base
    for who in ("model", "base"):
        assert 0 <= summary["best_vs_base"][who]["rouge_l"] <= 1
    # the recipe: what `flwr run . --run-config best.toml` reads, a valid RunConfig, the best trial's values
    recipe = parse_config_args([str(out / "best.toml")])
    assert recipe == tomllib.loads((out / "best.toml").read_text())
    cfg = RunConfig.from_flower(recipe)
    assert cfg.dp and cfg.base_model == "tiny" and cfg.lora_alpha == 2 * cfg.lora_r
    assert set(SEARCHED) < set(summary["best_params"])
    assert {k: recipe[k] for k in summary["best_params"]} == summary["best_params"]
    run = cfg.replace(out_dir=str(tmp_path / "run"), eval_data=str(small_data / "eval.jsonl"), min_nodes=2,
                      secagg=False, merge=False)
    nodes = {i: {"data-path": str(small_data / f"org-{i + 1}.jsonl"), "state-dir": str(tmp_path / "nodes" / str(i)),
                 "node-name": f"org-{i + 1}", "require-secagg": False} for i in range(2)}
    report = simulate(run, nodes)
    assert report["status"] == "finished" and report["final_eval_loss"] == pytest.approx(summary["best_loss"], rel=0.05)
