"""`fedchat audit`: verify privacy ledgers independently of the nodes that wrote them.

For each ledger: every line parses and is in canonical form, the hash chain is
unbroken from the first line, every signature verifies against the node's public key
(obtained by the auditor), epsilon is recomputed from the recorded mechanism
parameters with Opacus' accountants and must match the claim within 1%, and no entry
exceeds its budget. Given the coordinator's report.json, the ledger must also contain
every entry the node had committed to when it last reported (so removing lines at
the end is caught too).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared import ledger
from shared.crypto import load_public_key, verify
from shared.errors import LedgerError

TOLERANCE = 0.01  # relative epsilon mismatch accepted (the PRV accountant's own error bound)


@dataclass
class NodeAudit:
    ledger: str
    key: str
    node: str = "?"
    rounds: int = 0
    epsilon_claimed: float | None = None
    epsilon_recomputed: float | None = None
    target_epsilon: float | None = None
    problems: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # per entry: round, run, claimed, recomputed

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = "OK" if self.ok else "FAIL"
        return d


def _type_problem(entry: dict) -> str | None:
    for name, types in ledger.FIELDS.items():
        if name not in entry:
            return f"field '{name}' is missing"
        if not isinstance(entry[name], types) or isinstance(entry[name], bool):
            return f"field '{name}' has the wrong type ({type(entry[name]).__name__})"
    if entry["accountant"] not in ("prv", "rdp"):
        return f"unknown accountant {entry['accountant']!r}"
    return None


def audit_ledger(path: str | Path, key_path: str | Path, recompute: bool = True) -> NodeAudit:
    from client.privacy import compute_epsilon, ledger_history

    path, key_path = Path(path), Path(key_path)
    result = NodeAudit(str(path), str(key_path))
    try:
        key = load_public_key(key_path)
        raw = path.read_bytes()
    except (LedgerError, OSError) as exc:
        result.problems.append(str(exc))
        return result
    chunks = raw.split(b"\n")
    if chunks[-1]:
        result.problems.append(f"line {len(chunks)}: incomplete last line (the file was cut): entries are lost")
    lines = chunks[:-1]
    if not lines:
        result.problems.append("the ledger is empty")
        return result
    prev, history, nodes = ledger.GENESIS, [], set()
    for number, line in enumerate(lines, 1):
        where = f"line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            result.problems.append(f"{where}: not JSON (edited or corrupt)")
            return result
        problem = _type_problem(entry) if isinstance(entry, dict) else "not a JSON object"
        if problem:
            result.problems.append(f"{where}: {problem}")
            return result
        if ledger.canonical(entry) != line:
            result.problems.append(f"{where}: not in canonical form: the line was rewritten")
        if entry["prev"] != prev:
            result.problems.append(f"{where}: hash chain broken (prev does not match the line before): a line was "
                                   "removed, inserted or reordered")
        body = {k: v for k, v in entry.items() if k != "signature"}
        if not verify(key, ledger.canonical(body), entry["signature"]):
            result.problems.append(f"{where}: signature does not verify with {key_path.name}: an edited field, or "
                                   "signed with another key")
        nodes.add(entry["node"])
        history += ledger_history([entry])
        claimed = float(entry["epsilon"])
        recomputed = compute_epsilon(history, float(entry["delta"]), entry["accountant"]) if recompute else claimed
        if not math.isclose(recomputed, claimed, rel_tol=TOLERANCE):
            result.problems.append(f"{where}: claims epsilon {claimed:.4f} but its recorded mechanism (noise "
                                   f"{entry['noise_multiplier']:.4g}, rate {entry['sample_rate']:.4g}, "
                                   f"{len(history)} rounds) gives {recomputed:.4f}")
        if max(claimed, recomputed) > entry["target_epsilon"] * (1 + 1e-9):
            result.problems.append(f"{where}: epsilon {max(claimed, recomputed):.4f} exceeds the budget "
                                   f"{entry['target_epsilon']:g}: overspent")
        result.history.append({"line": number, "run": entry["run"], "round": entry["round"],
                               "claimed": claimed, "recomputed": recomputed, "target": entry["target_epsilon"]})
        result.epsilon_claimed, result.epsilon_recomputed = claimed, recomputed
        result.target_epsilon = entry["target_epsilon"]
        prev = ledger.line_hash(line)
    if len(nodes) > 1:
        result.problems.append(f"entries of several nodes in one ledger: {sorted(nodes)}")
    result.node = sorted(nodes)[0]
    result.rounds = len(lines)
    return result


def check_against_report(audits: list[NodeAudit], report_path: str | Path) -> None:
    """The ledger must hold every entry the node had committed to in its replies to the coordinator."""
    report = json.loads(Path(report_path).read_text())
    by_node = {a.node: a for a in audits}
    lines_of: dict[str, list[bytes]] = {}  # each ledger read once, when the report names its node
    for row in report.get("rounds", []):
        for c in row.get("clients", []):
            audit = by_node.get(c.get("node"))
            count, head = c.get("ledger_entries"), c.get("ledger_head")
            if audit is None or count is None or not head:
                continue
            if audit.node not in lines_of:
                lines_of[audit.node] = Path(audit.ledger).read_bytes().split(b"\n")[:-1]
            lines = lines_of[audit.node]
            if len(lines) < count:
                audit.problems.append(f"the coordinator recorded {count} entries after round {row['round']}, the "
                                      f"ledger has {len(lines)}: entries were removed")
            elif count and ledger.line_hash(lines[count - 1]) != head:
                audit.problems.append(f"line {count}: differs from what the node committed to the coordinator in "
                                      f"round {row['round']}: the ledger was rewritten")


def plot_epsilon(audits: list[NodeAudit], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, a in enumerate(audits):
        if not a.history:
            continue
        xs = list(range(1, len(a.history) + 1))
        line, = ax.plot(xs, [h["recomputed"] for h in a.history], marker="o",
                        label=f"{a.node}{'' if a.ok else ' (FAIL)'}")
        ax.axhline(a.history[-1]["target"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("rounds trained (ledger entries)")
    ax.set_ylabel("cumulative epsilon (recomputed)")
    ax.set_title("privacy spent per node (dotted: budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
