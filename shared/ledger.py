"""The privacy ledger: an append-only, hash-chained, signed JSONL file per node.

One line per round a node trained, with or without DP (format versions: see VERSION). Each
line holds the mechanism's parameters, the cumulative epsilon the node claims after the
round, the SHA-256 of the update it sent, ``prev`` (SHA-256 of the previous line's bytes; 64 zeros for the first)
and an Ed25519 ``signature`` by the node's key over the canonical JSON of the entry
without its signature. Canonical JSON: keys sorted, no spaces, UTF-8, and strict (no
NaN or Infinity).

A round trained without DP is recorded like any other, never left out: its
``noise_multiplier`` is 0 and its ``epsilon`` is ``null`` (JSON has no infinity); the
accountant (shared/accounting.py) gives infinite epsilon for any history holding such a
round, so the node's budget is void from then on and `fedchat audit` fails it.
`no_dp_fields` gives those fields.

Beside ``ledger.jsonl`` lie ``ledger.head`` (the entry count and the hash of the last line,
rewritten after every append: a ledger found shorter than its head, or missing, was
rolled back or deleted) and ``ledger.jsonl.lock``. The node trains only inside
`open_for_training`, which holds an exclusive lock from planning to append, verifies every
line first, and refuses a ledger behind what the node or the coordinator last recorded.
Every write goes through a temporary file, fsync and an atomic rename (file and folder
synced), so a line is never half-written or lost even if the process or machine dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.accounting import ACCOUNTANTS
from shared.crypto import load_or_create_signing_key, load_signing_key, sign, verify
from shared.errors import LedgerError
from shared.files import atomic_write_bytes

GENESIS = "0" * 64
FIELDS = {  # name -> accepted JSON types (epsilon is null for a round without DP)
    "node": (str,), "run": (str,), "round": (int,), "time": (str,), "num_examples": (int,),
    "sample_rate": (float, int), "noise_multiplier": (float, int), "max_grad_norm": (float, int),
    "steps": (int,), "delta": (float, int), "accountant": (str,), "epsilon": (float, int, type(None)),
    "target_epsilon": (float, int), "update_sha256": (str,), "prev": (str,), "signature": (str,),
}
# Format versions. Version 1 (lines written before versions existed) has exactly FIELDS and no "version";
# version 2 adds "version": 2 and "first_contact" (true when the coordinator held no record of this
# ledger when the round was planned). Lines of every version stay valid and keep their spent budget;
# a ledger never goes back to an older version after a newer line. Version 3 adds "dp_mode" and
# "local_epsilon" (the epsilon of the node's own noise alone; in local DP, the epsilon); a distributed-DP
# line (dp_mode "distributed": a Skellam noise share in a secure sum) also records the share it added, the
# noise it counted on in the sum and the sensitivities, and its "epsilon" is against an observer of the sum.
VERSION = 3
V2_FIELDS = {"version": (int,), "first_contact": (bool,)}
V3_FIELDS = {"dp_mode": (str,), "local_epsilon": (float, int, type(None))}
DISTRIBUTED_FIELDS = {"noise_share": (float, int), "noise_counted": (float, int), "l2_sensitivity": (float, int),
                      "l1_sensitivity": (float, int)}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
RESTORE = ("Restore the ledger and the ledger.head beside it from the node's newest backup; never edit them by "
           "hand. If no intact copy exists, this node's data has an unknown privacy cost: do not train on it "
           "again before your privacy auditor has looked at it.")


def canonical(entry: dict) -> bytes:
    try:
        return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except ValueError:
        raise LedgerError("a ledger entry holds NaN or infinity, which strict JSON cannot: record a round "
                          "without DP with no_dp_fields() (epsilon null).") from None


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _no_constants(name: str):
    raise ValueError(f"{name} is not strict JSON")


def parse(line: bytes) -> dict:
    """One line as a JSON object; ValueError if it is not strict JSON or not an object."""
    entry = json.loads(line, parse_constant=_no_constants)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    return entry


def no_dp_fields(sample_rate: float, steps: int) -> dict:
    """The mechanism fields of a round trained WITHOUT DP: no noise, epsilon null (= infinite)."""
    return {"sample_rate": float(sample_rate), "noise_multiplier": 0.0, "steps": int(steps), "epsilon": None}


def version(entry: dict) -> int:
    """The format version of a line (1: written before versions existed, no "version" field)."""
    return entry.get("version", 1) if isinstance(entry.get("version", 1), int) else 0


def type_problem(entry: dict) -> str | None:
    """The first missing, unknown or mistyped field, or None."""
    if "version" in entry and (type(entry["version"]) is not int or entry["version"] not in (2, 3)):
        return (f"unknown ledger format version {entry['version']!r} (this fedchat reads versions 1 to {VERSION}): "
                "upgrade fedchat to read it")
    fields = FIELDS if version(entry) == 1 else {**FIELDS, **V2_FIELDS}
    if version(entry) >= 3:
        fields = {**fields, **V3_FIELDS, **(DISTRIBUTED_FIELDS if entry.get("dp_mode") == "distributed" else {})}
    for name, types in fields.items():
        if name not in entry:
            return f"field '{name}' is missing"
        if not isinstance(entry[name], types) or (isinstance(entry[name], bool) and bool not in types):
            return f"field '{name}' has the wrong type ({type(entry[name]).__name__})"
    unknown = sorted(set(entry) - set(fields))
    return f"unknown fields {unknown}" if unknown else None


def range_problems(entry: dict) -> list[str]:
    """Values out of range in an entry whose types are right (see type_problem)."""
    e, out = entry, []

    def need(ok: bool, text: str) -> None:
        if not ok:
            out.append(text)

    for name in ("sample_rate", "noise_multiplier", "max_grad_norm", "delta", "target_epsilon"):
        if not math.isfinite(e[name]):
            return [f"{name} is not a finite number"]
    need(bool(e["node"].strip()), "node is empty")
    need(bool(e["run"].strip()), "run is empty")
    need(e["round"] >= 1, f"round {e['round']} is not >= 1")
    need(e["num_examples"] >= 1, f"num_examples {e['num_examples']} is not >= 1")
    need(0 < e["sample_rate"] <= 1, f"sample_rate {e['sample_rate']} is not in (0, 1]")
    need(e["noise_multiplier"] >= 0, f"noise_multiplier {e['noise_multiplier']} is negative")
    need(e["max_grad_norm"] > 0, f"max_grad_norm {e['max_grad_norm']} is not > 0")
    need(e["steps"] >= 1, f"steps {e['steps']} is not >= 1")
    need(0 < e["delta"] < 1, f"delta {e['delta']} is not in (0, 1)")
    if e["num_examples"] >= 1:
        need(e["delta"] < 1 / e["num_examples"], f"delta {e['delta']:g} is not below 1/num_examples = "
             f"1/{e['num_examples']}: such a delta allows leaking a whole record")
    need(e["accountant"] in ACCOUNTANTS, f"unknown accountant {e['accountant']!r}")
    need(e["target_epsilon"] > 0, f"target_epsilon {e['target_epsilon']} is not > 0")
    if e["noise_multiplier"] == 0:
        need(e["epsilon"] is None, "a round without noise must record epsilon null (infinite), not a number")
    elif e["epsilon"] is None:
        need(False, "epsilon is null but the round had noise: null is only for a round without DP")
    else:
        need(math.isfinite(e["epsilon"]) and e["epsilon"] >= 0,
             f"epsilon {e['epsilon']} is not a finite number >= 0 (a round without DP records null)")
    if version(e) >= 3:
        need(e["dp_mode"] in ("local", "distributed"), f"unknown dp_mode {e['dp_mode']!r}")
        need((e["local_epsilon"] is None) == (e["epsilon"] is None), "local_epsilon and epsilon must both be null "
             "(a round without DP) or both numbers")
        if e["dp_mode"] == "distributed":
            for name in DISTRIBUTED_FIELDS:
                need(math.isfinite(e[name]) and e[name] > 0, f"{name} {e[name]} is not a positive number")
            if all(math.isfinite(e[n]) for n in DISTRIBUTED_FIELDS):
                need(e["noise_counted"] > 0 and e["noise_share"] > 0, "a distributed round must count on noise")
    try:
        datetime.fromisoformat(e["time"])
    except ValueError:
        out.append(f"time {e['time']!r} is not an ISO 8601 time")
    need(bool(_HEX64.fullmatch(e["update_sha256"])), "update_sha256 is not 64 hex characters")
    need(bool(_HEX64.fullmatch(e["prev"])), "prev is not 64 hex characters")
    need(bool(_HEX128.fullmatch(e["signature"])), "signature is not 128 hex characters")
    return out


def check_line(line: bytes, prev: str, key: Ed25519PublicKey,
               key_name: str = "the node's ledger key") -> tuple[dict | None, list[str]]:
    """Check one line given the hash of the line before: (its entry or None, what is wrong with it)."""
    try:
        entry = parse(line)
    except ValueError:
        return None, ["not a strict JSON object (edited or corrupt)"]
    problem = type_problem(entry)
    if problem:
        return None, [problem]
    problems = range_problems(entry)
    if canonical(entry) != line:
        problems.append("not in canonical form: the line was rewritten")
    if entry["prev"] != prev:
        problems.append("hash chain broken (prev does not match the line before): a line was removed, inserted "
                        "or reordered")
    body = {k: v for k, v in entry.items() if k != "signature"}
    if not verify(key, canonical(body), entry["signature"]):
        problems.append(f"signature does not verify with {key_name}: an edited field, or signed with another key")
    return entry, problems


def read_lines(path: str | Path) -> list[bytes]:
    """The ledger's lines (without newlines); a missing ledger is empty."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise LedgerError(f"{path}: the last line is incomplete (no newline): the file was cut or edited. {RESTORE}")
    return data.split(b"\n")[:-1] if data else []


