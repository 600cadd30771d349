"""`fedchat merge`: merge an adapter into its base model."""

from __future__ import annotations


def cmd_merge(args) -> int:
    from shared.merge import merge_adapter

    print(merge_adapter(args.adapter, args.out, base_model=args.base_model, overwrite=args.force))
    return 0


def add_merge_command(sub) -> None:
    merge = sub.add_parser("merge", help="merge an adapter into its base model (a plain HF model folder)")
    merge.add_argument("--adapter", required=True, help="adapter folder (OUT/adapter or a checkpoint)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--base-model", help="override the base model the adapter names")
    merge.add_argument("--force", action="store_true", help="replace --out if it exists")
    merge.set_defaults(func=cmd_merge)
