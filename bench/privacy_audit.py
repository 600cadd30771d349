"""Where DP puts the empirical lower bound on epsilon: canaries in one node's data, audited after one run.

    .venv/bin/python -m bench.privacy_audit [--m 100] [--steps 40] [--epsilons 8 1]

One node, trained locally through the node's own trainer (client.train.train_round: the same
LoRA, Poisson sampling, clipping and noise as a federated round, without the Flower transport,
which does not change what the adapter learns). Its data: --filler demo conversations plus the
canaries whose coin came up "included". The same data, steps and seed for every setting: without
DP, then DP-SGD at each --epsilons (delta 1e-5, PRV accountant). After each run the auditor scores
every canary (trained minus base loss on its secret), guesses with the k+/k- fixed when the
canaries were made, and computes the one-run lower bound at 95% (fedchat/audit/one_run.py).
Writes bench/results/privacy_audit.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, md_table, write_results
from shared.logs import setup_logging

DELTA = 1e-5


def node_data(tokenizer, canaries, filler: int, max_len: int):
    """The node's encoded training data: demo conversations of org-1 plus the included canaries."""
    from fedchat.audit.canary import mixed_in
    from fedchat.demo_data import write_demo_data
    from shared.dialogue import encode_conversation, read_dialogues

    with tempfile.TemporaryDirectory() as tmp:
        write_demo_data(tmp, 1)
        conversations = read_dialogues(Path(tmp) / "org-1.jsonl").conversations[:filler]
    return [encode_conversation(tokenizer, c, max_len) for c in mixed_in(conversations, canaries, seed=0)]