def read_entries(path: str | Path) -> list[dict]:
    """Parse every line, without checking chain or signatures (open_for_training and `fedchat audit` do)."""
    entries = []
    for number, line in enumerate(read_lines(path), 1):
        try:
            entry = parse(line)
        except ValueError:
            raise LedgerError(f"{path} line {number}: not a strict JSON object: the ledger is corrupt. "
                              f"{RESTORE}") from None
        if type_problem(entry):
            raise LedgerError(f"{path} line {number}: not a ledger entry ({type_problem(entry)}). {RESTORE}")
        entries.append(entry)
    return entries


def verify_lines(path: str | Path, lines: list[bytes], key: Ed25519PublicKey) -> list[dict]:
    """Every line checked (fields and ranges, canonical form, chain, signature, one node); the entries."""
    prev, entries = GENESIS, []
    for number, line in enumerate(lines, 1):
        entry, problems = check_line(line, prev, key)
        if not problems and entries and entry["node"] != entries[0]["node"]:
            problems = [f"node {entry['node']!r} differs from {entries[0]['node']!r} of line 1: two nodes' entries"]
        if not problems and entries and version(entry) < version(entries[-1]):
            problems = [f"format version {version(entry)} after version {version(entries[-1])}: lines are only ever "
                        "appended in the newest format, so this line was not written by fedchat's node"]
        if problems:
            raise LedgerError(f"{path} line {number}: {'; '.join(problems)}. The ledger does not verify. {RESTORE}")
        entries.append(entry)
        prev = line_hash(line)
    return entries


