"""`fedchat eval`: a model (or a base + adapter) on held-out conversations, beside a base model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.errors import ModelError

log = logging.getLogger("fedchat.evaluation")


def _load(spec: str, adapter: str | None, device, dtype):
    """(model, tokenizer, name): a model folder or name, with an adapter merged in memory if given."""
    from shared.merge import merged_in_memory
    from shared.model import load_model, load_tokenizer, resolve_base_model

    if adapter:
        model, base_dir, _, _ = merged_in_memory(Path(adapter), device, dtype, spec, flag="MODEL")
        return model, load_tokenizer(base_dir), f"{Path(spec).name}+{Path(adapter).name}"
    folder = resolve_base_model(spec)
    return load_model(folder, device, dtype), load_tokenizer(folder), Path(spec).name


def run_eval(model: str, data: str, *, base: str | None = None, adapter: str | None = None,
             max_conversations: int = 200, max_new_tokens: int = 48, max_seq_len: int = 256,
             engine: str = "continuous", device: str = "auto", dtype: str = "auto") -> dict:
    from shared.evaluation import evaluation_report, load_heldout, score_model
    from shared.model import select_device, select_dtype

    heldout = load_heldout(data, max_conversations)  # a bad file fails before any model loads
    dev = select_device(device)
    dt = select_dtype(dtype, dev)
    scores = []
    for spec, extra in ((model, adapter), (base, None)):
        if spec is None:
            scores.append(None)
            continue
        loaded, tokenizer, name = _load(spec, extra, dev, dt)
        if scores and scores[0].name == name:
            name = f"{name} (base)"
        scores.append(score_model(loaded, tokenizer, heldout, name=name, max_len=max_seq_len,
                                  max_new_tokens=max_new_tokens, engine=engine))
        del loaded
    return evaluation_report(heldout, scores[0], scores[1], max_len=max_seq_len, max_new_tokens=max_new_tokens,
                             engine=engine)


def cmd_eval(args) -> int:
    from shared.evaluation import format_table, plot_report
    from shared.files import atomic_write_text

    if args.adapter and not Path(args.adapter).is_dir():
        raise ModelError(f"--adapter {args.adapter}: no such folder. Give OUT/adapter or a checkpoint folder of a "
                         "fedchat run.")
    report = run_eval(args.model, args.data, base=args.base, adapter=args.adapter,
                      max_conversations=args.max_conversations, max_new_tokens=args.max_new_tokens,
                      max_seq_len=args.max_seq_len, engine=args.engine, device=args.device, dtype=args.dtype)
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(report, indent=2))
        print(f"json: {args.json}")
    if args.plot:
        print(f"plot: {plot_report(report, args.plot)}")
    return 0


def add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss, perplexity, ROUGE-L, BLEU and chrF of a model, beside a base")
    p.add_argument("model", metavar="MODEL", help="model folder (e.g. OUT/merged), smollm2-135m or tiny; with "
                   "--adapter, the base the adapter is merged into")
    p.add_argument("--data", required=True, help="held-out JSONL dialogue file (no node trained on it)")
    p.add_argument("--base", help="a model to compare with, side by side (e.g. smollm2-135m)")
    p.add_argument("--adapter", help="adapter folder (OUT/adapter or a checkpoint) merged into MODEL in memory")
    p.add_argument("--json", metavar="OUT", help="write the scores and every answer as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of the metrics")
    p.add_argument("--max-conversations", type=int, default=200, help="first N conversations of --data (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest greedy answer")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per conversation for the loss")
    p.add_argument("--engine", choices=("continuous", "padded"), default="continuous",
                   help="transformers' continuous batching (generate_batch) or generate on left-padded batches")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_eval)
