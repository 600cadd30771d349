"""What differential privacy costs in held-out loss and ROUGE-L, at matched compute.

    .venv/bin/python -m bench.dp_utility [--clients 3] [--rounds 3] [--local-steps 10]
        [--epsilons 1 4 8] [--run-config key=value ...] [--results-dir bench/results]

The same demo data, nodes, run config and seed for every setting: the base model, federated
without DP, and federated with DP-SGD at each epsilon (delta 1e-5, per node, over the whole
run). Every setting takes the same steps at the same expected batch, so each node processes
the same number of conversations (matched compute); DP changes only the clipping and noise.
For each: the coordinator's held-out loss (shared.model.heldout_loss) and the ROUGE-L F1 of
greedy answers on the held-out questions (shared.evaluation, rouge-score), and the fraction of
the non-private gain each keeps: (base - DP) / (base - no DP), for loss and for ROUGE-L.
DP noise is seeded from the OS (never reproducible by design), so repeated runs differ a little.
Transport is plaintext here: SecAgg+ changes the aggregate by less than 1e-7 (see
tests/test_secagg.py), which does not matter for utility.
Writes dp_utility.json, dp_utility.md and dp_utility.png to --results-dir.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import RESULTS, machine, md_table, simulate_demo
from shared.config import parse_overrides
from shared.logs import setup_logging

# Keys each setting sets itself: a --run-config override of them would break the comparison.
_SET_HERE = {"dp", "secagg", "base-model", "num-rounds", "local-steps", "merge", "eval-data", "out-dir", "min-nodes"}


def retained(base: float, value: float, reference: float) -> float | None:
    """The share of the reference's gain over the base that `value` keeps (None without a gain)."""
    gain = reference - base
    return None if gain == 0 else (value - base) / gain