def head(path: str | Path) -> tuple[str, int]:
    """(hash of the last line, number of entries): the ledger's current commitment (not verified)."""
    lines = read_lines(path)
    return (line_hash(lines[-1]) if lines else GENESIS), len(lines)


def head_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".head")


def _read_head_file(path: Path) -> tuple[int, str] | None:
    where = head_path(path)
    if not where.exists():
        return None
    try:
        data = json.loads(where.read_bytes())
        count, last = int(data["entries"]), str(data["head"])
        if count < 0 or not _HEX64.fullmatch(last):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise LedgerError(f"{where} is corrupt: it should hold the ledger's entry count and last line hash. "
                          f"{RESTORE}") from None
    return count, last


def _write_head_file(path: Path, last: str, count: int) -> None:
    atomic_write_bytes(head_path(path), canonical({"entries": count, "head": last}) + b"\n")


def check_not_behind(path: Path, lines: list[bytes], count: int, last: str, who: str) -> None:
    """LedgerError unless `lines` (the ledger at `path`) hold the `count` entries `who` recorded, the last
    hashing to `last`."""
    if count == 0:
        return
    if not path.exists():
        raise LedgerError(f"{path} is missing, but {who} recorded {count} entries in it: the ledger was deleted or "
                          f"moved, and a missing ledger is never a fresh budget. {RESTORE}")
    if len(lines) < count:
        raise LedgerError(f"{path} has {len(lines)} entries, but {who} recorded {count}: the ledger was rolled back "
                          f"(an older copy restored) or cut, which would hide spent budget. {RESTORE}")
    if line_hash(lines[count - 1]) != last:
        raise LedgerError(f"{path} line {count} differs from the line {who} recorded there: the ledger was "
                          f"replaced or rewritten. {RESTORE}")


