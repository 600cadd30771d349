"""The federation roster: who may take part in secure aggregation, by long-term identity key.

A roster lists every member's node name and Ed25519 identity key (a key of its own, not the ledger
key: docs/decisions/roster-identity-key.md) and the federation-wide colluder bound: how many members
may collude with the coordinator. Each node operator approves one roster by its SHA-256 in node.toml
(`fedchat roster approve`); a node takes part only in rounds whose every participant is on it.

A roster is never edited in place: adding or removing a member, rotating or revoking a key, or
changing the bound makes the next version, which names the SHA-256 of the one it replaces, and each
operator approves it again after reading what changed (`fedchat roster show NEW --against OLD`).

The hash is over the canonical JSON (sorted keys, no spaces), so a roster reformatted by hand keeps
its hash; `write_roster` writes exactly that form, so `sha256sum` of a written file gives it too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import RosterError
from shared.files import atomic_write_bytes

ROSTER_FORMAT = "fedchat-roster/1"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEY_HEX = re.compile(r"[0-9a-f]{64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FIELDS = ("format", "federation", "version", "colluder_bound", "members", "previous")
MEMBER_FIELDS = ("name", "identity_key")
REBUILD = "build rosters with `fedchat roster` (init, add, remove, rotate, set-colluders) rather than by hand"


def short_key(identity_key: str) -> str:
    """The first 16 hex digits of a key: enough to tell members apart on screen (approval is by full hash)."""
    return identity_key[:16]


@dataclass(frozen=True)
class Member:
    name: str  # the member's node name
    identity_key: str  # hex of the raw 32-byte Ed25519 public key

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise RosterError(f"member name {self.name!r} is not allowed: use 1 to 64 letters, digits, '.', '_' or "
                              "'-' (the node's node-name)")
        if not isinstance(self.identity_key, str) or not KEY_HEX.fullmatch(self.identity_key):
            raise RosterError(f"member {self.name}: identity key {self.identity_key!r} is not 64 lower-case hex "
                              "digits (the raw Ed25519 public key that `fedchat roster key` prints)")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.identity_key))
        except ValueError:
            raise RosterError(f"member {self.name}: {self.identity_key} is not an Ed25519 public key: ask the "
                              "member for the line `fedchat roster key` printed") from None

    @property
    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.identity_key))


@dataclass(frozen=True)
class Roster:
    federation: str
    version: int  # 1, 2, ...
    colluder_bound: int  # how many members may collude with the coordinator, federation-wide
    members: tuple[Member, ...]  # stored sorted by name
    previous: str | None  # SHA-256 of the version this one replaces (None for version 1)

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not NAME.fullmatch(self.federation):
            raise RosterError(f"federation name {self.federation!r} is not allowed: use 1 to 64 letters, digits, "
                              "'.', '_' or '-'")
        if type(self.version) is not int or self.version < 1:
            raise RosterError(f"roster version {self.version!r} must be a whole number, 1 or more")
        if self.version == 1 and self.previous is not None:
            raise RosterError("roster version 1 replaces nothing, so its 'previous' must be null; a later version "
                              "must have a version above 1")
        if self.version > 1 and (not isinstance(self.previous, str) or not SHA256_HEX.fullmatch(self.previous)):
            raise RosterError(f"roster version {self.version} must name the SHA-256 of the version it replaces "
                              f"in 'previous' (64 lower-case hex digits), got {self.previous!r}")
        members = tuple(self.members)
        if not members or not all(isinstance(m, Member) for m in members):
            raise RosterError("a roster needs at least one member, each with a name and an identity key")
        object.__setattr__(self, "members", tuple(sorted(members, key=lambda m: m.name)))
        seen_names: set[str] = set()
        seen_keys: dict[str, str] = {}
        for m in self.members:
            if m.name in seen_names:
                raise RosterError(f"member {m.name} is listed twice: each node appears once (to change its key, "
                                  "rotate it)")
            seen_names.add(m.name)
            if m.identity_key in seen_keys:
                raise RosterError(f"members {seen_keys[m.identity_key]} and {m.name} have the same identity key "
                                  f"{short_key(m.identity_key)}...: each node needs a key of its own (`fedchat roster "
                                  "key` on that node), or one node would count as two")
            seen_keys[m.identity_key] = m.name
        if type(self.colluder_bound) is not int or not 0 <= self.colluder_bound < len(self.members):
            raise RosterError(f"colluder bound {self.colluder_bound!r} must be a whole number from 0 to "
                              f"{len(self.members) - 1} (below the {len(self.members)} members): it counts the "
                              "members that may collude with the coordinator, and at least one must be honest. "
                              f"The largest minority is {(len(self.members) - 1) // 2}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": ROSTER_FORMAT, "federation": self.federation, "version": self.version,
                "colluder_bound": self.colluder_bound, "previous": self.previous,
                "members": [{"name": m.name, "identity_key": m.identity_key} for m in self.members]}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("ascii")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json()).hexdigest()

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise RosterError(f"{name!r} is not a member of federation {self.federation} (roster version {self.version}, "
                          f"members: {', '.join(m.name for m in self.members)}): ask the roster keeper to add it "
                          "(`fedchat roster add`), then approve the new roster")

    def by_key(self, identity_key_hex: str) -> Member | None:
        wanted = identity_key_hex.lower()
        return next((m for m in self.members if m.identity_key == wanted), None)

    @classmethod
    def from_json(cls, data: bytes, source: str = "roster") -> Roster:
        """Parse and validate a roster file's bytes; a RosterError says what is wrong and what to do."""
        try:
            value = json.loads(data, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise RosterError(f"{source}: the key {exc} appears twice in one object: readers could disagree on "
                              f"its value; {REBUILD}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RosterError(f"{source} is not JSON ({exc}): it is not a fedchat roster; {REBUILD}") from None
        if not isinstance(value, dict) or value.get("format") != ROSTER_FORMAT:
            found = value.get("format") if isinstance(value, dict) else type(value).__name__
            raise RosterError(f"{source} is not a fedchat roster (format {found!r}, expected {ROSTER_FORMAT!r}); "
                              f"{REBUILD}")
        problems = _unknown_or_missing(value, FIELDS, "")
        members = value.get("members")
        if not isinstance(members, list):
            problems.append(f"'members' must be a list of {{name, identity_key}} objects, got {members!r}")
            members = []
        for i, m in enumerate(members):
            if not isinstance(m, dict):
                problems.append(f"members[{i}] must be an object with 'name' and 'identity_key', got {m!r}")
            else:
                problems += _unknown_or_missing(m, MEMBER_FIELDS, f"members[{i}] ")
        if problems:
            raise RosterError(f"{source}: " + "; ".join(problems) + f"; {REBUILD}")
        try:
            return cls(federation=value["federation"], version=value["version"],
                       colluder_bound=value["colluder_bound"], previous=value["previous"],
                       members=tuple(Member(m["name"], m["identity_key"]) for m in members))
        except RosterError as exc:
            raise RosterError(f"{source}: {exc}") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key))
        out[key] = value
    return out