def run_setting(cfg, base_dir, tokenizer, data, canaries, epsilon: float | None) -> tuple[object, dict]:
    """Train a fresh adapter on `data` (DP-SGD calibrated to `epsilon`, or none) and score the canaries."""
    import torch

    from client.train import secure_seed, train_round
    from fedchat.audit.canary import secret_losses
    from shared.accounting import calibrate_noise, compute_epsilon
    from shared.adapter import attach_adapter, exchanged_names
    from shared.model import load_model

    model = attach_adapter(load_model(base_dir, torch.device("cpu"), torch.float32), cfg)
    rate = min(1.0, cfg.batch_size / len(data))
    sigma = None if epsilon is None else calibrate_noise(epsilon, DELTA, rate, cfg.local_steps, [], "prv")
    started = time.perf_counter()
    result = train_round(model, exchanged_names(model, cfg.aggregation), data, cfg, pad_id=tokenizer.pad_token_id,
                         seed=cfg.seed if sigma is None else secure_seed(), noise_multiplier=sigma)
    spent = None if sigma is None else compute_epsilon([(sigma, rate, cfg.local_steps)], DELTA, "prv")
    info = {"noise_multiplier": sigma, "sample_rate": rate, "epsilon_spent": spent,
            "train_loss": result.train_loss, "train_seconds": round(time.perf_counter() - started, 1)}
    return secret_losses(model, tokenizer, canaries.canaries), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=100, help="canaries (each included by a fair coin)")
    parser.add_argument("--filler", type=int, default=10, help="demo conversations beside the canaries")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0],
                        help="DP settings after the run without DP (e.g. 8 1)")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--lora-target-modules", default="q_proj,v_proj,lm_head",
                        help="LoRA on lm_head too lets 40 steps memorise rare-word secrets (q/v alone: 31/40 "
                        "guesses right, bound 0.58, in our first try)")
    parser.add_argument("--seed", type=int, default=0, help="canaries' coins and secrets (a bench: not secret)")
    args = parser.parse_args()
    setup_logging(quiet_flower=True)

    import torch

    from fedchat.audit.canary import make_canaries, secret_losses, secret_vocabulary
    from fedchat.audit.one_run import audit_report, draw_scores, epsilon_lower_bound
    from shared.config import RunConfig
    from shared.model import load_model, load_tokenizer, resolve_base_model

    cfg = RunConfig(base_model=args.base_model, local_steps=args.steps, batch_size=args.batch_size,
                    learning_rate=args.learning_rate, secagg=False, seed=args.seed,
                    lora_target_modules=args.lora_target_modules)
    base_dir = resolve_base_model(args.base_model)
    tokenizer = load_tokenizer(base_dir)
    canaries = make_canaries(args.m, secret_vocabulary(tokenizer), seed=args.seed)
    data = node_data(tokenizer, canaries, args.filler, cfg.max_seq_len)
    print(f"node data: {len(data)} conversations ({int(canaries.included.sum())} canaries of {args.m}), "
          f"{args.steps} steps of {args.batch_size}; guesses k+ {canaries.k_plus}, k- {canaries.k_minus}", flush=True)
    started = time.perf_counter()
    base_losses = secret_losses(load_model(base_dir, torch.device("cpu"), torch.float32), tokenizer,
                                canaries.canaries)
    print(f"base model scored in {time.perf_counter() - started:.0f}s", flush=True)

    runs, panels = [], []
    for eps in [None] + list(args.epsilons):
        label = "no DP" if eps is None else f"DP epsilon {eps:g}"
        print(f"== {label}", flush=True)
        trained_losses, info = run_setting(cfg, base_dir, tokenizer, data, canaries, eps)
        report = audit_report(base_losses, trained_losses, canaries.included, k_plus=canaries.k_plus,
                              k_minus=canaries.k_minus, delta=DELTA, epsilon_claimed=eps)
        run = {"setting": label, "epsilon_claimed": eps, **info,
               **{k: report[k] for k in ("guesses", "correct", "correct_included", "correct_excluded",
                                         "epsilon_lower", "verdict", "exposure", "score_mean_included",
                                         "score_mean_excluded")}}
        runs.append(run)
        panels.append((report["scores"], report["guesses_per_canary"],
                       f"{label}: {report['correct']}/{report['guesses']} right, eps >= {report['epsilon_lower']:.2f}"))
        print(f"   {run['correct']}/{run['guesses']} right, epsilon >= {run['epsilon_lower']:.3f} "
              f"(trained {run['train_seconds']}s)", flush=True)

    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    rows = [[r["setting"], fmt(r["noise_multiplier"], "{:.3f}"), f"{r['correct']}/{r['guesses']}",
             f"{r['epsilon_lower']:.2f}", fmt(r["epsilon_claimed"], "{:g}"),
             fmt(r["exposure"]["median"] if r["exposure"] else None),
             f"{r['score_mean_included']:+.3f} / {r['score_mean_excluded']:+.3f}"] for r in runs]
    table = md_table(["setting", "noise multiplier", "correct guesses", "epsilon lower bound (95%)",
                      "epsilon claimed", "median exposure (bits)", "mean score in / out"], rows)
    command = "-m bench.privacy_audit " + " ".join(sys.argv[1:])
    write_results("privacy_audit", {
        "command": f".venv/bin/python {command.strip()}", "base_model": args.base_model, "canaries": args.m,
        "included": int(canaries.included.sum()), "filler_conversations": args.filler,
        "node_conversations": len(data), "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "lora": f"r={cfg.lora_r} on {cfg.lora_target_modules}",
        "delta": DELTA, "confidence": 0.95, "k_plus": canaries.k_plus, "k_minus": canaries.k_minus,
        "max_bound_possible": epsilon_lower_bound(args.m, canaries.k_plus + canaries.k_minus,
                                                  canaries.k_plus + canaries.k_minus, DELTA),
        "exposure_reference": "excluded canaries", "runs": runs}, table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (scores, guesses, title) in zip(axes[0], panels):
        draw_scores(ax, scores, canaries.included, guesses, title)
    fig.tight_layout()
    fig.savefig(RESULTS / "privacy_audit.png", dpi=110)
    print(f"plot: {RESULTS / 'privacy_audit.png'}")


if __name__ == "__main__":
    main()
