"""`fedchat audit`: verify privacy ledgers independently of the nodes that wrote them.

For each ledger, against the node's public key that the auditor obtained from the node's
operator (never a key found beside the ledger): every line is strict canonical JSON with
every field of the right type and in range, the hash chain is unbroken from the first
line, every signature verifies, one node wrote it, its budget (delta, target epsilon)
never changed, epsilon recomputed from the recorded mechanism parameters with Opacus'
accountants (shared/accounting.py) matches the claim within 1%, and no entry exceeds its
budget. A round trained without DP (noise 0) has infinite epsilon and fails.

Given the coordinator's report.json, each report row is bound to a ledger by the
fingerprint of the ledger key the node sent with its update (not by the node's
self-declared name), the ledger must still hold every entry the node had committed to
(so lines removed at the end are caught too), and every row must match an audited
ledger and every audited ledger a node of the report.

Ledgers signed by the same key must be one history (`check_forks`): two that diverge are a fork,
the same budget spent twice, and both fail, with or without the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shared import ledger
from shared.accounting import ledger_epsilons
from shared.crypto import key_fingerprint, load_public_key
from shared.errors import LedgerError

TOLERANCE = 0.01  # relative epsilon mismatch accepted (the PRV accountant's own error bound)
BUDGET_FIELDS = ("delta", "target_epsilon")  # a change of either is a changed promise: FAIL


@dataclass
class NodeAudit:
    ledger: str
    key: str
    key_fingerprint: str | None = None
    node: str = "?"
    node_ids: list = field(default_factory=list)  # Flower node ids bound to this key by the report
    rounds: int = 0
    rounds_without_dp: int = 0
    epsilon_claimed: float | None = None
    epsilon_recomputed: float | None = None
    target_epsilon: float | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # per entry: line, round, run, claimed, recomputed, target
    line_hashes: list[str] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """Strict JSON: an infinite epsilon (a round without DP) is null, with rounds_without_dp > 0."""
        d = asdict(self)
        del d["line_hashes"]
        d["verdict"] = "OK" if self.ok else "FAIL"
        return _finite(d)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def audit_ledger(path: str | Path, key_path: str | Path, recompute: bool = True) -> NodeAudit:
    """Audit one ledger with the node's public key (a private key PEM also gives it)."""
    path, key_path = Path(path), Path(key_path)
    result = NodeAudit(str(path), str(key_path))
    try:
        key = load_public_key(key_path)
        result.key_fingerprint = key_fingerprint(key)
        raw = path.read_bytes()
    except LedgerError as exc:
        result.problems.append(str(exc))
        return result
    except OSError as exc:
        result.problems.append(f"cannot read the ledger: {exc.strerror}")
        return result
    chunks = raw.split(b"\n")
    if chunks[-1]:
        result.problems.append(f"line {len(chunks)}: incomplete last line (the file was cut): entries are lost")
    lines = chunks[:-1]
    if not lines:
        result.problems.append("the ledger is empty")
        return result
    prev, history, nodes, before, valid = ledger.GENESIS, [], set(), None, True
    for number, line in enumerate(lines, 1):
        where = f"line {number}"
        entry, problems = ledger.check_line(line, prev, key, key_path.name)
        result.problems += [f"{where}: {p}" for p in problems]
        if entry is None:
            return result
        if before is not None:
            _check_unchanged(before, entry, number, result)
            if ledger.version(entry) < ledger.version(before):
                result.problems.append(f"{where}: format version {ledger.version(entry)} after version "
                                       f"{ledger.version(before)}: fedchat's node only appends in the newest format")
        if entry.get("first_contact") and number > 1:
            result.warnings.append(f"{where}: planned with no coordinator record of this ledger although it held "
                                   f"{number - 1} entries (a new federation, a coordinator that lost its records, or "
                                   "a copy of the node's state dir): ask the node's operator which")
        nodes.add(entry["node"])
        history.append(entry)
        no_dp = entry["noise_multiplier"] == 0
        result.rounds_without_dp += no_dp
        claimed = math.inf if entry["epsilon"] is None else float(entry["epsilon"])
        valid = valid and not ledger.range_problems(entry)  # out-of-range values cannot be accounted
        if not valid:
            recomputed = math.nan
        elif recompute:
            recomputed, local = ledger_epsilons(history, float(entry["delta"]), entry["accountant"])
            local_claimed = entry.get("local_epsilon", entry["epsilon"])
            local_claimed = math.inf if local_claimed is None else float(local_claimed)
            if not math.isclose(local, local_claimed, rel_tol=TOLERANCE):  # the node's own noise alone
                result.problems.append(f"{where}: claims local epsilon {local_claimed:.4f} (its own noise share "
                                       f"alone) but its recorded mechanism gives {local:.4f}")
        else:
            recomputed = claimed
        if valid and not math.isclose(recomputed, claimed, rel_tol=TOLERANCE):
            result.problems.append(f"{where}: claims epsilon {claimed:.4f} but its recorded mechanism (noise "
                                   f"{entry['noise_multiplier']:.4g}, rate {entry['sample_rate']:.4g}, "
                                   f"{len(history)} rounds) gives {recomputed:.4f}")
        spent = claimed if math.isnan(recomputed) else max(claimed, recomputed)
        if no_dp:
            result.problems.append(f"{where}: round {entry['round']} of run {entry['run']} was trained WITHOUT DP "
                                   f"(noise 0): epsilon is infinite from here on and the budget "
                                   f"{entry['target_epsilon']:g} is void")
        elif spent > entry["target_epsilon"] * (1 + 1e-9):
            cause = " (an earlier round was trained without DP)" if result.rounds_without_dp else ""
            result.problems.append(f"{where}: epsilon {spent:.4f} exceeds the budget {entry['target_epsilon']:g}: "
                                   f"overspent{cause}")
        result.history.append({"line": number, "run": entry["run"], "round": entry["round"],
                               "claimed": claimed, "recomputed": recomputed, "target": entry["target_epsilon"]})
        result.epsilon_claimed, result.epsilon_recomputed = claimed, recomputed
        result.target_epsilon = entry["target_epsilon"]
        prev, before = ledger.line_hash(line), entry
        result.line_hashes.append(prev)
    if len(nodes) > 1:
        result.problems.append(f"entries of several nodes in one ledger: {sorted(nodes)}")
    result.node = sorted(nodes)[0]
    result.rounds = len(lines)
    return result


