"""Helpers shared by the bench scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write_results(name: str, data: dict, table: str) -> None:
    """bench/results/NAME.json and NAME.md (the table the README includes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**data, "machine": machine()}, indent=2))
    (RESULTS / f"{name}.md").write_text(table.rstrip() + "\n")
    print(table)
    print(f"wrote {RESULTS / (name + '.json')} and {name}.md")


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def warm_rounds(report: dict) -> list[dict]:
    """The rounds after the first (whose time includes loading the model), or all if only one."""
    return report["rounds"][1:] or report["rounds"]


def simulate_demo(out: Path, clients: int, *, target_epsilon: float = 8.0, colluders: int | None = None,
                  node_config: dict | None = None, **run: object) -> dict:
    """A simulated federation on the demo data: `clients` organisations, run-config overrides
    (held-out evaluation on the demo's eval.jsonl unless eval_data="" turns it off); with secure
    aggregation, `colluders` is the roster's colluder bound (None: the largest minority); `node_config`:
    node-config keys for every node."""
    import shutil

    from fedchat.demo_data import demo_node_config, write_demo_data
    from fedchat.federation.simulation import simulate
    from shared.config import RunConfig

    shutil.rmtree(out, ignore_errors=True)
    manifest = write_demo_data(out / "data", clients)
    cfg = RunConfig.from_flower({"min-nodes": clients, "out-dir": str(out / "run"), "merge": False,
                                 "eval-data": str(out / "data" / "eval.jsonl"),
                                 **{k.replace("_", "-"): v for k, v in run.items()}})
    nodes = {i: {**demo_node_config(out, c["node"], target_epsilon=target_epsilon, dp=cfg.dp, secagg=cfg.secagg),
                 **(node_config or {})} for i, c in enumerate(manifest["clients"])}
    return simulate(cfg, nodes, colluders)
