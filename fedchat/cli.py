"""The `fedchat` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from fedchat.canary_cli import add_canary_commands, empirical_argv
from fedchat.certs_cli import add_certs_command
from fedchat.eval_cli import add_eval_command
from fedchat.roster_cli import add_roster_command
from fedchat.service_cli import add_service_commands
from fedchat.tune import add_tune_command
from serving.cli import add_serving_commands
from shared.config import AGGREGATIONS, RunConfig, parse_overrides
from shared.errors import FedchatError, require_extra
from shared.logs import setup_logging

log = logging.getLogger("fedchat")


def cmd_model_prepare(args) -> int:
    from transformers.utils import logging as hf_logging

    from shared.model import resolve_base_model

    hf_logging.enable_progress_bar()  # the GGUF de-quantisation bar
    path = resolve_base_model(args.base_model)
    print(path)
    return 0


def cmd_data_check(args) -> int:
    from shared.dialogue import dialogue_stats, read_dialogues
    from shared.model import load_tokenizer, resolve_base_model

    dialogues = read_dialogues(args.file, skip_bad_lines=args.skip_bad_lines)
    stats = dialogue_stats(dialogues, load_tokenizer(resolve_base_model(args.base_model)), args.max_seq_len)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    t = stats["tokens_per_conversation"]
    print(f"{stats['file']}: OK")
    print(f"  conversations        {stats['conversations']}")
    by_role = ", ".join(f"{k} {v}" for k, v in stats["turns_by_role"].items())
    print(f"  turns                {stats['turns']} ({by_role})")
    print(f"  tokens               {stats['tokens']} (mean {t['mean']}, min {t['min']}, max {t['max']} "
          "per conversation)")
    print(f"  assistant tokens     {stats['assistant_tokens']} (the ones the model learns)")
    print(f"  truncated at {stats['max_seq_len']:<6}  {stats['truncated']} conversation(s)"
          + (f", {stats['truncated_without_assistant_tokens']} of them lose every assistant token"
             if stats["truncated_without_assistant_tokens"] else ""))
    if stats["blank_lines"]:
        print(f"  blank lines          {stats['blank_lines']} (ignored)")
    for bad in stats["bad_lines_skipped"]:
        print(f"  skipped line {bad['line']}: {bad['problem']}")
    return 0


def cmd_data_demo(args) -> int:
    from fedchat.demo_data import write_demo_data

    manifest = write_demo_data(args.out, args.clients, seed=args.seed)
    for c in manifest["clients"]:
        print(f"{args.out}/{c['file']}: {c['conversations']} conversations ({', '.join(c['topics'])})")
    print(f"{args.out}/eval.jsonl: {manifest['eval']['conversations']} held-out conversations")
    return 0


def cmd_demo(args) -> int:
    from fedchat.demo import run_demo

    report = run_demo(out=args.out, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                      base_model=args.base_model, aggregation=args.aggregation, dp=not args.no_dp,
                      secagg=not args.no_secagg, target_epsilon=args.target_epsilon, fresh=args.fresh,
                      extra=parse_overrides(args.run_config))
    return 0 if report["final_eval_loss"] is not None else 1


def cmd_merge(args) -> int:
    from shared.merge import merge_adapter

    print(merge_adapter(args.adapter, args.out, base_model=args.base_model, overwrite=args.force))
    return 0


def _audit_keys(args) -> dict:
    """The public key for each ledger: --key LEDGER=PUB first, else --keys DIR/NODE.pub; never a default."""
    from pathlib import Path

    if not args.key and not args.keys:
        raise FedchatError("give each node's public ledger key: --keys DIR (DIR/NODE.pub for NODE.jsonl) or "
                           "--key LEDGER=PUB per ledger, each obtained from the node's operator by another channel "
                           "than the ledger. A key found beside a ledger proves nothing: whoever could edit the "
                           "ledger could replace the key.")
    ledgers = [Path(p) for p in args.ledgers]
    keys: dict = {}
    for pair in args.key or []:
        name, sep, pub = pair.partition("=")
        if not sep and len(ledgers) == 1 == len(args.key):  # one ledger, one key: nothing to pair
            name, sep, pub = str(ledgers[0]), "=", pair
        if not sep or not name or not pub:
            raise FedchatError(f"--key {pair!r}: give LEDGER=PUB, e.g. --key ledgers/org-1.jsonl=keys/org-1.pub "
                               "(a bare key only when auditing one ledger)")
        hits = [p for p in ledgers if p.resolve() == Path(name).resolve() or p.stem == name]
        if not hits:
            raise FedchatError(f"--key {pair!r} names {name}, which is none of the ledgers given")
        for p in hits:
            keys[p] = Path(pub)
    for p in ledgers:
        if p not in keys:
            if not args.keys:
                raise FedchatError(f"no key for {p}: add --key {p}=PUB or --keys DIR holding {p.stem}.pub")
            keys[p] = Path(args.keys) / f"{p.stem}.pub"
        if keys[p].resolve().parent == p.resolve().parent:
            print(f"warning: the key for {p} lies in the ledger's own folder: it proves the ledger only if the node's "
                  "operator gave it to you by another channel", file=sys.stderr)
    return keys


def cmd_audit(args) -> int:
    from fedchat.audit.ledger_audit import audit_ledger, check_against_report, check_forks, plot_epsilon

    keys = _audit_keys(args)
    audits = [audit_ledger(path, key) for path, key in keys.items()]
    check_forks(audits)  # two ledgers of one key that diverge: one budget spent twice
    checked = audits + ([check_against_report(audits, args.report)] if args.report else [])
    if args.plot:
        plot_epsilon(audits, args.plot)
    no_report = ("note: no --report given: entries removed at the END of a ledger cannot be detected without the "
                 "coordinator's report.json (the hash chain shows only changes before the last line), and the "
                 "ledgers are not bound to the nodes that trained.")
    if args.json:
        print(json.dumps([a.to_dict() for a in checked], indent=2))
    else:
        fmt = "{:<14} {:>8} {:<12} {:>6} {:>16} {:>19} {:>8}  {}"
        print(fmt.format("node", "node id", "ledger key", "rounds", "epsilon claimed", "epsilon recomputed",
                         "budget", "verdict"))
        num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        for a in checked:
            print(fmt.format(a.node, ",".join(map(str, a.node_ids)) or "-", (a.key_fingerprint or "-")[:12], a.rounds,
                             num(a.epsilon_claimed), num(a.epsilon_recomputed),
                             "-" if a.target_epsilon is None else f"{a.target_epsilon:g}", "OK" if a.ok else "FAIL"))
        if args.plot:
            print(f"plot: {args.plot}")
    if not args.report:
        print(no_report, file=sys.stderr if args.json else sys.stdout)
    for a in checked:
        for problem in a.problems:
            print(f"{a.ledger}: {problem}", file=sys.stderr)
        for warning in a.warnings:
            print(f"{a.ledger}: warning: {warning}", file=sys.stderr)
    return 0 if all(a.ok for a in checked) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedchat", description=__doc__.strip() + " Federated LoRA fine-tuning of chat "
                                "models with DP-SGD and secure aggregation on Flower.")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = sub.add_parser("model", help="base models").add_subparsers(dest="action", required=True)
    prep = model.add_parser("prepare", help="materialise a base model into the cache (the embedded one by default)")
    prep.add_argument("--base-model", default="smollm2-135m", help="smollm2-135m, tiny, or a folder")
    prep.set_defaults(func=cmd_model_prepare)

    data = sub.add_parser("data", help="dialogue data").add_subparsers(dest="action", required=True)
    check = data.add_parser("check", help="validate a JSONL dialogue file and print statistics")
    check.add_argument("file")
    check.add_argument("--base-model", default="smollm2-135m", help="whose tokenizer and chat template count tokens")
    check.add_argument("--max-seq-len", type=int, default=256, help="report conversations longer than this")
    check.add_argument("--skip-bad-lines", action="store_true", help="report bad lines instead of refusing the file")
    check.add_argument("--json", action="store_true", help="print the statistics as JSON")
    check.set_defaults(func=cmd_data_check)
    demo_data = data.add_parser("demo", help="write demo data: one JSONL per simulated organisation + eval.jsonl")
    demo_data.add_argument("--clients", type=int, default=3)
    demo_data.add_argument("--out", required=True)
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.set_defaults(func=cmd_data_demo)

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

    audit = sub.add_parser("audit", help="verify privacy ledgers: chain, signatures, recomputed epsilon, budget")
    audit.add_argument("ledgers", nargs="+", metavar="LEDGER", help="a node's ledger.jsonl")
    audit.add_argument("--key", action="append", metavar="LEDGER=PUB",
                       help="a ledger's node public key (Ed25519 PEM), from its operator; repeat per ledger "
                       "(a bare PUB when auditing one ledger)")
    audit.add_argument("--keys", metavar="DIR", help="folder of NODE.pub keys for NODE.jsonl ledgers, from the "
                       "operators (one of --key/--keys is required: no key is taken from beside a ledger)")
    audit.add_argument("--report", help="the coordinator's report.json: bind ledgers to the nodes that trained (by "
                       "ledger-key fingerprint) and check no entry was removed at the end")
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.add_argument("--plot", help="write a PNG of epsilon per round per node")
    audit.set_defaults(func=cmd_audit)

    merge = sub.add_parser("merge", help="merge an adapter into its base model (a plain HF model folder)")
    merge.add_argument("--adapter", required=True, help="adapter folder (OUT/adapter or a checkpoint)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--base-model", help="override the base model the adapter names")
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    merge.set_defaults(func=cmd_merge)
    add_serving_commands(sub)
    add_certs_command(sub)
    add_eval_command(sub)
    add_tune_command(sub)
    add_canary_commands(sub)
    add_service_commands(sub)
    add_roster_command(sub)
    return p


# The extras (pyproject.toml) a command needs beyond a node's install; checked before it starts.
COMMAND_EXTRAS = {"serve": ("serve",), "eval": ("eval",), "tune": ("tune", "eval"), "demo": ("eval",)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(empirical_argv(sys.argv[1:] if argv is None else list(argv)))
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, quiet_flower=not args.verbose)
    try:
        for extra in COMMAND_EXTRAS.get(args.command, ()):
            require_extra(extra, f"`fedchat {args.command}`")
        return args.func(args)
    except FedchatError as exc:
        print(f"fedchat: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedchat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
