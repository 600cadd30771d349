"""fedchat tune: Optuna's TPE, random and grid samplers over the recipe (local and distributed DP); a short search on
the tiny model writes a recipe that loads and runs, and a grid of local against distributed DP runs both."""

import csv
import json
import tomllib
from pathlib import Path

import optuna
import pytest
from flwr.common.config import parse_config_args

from fedchat.cli import main
from fedchat.demo_data import write_demo_data
from fedchat.federation.simulation import simulate
from fedchat.tune import SEARCHED, Search, make_sampler, parse_grid
from shared.config import RunConfig
from shared.dialogue import read_dialogues, write_dialogues
from shared.errors import ConfigError


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Coordinator-owned data in the --data-dir layout, small so a trial takes seconds (16 conversations a node:
    the search's batch sizes run 8 to 16, and a DP step's per-conversation gradients cost in proportion)."""
    full, data = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("data")
    write_demo_data(full, 3)
    for name, n in (("org-1", 16), ("org-2", 16), ("org-3", 16), ("eval", 8)):
        write_dialogues(data / f"{name}.jsonl", read_dialogues(full / f"{name}.jsonl").conversations[:n])
    return data


def _search(data: Path, tmp_path: Path, **kwargs) -> Search:
    files = [data / f"org-{i}.jsonl" for i in (1, 2, 3)]
    return Search(out=tmp_path, node_files=files, eval_file=data / "eval.jsonl", base_model="tiny", rounds=1,
                  target_epsilon=8.0, seed=0, max_local_steps=3, max_batch_size=256, eval_max_conversations=8,
                  fixed={}, **kwargs)


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


@pytest.mark.parametrize("args, message", [
    (["--sampler", "grid"], "searches the values --grid declares"),
    (["--grid", "learning-rate=0.1,0.2"], "add --sampler grid"),
    (["--sampler", "grid", "--grid", "lora-alpha=4,8"], "'lora-alpha' is not searched"),
    (["--sampler", "grid", "--grid", "learning-rate=0.1,0.1"], "lists 0.1 twice"),
    (["--sampler", "grid", "--grid", "learning-rate=fast"], "must be of type float"),
    (["--sampler", "grid", "--grid", "batch-size"], "expects key=value1,value2"),
    (["--sampler", "grid", "--grid", "dp-mode=central"], "dp-mode values are 'local' and 'distributed'"),
    (["--sampler", "grid", "--grid", "dp-mode=local,distributed"], "give --dp-mode both"),
    (["--dp-mode", "distributed", "--clients", "2"], "at least 3 for distributed DP"),
    (["--dp-mode", "both", "--clients", "3", "--colluders", "2"], "--colluders must be between 0"),
    (["--run-config", "dp-mode=distributed"], "choose the DP mode with --dp-mode"),
])
def test_bad_search_choices_fail_before_any_trial(tmp_path, capsys, args, message):
    assert main(["tune", "--base-model", "tiny", "--clients", "2", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "trials").exists()


def test_each_sampler_is_optunas_own():
    assert isinstance(make_sampler("tpe", 0, 20, None), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", 0, 20, None), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("grid", 0, 4, {"lora-r": [2, 4]}), optuna.samplers.GridSampler)
    with pytest.raises(ConfigError, match="--sampler must be one of tpe, random, grid"):
        make_sampler("cmaes", 0, 20, None)


def test_the_grid_tries_every_declared_point_once_and_keeps_the_default_recipe_elsewhere(small_data, tmp_path):
    """The grid sampler's recipes, without simulating: every combination of the declared values exactly once."""
    grid = parse_grid(["learning-rate=0.01,0.1", "lora-r=2,4,8", "dp-mode=local,distributed"])
    assert grid == {"learning-rate": [0.01, 0.1], "lora-r": [2, 4, 8], "dp-mode": ["local", "distributed"]}
    search = _search(small_data, tmp_path, dp_mode="both", grid=grid)
    study = optuna.create_study(sampler=make_sampler("grid", 0, 12, grid))
    recipes = []
    study.optimize(lambda t: recipes.append(search.suggest(t)) or 0.0, n_trials=50)  # the grid stops the study
    assert len(recipes) == 12
    assert {(r["learning-rate"], r["lora-r"], r["dp-mode"]) for r in recipes} == {
        (lr, r, m) for lr in (0.01, 0.1) for r in (2, 4, 8) for m in ("local", "distributed")}
    default = RunConfig()
    for r in recipes:
        assert r["lora-alpha"] == 2 * r["lora-r"] and r["aggregation"] == default.aggregation
        assert r["dp-max-grad-norm"] == default.dp_max_grad_norm and r["batch-size"] == 16  # capped at a node's 16
        assert r["local-steps"] == (1 if r["dp-mode"] == "distributed" else default.local_steps)
        assert search.run_config(r, tmp_path).dp_mode == r["dp-mode"]  # every recipe is a valid run config


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_random_and_tpe_draw_within_the_ranges_and_search_the_dp_mode(small_data, tmp_path, sampler):
    search = _search(small_data, tmp_path, dp_mode="both")
    study = optuna.create_study(sampler=make_sampler(sampler, 3, 12, None))
    recipes = []
    study.optimize(lambda t: recipes.append(search.suggest(t)) or len(recipes) % 3, n_trials=12)
    assert {r["dp-mode"] for r in recipes} == {"local", "distributed"}
    assert len({r["learning-rate"] for r in recipes}) == 12  # drawn, not fixed
    for r in recipes:
        assert 1e-4 <= r["learning-rate"] <= 0.5 and 8 <= r["batch-size"] <= 16
        assert 0.05 <= r["dp-max-grad-norm"] <= 5.0 and r["aggregation"] in ("fedavg", "ffa")
        assert r["local-steps"] == 1 if r["dp-mode"] == "distributed" else 1 <= r["local-steps"] <= 3
        assert search.run_config(r, tmp_path).secagg == (r["dp-mode"] == "distributed")