class LedgerSession:
    """A node's verified ledger, locked for one round: read `entries`, then `append` what was trained."""

    def __init__(self, path: Path, key: Ed25519PrivateKey, lines: list[bytes], entries: list[dict]):
        self.path, self._key, self._lines, self.entries = path, key, lines, entries
        self._open = True

    def head(self) -> tuple[str, int]:
        """(hash of the last line or GENESIS, number of entries)."""
        return (line_hash(self._lines[-1]) if self._lines else GENESIS), len(self._lines)

    def check_not_behind(self, count: int, last: str, who: str) -> None:
        """LedgerError unless this ledger holds the `count` entries `who` recorded, the last one hashing to `last`."""
        check_not_behind(self.path, self._lines, count, last, who)

    def append(self, entry: dict) -> dict:
        """Chain, sign and durably append one entry, then update the head file; return it as written."""
        if not self._open:
            raise LedgerError("the ledger session is closed: append inside `with open_for_training(...)`.")
        entry = {k: v for k, v in entry.items() if k not in ("prev", "signature")}
        entry["version"], entry["first_contact"] = VERSION, entry.get("first_contact", False)
        entry.setdefault("dp_mode", "local")
        entry.setdefault("local_epsilon", entry.get("epsilon"))  # local DP: the node's own noise is all there is
        entry["prev"], entry["signature"] = self.head()[0], "0" * 128
        problem = type_problem(entry)
        problems = [problem] if problem else range_problems(entry)
        if not problems and self.entries and entry["node"] != self.entries[0]["node"]:
            problems.append(f"node {entry['node']!r} differs from {self.entries[0]['node']!r}, this ledger's node")
        if problems:
            raise LedgerError(f"refusing to record an invalid ledger entry: {'; '.join(problems)}.")
        del entry["signature"]
        entry["signature"] = sign(self._key, canonical(entry))
        on_disk = self.path.read_bytes() if self.path.exists() else b""
        if on_disk != b"".join(line + b"\n" for line in self._lines):
            raise LedgerError(f"{self.path} changed on disk while this run held its lock: something outside fedchat "
                              f"writes to it. {RESTORE}")
        line = canonical(entry)
        atomic_write_bytes(self.path, on_disk + line + b"\n", mode=0o644)
        self._lines.append(line)
        self.entries.append(entry)
        _write_head_file(self.path, *self.head())
        return entry


def _lock(path: Path):
    """The ledger's lock, taken at once or a LedgerError: fail fast, never wait behind another run."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise LedgerError(f"another run is training on this node (the ledger {path} is locked"
                          f"{f' by process {holder}' if holder else ''}): one node trains one round at a time, "
                          "so two runs cannot both spend the same budget. Wait for the other run to finish, or "
                          "stop it, then retry.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def state_home() -> Path:
    """Where the budget's records outside any state dir live: the node's registry of its ledgers
    (client/ledger_registry.py) and the coordinator's ledger heads (server/ledger_heads.py).
    FEDCHAT_STATE_HOME, else $XDG_STATE_HOME/fedchat, else ~/.local/state/fedchat."""
    if os.environ.get("FEDCHAT_STATE_HOME"):
        return Path(os.environ["FEDCHAT_STATE_HOME"])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedchat"


def signing_key_for(path: str | Path, key_path: str | Path) -> Ed25519PrivateKey:
    """The node's ledger key; a key created here comes with an empty ledger head beside the ledger,
    so that from then on a ledger deleted together with nothing else is never a fresh budget."""
    path, key_path = Path(path), Path(key_path)
    if key_path.exists():
        return load_signing_key(key_path)
    key = load_or_create_signing_key(key_path)
    if not path.exists() and _read_head_file(path) is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_head_file(path, GENESIS, 0)
    return key


@contextlib.contextmanager
def open_for_training(path: str | Path, key: Ed25519PrivateKey, recorded: tuple[int, str] | None = None,
                      *, must_exist: bool = False) -> Iterator[LedgerSession]:
    """The node's ledger, exclusively locked and verified, for planning and recording one round.

    The lock (fcntl.flock on ledger.jsonl.lock) is held for the whole block: a second run on
    the same node fails at once with LedgerError. On entry every line is verified against
    key.public_key(); the ledger must not be missing or behind the head file beside it nor
    behind `recorded`, the (entry count, hash of that line) the coordinator last saw from
    this node (None: no coordinator record). With `must_exist` (the node's own rounds) a ledger
    missing together with its head file is refused too: the node's key (from `signing_key_for`)
    was created with a head, so both gone means deleted, or a state folder restored in part.
    Any failure raises LedgerError saying what to do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    session = None
    try:
        lines = read_lines(path)
        entries = verify_lines(path, lines, key.public_key())
        on_file = _read_head_file(path)
        if must_exist and on_file is None and not path.exists():
            raise LedgerError(f"{path} and its head file {head_path(path).name} are both missing, but this node's "
                              "ledger key exists: the ledger was deleted, and a missing ledger is never a fresh "
                              f"budget. {RESTORE} Only if this node has never trained with this key: create an "
                              f"empty ledger (touch {path}) and start again.")
        if on_file is not None:
            check_not_behind(path, lines, *on_file, who=f"this node ({head_path(path).name})")
        if recorded is not None:
            check_not_behind(path, lines, int(recorded[0]), str(recorded[1]), who="the coordinator")
        session = LedgerSession(path, key, lines, entries)
        if on_file is None or on_file[0] < len(lines):  # first use of a head file, or a crash
            _write_head_file(path, *session.head())
        yield session
    finally:
        if session is not None:
            session._open = False
        os.close(fd)  # releases the lock
