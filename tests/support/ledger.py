"""Privacy ledgers for tests: real entries (their epsilon computed by the accountant), ledgers written
through the node's own code, and forgeries chained and signed as an attacker holding a key would."""

from __future__ import annotations

from shared import ledger
from shared.accounting import compute_epsilon
from shared.crypto import sign


def entry(rnd: int, history: list | None, node="org-1", accountant="prv", **over) -> dict:
    """A DP round's entry whose epsilon is the real cumulative one after `history` (this round included;
    None: a placeholder epsilon, for tests of the lock that never account)."""
    e = {"node": node, "run": "run-1", "round": rnd, "time": f"2026-11-22T10:{rnd % 60:02d}:00+00:00",
         "num_examples": 400, "sample_rate": 0.02, "noise_multiplier": 0.9, "max_grad_norm": 1.0, "steps": 10,
         "delta": 1e-5, "accountant": accountant, "target_epsilon": 8.0, "update_sha256": "ab" * 32}
    e.update(over)
    e["epsilon"] = 1.0 if history is None else compute_epsilon(history, e["delta"], accountant)
    return e


def write_ledger(path, key, rounds=4, **over) -> list[dict]:
    history = []
    with ledger.open_for_training(path, key) as book:
        for rnd in range(1, rounds + 1):
            history.append((0.9, 0.02, 10))
            book.append(entry(rnd, history, **over))
        return book.entries


def signed_lines(entries: list[dict], key) -> list[bytes]:
    """Chain and sign arbitrary entries as a forger with `key` would (no checks of ranges)."""
    lines, prev = [], ledger.GENESIS
    for e in entries:
        e = {k: v for k, v in e.items() if k not in ("prev", "signature")}
        e["prev"] = prev
        e["signature"] = sign(key, ledger.canonical(e))
        lines.append(ledger.canonical(e))
        prev = ledger.line_hash(lines[-1])
    return lines


def rewrite(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
