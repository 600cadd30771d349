"""DP-SGD step time vs a non-private step on the embedded model, same batches, side by side.

    .venv/bin/python -m bench.dp_overhead [--repeats 12] [--batch-size 8]

Both steps run the same forward/backward code on the same conversations (fixed
batches, no Poisson sampling, so only the cost of privacy differs): the private step
adds Opacus' per-sample gradients, per-sample clipping and Gaussian noise. Steps are
interleaved (plain, private, plain, ...) so machine load affects both alike; the ratio
is of medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import md_table, write_results
from client.train import backward_batch, dp_streams, make_private, secure_seed
from fedchat.demo_data import write_demo_data
from shared.adapter import attach_adapter
from shared.config import RunConfig
from shared.dialogue import encode_conversation, read_dialogues
from shared.logs import quiet_library_warnings
from shared.model import load_model, load_tokenizer, resolve_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--base-model", default="smollm2-135m")
    args = parser.parse_args()
    quiet_library_warnings()
    cfg = RunConfig(base_model=args.base_model, batch_size=args.batch_size)
    base_dir = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_data(tmp, 3)
        conversations = read_dialogues(Path(tmp) / "org-2.jsonl").conversations
    data = [encode_conversation(tokenizer, m, cfg.max_seq_len) for m in conversations]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randperm(len(data), generator=gen)[: cfg.batch_size].tolist() for _ in range(args.repeats + 2)]

    # Two identical models: one never sees Opacus (its hooks would tax even a disabled step).
    plain_model = attach_adapter(load_model(base_dir, torch.device("cpu"), torch.float32), cfg)
    dp_model = attach_adapter(load_model(base_dir, torch.device("cpu"), torch.float32), cfg)
    trainable = [p for p in plain_model.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate)
    gsm, dp_opt = make_private(dp_model, torch.optim.AdamW([p for p in dp_model.parameters() if p.requires_grad],
                                                           lr=cfg.learning_rate), cfg, noise_multiplier=1.0,
                               noise_rng=dp_streams(secure_seed())[1])
    plain_model.train()
    dp_model.train()

    def step(private: bool, idx: list[int]) -> float:
        started = time.perf_counter()
        if private:
            backward_batch(gsm, data, idx, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"),
                           max_tokens=cfg.micro_batch_tokens, dp_optimizer=dp_opt)
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        else:
            backward_batch(plain_model, data, idx, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"),
                           max_tokens=cfg.micro_batch_tokens)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step(False, batches[0]), step(True, batches[1])  # warm-up
    plain, private = [], []
    for i, idx in enumerate(batches[2:], 1):
        plain.append(step(False, idx))
        private.append(step(True, idx))
        print(f"  [{i}/{args.repeats}] plain {plain[-1]:.2f}s  DP-SGD {private[-1]:.2f}s", flush=True)
    p, d = statistics.median(plain), statistics.median(private)
    result = {"ratio": d / p, "dp_step_seconds_median": d, "plain_step_seconds_median": p,
              "dp_step_seconds": private, "plain_step_seconds": plain, "batch_size": cfg.batch_size,
              "repeats": args.repeats, "base_model": cfg.base_model,
              "trainable_parameters": sum(t.numel() for t in trainable), "goal": "ratio <= 1.10"}
    table = md_table(["model", "batch", "plain step (s, median)", "DP-SGD step (s, median)", "ratio"],
                     [[cfg.base_model, cfg.batch_size, f"{p:.3f}", f"{d:.3f}", f"{d / p:.3f}"]])
    write_results("dp_overhead", result, table)


if __name__ == "__main__":
    main()
