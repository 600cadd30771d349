"""What differential privacy costs in held-out loss and ROUGE-L, at matched compute.

    .venv/bin/python -m bench.dp_utility [--clients 3] [--rounds R] [--local-steps S]
        [--epsilons 1 4 8] [--run-config key=value ...] [--reference key=value ...] [--results-dir bench/results]

The same demo data, nodes and seed for every setting: the base model; federated without DP in
two recipes, the best non-private one we know at this compute (--reference: small batches, many
steps) and the DP recipe itself without noise; and the DP recipe (the run config's defaults plus
--run-config) with DP-SGD at each epsilon (delta 1e-5, per node, over the whole run). Every
setting processes the same number of conversations per node (rounds x local steps x expected
batch: matched compute); the script refuses a reference that does not.
For each: the coordinator's held-out loss (shared.model.heldout_loss) and the ROUGE-L F1 of
greedy answers on the held-out questions (shared.evaluation, rouge-score), and the fraction of
the non-private gain each keeps: (base - DP) / (base - no DP), against the better of the two
non-private models (and, in a column of its own, against the same recipe without noise).
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
RECIPE_KEYS = ("batch-size", "local-steps", "learning-rate", "lora-r", "aggregation", "dp-max-grad-norm")
# Before issue 10 this was the run config's default; it is the best non-private recipe we measured at
# this compute (small batches, many steps), so the DP recipe is judged against it too, not only against
# itself without noise.
NON_PRIVATE_RECIPE = {"batch-size": 8, "local-steps": 10, "learning-rate": 0.002, "lora-r": 8, "lora-alpha": 16,
                      "aggregation": "fedavg"}


def retained(base: float, value: float, reference: float) -> float | None:
    """The share of the reference's gain over the base that `value` keeps (None without a gain)."""
    gain = reference - base
    return None if gain == 0 else (value - base) / gain


def rouge_of(adapter: str | None, base_model: str, heldout, max_len: int, max_new_tokens: int) -> dict:
    """ROUGE-L, BLEU and chrF of base + adapter (or the base alone) on the held-out questions."""
    import torch

    from shared.evaluation import score_model
    from shared.merge import merged_in_memory
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
    from shared.config import RunConfig

    default = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=default.num_rounds)
    parser.add_argument("--local-steps", type=int, default=default.local_steps)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--rouge-conversations", type=int, default=100, help="held-out questions answered per setting")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--run-config", nargs="*", metavar="KEY=VALUE", help="run-config keys for every setting "
                        "(the recipe: batch-size, learning-rate, dp-max-grad-norm, lora-r, aggregation ...)")
    parser.add_argument("--reference", nargs="*", metavar="KEY=VALUE",
                        default=[f"{k}={v}" for k, v in NON_PRIVATE_RECIPE.items()],
                        help="the non-private recipe to compare with at the same compute (default: %(default)s)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where dp_utility.json/.md/.png go")
    args = parser.parse_args()
    setup_logging(quiet_flower=True)
    overrides, reference = parse_overrides(args.run_config), parse_overrides(args.reference)
    # The reference may take other steps (at the same conversations per node); nothing else of the protocol.
    clash = sorted(set(overrides) & _SET_HERE | set(reference) & (_SET_HERE - {"local-steps"}))
    if clash:
        parser.error(f"--run-config/--reference may not set {', '.join(clash)}: each setting sets them")
    recipe = RunConfig.from_flower({"local-steps": args.local_steps, **overrides})
    ref = RunConfig.from_flower({"local-steps": args.local_steps, **overrides, **reference})
    compute = {name: args.rounds * c.local_steps * c.batch_size for name, c in (("recipe", recipe), ("reference", ref))}
    if compute["recipe"] != compute["reference"]:
        parser.error(f"--reference processes {compute['reference']} conversations per node and the recipe "
                     f"{compute['recipe']}: set its batch-size x local-steps to "
                     f"{recipe.local_steps * recipe.batch_size} "
                     "so the comparison is at matched compute")

    from shared.evaluation import load_heldout

    settings = [("no DP, non-private recipe", None, reference), ("no DP, same recipe", None, {})]
    settings += [(f"DP epsilon {eps:g}", eps, {}) for eps in args.epsilons]
    results, curves = [], {}
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for label, eps, extra in settings:
            print(f"== {label}", flush=True)
            out = Path(tmp) / label.replace(" ", "-").replace(",", "")
            run = {"local_steps": args.local_steps, **overrides, **extra}
            report = simulate_demo(out, args.clients, target_epsilon=eps or 8.0, base_model=args.base_model,
                                   num_rounds=args.rounds, dp=eps is not None, secagg=False,
                                   **{k.replace("-", "_"): v for k, v in run.items()})
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
                            "recipe": {k: cfg[k] for k in RECIPE_KEYS},
                            "conversations_per_node": args.rounds * cfg["local-steps"] * cfg["batch-size"]})
            # Written after every setting: an interrupted run keeps what it measured (complete: false).
            write_outputs(results, base, curves, args, overrides, reference, compute,
                          complete=len(results) == len(settings))
