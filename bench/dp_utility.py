"""What differential privacy costs in held-out loss on the embedded model.

    .venv/bin/python bench/dp_utility.py [--clients 3] [--rounds 3] [--local-steps 10]

Same data, rounds, steps and seed for every setting: the base model, federated
without DP, and federated with DP-SGD at epsilon 1, 4 and 8 (delta 1e-5, per node,
over the whole run). Transport is plaintext here: SecAgg+ changes the aggregate by
less than 1e-7 (see tests/test_secagg.py), which does not matter for utility.
Writes JSON, a markdown table and a PNG of held-out loss per round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, md_table, simulate_demo, write_results  # noqa: E402
from shared.logs import setup_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--base-model", default="smollm2-135m")
    args = parser.parse_args()
    setup_logging(quiet_flower=True)
    settings = [("no DP", None)] + [(f"DP epsilon {e:g}", e) for e in args.epsilons]
    curves, rows, results = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, eps in settings:
            print(f"== {label}", flush=True)
            report = simulate_demo(Path(tmp) / label.replace(" ", "-"), args.clients, target_epsilon=eps or 8.0,
                                   base_model=args.base_model, num_rounds=args.rounds, local_steps=args.local_steps,
                                   dp=eps is not None, secagg=False)
            losses = [report["base_eval_loss"]] + [r["eval_loss"] for r in report["rounds"]]
            curves[label] = losses
            spent = max((c.get("epsilon") or 0) for r in report["rounds"] for c in r["clients"]) if eps else None
            results.append({"setting": label, "target_epsilon": eps, "max_epsilon_spent": spent,
                             "eval_loss_per_round": losses, "final_eval_loss": losses[-1]})
    base = results[0]["eval_loss_per_round"][0]
    rows = [["base model (no training)", "-", f"{base:.4f}"]]
    rows += [[r["setting"], "-" if r["max_epsilon_spent"] is None else f"{r['max_epsilon_spent']:.2f}",
              f"{r['final_eval_loss']:.4f}"] for r in results]
    table = md_table(["setting", "epsilon spent (max node)", "held-out loss"], rows)
    write_results("dp_utility", {"base_model": args.base_model, "clients": args.clients, "rounds": args.rounds,
                                 "local_steps": args.local_steps, "delta": 1e-5, "base_eval_loss": base,
                                 "results": results}, table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, losses in curves.items():
        ax.plot(range(len(losses)), losses, marker="o", label=label)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{args.base_model}: {args.clients} nodes, {args.local_steps} steps/round")
    ax.set_xticks(range(args.rounds + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "dp_utility.png", dpi=120)
    print(f"plot: {RESULTS / 'dp_utility.png'}")


if __name__ == "__main__":
    main()