def _check_unchanged(before: dict, entry: dict, number: int, result: NodeAudit) -> None:
    """A node's budget is one promise for the life of its data: a change of it fails; a change of
    accountant (the coordinator's choice per run; each line is recomputed over the whole history with
    its own accountant, a valid bound either way) is reported as a warning."""
    for name in BUDGET_FIELDS:
        if entry[name] != before[name]:
            result.problems.append(f"line {number}: {name} changed from {before[name]:g} (line {number - 1}) to "
                                   f"{entry[name]:g}: the node changed its budget, so its spending cannot be held to "
                                   "one promise; ask the node's operator why")
    if entry["accountant"] != before["accountant"]:
        result.warnings.append(f"line {number}: accountant changed from {before['accountant']} (line {number - 1}) "
                               f"to {entry['accountant']}")


def check_against_report(audits: list[NodeAudit], report_path: str | Path) -> NodeAudit:
    """Bind the report's rows to the audited ledgers by ledger-key fingerprint and check each row's
    ledger head. Problems of a ledger go to its audit; those of the report itself (rows no audited
    ledger matches, a node id with two ledger keys) to the returned audit of the report."""
    report_path = Path(report_path)
    result = NodeAudit(str(report_path), key="", node="(report)")
    try:
        report = json.loads(report_path.read_text())
        rows = [(r, c) for r in report.get("rounds", []) for c in r.get("clients", [])]
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        result.problems.append(f"cannot read the coordinator's report: {exc}")
        return result
    by_key = {a.key_fingerprint: a for a in audits if a.key_fingerprint}
    keys_of: dict[object, set[str]] = {}
    seen: set[str] = set()
    result.rounds = len(report.get("rounds", []))
    for row, c in rows:
        where = f"report round {row.get('round')}, node id {c.get('node_id')} (calls itself {c.get('node')!r})"
        fp = c.get("ledger_key")
        if not fp:
            if c.get("status", "ok") == "ok":
                result.problems.append(f"{where}: the row has no ledger_key, so it cannot be bound to a ledger: the "
                                       "report is from an older coordinator or was edited")
            continue
        keys_of.setdefault(c.get("node_id"), set()).add(fp)
        audit = by_key.get(fp)
        if audit is None:
            result.problems.append(f"{where}: unmatched: its ledger key {fp[:16]}... is the key of none of the "
                                   "audited ledgers: this node trained, but its ledger (or the right key for it) "
                                   "was not given; ask its operator for both")
            continue
        seen.add(fp)
        if c.get("node_id") not in audit.node_ids:
            audit.node_ids.append(c.get("node_id"))
        count, head = c.get("ledger_entries"), c.get("ledger_head")
        if count is None or not head:
            if c.get("status", "ok") == "ok":
                audit.problems.append(f"{where}: the row carries no ledger head: nothing binds the round to the ledger")
            continue
        count = int(count)
        if len(audit.line_hashes) < count:
            audit.problems.append(f"the coordinator recorded {count} entries after round {row.get('round')}, the "
                                  f"ledger has {len(audit.line_hashes)}: entries were removed")
        elif count and audit.line_hashes[count - 1] != head:
            audit.problems.append(f"line {count}: differs from what the node committed to the coordinator in "
                                  f"round {row.get('round')}: the ledger was rewritten")
    for node_id, fps in keys_of.items():
        if len(fps) > 1:
            result.problems.append(f"node id {node_id} sent {len(fps)} different ledger keys in one run: a node that "
                                   "changes its ledger key starts a fresh budget")
    for a in audits:
        if a.key_fingerprint and a.key_fingerprint not in seen:
            a.problems.append(f"unmatched: no node of the report sent this ledger's key ({a.key_fingerprint[:16]}"
                              "...): the ledger is not from this run's nodes, or the key given for it is not the one "
                              "its node signs with")
    return result


