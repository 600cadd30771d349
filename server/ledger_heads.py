"""The coordinator's record of every node's ledger head, kept across runs, per ledger-key fingerprint.

A node reports its ledger head (entries, hash of the last line) and the fingerprint of its ledger key
with each update. The coordinator keeps the newest head per fingerprint in one file outside any run's
out-dir (``ledger.state_home()/coordinator-ledger-heads.json``) and, with each training instruction,
sends a node the head last recorded for the key that node id last signed with, in this run or an
earlier one. A node whose ledger is behind it (a state dir restored from a backup, or a copy trained
on elsewhere) refuses to train. A key the coordinator has never seen gets no head: the node's first
contact with this federation, recorded in its ledger line (``first_contact``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from shared import ledger
from shared.errors import LedgerError
from shared.files import atomic_write_bytes

log = logging.getLogger("fedchat.coordinator")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerHeads:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, path: str = "") -> LedgerHeads:
        """The run config's ledger-heads file, else FEDCHAT_STATE_HOME/coordinator-ledger-heads.json."""
        return cls(Path(path) if path else ledger.state_home() / "coordinator-ledger-heads.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LedgerError(f"cannot open the coordinator's ledger heads {self.path}: {exc.strerror}. Make its "
                              "folder writable or set FEDCHAT_STATE_HOME.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict:
        if not self.path.exists():
            return {"keys": {}, "node_ids": {}}
        try:
            data = json.loads(self.path.read_bytes())
            if not isinstance(data.get("keys"), dict) or not isinstance(data.get("node_ids"), dict):
                raise ValueError
            return data
        except (OSError, ValueError, AttributeError):
            raise LedgerError(f"the coordinator's ledger heads {self.path} are unreadable: restore the file from a "
                              "backup (nodes are held to the heads it records).") from None

    def for_node(self, node_id: int) -> tuple[int, str, str] | None:
        """(entries, head, key fingerprint) last recorded for the key this node id last signed with."""
        with self._locked():
            data = self._read()
        fingerprint = data["node_ids"].get(str(node_id))
        record = data["keys"].get(fingerprint) if fingerprint else None
        return (int(record["entries"]), str(record["head"]), fingerprint) if record else None

    def record(self, fingerprint: str, node_id: int, entries: int, head: str) -> None:
        """Keep a node's reported head (never an older one than recorded for its key)."""
        if not (isinstance(fingerprint, str) and _HEX64.fullmatch(fingerprint) and _HEX64.fullmatch(str(head))):
            return
        with self._locked():
            data = self._read()
            known = data["keys"].get(fingerprint)
            if known and int(known["entries"]) > int(entries):
                log.error("node %s reported %d ledger entries for key %s..., fewer than the %d recorded: kept the "
                          "record", node_id, entries, fingerprint[:16], int(known["entries"]))
                return
            data["keys"][fingerprint] = {"entries": int(entries), "head": str(head),
                                         "time": datetime.now(UTC).isoformat(timespec="seconds")}
            data["node_ids"][str(node_id)] = fingerprint
            atomic_write_bytes(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
