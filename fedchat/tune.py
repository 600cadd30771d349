"""`fedchat tune`: search a DP recipe with Optuna (its TPE, random or grid sampler), in Flower's
simulation engine, on data the coordinator may use (the demo corpus, or JSONL files it owns), never on
nodes' data.

Each trial is one whole simulated federation (fedchat.federation.simulation.simulate) with every node
training under DP at the target epsilon; its objective is the held-out loss of the final
global adapter, as the coordinator computes it. Searched: learning rate, expected batch,
clipping norm, local steps, LoRA rank (alpha = 2 x rank, so the LoRA scale stays fixed),
aggregation, and with --dp-mode both the DP mode itself. The grid sampler searches exactly the
values --grid declares (every other key keeps the run config's default recipe).
Local-DP trials run without secure aggregation: fedchat's secure sum changes the aggregate by
less than its quantisation step, so it changes nothing the search measures, and the recipe written
keeps the run config's secagg default. Distributed-DP trials (each round one DP step of the whole
federation, the noise shared between the nodes) run inside the secure sum, which the mode needs,
with a roster whose colluder bound is --colluders; local-steps does not apply to them (one step a
round) and is not searched there.

Writes OUT/best.toml (for `flwr run . --run-config OUT/best.toml`), OUT/trials.csv and
OUT/trials.md, OUT/tune.png, and OUT/tune.json with the ROUGE-L/chrF of the best adapter
beside the base model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path

from shared.config import RunConfig, org_name
from shared.errors import ConfigError, DataError, FedchatError

log = logging.getLogger("fedchat.tune")

SEARCHED = ("learning-rate", "batch-size", "dp-max-grad-norm", "local-steps", "lora-r", "aggregation")
SAMPLERS = ("tpe", "random", "grid")
DP_MODES = ("local", "distributed", "both")
# Keys a tuning run sets itself: paths and transport belong to the search, not to the recipe.
_OWN_KEYS = {"out-dir", "eval-data", "min-nodes", "merge", "secagg", "dp", "resume", "sim-data-dir", "secagg-roster"}
_INT_KEYS = {"batch-size", "local-steps", "lora-r"}


def tuning_data(out: Path, clients: int, data_dir: str | None, seed: int) -> tuple[list[Path], Path]:
    """(one JSONL per simulated node, the held-out JSONL): DATA_DIR/org-1.jsonl .. org-N.jsonl and
    DATA_DIR/eval.jsonl if given, else the demo corpus written to OUT/data. Nothing else is read."""
    if data_dir is None:
        from fedchat.demo_data import write_demo_data

        data = out / "data"
        write_demo_data(data, clients, seed=seed)
    else:
        data = Path(data_dir)
        if not data.is_dir():
            raise DataError(f"--data-dir {data}: no such folder. Give a folder of JSONL files the coordinator owns.")
    files = [data / f"{org_name(i + 1)}.jsonl" for i in range(clients)]
    missing = [f.name for f in files + [data / "eval.jsonl"] if not f.is_file()]
    if missing:
        raise DataError(f"--data-dir {data} lacks {', '.join(missing)}: it needs one file per simulated node "
                        f"(org-1.jsonl .. org-{clients}.jsonl for --clients {clients}) and eval.jsonl for the held-out "
                        "loss, all data the coordinator owns (`fedchat data demo --out DIR` writes that layout).")
    return files, data / "eval.jsonl"


def _count(path: Path) -> int:
    from shared.dialogue import read_dialogues

    return len(read_dialogues(path).conversations)


class Search:
    """The objective: one simulated federation per trial."""

    def __init__(self, *, out: Path, node_files: list[Path], eval_file: Path, base_model: str, rounds: int,
                 target_epsilon: float, seed: int, max_local_steps: int, max_batch_size: int,
                 eval_max_conversations: int, fixed: dict, dp_mode: str = "local", grid: dict | None = None,
                 colluders: int | None = None) -> None:
        self.out, self.node_files, self.eval_file = out, node_files, eval_file
        self.dp_mode, self.grid, self.colluders = dp_mode, grid, colluders
        self.base_model, self.rounds, self.target_epsilon, self.seed = base_model, rounds, target_epsilon, seed
        self.max_local_steps, self.fixed = max_local_steps, fixed
        self.eval_max_conversations = eval_max_conversations
        smallest = min(_count(f) for f in node_files)
        self.max_batch_size = max(2, min(max_batch_size, smallest))  # a larger batch only caps at rate 1
        self.min_batch_size = min(8, self.max_batch_size)

    def suggest(self, trial) -> dict:
        """The trial's recipe: the grid's declared values (others at the default recipe), or the ranges."""
        if self.grid is not None:
            default = self.default_trial()
            params = {k: trial.suggest_categorical(k, self.grid[k]) if k in self.grid else default[k]
                      for k in SEARCHED}
            mode = trial.suggest_categorical("dp-mode", self.grid["dp-mode"]) if "dp-mode" in self.grid \
                else self.dp_mode
        else:
            # Wide enough for both kinds of recipe: small batches at lr ~1e-3 without DP, and the DP
            # default's large batches at low rank and lr ~0.1 (the first trial, see `default_trial`).
            mode = trial.suggest_categorical("dp-mode", ["local", "distributed"]) if self.dp_mode == "both" \
                else self.dp_mode
            r = trial.suggest_categorical("lora-r", [1, 2, 4, 8, 16])
            params = {
                "learning-rate": trial.suggest_float("learning-rate", 1e-4, 0.5, log=True),
                "batch-size": trial.suggest_int("batch-size", self.min_batch_size, self.max_batch_size, log=True),
                "dp-max-grad-norm": trial.suggest_float("dp-max-grad-norm", 0.05, 5.0, log=True),
                # one DP step of the federation a round: local steps do not apply to distributed DP
                "local-steps": 1 if mode == "distributed" else trial.suggest_int("local-steps", 1,
                                                                                 self.max_local_steps),
                "lora-r": r,
                "aggregation": trial.suggest_categorical("aggregation", ["fedavg", "ffa"]),
            }
        if mode == "distributed":
            params["local-steps"] = 1
        return {**params, "lora-alpha": 2 * params["lora-r"], "dp-mode": mode}

    def default_trial(self) -> dict:
        """The run config's default recipe, within the searched ranges: the first trial, so the search
        reports how the default does on this data and never returns a recipe that did worse."""
        d = RunConfig()
        default = {"learning-rate": d.learning_rate, "dp-max-grad-norm": d.dp_max_grad_norm, "lora-r": d.lora_r,
                   "aggregation": d.aggregation, "local-steps": min(d.local_steps, self.max_local_steps),
                   "batch-size": max(self.min_batch_size, min(d.batch_size, self.max_batch_size))}
        if self.dp_mode != "local":  # the mode is searched or fixed: the default recipe in local DP first
            default["dp-mode"] = "local" if self.dp_mode == "both" else self.dp_mode
        return default

    def run_config(self, params: dict, out_dir: Path) -> RunConfig:
        return RunConfig.from_flower({
            **self.fixed, **params, "base-model": self.base_model, "num-rounds": self.rounds, "seed": self.seed,
            "min-nodes": len(self.node_files), "out-dir": str(out_dir), "eval-data": str(self.eval_file),
            "eval-max-conversations": self.eval_max_conversations, "dp": True,
            "secagg": params.get("dp-mode") == "distributed", "merge": False, "resume": False})

    def nodes(self, trial_dir: Path, secagg: bool) -> dict[int, dict]:
        """Fresh node state per trial: each trial is charged to its own ledgers, on the coordinator's data."""
        return {i: {"data-path": str(f), "state-dir": str(trial_dir / "nodes" / f.stem), "node-name": f.stem,
                    "target-epsilon": self.target_epsilon, "require-dp": True, "require-secagg": secagg,
                    "allowed-base-models": self.base_model}
                for i, f in enumerate(self.node_files)}

    def __call__(self, trial) -> float:
        from fedchat.federation.simulation import simulate

        params = self.suggest(trial)
        trial.set_user_attr("recipe", params)
        trial_dir = self.out / "trials" / f"trial-{trial.number:03d}"
        started = time.perf_counter()
        try:
            cfg = self.run_config(params, trial_dir / "run")
            report = simulate(cfg, self.nodes(trial_dir, cfg.secagg), self.colluders)
        except FedchatError as exc:  # optuna records the trial as failed and goes on (catch=)
            trial.set_user_attr("error", str(exc))
            raise
        spent = [c["epsilon"] for r in report["rounds"] for c in r["clients"] if c.get("epsilon") is not None]
        trial.set_user_attr("base_loss", report["base_eval_loss"])
        trial.set_user_attr("epsilon_spent", max(spent) if spent else None)
        trial.set_user_attr("failed_rounds", len(report["failed_rounds"]))
        trial.set_user_attr("adapter", report["adapter"])
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        loss = report["final_eval_loss"]
        if report["failed_rounds"] or loss is None or not math.isfinite(loss):
            trial.set_user_attr("error", f"rounds {report['failed_rounds']} failed")
            raise FedchatError(f"trial {trial.number}: rounds {report['failed_rounds']} failed (see the log above)")
        return loss


