"""`fedchat model prepare`: materialise a base model into the cache."""

from __future__ import annotations


def cmd_model_prepare(args) -> int:
    from transformers.utils import logging as hf_logging

    from shared.model import resolve_base_model

    hf_logging.enable_progress_bar()  # the GGUF de-quantisation bar
    path = resolve_base_model(args.base_model)
    print(path)
    return 0


def add_model_command(sub) -> None:
    model = sub.add_parser("model", help="base models").add_subparsers(dest="action", required=True)
    prep = model.add_parser("prepare", help="materialise a base model into the cache (the embedded one by default)")
    prep.add_argument("--base-model", default="smollm2-135m", help="smollm2-135m, tiny, or a folder")
    prep.set_defaults(func=cmd_model_prepare)