def _unknown_or_missing(obj: dict, expected: tuple[str, ...], where: str) -> list[str]:
    # unknown fields are refused, not ignored: what an operator approves must be all that a node reads
    problems = [f"{where}unknown field {key!r}" for key in obj if key not in expected]
    return problems + [f"{where}missing field {key!r}" for key in expected if key not in obj]


def load_roster(path: str | Path) -> Roster:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RosterError(f"cannot read the roster {path}: {exc.strerror}. Get the roster file from the roster "
                          "keeper, or fix the path ('roster' in node.toml's [node]).") from None
    return Roster.from_json(data, str(path))


def load_approved(path: str | Path, approved_sha256: str) -> Roster:
    """The roster at `path`, only if it is the one the node's operator approved (by SHA-256)."""
    approve = ("approve it with `fedchat roster approve NODE_TOML ROSTER` after checking `fedchat roster show "
               "ROSTER`")
    if not path or not approved_sha256:
        raise RosterError("this node has no approved roster ('roster' and 'roster-sha256' in node.toml's [node]): "
                          f"get the federation's roster from its roster keeper and {approve}.")
    path = Path(path)
    try:
        roster = load_roster(path)
    except RosterError as exc:
        raise RosterError(f"{exc} The node takes part in no round until it reads the roster its operator "
                          f"approved; to approve another one, {approve}.") from None
    if roster.sha256 != approved_sha256:
        raise RosterError(f"the roster {path} (federation {roster.federation}, version {roster.version}) has sha256 "
                          f"{roster.sha256}, but this node's operator approved {approved_sha256}: it was changed "
                          f"or replaced since. If the change is expected, {approve} (with --against the old file "
                          "to see what changed); otherwise put back the approved file.")
    return roster


def changes(old: Roster, new: Roster) -> list[str]:
    """What `new` changes against `old`, one line per change, for an operator to read before approving."""
    out: list[str] = []
    if old.federation != new.federation:
        out.append(f"federation: {old.federation} -> {new.federation} (a different federation)")
    out.append(f"version: {old.version} -> {new.version}")
    if new.sha256 == old.sha256:
        return out + ["no change: the same roster"]
    if new.previous != old.sha256:
        out.append(f"warning: version {new.version} does not name this roster (sha256 {old.sha256[:16]}...) as the "
                   f"one it replaces (previous {(new.previous or 'none')[:16]}): versions were skipped or the "
                   "history differs; ask the roster keeper why")
    if new.version <= old.version:
        out.append(f"warning: version {new.version} is not newer than {old.version}: an older or rival roster "
                   "(it could re-admit a removed member or a revoked key)")
    old_by_name = {m.name: m for m in old.members}
    new_by_name = {m.name: m for m in new.members}
    old_names_by_key = {m.identity_key: m.name for m in old.members}
    renamed = {}
    for name, m in new_by_name.items():
        if name not in old_by_name and old_names_by_key.get(m.identity_key) not in (None, *new_by_name):
            renamed[old_names_by_key[m.identity_key]] = name
    for name in sorted(old_by_name.keys() - new_by_name.keys()):
        key = short_key(old_by_name[name].identity_key)
        out.append(f"renamed member {name} -> {renamed[name]} (same key {key})" if name in renamed
                   else f"removed member {name} (key {key})")
    for name in sorted(new_by_name.keys() - old_by_name.keys()):
        if name not in renamed.values():
            out.append(f"added member {name} (key {short_key(new_by_name[name].identity_key)})")
    for name in sorted(old_by_name.keys() & new_by_name.keys()):
        before, after = old_by_name[name].identity_key, new_by_name[name].identity_key
        if before != after:
            out.append(f"rotated key of {name}: {short_key(before)} -> {short_key(after)}")
    if old.colluder_bound != new.colluder_bound:
        out.append(f"colluder bound: {old.colluder_bound} -> {new.colluder_bound} "
                   f"(of {len(old.members)} -> {len(new.members)} members)")
    return out


def write_roster(path: str | Path, roster: Roster) -> None:
    atomic_write_bytes(path, roster.to_json())
