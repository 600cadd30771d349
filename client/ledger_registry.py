"""The node's registry of its ledgers, kept outside every state dir: which ledger holds the budget of
which conversations.

A ledger alone cannot tell that it is not the only one: a state dir restored from a backup (ledger and
head file together), a new or empty state dir, or a second node config over the same data file each
bring a ledger that verifies and shows budget left. The registry (one JSON record per ledger key, in
``ledger.state_home()/ledgers``, never in a state dir) remembers, for each ledger this host trained
with, the digest of every conversation it trained on and the ledger's head (entries, hash of the last
line) after its last round (node config ``ledger-registry`` names another folder). Before a round
the node checks, under the registry's lock:

* no other ledger claims any of these conversations (a new state dir, a second config, a copy with a
  new key): refused, naming the ledger that holds their budget;
* this ledger is not behind the head the registry recorded for its key (a restored backup): refused.

A conversation's digest is the SHA-256 of its canonical JSON line (keys sorted), so a data file that is
copied, reordered or extended is still recognised by the conversations it holds. What the registry
cannot see: a whole-machine restore (it is restored with the state dir) and the same conversations on
another host (docs/threat-model.md, row 6).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from shared import ledger
from shared.errors import LedgerError
from shared.files import atomic_write_bytes

MAX_EVENTS = 200
_digests: dict[tuple, frozenset[str]] = {}


def conversation_digests(data_path: str | Path) -> frozenset[str]:
    """One digest per conversation line of a JSONL data file (a line that is not JSON: its bytes)."""
    path = Path(data_path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _digests:
            digests = set()
            with path.open("rb") as f:
                for raw in f:
                    line = raw.strip()
                    if not line:
                        continue
                    try:
                        line = json.dumps(json.loads(line), sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=False).encode("utf-8")
                    except ValueError:
                        pass
                    digests.add(hashlib.sha256(line).hexdigest()[:32])
            _digests.clear()  # one data file per node process
            _digests[key] = frozenset(digests)
    except OSError as exc:
        raise LedgerError(f"cannot read the node's data file to check which ledger holds its budget: "
                          f"{exc.strerror}. Check data-path in the node config.") from None
    return _digests[key]


class LedgerRegistry:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def of(cls, folder: str = "") -> LedgerRegistry:
        """The node config's ledger-registry folder, else FEDCHAT_STATE_HOME/ledgers."""
        return cls(Path(folder) if folder else ledger.state_home() / "ledgers")

    def record_path(self, fingerprint: str) -> Path:
        return self.folder / f"{fingerprint}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The registry's lock, held for a check or an update only (never while a node trains)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / "registry.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot open the node's ledger registry {self.folder}: {exc.strerror}. It keeps the "
                              "budget of the node's data across state dirs: make it writable, or set "
                              "FEDCHAT_STATE_HOME to a folder outside every state dir.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def records(self) -> dict[str, dict]:
        out = {}
        for path in sorted(self.folder.glob("*.json")):
            try:
                record = json.loads(path.read_bytes())
                out[str(record["key"])] = record
            except (OSError, ValueError, KeyError, TypeError):
                raise LedgerError(f"the node's ledger registry record {path} is unreadable: it says which ledger "
                                  "holds the budget of which conversations. Restore it from a backup of the "
                                  "registry; never delete it to make a round run.") from None
        return out

    def _write(self, record: dict) -> None:
        record["events"] = record["events"][-MAX_EVENTS:]
        atomic_write_bytes(self.record_path(record["key"]), json.dumps(record, indent=1, sort_keys=True).encode())

    def _refuse_other_ledgers(self, records: dict, digests: frozenset[str], fingerprint: str, path: Path) -> None:
        for other, record in records.items():
            shared = len(digests & set(record.get("conversations", ()))) if other != fingerprint else 0
            if shared:
                raise LedgerError(
                    f"{shared} of the {len(digests)} conversations of this node's data file already have their "
                    f"budget in another ledger ({record.get('ledger')}, key {other[:16]}..., "
                    f"{record.get('entries', 0)} entries), not in {path}: a conversation has one privacy "
                    "budget for life, so a new, empty or second state dir over the same data is never a fresh "
                    "budget. Point state-dir (and ledger-key) back at that ledger. Only if that ledger never "
                    "trained on these conversations and never will: have your privacy auditor look at it, then "
                    f"remove its registry record {self.record_path(other)}.")

    def check(self, data_path: str | Path, path: Path, lines: list[bytes], fingerprint: str) -> None:
        """claim()'s refusals, registering nothing (the node's answer to "can you train this round?")."""
        digests = conversation_digests(data_path)
        with self._locked():
            records = self.records()
        self._refuse_other_ledgers(records, digests, fingerprint, path)
        if fingerprint in records:
            ledger.check_not_behind(path, lines, int(records[fingerprint]["entries"]),
                                    str(records[fingerprint]["head"]),
                                    who=f"this node's ledger registry ({self.record_path(fingerprint)})")

    def claim(self, data_path: str | Path, book: ledger.LedgerSession, fingerprint: str,
              first_contact: bool) -> Claim:
        """Check that `book` (open for a round) is the one ledger of the conversations in `data_path`
        and not behind what the registry recorded for it; register it for them. LedgerError if not."""
        digests = conversation_digests(data_path)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._locked():
            records = self.records()
            self._refuse_other_ledgers(records, digests, fingerprint, book.path)
            mine = records.get(fingerprint)
            head, count = book.head()
            events = list(mine["events"]) if mine else [{"time": now, "event": "registered", "entries": count}]
            if mine:
                book.check_not_behind(int(mine["entries"]), str(mine["head"]),
                                      who=f"this node's ledger registry ({self.record_path(fingerprint)})")
                if mine.get("ledger") != str(book.path.resolve()):
                    events.append({"time": now, "event": "moved", "from": mine.get("ledger"), "entries": count})
            if first_contact:
                events.append({"time": now, "event": "first-contact", "entries": count})
            if not mine or count >= int(mine["entries"]):
                entries_head = (count, head)
            else:
                entries_head = (int(mine["entries"]), str(mine["head"]))
            record = {"key": fingerprint, "ledger": str(book.path.resolve()), "entries": entries_head[0],
                      "head": entries_head[1], "events": events,
                      "conversations": sorted(digests | set(mine.get("conversations", ()) if mine else ()))}
            self._write(record)
        return Claim(self, fingerprint)


class Claim:
    """A ledger registered for a round's conversations; `update` records its head after the append."""

    def __init__(self, registry: LedgerRegistry, fingerprint: str) -> None:
        self.registry, self.fingerprint = registry, fingerprint

    def update(self, book: ledger.LedgerSession) -> None:
        head, count = book.head()
        with self.registry._locked():
            record = self.registry.records().get(self.fingerprint)
            if record is None:
                raise LedgerError(f"the node's ledger registry lost the record of {book.path} during the round: "
                                  "something outside fedchat changed it. Restore it from a backup of the registry.")
            if count >= int(record["entries"]):
                record["entries"], record["head"] = count, head
                self.registry._write(record)
