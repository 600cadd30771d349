"""`fedchat data check` and `fedchat data demo`: validate a dialogue file, write the demo data."""

from __future__ import annotations

import json


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


def add_data_command(sub) -> None:
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