def _rows(study) -> list[dict]:
    rows = []
    for t in study.trials:
        recipe = t.user_attrs.get("recipe", t.params)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "held_out_loss": t.value,
                     "dp-mode": recipe.get("dp-mode", "local"), **{k: recipe.get(k) for k in SEARCHED},
                     "epsilon_spent": t.user_attrs.get("epsilon_spent"), "seconds": t.user_attrs.get("seconds"),
                     "error": t.user_attrs.get("error", "")})
    return rows


def format_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_trials(rows: list[dict], out: Path) -> None:
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    keys = [k for k in rows[0] if k != "error"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    best = min((r for r in rows if r["held_out_loss"] is not None), key=lambda r: r["held_out_loss"], default=None)
    for r in rows:
        cells = [format_value(r[k]) for k in keys]
        if r is best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "trials.md").write_text("\n".join(lines) + "\n")


def write_best_toml(path: Path, params: dict, *, fixed: dict, base_model: str, rounds: int, target_epsilon: float,
                    loss: float, base_loss: float | None, trial: int, trials: int, data: str) -> Path:
    """The recipe as a flat TOML file `flwr run . --run-config PATH` reads (flwr 1.41 takes a .toml path)."""
    import tomli_w

    distributed = params.get("dp-mode") == "distributed"
    recipe = {"base-model": base_model, "num-rounds": rounds,
              **{k: v for k, v in fixed.items() if k not in _OWN_KEYS}, **params, "dp": True,
              **({"secagg": True} if distributed else {})}
    RunConfig.from_flower(recipe)  # what is written must load
    header = (f"# fedchat tune: the best of {trials} trials (trial {trial}), held-out loss {loss:.4f}"
              + (f" (base model {base_loss:.4f})" if base_loss is not None else "") + f" on {data}\n"
              f"# for nodes whose budget is target-epsilon = {target_epsilon:g} (their node config) over {rounds} "
              + ("round(s); distributed DP (one DP step of the federation a round, inside the secure sum, which it "
                 "needs).\n" if distributed else
                 "round(s); tuned with secagg off (it changes nothing of utility), so secagg keeps its default here.\n")
              + f"# Use: flwr run . --run-config {path}\n")
    path.write_text(header + tomli_w.dumps(recipe))
    return path