def write_outputs(results: list[dict], base: dict, curves: dict, args, overrides: dict, reference: dict,
                  compute: dict, *, complete: bool) -> None:
    no_dp = [r for r in results if r["epsilon"] is None]
    # The stricter reference: the better non-private model, by each measure.
    best_loss, best_rouge = min(r["loss"] for r in no_dp), max(r["rouge_l"] for r in no_dp)
    same = no_dp[1] if len(no_dp) > 1 else None
    for r in results:
        r["retained_loss_gain"] = retained(base["loss"], r["loss"], best_loss)
        r["retained_rouge_gain"] = retained(base["rouge_l"], r["rouge_l"], best_rouge)
        r["retained_loss_gain_same_recipe"] = same and retained(base["loss"], r["loss"], same["loss"])
        r["retained_rouge_gain_same_recipe"] = same and retained(base["rouge_l"], r["rouge_l"], same["rouge_l"])

    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    rows = [["base model (no training)", "-", f"{base['loss']:.4f}", f"{base['rouge_l']:.4f}", "-", "-", "-"]]
    rows += [[r["setting"], "-" if r["max_epsilon_spent"] is None else f"{r['max_epsilon_spent']:.2f}",
              f"{r['loss']:.4f}", f"{r['rouge_l']:.4f}", pct(r["retained_loss_gain"]), pct(r["retained_rouge_gain"]),
              pct(r["retained_loss_gain_same_recipe"])] for r in results]
    table = md_table(["setting", "epsilon spent (max node)", "held-out loss", "ROUGE-L F1", "loss gain kept",
                      "ROUGE-L gain kept", "loss gain kept (vs same recipe)"], rows)
    describe = lambda c: ", ".join(f"{k} {c[k]}" for k in RECIPE_KEYS)  # noqa: E731
    table += (f"\n\n{args.clients} nodes x {args.rounds} rounds, {compute['recipe']} conversations per node in every "
              f"setting (matched compute). DP recipe: {describe(results[-1]['recipe'])}. Non-private recipe: "
              f"{describe(no_dp[0]['recipe'])}. Gain kept = (base - setting) / (base - better no-DP model); the last "
              f"column divides by the DP recipe run without noise. ROUGE-L on {args.rouge_conversations} held-out "
              f"questions, greedy, {args.max_new_tokens} new tokens.")
    keep = ("epsilon", "loss", "rouge_l", "retained_loss_gain", "retained_rouge_gain", "retained_loss_gain_same_recipe",
            "retained_rouge_gain_same_recipe", "setting", "max_epsilon_spent", "bleu", "chrf", "eval_loss_per_round",
            "recipe", "conversations_per_node")
    data = {"base": base, "settings": [{k: r[k] for k in keep} for r in results],
            "base_model": args.base_model, "clients": args.clients, "rounds": args.rounds,
            "run_config": overrides, "reference": reference, "delta": 1e-5,
            "rouge_conversations": args.rouge_conversations, "max_new_tokens": args.max_new_tokens,
            "complete": complete, "machine": machine()}
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
    short = {"no DP, non-private recipe": "no DP\n(reference)", "no DP, same recipe": "no DP\n(same recipe)"}
    names = ["base"] + [short.get(r["setting"], r["setting"].replace("DP epsilon ", "eps ")) for r in results]
    bars = right.bar(names, [base["rouge_l"]] + [r["rouge_l"] for r in results], color="#3b75af")
    right.bar_label(bars, fmt="%.3f", fontsize=8)
    right.tick_params(axis="x", labelsize=8)
    right.set_ylabel("ROUGE-L F1 (held-out answers)")
    fig.suptitle(f"{args.base_model}: {args.clients} nodes, {args.rounds} rounds x {args.local_steps} steps, matched "
                 "compute")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
