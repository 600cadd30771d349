"""Cost of a federated round on the embedded model, for each aggregation mode.

    .venv/bin/python -m bench.round_cost [--clients 3] [--rounds 2] [--local-steps 5]

Runs the federation in Flower's simulation engine (DP-SGD on), once per aggregation
mode (fedavg, ffa) and transport (SecAgg+, plaintext), and reports seconds per local
step, seconds per round (rounds after the first, whose time includes loading the
model) and bytes each node sends and receives per round, also as a share of the full
model's size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import md_table, simulate_demo, warm_rounds, write_results
from shared.logs import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--base-model", default="smollm2-135m")
    args = parser.parse_args()
    setup_logging(quiet_flower=True)
    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for aggregation in ("fedavg", "ffa"):
            for secagg in (True, False):
                print(f"== {aggregation}, {'SecAgg+' if secagg else 'plaintext'}", flush=True)
                report = simulate_demo(Path(tmp) / f"{aggregation}-{secagg}", args.clients,
                                       base_model=args.base_model, num_rounds=args.rounds,
                                       local_steps=args.local_steps, aggregation=aggregation, secagg=secagg,
                                       eval_data="")
                warm = warm_rounds(report)
                clients = [c for r in warm for c in r["clients"]]
                # Nodes report no timing (it would be a statistic of their data); in simulation they train
                # one after another, so the round's time over all nodes' steps is the cost of a step.
                step_s = statistics.mean(r["seconds"] / (len(r["clients"]) * args.local_steps) for r in warm)
                up = statistics.mean(c["bytes_up"] for c in clients)
                down = statistics.mean(c["bytes_down"] for c in clients)
                entry = {"aggregation": aggregation, "secagg": secagg, "seconds_per_local_step": step_s,
                         "seconds_per_round": statistics.mean(r["seconds"] for r in warm),
                         "bytes_up_per_client_per_round": up, "bytes_down_per_client_per_round": down,
                         "bytes_per_round": statistics.mean(r["bytes_up"] + r["bytes_down"] for r in warm),
                         "update_bytes_float32": report["adapter_update_bytes"],
                         "full_model_bytes_float32": report["full_model_bytes"],
                         "up_ratio_to_full_model": up / report["full_model_bytes"]}
                results.append(entry)
                rows.append([aggregation, "SecAgg+" if secagg else "plaintext", f"{step_s:.2f}",
                             f"{entry['seconds_per_round']:.1f}", f"{up / 1e6:.2f}", f"{down / 1e6:.2f}",
                             f"{entry['up_ratio_to_full_model']:.4f}"])
    table = md_table(["aggregation", "transport", "s / local step (round / steps)", "s / round", "MB up / node / round",
                      "MB down / node / round", "up / full model"], rows)
    write_results("round_cost", {"base_model": args.base_model, "clients": args.clients, "rounds": args.rounds,
                                 "local_steps": args.local_steps, "dp": True, "results": results}, table)


if __name__ == "__main__":
    main()