@pytest.mark.slow
def test_a_search_writes_a_recipe_that_runs(tmp_path, small_data, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--trials", "2", "--base-model", "tiny", "--clients", "2", "--rounds", "1",
                 "--max-local-steps", "2", "--data-dir", str(small_data), "--out", str(out), "--seed", "1",
                 "--eval-max-conversations", "8"]) == 0
    printed = capsys.readouterr().out
    assert "recipe:" in printed and "ROUGE-L" in printed
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert len(rows) == 2 and all(r["state"] == "complete" for r in rows)
    assert (out / "trials.md").read_text().count("\n") == 4 and (out / "tune.png").stat().st_size > 1000
    default, first = RunConfig(), rows[0]  # the default recipe runs first, its batch capped at the 16 a node has
    assert (first["aggregation"], int(first["lora-r"]), int(first["batch-size"])) == (default.aggregation,
                                                                                    default.lora_r, 16)
    assert float(first["learning-rate"]) == pytest.approx(default.learning_rate)
    assert rows[1]["learning-rate"] != first["learning-rate"]  # the sampler's own draw
    for r in rows:
        assert 1 <= int(r["local-steps"]) <= 2 and r["dp-mode"] == "local"
        assert float(r["epsilon_spent"]) <= 8.0  # every trial within the target epsilon
    summary = json.loads((out / "tune.json").read_text())
    assert summary["best_loss"] == min(float(r["held_out_loss"]) for r in rows) and summary["sampler"] == "tpe"
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


@pytest.mark.slow
def test_a_grid_of_local_against_distributed_dp_runs_both_and_writes_the_better(tmp_path, small_data):
    out = tmp_path / "tune"
    assert main(["tune", "--sampler", "grid", "--grid", "dp-mode=local,distributed", "learning-rate=0.05",
                 "--dp-mode", "both", "--colluders", "0", "--base-model", "tiny", "--clients", "3", "--rounds", "1",
                 "--data-dir", str(small_data), "--out", str(out), "--eval-max-conversations", "8"]) == 0
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert sorted(r["dp-mode"] for r in rows) == ["distributed", "local"] and all(r["state"] == "complete"
                                                                                   for r in rows)
    for r in rows:
        assert float(r["learning-rate"]) == 0.05 and float(r["epsilon_spent"]) <= 8.0
        assert int(r["local-steps"]) == (1 if r["dp-mode"] == "distributed" else RunConfig().local_steps)
    best = min(rows, key=lambda r: float(r["held_out_loss"]))
    cfg = RunConfig.from_flower(parse_config_args([str(out / "best.toml")]))
    assert cfg.dp_mode == best["dp-mode"] and cfg.learning_rate == 0.05
    assert cfg.secagg if cfg.dp_mode == "distributed" else True  # distributed DP needs the secure sum
    summary = json.loads((out / "tune.json").read_text())
    assert summary["sampler"] == "grid" and summary["trials"] == 2
    assert summary["grid"] == {"dp-mode": ["local", "distributed"], "learning-rate": [0.05]}