def plot_study(study, out: Path) -> Path:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = plot_optimization_history(study)
    ax.set_ylabel("held-out loss (final global adapter)")
    ax.figure.set_size_inches(8.5, 4)
    ax.figure.tight_layout()
    ax.figure.savefig(out, dpi=120)
    plt.close(ax.figure)
    return out


def score_best(adapter: str, base_model: str, eval_file: Path, max_len: int) -> dict:
    """ROUGE-L, BLEU, chrF (and loss) of base + best adapter beside the base, on the held-out file."""
    import torch

    from shared.evaluation import REPORT_CONVERSATIONS, REPORT_NEW_TOKENS, evaluation_report, load_heldout, score_model
    from shared.merge import merged_in_memory
    from shared.model import load_model, load_tokenizer

    heldout = load_heldout(eval_file, REPORT_CONVERSATIONS)
    cpu = torch.device("cpu")
    model, base_dir, _, _ = merged_in_memory(Path(adapter), cpu, torch.float32, base_model, flag="--base-model")
    tokenizer = load_tokenizer(base_dir)
    best = score_model(model, tokenizer, heldout, name="best", max_len=max_len, max_new_tokens=REPORT_NEW_TOKENS)
    del model
    base = score_model(load_model(base_dir, cpu, torch.float32), tokenizer, heldout, name="base", max_len=max_len,
                       max_new_tokens=REPORT_NEW_TOKENS)
    return evaluation_report(heldout, best, base, max_len=max_len, max_new_tokens=REPORT_NEW_TOKENS,
                             engine="continuous")


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """`--grid key=v1,v2 ...`: the values the grid sampler tries per key, each checked as that run-config key."""
    grid: dict[str, list] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ConfigError(f"--grid expects key=value1,value2,... (got {item!r}).")
        if key not in (*SEARCHED, "dp-mode"):
            raise ConfigError(f"--grid key '{key}' is not searched; the grid takes "
                              f"{', '.join((*SEARCHED, 'dp-mode'))}.")
        if key in grid:
            raise ConfigError(f"--grid gives '{key}' twice: list all its values once, comma-separated.")
        parsed = []
        for raw in values.split(","):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw.strip()
            if key == "dp-mode" and value not in ("local", "distributed"):
                raise ConfigError(f"--grid dp-mode values are 'local' and 'distributed' (got {value!r}).")
            value = getattr(RunConfig.from_flower({key: value}), key.replace("-", "_"))  # checked, typed
            if value in parsed:
                raise ConfigError(f"--grid {key} lists {value!r} twice.")
            parsed.append(value)
        grid[key] = parsed
    return grid


