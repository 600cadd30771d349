"""One DP recipe, measured fast: the demo's nodes trained in this process, without Flower.

    .venv/bin/python -m bench.dp_recipe [--epsilon 8] [--rounds 3] [--local-steps 2] [--batch-size 40]
        [--learning-rate 0.15] [--lr-decay 1] [--lora-r 1] [--aggregation ffa] [--eval-conversations 100]

What the search for the default recipe (docs/decisions/dp-recipe.md) ran, one candidate a call: each round every
demo node (runs/demo/data unless --data) trains with client.train.train_round, the code a node
runs, its noise calibrated by shared.accounting for the run's planned steps at the node's sampling
rate, and the round's update is the conversation-weighted mean of the nodes' deltas, as the
coordinator's plaintext FedAvg. No Flower, SecAgg+ or ledger: a candidate costs only its
training and evaluation. bench/dp_utility.py measures the chosen recipe through the real
simulation. Appends one JSON line per candidate to bench/results/dp_recipe.jsonl; --epsilon 0
trains without DP.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from bench.common import RESULTS


@contextmanager
def carried_adamw(state: dict | None, kept: list):
    """--carry-moments: the AdamW that client.train.train_round makes starts from `state` (the node's moments
    after its last round, at this round's learning rate) and is appended to `kept` for the next round. Nodes
    never carry moments (it did not help: docs/decisions/dp-recipe.md), so the product has no option for it."""
    import torch

    real = torch.optim.AdamW

    class Carried(real):
        def __init__(self, params, **kwargs) -> None:
            super().__init__(params, **kwargs)
            if state is not None:
                rates = [g["lr"] for g in self.param_groups]
                self.load_state_dict(state)
                for group, lr in zip(self.param_groups, rates, strict=True):
                    group["lr"] = lr
            kept.append(self)

    torch.optim.AdamW = Carried
    try:
        yield
    finally:
        torch.optim.AdamW = real


def main() -> None:
    from shared.config import RunConfig

    default = RunConfig()  # each flag defaults to the run config's default recipe
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0, help="per node, over the run; 0 = no DP")
    parser.add_argument("--rounds", type=int, default=default.num_rounds)
    parser.add_argument("--local-steps", type=int, default=default.local_steps)
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--learning-rate", type=float, default=default.learning_rate)
    parser.add_argument("--lr-decay", type=float, default=1.0, help="learning rate x this each round (1 = constant)")
    parser.add_argument("--server-momentum", type=float, default=0.0,
                        help="coordinator adds this x its last step to the round's mean update (FedAvgM)")
    parser.add_argument("--carry-moments", action="store_true", help="each node keeps its AdamW moments across rounds")
    parser.add_argument("--dp-max-grad-norm", type=float, default=default.dp_max_grad_norm)
    parser.add_argument("--lora-r", type=int, default=default.lora_r)
    parser.add_argument("--lora-target-modules", default=default.lora_target_modules)
    parser.add_argument("--aggregation", choices=("fedavg", "ffa"), default=default.aggregation)
    parser.add_argument("--data", default="runs/demo/data", help="org-1.jsonl .. org-3.jsonl and eval.jsonl")
    parser.add_argument("--eval-conversations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from client.data import load_local_data
    from client.train import secure_seed, train_round
    from shared.accounting import calibrate_noise
    from shared.adapter import attach_adapter, exchanged_names, get_arrays, set_arrays
    from shared.dialogue import encode_conversation, read_dialogues
    from shared.model import heldout_loss, load_model, load_tokenizer, resolve_base_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(num_rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, dp_max_grad_norm=args.dp_max_grad_norm, lora_r=args.lora_r,
                    lora_alpha=2 * args.lora_r, lora_target_modules=args.lora_target_modules,
                    aggregation=args.aggregation, secagg=False)
    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base)
    model = attach_adapter(load_model(base, torch.device("cpu"), torch.float32), cfg)
    names = exchanged_names(model, cfg.aggregation)
    data = Path(args.data)
    nodes = [load_local_data(str(data / f"org-{i}.jsonl"), tokenizer, max_len=cfg.max_seq_len,
                             validation_fraction=0.1, seed=0).train for i in (1, 2, 3)]
    heldout = [encode_conversation(tokenizer, c, cfg.max_seq_len)
               for c in read_dialogues(data / "eval.jsonl").conversations[:args.eval_conversations]]
    started = time.perf_counter()
    current = get_arrays(model, names)
    losses = [heldout_loss(model, heldout, tokenizer.pad_token_id)]
    sigmas = [calibrate_noise(args.epsilon, 1e-5, min(1.0, cfg.batch_size / len(n)), cfg.local_steps * cfg.num_rounds,
                              [], cfg.dp_accountant) if args.epsilon else None for n in nodes]
    moments: list[dict | None] = [None] * len(nodes)
    step = [np.zeros_like(c) for c in current]  # the coordinator's last step (server momentum)
    for rnd in range(1, cfg.num_rounds + 1):
        deltas = []
        round_cfg = cfg.replace(learning_rate=args.learning_rate * args.lr_decay ** (rnd - 1))
        for i, (train, sigma) in enumerate(zip(nodes, sigmas, strict=True)):
            set_arrays(model, names, current)
            kept: list = []
            with carried_adamw(moments[i], kept) if args.carry_moments else nullcontext():
                result = train_round(model, names, train, round_cfg, pad_id=tokenizer.pad_token_id,
                                     seed=secure_seed() if sigma else rnd * 100 + i, noise_multiplier=sigma)
            deltas.append(result.delta)
            if args.carry_moments:
                moments[i] = kept[-1].state_dict()
        weights = np.array([len(n) for n in nodes], dtype=float) / sum(len(n) for n in nodes)
        mean = [sum(w * d[k] for w, d in zip(weights, deltas, strict=True)) for k in range(len(current))]
        step = [m + args.server_momentum * s for m, s in zip(mean, step, strict=True)]
        current = [c + s for c, s in zip(current, step, strict=True)]
        set_arrays(model, names, current)
        losses.append(heldout_loss(model, heldout, tokenizer.pad_token_id))
        print(f"round {rnd}/{cfg.num_rounds}: held-out loss {losses[-1]:.4f} ({time.perf_counter() - started:.0f}s)",
              flush=True)
    row = {**{k: v for k, v in vars(args).items() if k not in ("data", "threads")},
           "trainable_values": int(sum(a.size for a in current)), "noise_multipliers": sigmas,
           "held_out_loss_per_round": [round(v, 4) for v in losses],
           "conversations_per_node": cfg.num_rounds * cfg.local_steps * cfg.batch_size,
           "seconds": round(time.perf_counter() - started)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "dp_recipe.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
