"""The privacy ledger: an append-only, hash-chained, signed JSONL file per node.

One line per round a node trained. Each line holds the mechanism's parameters, the
cumulative epsilon the node claims after the round, the SHA-256 of the update it
sent, ``prev`` (SHA-256 of the previous line's bytes; 64 zeros for the first) and an
Ed25519 ``signature`` by the node's key over the canonical JSON of the entry without
its signature. Canonical JSON: keys sorted, no spaces, UTF-8.

Appending rewrites the file through a temporary file and an atomic rename, so a line
is never half-written even if the process dies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shared.crypto import sign
from shared.errors import LedgerError
from shared.files import atomic_write_bytes

GENESIS = "0" * 64
FIELDS = {  # name -> accepted JSON types
    "node": (str,), "run": (str,), "round": (int,), "time": (str,), "num_examples": (int,),
    "sample_rate": (float, int), "noise_multiplier": (float, int), "max_grad_norm": (float, int),
    "steps": (int,), "delta": (float, int), "accountant": (str,), "epsilon": (float, int),
    "target_epsilon": (float, int), "update_sha256": (str,), "prev": (str,), "signature": (str,),
}


def canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def read_lines(path: str | Path) -> list[bytes]:
    """The ledger's lines (without newlines); a missing ledger is empty."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise LedgerError(f"{path}: the last line is incomplete (no newline): the file was cut or edited. "
                          "Restore the ledger from a backup; never edit it by hand.")
    return data.split(b"\n")[:-1] if data else []


def read_entries(path: str | Path) -> list[dict]:
    """Parse every line (no signature check: `fedchat audit` does that)."""
    entries = []
    for number, line in enumerate(read_lines(path), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise LedgerError(f"{path} line {number}: not JSON: the ledger is corrupt; restore it.") from None
        if not isinstance(entry, dict) or set(FIELDS) - set(entry):
            raise LedgerError(f"{path} line {number}: not a ledger entry (fields missing): restore the ledger.")
        entries.append(entry)
    return entries


def head(path: str | Path) -> tuple[str, int]:
    """(hash of the last line, number of entries): the ledger's current commitment."""
    lines = read_lines(path)
    return (line_hash(lines[-1]) if lines else GENESIS), len(lines)


def append(path: str | Path, entry: dict, key) -> dict:
    """Chain, sign and durably append one entry; return it as written."""
    path = Path(path)
    lines = read_lines(path)
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            raise LedgerError(f"{path}: the last line is not JSON: the ledger is corrupt; restore it.") from None
    entry = {k: v for k, v in entry.items() if k not in ("prev", "signature")}
    entry["prev"] = line_hash(lines[-1]) if lines else GENESIS
    entry["signature"] = sign(key, canonical(entry))
    missing = set(FIELDS) - set(entry)
    if missing:
        raise LedgerError(f"ledger entry lacks {sorted(missing)}")
    new = b"".join(line + b"\n" for line in lines) + canonical(entry) + b"\n"
    atomic_write_bytes(path, new, mode=0o644)
    return entry