def rouge_of(adapter: str | None, base_model: str, heldout, max_len: int, max_new_tokens: int) -> dict:
    """ROUGE-L, BLEU and chrF of base + adapter (or the base alone) on the held-out questions."""
    import torch

    from server.merge import merged_in_memory
    from shared.evaluation import score_model
    from shared.model import load_model, load_tokenizer, resolve_base_model

    cpu = torch.device("cpu")
    if adapter:
        model, base_dir, _, _ = merged_in_memory(Path(adapter), cpu, torch.float32, base_model, flag="--base-model")
    else:
        base_dir = resolve_base_model(base_model)
        model = load_model(base_dir, cpu, torch.float32)
    s = score_model(model, load_tokenizer(base_dir), heldout, name=adapter or base_model, max_len=max_len,
                    max_new_tokens=max_new_tokens, with_loss=False)
    return {"rouge_l": s.rouge_l, "bleu": s.bleu, "chrf": s.chrf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--rouge-conversations", type=int, default=100, help="held-out questions answered per setting")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--run-config", nargs="*", metavar="KEY=VALUE", help="run-config keys for every setting "
                        "(the recipe: batch-size, learning-rate, dp-max-grad-norm, lora-r, aggregation ...)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where dp_utility.json/.md/.png go")
    args = parser.parse_args()
    setup_logging(quiet_flower=True)
    overrides = parse_overrides(args.run_config)
    clash = sorted(set(overrides) & _SET_HERE)
    if clash:
        parser.error(f"--run-config may not set {', '.join(clash)}: each setting sets them (use the options)")

    from shared.evaluation import load_heldout

    settings = [None] + args.epsilons
    results, curves = [], {}
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for eps in settings:
            label = "no DP" if eps is None else f"DP epsilon {eps:g}"
            print(f"== {label}", flush=True)
            out = Path(tmp) / label.replace(" ", "-")
            report = simulate_demo(out, args.clients, target_epsilon=eps or 8.0, base_model=args.base_model,
                                   num_rounds=args.rounds, local_steps=args.local_steps, dp=eps is not None,
                                   secagg=False, **{k.replace("-", "_"): v for k, v in overrides.items()})
            cfg = report["config"]
            heldout = load_heldout(out / "data" / "eval.jsonl", args.rouge_conversations)
            if base is None:  # the same base, data and questions for every setting
                base = {"loss": report["base_eval_loss"],
                        **rouge_of(None, args.base_model, heldout, cfg["max-seq-len"], args.max_new_tokens)}
            losses = [report["base_eval_loss"]] + [r["eval_loss"] for r in report["rounds"]]
            curves[label] = losses
            spent = [c["epsilon"] for r in report["rounds"] for c in r["clients"] if c.get("epsilon") is not None]
            scores = rouge_of(report["adapter"], args.base_model, heldout, cfg["max-seq-len"], args.max_new_tokens)
            results.append({"setting": label, "epsilon": eps, "max_epsilon_spent": max(spent) if spent else None,
                            "loss": losses[-1], **scores, "eval_loss_per_round": losses,
                            "conversations_per_node": args.rounds * args.local_steps * cfg["batch-size"]})
    reference = results[0]
    for r in results:
        r["retained_loss_gain"] = retained(base["loss"], r["loss"], reference["loss"])
        r["retained_rouge_gain"] = retained(base["rouge_l"], r["rouge_l"], reference["rouge_l"])

    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    rows = [["base model (no training)", "-", f"{base['loss']:.4f}", f"{base['rouge_l']:.4f}", "-", "-"]]
    rows += [[r["setting"], "-" if r["max_epsilon_spent"] is None else f"{r['max_epsilon_spent']:.2f}",
              f"{r['loss']:.4f}", f"{r['rouge_l']:.4f}", pct(r["retained_loss_gain"]), pct(r["retained_rouge_gain"])]
             for r in results]
    table = md_table(["setting", "epsilon spent (max node)", "held-out loss", "ROUGE-L F1",
                      "loss gain kept", "ROUGE-L gain kept"], rows)
    table += (f"\n\n{args.clients} nodes x {args.rounds} rounds x {args.local_steps} steps at expected batch "
              f"{reference['conversations_per_node'] // (args.rounds * args.local_steps)}: "
              f"{reference['conversations_per_node']} conversations per node in every setting; ROUGE-L on "
              f"{args.rouge_conversations} held-out questions, greedy, {args.max_new_tokens} new tokens.")
    data = {"base": base, "settings": [{k: r[k] for k in ("epsilon", "loss", "rouge_l", "retained_loss_gain",
                                                          "retained_rouge_gain", "setting", "max_epsilon_spent",
                                                          "bleu", "chrf", "eval_loss_per_round",
                                                          "conversations_per_node")} for r in results],
            "base_model": args.base_model, "clients": args.clients, "rounds": args.rounds,
            "local_steps": args.local_steps, "run_config": overrides, "delta": 1e-5,
            "rouge_conversations": args.rouge_conversations, "max_new_tokens": args.max_new_tokens,
            "machine": machine()}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "dp_utility.json").write_text(json.dumps(data, indent=2))
    (results_dir / "dp_utility.md").write_text(table.rstrip() + "\n")
    print(table)
    plot(curves, base, results, results_dir / "dp_utility.png", args)
    print(f"wrote {results_dir / 'dp_utility.json'}, dp_utility.md and dp_utility.png")


def plot(curves: dict, base: dict, results: list[dict], out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, losses in curves.items():
        left.plot(range(len(losses)), losses, marker="o", label=label)
    left.set_xlabel("round (0 = base model)")
    left.set_ylabel("held-out loss")
    left.set_xticks(range(args.rounds + 1))
    left.grid(alpha=0.3)
    left.legend()
    names = ["base"] + [r["setting"].replace("DP epsilon ", "eps ") for r in results]
    bars = right.bar(names, [base["rouge_l"]] + [r["rouge_l"] for r in results], color="#3b75af")
    right.bar_label(bars, fmt="%.3f", fontsize=8)
    right.set_ylabel("ROUGE-L F1 (held-out answers)")
    fig.suptitle(f"{args.base_model}: {args.clients} nodes, {args.rounds} rounds x {args.local_steps} steps, matched "
                 "compute")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
