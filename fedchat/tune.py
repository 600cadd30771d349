"""`fedchat tune`: search a DP recipe with Optuna's TPE sampler, in Flower's simulation engine,
on data the coordinator may use (the demo corpus, or JSONL files it owns), never on nodes' data.

Each trial is one whole simulated federation (fedchat.simulation.simulate) with every node
training under DP-SGD at the target epsilon; its objective is the held-out loss of the final
global adapter, as the coordinator computes it. Searched: learning rate, expected batch,
clipping norm, local steps, LoRA rank (alpha = 2 x rank, so the LoRA scale stays fixed) and
aggregation. SecAgg+ is off in trials: it changes the aggregate by less than 1e-7 (see
bench/dp_utility.py), so it changes nothing the search measures, and the recipe written keeps
the run config's secagg default.

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

from shared.config import RunConfig, org_name, parse_overrides
from shared.errors import ConfigError, DataError, FedchatError

log = logging.getLogger("fedchat.tune")

SEARCHED = ("learning-rate", "batch-size", "dp-max-grad-norm", "local-steps", "lora-r", "aggregation")
# Keys a tuning run sets itself: paths and transport belong to the search, not to the recipe.
_OWN_KEYS = {"out-dir", "eval-data", "min-nodes", "merge", "secagg", "dp", "resume", "sim-data-dir"}


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
                 eval_max_conversations: int, fixed: dict) -> None:
        self.out, self.node_files, self.eval_file = out, node_files, eval_file
        self.base_model, self.rounds, self.target_epsilon, self.seed = base_model, rounds, target_epsilon, seed
        self.max_local_steps, self.fixed = max_local_steps, fixed
        self.eval_max_conversations = eval_max_conversations
        smallest = min(_count(f) for f in node_files)
        self.max_batch_size = max(2, min(max_batch_size, smallest))  # a larger batch only caps at rate 1
        self.min_batch_size = min(8, self.max_batch_size)

    def suggest(self, trial) -> dict:
        # Wide enough for both kinds of recipe: small batches at lr ~1e-3 without DP, and the DP
        # default's large batches at low rank and lr ~0.1 (the first trial, see `default_trial`).
        r = trial.suggest_categorical("lora-r", [1, 2, 4, 8, 16])
        return {
            "learning-rate": trial.suggest_float("learning-rate", 1e-4, 0.5, log=True),
            "batch-size": trial.suggest_int("batch-size", self.min_batch_size, self.max_batch_size, log=True),
            "dp-max-grad-norm": trial.suggest_float("dp-max-grad-norm", 0.05, 5.0, log=True),
            "local-steps": trial.suggest_int("local-steps", 1, self.max_local_steps),
            "lora-r": r, "lora-alpha": 2 * r,
            "aggregation": trial.suggest_categorical("aggregation", ["fedavg", "ffa"]),
        }

    def default_trial(self) -> dict:
        """The run config's default recipe, within the searched ranges: the first trial, so the search
        reports how the default does on this data and never returns a recipe that did worse."""
        d = RunConfig()
        return {"learning-rate": d.learning_rate, "dp-max-grad-norm": d.dp_max_grad_norm, "lora-r": d.lora_r,
                "aggregation": d.aggregation, "local-steps": min(d.local_steps, self.max_local_steps),
                "batch-size": max(self.min_batch_size, min(d.batch_size, self.max_batch_size))}

    def run_config(self, params: dict, out_dir: Path) -> RunConfig:
        return RunConfig.from_flower({
            **self.fixed, **params, "base-model": self.base_model, "num-rounds": self.rounds, "seed": self.seed,
            "min-nodes": len(self.node_files), "out-dir": str(out_dir), "eval-data": str(self.eval_file),
            "eval-max-conversations": self.eval_max_conversations, "dp": True, "secagg": False, "merge": False,
            "resume": False})

    def nodes(self, trial_dir: Path) -> dict[int, dict]:
        """Fresh node state per trial: each trial is charged to its own ledgers, on the coordinator's data."""
        return {i: {"data-path": str(f), "state-dir": str(trial_dir / "nodes" / f.stem), "node-name": f.stem,
                    "target-epsilon": self.target_epsilon, "require-dp": True, "require-secagg": False,
                    "allowed-base-models": self.base_model}
                for i, f in enumerate(self.node_files)}

    def __call__(self, trial) -> float:
        from fedchat.simulation import simulate

        params = self.suggest(trial)
        trial_dir = self.out / "trials" / f"trial-{trial.number:03d}"
        started = time.perf_counter()
        try:
            report = simulate(self.run_config(params, trial_dir / "run"), self.nodes(trial_dir))
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
        rows.append({"trial": t.number, "state": t.state.name.lower(), "held_out_loss": t.value,
                     **{k: t.params.get(k) for k in SEARCHED},
                     "epsilon_spent": t.user_attrs.get("epsilon_spent"), "seconds": t.user_attrs.get("seconds"),
                     "error": t.user_attrs.get("error", "")})
    return rows


