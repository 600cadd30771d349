"""`fedchat demo`: the whole pipeline on the embedded model and demo data (fedchat/demo.py)."""

from __future__ import annotations

from shared.config import AGGREGATIONS, RunConfig, parse_overrides


def cmd_demo(args) -> int:
    from fedchat.demo import run_demo

    report = run_demo(out=args.out, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                      base_model=args.base_model, aggregation=args.aggregation, dp=not args.no_dp,
                      secagg=not args.no_secagg, target_epsilon=args.target_epsilon, fresh=args.fresh,
                      extra=parse_overrides(args.run_config))
    return 0 if report["final_eval_loss"] is not None else 1


def add_demo_command(sub) -> None:
    recipe = RunConfig()  # the demo runs the run config's defaults: the DP recipe
    demo = sub.add_parser("demo", help="the whole pipeline on the embedded model and demo data")
    demo.add_argument("--clients", type=int, default=3, help="simulated organisations (SuperNodes)")
    demo.add_argument("--rounds", type=int, default=recipe.num_rounds)
    demo.add_argument("--local-steps", type=int, default=recipe.local_steps)
    demo.add_argument("--base-model", default=recipe.base_model, help="smollm2-135m, tiny, or a local HF model folder")
    demo.add_argument("--aggregation", choices=AGGREGATIONS, default=recipe.aggregation)
    demo.add_argument("--target-epsilon", type=float, default=8.0, help="every node's privacy budget")
    demo.add_argument("--no-dp", action="store_true", help="train without differential privacy (for comparison)")
    demo.add_argument("--no-secagg", action="store_true", help="send plaintext updates (for comparison)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming the run in it")
    demo.add_argument("--run-config", nargs="*", metavar="KEY=VALUE", help="any other run-config key")
    demo.set_defaults(func=cmd_demo)
