"""What secure aggregation costs: plaintext, Flower's stock SecAgg+ and fedchat's secure sum, side by side.

    nice -n 5 .venv/bin/python -m bench.secagg_overhead [--demo] [--only train synthetic] [--stock-timeout 400]
    .venv/bin/python -m bench.secagg_overhead --report   # tables, ratios and figure again from the JSON

One run measures every configuration under the three protocols back to back (bench/scale.py runs each
in a process of its own; bench/scale_app.py says what each protocol runs), so they share the machine's
load, and records the load:

* train: 5 nodes training the tiny model (5 rounds: the median of the last 4), and with --demo the demo
  model smollm2-135m with DP (2 rounds: the second);
* synthetic: random updates of 0.5M and 40M parameters at 5 and 20 nodes, and 0.5M at 100 nodes
  (every pair of nodes shares keys under both secure protocols). Rounds: 3 at 0.5M and 5 or 20 nodes (the
  median of the last 2); 1 at 40M and at 100 nodes (its start-up, a few seconds, is small beside such a
  round, and the same for every protocol). A configuration that runs past its time limit (--stock-timeout
  for Flower's SecAgg+, --timeout for the others) is stopped: its row then says how long it ran, the
  rounds and stages that had finished, and the last progress line.

Writes bench/results/secagg_overhead.json ({"rows": [...], "ratios", "goals", "machine", "load", "command"}),
secagg_overhead.md, docs/results/secagg.png (round time against nodes and adapter size), and merges the
rows into bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import scale
from bench.common import RESULTS, machine, md_table

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "results" / "secagg.png"
SMALL, LARGE = 500_000, 40_000_000


def configurations(demo: bool, only: list[str]) -> list[dict]:
    """(spec without protocol) in the order they run: the cheap ones first."""
    out = []
    if "train" in only:
        out.append({"kind": "train", "nodes": 5, "adapter_params": 0, "rounds": 5, "base_model": "tiny",
                     "run": scale.TINY_TRAIN})
    if "synthetic" in only:
        out += [{"kind": "synthetic", "nodes": n, "adapter_params": p, "rounds": r}
                for n, p, r in ((5, SMALL, 3), (20, SMALL, 3), (5, LARGE, 1), (100, SMALL, 1), (20, LARGE, 1))]
    if demo and "train" in only:
        out.append({"kind": "train", "nodes": 5, "adapter_params": 0, "rounds": 2, "base_model": "smollm2-135m",
                    "run": scale.DEMO_ROUND})
    return out


def goals(ratios: list[dict]) -> list[dict]:
    """The issue's goals, each with the figure that meets it or not."""
    out = []
    for r in ratios:
        flower = r.get("round_seconds_fedchat_over_flower")
        if r["kind"] == "train" and flower is not None:
            out.append({"goal": f"train round ({r['nodes']} nodes, {r.get('base_model', 'tiny')}): fedchat at most "
                                "1.05x Flower's SecAgg+", "value": flower, "met": flower <= 1.05})
        if r["kind"] == "synthetic" and r["adapter_params"] == LARGE:
            up = r.get("bytes_up_per_node_fedchat_over_plaintext")
            if up is not None:
                out.append({"goal": f"bytes up per node at 40M, {r['nodes']} nodes: fedchat at most 1.05x plaintext",
                            "value": up, "met": up <= 1.05})
            if flower is not None:
                out.append({"goal": f"40M round, {r['nodes']} nodes: fedchat faster than Flower's SecAgg+",
                            "value": flower, "met": flower < 1.0})
            elif r.get("flower_stopped_after_seconds"):
                out.append({"goal": f"40M round, {r['nodes']} nodes: fedchat faster than Flower's SecAgg+",
                            "value": f"Flower stopped after {r['flower_stopped_after_seconds']:.0f} s",
                            "met": None})
    return out


def _configuration(row: dict) -> tuple:
    """What identifies a row's configuration (a train row's adapter size is measured, not asked for)."""
    return (row["kind"], row["nodes"], row["protocol"], row.get("base_model"),
            row["adapter_params"] if row["kind"] == "synthetic" else 0)


