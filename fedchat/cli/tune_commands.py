"""`fedchat tune`: search a DP recipe with Optuna in simulation (the search itself: fedchat/tune.py)."""

from __future__ import annotations

from pathlib import Path

from fedchat.tune import DP_MODES, SAMPLERS, format_value, parse_grid, run_tune
from shared.config import parse_overrides


def cmd_tune(args) -> int:
    summary = run_tune(out=args.out, trials=args.trials, base_model=args.base_model, clients=args.clients,
                       rounds=args.rounds, target_epsilon=args.target_epsilon, seed=args.seed, timeout=args.timeout,
                       data_dir=args.data_dir, max_local_steps=args.max_local_steps, max_batch_size=args.max_batch_size,
                       eval_max_conversations=args.eval_max_conversations, fixed=parse_overrides(args.run_config),
                       sampler=args.sampler, grid=parse_grid(args.grid), dp_mode=args.dp_mode,
                       colluders=args.colluders)
    out = Path(args.out)
    print((out / "trials.md").read_text())
    s, m, b = summary, summary["best_vs_base"]["model"], summary["best_vs_base"]["base"]
    print(f"best: trial {s['best_trial']} of {s['trials']} ({s['finished_trials']} finished), held-out loss "
          f"{s['best_loss']:.4f} (base {s['base_loss']:.4f}), epsilon spent {format_value(s['epsilon_spent'])} of "
          f"{s['target_epsilon']:g}")
    print(f"      ROUGE-L {b['rouge_l']:.4f} -> {m['rouge_l']:.4f}, chrF {b['chrf']:.2f} -> {m['chrf']:.2f} on "
          f"{summary['best_vs_base']['scored']} held-out answers")
    print(f"recipe: {s['best_toml']}  (flwr run . --run-config {s['best_toml']})")
    print(f"trials: {out / 'trials.csv'}, {s['trials_table']}; plot: {s['plot']}; summary: {out / 'tune.json'}")
    return 0


def add_tune_command(sub) -> None:
    p = sub.add_parser("tune", help="search a DP recipe with Optuna (TPE, random or grid) in simulation, on data the "
                       "coordinator owns")
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
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe",
                   help="Optuna's sampler: tpe (default; the default recipe first, then a few random trials), random, "
                        "or grid (every combination of the --grid values; other keys keep the default recipe)")
    p.add_argument("--grid", nargs="*", metavar="KEY=V1,V2", help="the grid sampler's values, e.g. learning-rate=0.02,"
                   "0.075 batch-size=20,40 dp-mode=local,distributed")
    p.add_argument("--dp-mode", choices=DP_MODES, default="local",
                   help="the DP mode of the trials: local, distributed (one DP step of the federation a round, noise "
                        "shared inside the secure sum: 3 clients or more), or both (searched)")
    p.add_argument("--colluders", type=int, help="distributed DP: the simulated roster's colluder bound (default: "
                   "the largest minority, the most conservative)")
    p.set_defaults(func=cmd_tune)