def check_forks(audits: list[NodeAudit]) -> None:
    """Ledgers signed by the same key must be one history: where neither is the start of the other, the
    node kept two ledgers (a restored backup trained on, a state dir copied and used twice) and spent
    its budget once in each. Both fail. A ledger that is the start of another is an older copy of it:
    a warning (the longer one holds everything it spent)."""
    by_key: dict[str, list[NodeAudit]] = {}
    for a in audits:
        if a.key_fingerprint:
            by_key.setdefault(a.key_fingerprint, []).append(a)
    for same_key in by_key.values():
        for i, one in enumerate(same_key):
            for other in same_key[i + 1:]:
                shorter, longer = sorted((one, other), key=lambda a: len(a.line_hashes))
                common = next((k for k, (x, y) in enumerate(zip(one.line_hashes, other.line_hashes)) if x != y),
                              len(shorter.line_hashes))
                if common == len(shorter.line_hashes):
                    shorter.warnings.append(f"an older copy of {longer.ledger} (the same key, its first "
                                            f"{common} lines): {longer.ledger} holds all it spent")
                    continue
                for a, b in ((one, other), (other, one)):
                    a.problems.append(f"forked: {b.ledger} is signed by the same key ({a.key_fingerprint[:16]}...) "
                                      f"and shares its first {common} lines, then line {common + 1} differs: the node "
                                      "trained two histories on one budget (a restored backup trained on, or a state "
                                      "dir copied and used twice), so neither ledger holds all it spent; ask the "
                                      "node's operator for both histories and add up their rounds")


def plot_epsilon(audits: list[NodeAudit], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for a in audits:
        if not a.history:
            continue
        xs = list(range(1, len(a.history) + 1))
        ys = [h["recomputed"] if math.isfinite(h["recomputed"]) else math.nan for h in a.history]
        label = f"{a.node}{'' if a.ok else ' (FAIL)'}{' (trained without DP)' if a.rounds_without_dp else ''}"
        line, = ax.plot(xs, ys, marker="o", label=label)
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