def _fmt(v) -> str:
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
        cells = [_fmt(r[k]) for k in keys]
        if r is best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "trials.md").write_text("\n".join(lines) + "\n")


def write_best_toml(path: Path, params: dict, *, fixed: dict, base_model: str, rounds: int, target_epsilon: float,
                    loss: float, base_loss: float | None, trial: int, trials: int, data: str) -> Path:
    """The recipe as a flat TOML file `flwr run . --run-config PATH` reads (flwr 1.41 takes a .toml path)."""
    import tomli_w

    recipe = {"base-model": base_model, "num-rounds": rounds,
              **{k: v for k, v in fixed.items() if k not in _OWN_KEYS}, **params, "dp": True}
    RunConfig.from_flower(recipe)  # what is written must load
    header = (f"# fedchat tune: the best of {trials} trials (trial {trial}), held-out loss {loss:.4f}"
              + (f" (base model {base_loss:.4f})" if base_loss is not None else "") + f" on {data}\n"
              f"# for nodes whose budget is target-epsilon = {target_epsilon:g} (their node config) over {rounds} "
              "round(s); tuned with secagg off (it changes nothing of utility), so secagg keeps its default here.\n"
              f"# Use: flwr run . --run-config {path}\n")
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


def run_tune(*, out: str, trials: int, base_model: str, clients: int, rounds: int, target_epsilon: float,
             seed: int = 0, timeout: float | None = None, data_dir: str | None = None, max_local_steps: int = 20,
             max_batch_size: int = 256, eval_max_conversations: int = 200, fixed: dict | None = None) -> dict:
    import optuna

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1 (got {trials}).")
    if clients < 2:
        raise ConfigError(f"--clients must be at least 2 for a federation (got {clients}).")
    if max_local_steps < 1:
        raise ConfigError(f"--max-local-steps must be at least 1 (got {max_local_steps}).")
    if not target_epsilon > 0:
        raise ConfigError(f"--target-epsilon must be > 0 (got {target_epsilon}).")
    fixed = dict(fixed or {})
    searched = sorted(set(fixed) & (set(SEARCHED) | {"lora-alpha"}))
    if searched:
        raise ConfigError(f"--run-config sets {', '.join(searched)}, which the search chooses: leave them out.")
    RunConfig.from_flower({k: v for k, v in fixed.items() if k not in _OWN_KEYS})  # a bad key fails now
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / "trials", ignore_errors=True)
    node_files, eval_file = tuning_data(out_dir, clients, data_dir, seed)
    search = Search(out=out_dir, node_files=node_files, eval_file=eval_file, base_model=base_model, rounds=rounds,
                    target_epsilon=target_epsilon, seed=seed, max_local_steps=max_local_steps,
                    max_batch_size=max_batch_size, eval_max_conversations=eval_max_conversations, fixed=fixed)
    log.info("tuning on %s (%d nodes and a held-out file): %d trials of %d round(s) at target epsilon %g",
             eval_file.parent, clients, trials, rounds, target_epsilon)

    def progress(study, trial) -> None:
        value = "failed" if trial.value is None else f"held-out loss {trial.value:.4f}"
        best = study.best_value if any(t.value is not None for t in study.trials) else float("nan")
        log.info("trial %d/%d: %s (%s); best so far %.4f", trial.number + 1, trials, value,
                 ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()), best)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, trials // 4)))
    study = optuna.create_study(direction="minimize", sampler=sampler, study_name="fedchat-tune")
    study.enqueue_trial(search.default_trial())
    started = time.perf_counter()
    from fedchat.simulation import one_ray_session

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
    params = {**{k: best.params[k] for k in SEARCHED}, "lora-alpha": 2 * best.params["lora-r"]}
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
               "trials": len(study.trials), "finished_trials": len(done),
               "seconds": round(time.perf_counter() - started, 1),
               "data": str(eval_file.parent), "best_toml": str(toml_path), "plot": str(plot),
               "trials_table": str(out_dir / "trials.md"),
               "best_vs_base": {k: scores[k] for k in ("model", "base", "scored", "max_new_tokens")}}
    (out_dir / "tune.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_tune(args) -> int:
    summary = run_tune(out=args.out, trials=args.trials, base_model=args.base_model, clients=args.clients,
                       rounds=args.rounds, target_epsilon=args.target_epsilon, seed=args.seed, timeout=args.timeout,
                       data_dir=args.data_dir, max_local_steps=args.max_local_steps, max_batch_size=args.max_batch_size,
                       eval_max_conversations=args.eval_max_conversations, fixed=parse_overrides(args.run_config))
    out = Path(args.out)
    print((out / "trials.md").read_text())
    s, m, b = summary, summary["best_vs_base"]["model"], summary["best_vs_base"]["base"]
    print(f"best: trial {s['best_trial']} of {s['trials']} ({s['finished_trials']} finished), held-out loss "
          f"{s['best_loss']:.4f} (base {s['base_loss']:.4f}), epsilon spent {_fmt(s['epsilon_spent'])} of "
          f"{s['target_epsilon']:g}")
    print(f"      ROUGE-L {b['rouge_l']:.4f} -> {m['rouge_l']:.4f}, chrF {b['chrf']:.2f} -> {m['chrf']:.2f} on "
          f"{summary['best_vs_base']['scored']} held-out answers")
    print(f"recipe: {s['best_toml']}  (flwr run . --run-config {s['best_toml']})")
    print(f"trials: {out / 'trials.csv'}, {s['trials_table']}; plot: {s['plot']}; summary: {out / 'tune.json'}")
    return 0


def add_tune_command(sub) -> None:
    p = sub.add_parser("tune", help="search a DP recipe with Optuna (TPE) in simulation, on data the coordinator owns")
    p.add_argument("--trials", type=int, default=20, help="simulated federations to run")
    p.add_argument("--base-model", default="smollm2-135m", help="smollm2-135m, tiny, or a local HF model folder")
    p.add_argument("--clients", type=int, default=3, help="simulated nodes")
    p.add_argument("--rounds", type=int, default=3, help="rounds per trial (the recipe is for this many)")
    p.add_argument("--target-epsilon", type=float, default=8.0, help="every simulated node's budget")
    p.add_argument("--data-dir", help="folder of org-1.jsonl .. org-N.jsonl and eval.jsonl the coordinator owns "
                   "(default: the demo corpus, written to OUT/data); never nodes' private data")
    p.add_argument("--out", default="runs/tune", help="where best.toml, trials.csv/.md, tune.png and trials go")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the demo split and the runs")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--max-local-steps", type=int, default=20, help="upper end of the local-steps range")
    p.add_argument("--max-batch-size", type=int, default=256, help="upper end of the expected-batch range")
    p.add_argument("--eval-max-conversations", type=int, default=200, help="held-out conversations per trial")
    p.add_argument("--run-config", nargs="*", metavar="KEY=VALUE", help="fixed run-config keys for every trial")
    p.set_defaults(func=cmd_tune)