def load() -> dict:
    return dict(zip(("1min", "5min", "15min"), (round(x, 2) for x in os.getloadavg())))


def write(rows: list[dict], command: str, loads: list[dict], partial: bool) -> None:
    rs = scale.ratios(rows)
    data = {"rows": rows, "ratios": rs, "goals": goals(rs), "machine": machine(),
            "load": {"during_rows": loads, "cpu_cores": os.cpu_count(),
                     "note": "load averages (uptime) when each row started and ended; other engineers' jobs shared "
                             "the 2 cores: compare protocols as ratios within this run"},
            "command": command, "complete": not partial}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "secagg_overhead.json").write_text(json.dumps(data, indent=2))
    table = scale.tables(rows)
    if data["goals"]:
        table += "\n\n" + md_table(["goal", "value", "met"],
                                   [[g["goal"], g["value"] if isinstance(g["value"], str) else f"{g['value']:.3f}",
                                     {True: "yes", False: "no", None: "see row"}[g["met"]]] for g in data["goals"]])
    (RESULTS / "secagg_overhead.md").write_text(f"`{command}`\n\n" + table.rstrip() + "\n")
    scale.synthetic_figure(rows, FIGURE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also 5 nodes training smollm2-135m with DP")
    parser.add_argument("--only", nargs="+", choices=("train", "synthetic"), default=["train", "synthetic"])
    parser.add_argument("--stock-timeout", type=float, default=400.0,
                        help="stop a Flower SecAgg+ configuration after this many seconds")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="stop any other synthetic configuration after this many seconds")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of secagg_overhead.json and run only the configurations it lacks")
    parser.add_argument("--report", action="store_true", help="rebuild the outputs from secagg_overhead.json")
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads((RESULTS / "secagg_overhead.json").read_text())
        for row in data["rows"]:  # the median of the rounds after the first, as scale.summary computes it
            every = row.get("round_seconds_all")
            if every and row.get("timed_out_after_seconds") is None:
                row["round_seconds"] = round(statistics.median(every[1:] or every), 3)
        write(data["rows"], data["command"], data["load"]["during_rows"], partial=not data["complete"])
        return print((RESULTS / "secagg_overhead.md").read_text())
    command = "nice -n 5 .venv/bin/python -m bench.secagg_overhead " + shlex.join(sys.argv[1:] if argv is None
                                                                                 else argv)
    logs = Path(tempfile.mkdtemp(prefix="fedchat-secagg-overhead-"))
    print(f"logs in {logs}; load {load()}", flush=True)
    rows, loads = [], []
    todo = [{**c, "protocol": p} for c in configurations(args.demo, args.only) for p in scale.PROTOCOLS]
    if args.resume:
        data = json.loads((RESULTS / "secagg_overhead.json").read_text())
        rows, loads, command = data["rows"], data["load"]["during_rows"], data["command"] + " (then --resume)"
        done = {_configuration(r) for r in rows}
        todo = [s for s in todo if _configuration(s) not in done]
    started = time.perf_counter()
    for i, spec in enumerate(todo):
        before = load()
        timeout = None if spec["kind"] != "synthetic" else \
            args.stock_timeout if spec["protocol"] == scale.STOCK else args.timeout
        (row,) = scale.run_specs([spec], logs / f"{i:02d}", {0: timeout} if timeout else None)
        row["load_before"], row["load_after"] = before, load()
        rows.append(row)
        loads.append({"row": len(rows) - 1, "protocol": spec["protocol"], "before": before, "after": row["load_after"]})
        write(rows, command, loads, partial=i + 1 < len(todo))
        print(f"   [{i + 1}/{len(todo)} done, {(time.perf_counter() - started) / 60:.1f} min so far, load "
              f"{row['load_after']}]", flush=True)
    scale.write(scale.merge_rows(rows))
    print((RESULTS / "secagg_overhead.md").read_text())
    print(f"wrote {RESULTS / 'secagg_overhead.json'}, secagg_overhead.md, {FIGURE}")


if __name__ == "__main__":
    main()
