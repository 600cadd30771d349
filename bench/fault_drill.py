"""The fault drill: every fault of tests/test_faults.py on a real network of namespaces, one table.

    .venv/bin/python -m bench.fault_drill [--only NAME ...] [--round-timeout 60] [--keep DIR]

Runs as root (network namespaces). One topology (coordinator, wan proxy, 3 node hosts, TLS for
coordinator.fedchat.test, SuperNode authentication) serves every fault; each fault gets fresh
nodes and a 2-round run of the tiny model under secure aggregation and DP (tests.support.drill). A fault is
survived when the run completes, or its faulted round fails with an error that says what happened
and the next round runs with every node; no ledger line is lost, duplicated or corrupt; every
update that reached the coordinator is bound to its node's ledger line; and nothing is left behind.

Writes bench/results/faults.json ({"faults": [{"name", "survived", "ledger_entries_lost",
"rounds_completed", "detail"}], ...}) and faults.md, the table docs/results/faults.md shows. Exits 1 if a
fault was not survived or something was left behind.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from bench.common import md_table, write_results
from shared.logs import FORMAT
from tests.support.drill import SCENARIOS, SINGLE, DrillSettings, NetworkFederation, run_scenario
from tests.support.netns import unavailable


def table(result: dict) -> str:
    rows = [[f["name"], "yes" if f["survived"] else "**NO**", f["ledger_entries_lost"], f["rounds_completed"],
             f"{f['seconds']:.0f}", f["what_happened"]] for f in result["faults"]]
    return md_table(["fault", "survived", "ledger entries lost", "rounds completed (of 2)", "s", "what happened"],
                    rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="these faults only")
    parser.add_argument("--round-timeout", type=float, default=DrillSettings.secagg_timeout,
                        help="secagg-timeout of the runs: seconds each secure-aggregation stage waits for the nodes")
    parser.add_argument("--keep", type=Path, help="keep the drill's files (logs, ledgers, reports) in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "fedchat.processes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    why = unavailable()
    if why:
        print(f"fault drill: cannot run here: {why}", file=sys.stderr)
        return 2
    names = args.only or list(SINGLE)
    settings = DrillSettings(secagg_timeout=args.round_timeout)
    with tempfile.TemporaryDirectory(prefix="fedchat-drill-") as tmp:
        root = args.keep or Path(tmp)
        fed = NetworkFederation(root, settings)
        outcomes, started = [], time.monotonic()
        try:
            fed.open()
            for name in names:
                print(f"== {name}: {SCENARIOS[name].fault}", file=sys.stderr, flush=True)
                out = run_scenario(fed, name)
                print(f"   {'survived' if out.survived else 'NOT SURVIVED'} in {out.seconds:.0f} s: {out.detail}",
                      file=sys.stderr, flush=True)
                outcomes.append(out)
        finally:
            left = fed.close()
    faults = [{**o.summary(), "fault": o.fault, "seconds": o.seconds, "what_happened": _what_happened(o),
               "rounds": o.rows} for o in outcomes]
    result = {"faults": faults, "left_behind": left, "seconds": round(time.monotonic() - started, 1),
              "settings": {"nodes": settings.nodes, "rounds": 2, "local_steps": settings.local_steps,
                           "batch_size": settings.batch_size, "secagg_timeout": settings.secagg_timeout,
                           "node_wait_timeout": settings.node_wait_timeout, "base_model": "tiny",
                           "secagg": True, "dp": True, "target_epsilon": settings.target_epsilon}}
    write_results("faults", result, table(result))
    if left:
        print(f"left behind: {left}", file=sys.stderr)
    return 0 if all(o.survived for o in outcomes) and not left else 1


REFUSED = re.compile(r"node (\S+) refuses secure-aggregation stage '([\w-]+)'")
ERROR_ID = re.compile(r", error [0-9a-f]+\).*")  # the node's error id and where to find it: its operator's business


def _what_happened(out) -> str:
    """The table's last column: each round's outcome in a few words, the nodes by name."""
    parts = []
    for r in out.rows:
        if r["status"] == "ok":
            parts.append(f"round {r['round']} ok ({len(r['clients'])} nodes)")
            continue
        refused: dict[str, list[str]] = {}
        for node, stage in (m.groups() for f in r["failures"] if (m := REFUSED.search(f))):
            refused.setdefault(stage, []).append(node)
        said = []
        for stage, names in r.get("dropped", {}).items():
            gone = [n for n in names if n not in refused.get(stage, [])]
            if gone:
                said.append(f"{', '.join(gone)} dropped out at {stage}")
        said += [f"{', '.join(names)} refused {stage} (fewer than 3 left)" for stage, names in refused.items()]
        for error in (f for f in r["failures"] if not REFUSED.search(f)):
            said.append('"' + ERROR_ID.sub(")", error) + '"')
        listed = sorted(n for n, status in r["clients"].items() if status.startswith("not aggregated"))
        if listed:
            said.append(f"masked updates of {', '.join(listed)} listed, not aggregated")
        parts.append(f"round {r['round']} failed at {r.get('halted_at') or 'sampling'}: "
                     + ("; ".join(said) or (r["error"] or "")[:100]))
    if "reconnect_seconds" in out.facts:
        parts.insert(0, f"the SuperNodes reconnected in {out.facts['reconnect_seconds']:.0f} s"
                        + (" (same processes)" if out.facts.get("same_node_processes") else ""))
    for resume in (out.facts.get("report") or {}).get("resumed", []):
        parts.insert(0, f"the run, submitted again, resumed after round {resume['from_round']}")
    return "; ".join(parts) or "no round ran" + (f" ({out.problems[0][:120]})" if out.problems else "")


if __name__ == "__main__":
    sys.exit(main())