def make_sampler(sampler: str, seed: int, trials: int, grid: dict[str, list] | None):
    """Optuna's own sampler for `sampler`: TPE (a few random trials first), random, or the grid declared."""
    import optuna

    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, trials // 4)))
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sampler == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r}).")


def run_tune(*, out: str, trials: int, base_model: str, clients: int, rounds: int, target_epsilon: float,
             seed: int = 0, timeout: float | None = None, data_dir: str | None = None, max_local_steps: int = 20,
             max_batch_size: int = 256, eval_max_conversations: int = 200, fixed: dict | None = None,
             sampler: str = "tpe", grid: dict[str, list] | None = None, dp_mode: str = "local",
             colluders: int | None = None) -> dict:
    import optuna

    from shared.config import SECAGG_MIN_NODES

    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r}).")
    if dp_mode not in DP_MODES:
        raise ConfigError(f"--dp-mode must be one of {', '.join(DP_MODES)} (got {dp_mode!r}).")
    if sampler == "grid":
        if not grid:
            raise ConfigError("--sampler grid searches the values --grid declares: give --grid key=v1,v2 ... "
                              f"(keys: {', '.join((*SEARCHED, 'dp-mode'))}).")
        grid = dict(grid)
        if "dp-mode" in grid and dp_mode != "both":
            raise ConfigError("--grid declares dp-mode values: give --dp-mode both (or leave dp-mode out of the grid "
                              "and choose it with --dp-mode).")
        if dp_mode == "both":
            grid.setdefault("dp-mode", ["local", "distributed"])
    elif grid:
        raise ConfigError("--grid declares the grid sampler's values: add --sampler grid (TPE and random search the "
                          "built-in ranges).")
    modes = set((grid or {}).get("dp-mode", [])) | ({"local", "distributed"} if dp_mode == "both" else {dp_mode})
    if "distributed" in modes and clients < SECAGG_MIN_NODES:
        raise ConfigError(f"--clients must be at least {SECAGG_MIN_NODES} for distributed DP, which runs inside the "
                          f"secure sum (got {clients}).")
    if colluders is not None and not 0 <= colluders <= clients - 2:
        raise ConfigError(f"--colluders must be between 0 and --clients - 2 = {clients - 2}: the secure sum must keep "
                          f"an honest share an observer does not know (got {colluders}).")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1 (got {trials}).")
    if clients < 2:
        raise ConfigError(f"--clients must be at least 2 for a federation (got {clients}).")
    if max_local_steps < 1:
        raise ConfigError(f"--max-local-steps must be at least 1 (got {max_local_steps}).")
    if not target_epsilon > 0:
        raise ConfigError(f"--target-epsilon must be > 0 (got {target_epsilon}).")
    fixed = dict(fixed or {})
    searched = sorted(set(fixed) & (set(SEARCHED) | {"lora-alpha", "dp-mode"}))
    if searched:
        raise ConfigError(f"--run-config sets {', '.join(searched)}, which the search chooses: leave them out "
                          "(choose the DP mode with --dp-mode).")
    RunConfig.from_flower({k: v for k, v in fixed.items() if k not in _OWN_KEYS})  # a bad key fails now
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "trials", ignore_errors=True)
    node_files, eval_file = tuning_data(out_dir, clients, data_dir, seed)
    search = Search(out=out_dir, node_files=node_files, eval_file=eval_file, base_model=base_model, rounds=rounds,
                    target_epsilon=target_epsilon, seed=seed, max_local_steps=max_local_steps,
                    max_batch_size=max_batch_size, eval_max_conversations=eval_max_conversations, fixed=fixed,
                    dp_mode=dp_mode, grid=grid if sampler == "grid" else None, colluders=colluders)
    if grid and sampler == "grid":
        points = math.prod(len(v) for v in grid.values())
        if points > trials:
            log.warning("the grid has %d points and --trials %d runs only that many of them", points, trials)
        trials = min(trials, points)
    log.info("tuning on %s (%d nodes and a held-out file): %d trials of %d round(s) at target epsilon %g, %s sampler, "
             "DP mode %s", eval_file.parent, clients, trials, rounds, target_epsilon, sampler, dp_mode)

    def progress(study, trial) -> None:
        value = "failed" if trial.value is None else f"held-out loss {trial.value:.4f}"
        best = study.best_value if any(t.value is not None for t in study.trials) else float("nan")
        log.info("trial %d/%d: %s (%s); best so far %.4f", trial.number + 1, trials, value,
                 ", ".join(f"{k}={format_value(v)}" for k, v in trial.params.items()), best)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(sampler, seed, trials, grid),
                                study_name="fedchat-tune")
    if sampler != "grid":  # the default recipe first: the search never returns one that did worse
        study.enqueue_trial(search.default_trial())
    started = time.perf_counter()
    from fedchat.federation.simulation import one_ray_session

    with one_ray_session():
        study.optimize(search, n_trials=trials, timeout=timeout, catch=(FedchatError,), callbacks=[progress],
                       show_progress_bar=True)
    rows = _rows(study)
    write_trials(rows, out_dir)
    done = [t for t in study.trials if t.value is not None]
    if not done:
        raise FedchatError(f"no trial finished ({len(study.trials)} failed): see the log above and "
                           f"{out_dir / 'trials.md'}.")
    best = study.best_trial
    params = dict(best.user_attrs["recipe"])
    toml_path = write_best_toml(out_dir / "best.toml", params, fixed=fixed, base_model=base_model, rounds=rounds,
                                target_epsilon=target_epsilon, loss=best.value, base_loss=best.user_attrs["base_loss"],
                                trial=best.number, trials=len(study.trials), data=str(eval_file))
    plot = plot_study(study, out_dir / "tune.png")
    max_len = search.run_config(params, out_dir).max_seq_len
    log.info("scoring the best adapter's greedy answers beside the base model")
    scores = score_best(best.user_attrs["adapter"], base_model, eval_file, max_len)
    summary = {"best_trial": best.number, "best_loss": best.value, "base_loss": best.user_attrs["base_loss"],
               "best_params": params, "epsilon_spent": best.user_attrs["epsilon_spent"],
               "target_epsilon": target_epsilon, "rounds": rounds, "clients": clients, "base_model": base_model,
               "sampler": sampler, "dp_mode": dp_mode, "grid": grid if sampler == "grid" else None,
               "trials": len(study.trials), "finished_trials": len(done),
               "seconds": round(time.perf_counter() - started, 1),
               "data": str(eval_file.parent), "best_toml": str(toml_path), "plot": str(plot),
               "trials_table": str(out_dir / "trials.md"),
               "best_vs_base": {k: scores[k] for k in ("model", "base", "scored", "max_new_tokens")}}
    (out_dir / "tune.json").write_text(json.dumps(summary, indent=2))
    return summary
