"""`fedchat roster ...`: identity keys, the federation roster's versions, and a node operator's approval of one.

Who does what: each node operator makes an identity key (`key`) and sends its public hex to the roster
keeper; the roster keeper builds the roster (`init`) and each later version (`add`, `remove`, `rotate`,
`set-colluders`) and hands the file out; each operator reads it (`show`, `--against` the version before)
and approves it by hash in node.toml (`approve`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from pathlib import Path

from shared.crypto import create_identity_key, load_identity_key, raw_public_hex
from shared.errors import RosterError
from shared.files import atomic_write_text
from shared.roster import KEY_HEX, Member, Roster, changes, load_roster, short_key, write_roster


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def public_key_hex(value: str, name: str) -> str:
    """A member's identity key from the command line: the hex `fedchat roster key` printed, or a file holding
    that hex or the public key in PEM (identity-key.pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if KEY_HEX.fullmatch(value.strip().lower()):
        return value.strip().lower()
    path = Path(value)
    if not path.is_file():
        raise RosterError(f"member {name}: {value!r} is neither an identity key (64 hex digits) nor a file: give the "
                          "hex that the member's `fedchat roster key` printed, or its identity-key.pub")
    data = path.read_bytes()
    if KEY_HEX.fullmatch(data.strip().lower().decode("ascii", "replace")):
        return data.strip().lower().decode("ascii")
    if b"PRIVATE KEY" in data:
        raise RosterError(f"member {name}: {path} is a PRIVATE key: it must never leave the member's node. Ask for "
                          "its public key (identity-key.pub, or the hex `fedchat roster key` printed), and have the "
                          "member make a new key, since this one was exposed")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise RosterError(f"member {name}: {path} is not a PEM public key: give the member's identity-key.pub, or "
                          "the hex `fedchat roster key` printed") from None
    if not isinstance(key, Ed25519PublicKey):
        raise RosterError(f"member {name}: {path} is not an Ed25519 public key (roster identities are Ed25519; the "
                          "node's TLS/auth key is not one): give the member's identity-key.pub")
    return raw_public_hex(key)


def parse_member(spec: str) -> Member:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise RosterError(f"--member {spec!r}: give NAME=KEY, KEY being the hex `fedchat roster key` printed or the "
                          "member's identity-key.pub")
    return Member(name, public_key_hex(value, name))


def print_roster(roster: Roster, source: str | Path, full_keys: bool = False) -> None:
    n = len(roster.members)
    print(f"roster {source}")
    print(f"  federation      {roster.federation}")
    print(f"  version         {roster.version}" + (f" (replaces sha256 {roster.previous})" if roster.previous else ""))
    print(f"  colluder bound  {roster.colluder_bound}: up to {roster.colluder_bound} of the {n} members may collude "
          "with the coordinator")
    print(f"  sha256          {roster.sha256}")
    print(f"  members         {n}")
    width = max(len(m.name) for m in roster.members)
    for m in roster.members:
        print(f"    {m.name:<{width}}  {m.identity_key if full_keys else short_key(m.identity_key) + '...'}")
    if n - roster.colluder_bound < 2:
        _warn(f"with {n} members and up to {roster.colluder_bound} colluding, a round may hold fewer than two honest "
              "members, and nodes refuse such rounds: add members or lower the bound")


def _write_version(args, roster: Roster, old: Roster | None = None) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise RosterError(f"{out} exists: refusing to replace it (nodes may have approved it, and keeping each "
                          "version lets operators see what changed). Write the new version to a new file, e.g. "
                          f"roster-v{roster.version}.json, or add --force.")
    write_roster(out, roster)
    print_roster(roster, out)
    if old is not None:
        print(f"changes against version {old.version}:")
        for line in changes(old, roster):
            print(f"  - {line}")
    print(f"wrote {out}. Hand it to every node operator, and tell them its sha256 by a second channel; each checks "
          f"it (`fedchat roster show {out.name}" + (" --against OLD_ROSTER" if old is not None else "")
          + f"`) and approves it (`fedchat roster approve NODE_TOML {out.name}`).")
    return 0


def _listed(roster: Roster, name: str, source: str) -> Member:
    member = next((m for m in roster.members if m.name == name), None)
    if member is None:
        raise RosterError(f"{name!r} is not a member of {source} (members: {', '.join(m.name for m in roster.members)})"
                          ": check the name (`fedchat roster show`)")
    return member


def _next_version(old: Roster, members, colluder_bound: int | None = None) -> Roster:
    members = tuple(members)
    bound = old.colluder_bound if colluder_bound is None else colluder_bound
    if colluder_bound is None and bound >= len(members):
        raise RosterError(f"the colluder bound {bound} is not below the {len(members)} members left: give a lower "
                          f"one with --colluders (the largest minority is {(len(members) - 1) // 2})")
    return Roster(old.federation, old.version + 1, bound, members, old.sha256)


# ------------------------------------------------------------------ commands


def cmd_key(args) -> int:
    out = Path(args.out)
    if out.exists():
        try:
            existing = f" (its public key: {raw_public_hex(load_identity_key(out))})"
        except RosterError:
            existing = ""
        raise RosterError(f"{out} exists{existing}: refusing to overwrite an identity key (the roster may list it). "
                          "Use it, or write a new key to another path and ask the roster keeper to rotate your key "
                          "(`fedchat roster rotate`).")
    key = create_identity_key(out)
    hex_key = raw_public_hex(key)
    print(f"wrote {out} (your node's identity key, mode 0600: it never leaves this host) and "
          f"{out.with_suffix('.pub')} (its public key)")
    print(f"public key: {hex_key}")
    print("Send this line to the roster keeper, and confirm it by a second channel (phone, a signed e-mail):")
    print(f"  --member {args.name or 'NODE_NAME'}={hex_key}")
    if args.name is None:
        print("(NODE_NAME: your node's node-name in node.toml)")
    return 0


def cmd_init(args) -> int:
    members = tuple(parse_member(spec) for spec in args.member)
    default = (len(members) - 1) // 2
    bound = default if args.colluders is None else args.colluders
    if bound >= len(members) or bound < 0:
        raise RosterError(f"--colluders {bound}: the colluder bound must be from 0 to {len(members) - 1} (below the "
                          f"{len(members)} members, so at least one is honest); the largest minority is {default}")
    roster = Roster(args.federation, 1, bound, members, None)
    if args.colluders is None:
        print(f"colluder bound: {bound} (default: the largest minority of {len(members)} members; set it with "
              "--colluders N)")
    if len(members) < 3:
        _warn(f"{len(members)} member(s): secure aggregation needs at least 3 nodes in a round")
    return _write_version(args, roster)


def cmd_add(args) -> int:
    old = load_roster(args.roster)
    added = [parse_member(spec) for spec in args.member]
    for m in added:
        if any(m.name == o.name for o in old.members):
            raise RosterError(f"{m.name} is already a member: to change its key, use `fedchat roster rotate`")
    new = _next_version(old, old.members + tuple(added), args.colluders)
    if args.colluders is None and new.colluder_bound < (len(new.members) - 1) // 2:
        print(f"colluder bound stays {new.colluder_bound} (the largest minority of {len(new.members)} members is "
              f"{(len(new.members) - 1) // 2}; change it with --colluders N)")
    return _write_version(args, new, old)


def cmd_remove(args) -> int:
    old = load_roster(args.roster)
    gone = {_listed(old, name, args.roster).name for name in args.member}
    if len(gone) == len(old.members):
        raise RosterError("that would remove every member: a roster keeps at least one (start a new federation "
                          "with `fedchat roster init` instead)")
    return _write_version(args, _next_version(old, [m for m in old.members if m.name not in gone], args.colluders),
                          old)


def cmd_rotate(args) -> int:
    old = load_roster(args.roster)
    new_keys = {}
    for spec in args.member:
        m = parse_member(spec)
        if _listed(old, m.name, args.roster).identity_key == m.identity_key:
            raise RosterError(f"{m.name}: the new key is the key the roster already lists: give the new key's hex")
        new_keys[m.name] = m.identity_key
    members = [Member(m.name, new_keys.get(m.name, m.identity_key)) for m in old.members]
    return _write_version(args, _next_version(old, members), old)


def cmd_set_colluders(args) -> int:
    old = load_roster(args.roster)
    if args.colluders == old.colluder_bound:
        raise RosterError(f"the colluder bound is already {old.colluder_bound}: nothing to change")
    if not 0 <= args.colluders < len(old.members):
        raise RosterError(f"the colluder bound must be from 0 to {len(old.members) - 1} (below the "
                          f"{len(old.members)} members); the largest minority is {(len(old.members) - 1) // 2}")
    return _write_version(args, _next_version(old, old.members, args.colluders), old)


def cmd_show(args) -> int:
    roster = load_roster(args.roster)
    print_roster(roster, args.roster, full_keys=args.full)
    if args.against:
        old = load_roster(args.against)
        print(f"changes against {args.against} (version {old.version}, sha256 {old.sha256}):")
        for line in changes(old, roster):
            print(f"  - {line}")
    return 0


# ------------------------------------------------------------------ approval in node.toml


def identity_key_path(nf) -> Path:
    """The node's identity key: node.toml's identity-key (relative to node.toml's folder), else in its state-dir."""
    return nf.identity_key_path


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string (checked after writing)


def set_node_keys(text: str, values: dict[str, str], comment: str) -> str:
    """node.toml's text with `values` set in its [node] section: earlier lines for those keys are dropped (a new
    approval replaces the old one), everything else, comments included, is kept."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*\[\s*node\s*\]\s*(#.*)?$", line)), None)
    if start is None:
        raise RosterError("node.toml has no [node] section to record the roster in: add one (see "
                          "deploy/examples/node.toml)")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
    setting = re.compile(r"^\s*[\"']?(" + "|".join(map(re.escape, values)) + r")[\"']?\s*=")
    body = [line for line in lines[start + 1:end] if not setting.match(line)]
    last = max((i for i, line in enumerate(body) if line.strip()), default=-1)
    new = [f"{key} = {_toml_string(value)}" for key, value in values.items()]
    new[-1] += f"  # {comment}"
    body = body[:last + 1] + new + body[last + 1:]
    return "\n".join(lines[:start + 1] + body + lines[end:]) + "\n"


def cmd_approve(args) -> int:
    from fedchat.federation.service_config import read_node_file

    nf = read_node_file(args.node_toml)
    roster_path = Path(args.roster).resolve()
    roster = load_roster(roster_path)
    print_roster(roster, roster_path)

    before_path, before_sha = nf.node.roster, nf.node.roster_sha256
    if before_sha == roster.sha256:
        print(f"this roster is already the one approved in {nf.path}")
    elif before_sha:
        try:
            before = load_roster(before_path)
        except RosterError:
            before = None
        if before is not None and before.sha256 == before_sha:
            print(f"changes against the roster approved before ({before_path}, version {before.version}):")
            for line in changes(before, roster):
                print(f"  - {line}")
        else:
            chained = "names it as the version it replaces" if roster.previous == before_sha else \
                "does NOT name it as the version it replaces: ask the roster keeper why"
            print(f"the roster approved before (sha256 {before_sha}) is no longer at {before_path or '?'}, so what "
                  f"changed cannot be listed (keep each version in a file of its own); this roster {chained}")
    else:
        print(f"no roster was approved in {nf.path} before")

    key_path = identity_key_path(nf)
    node_name = nf.node.node_name
    if key_path.exists():
        hex_key = raw_public_hex(load_identity_key(key_path))
        member = roster.by_key(hex_key)
        if member is None:
            raise RosterError(f"not approved: this node's identity key {key_path} (public key {hex_key}) is not in "
                              f"the roster, so the node could take part in no round. Did you send it to the roster "
                              f"keeper? Send them the line `--member {node_name or 'NODE_NAME'}={hex_key}` (they "
                              "add it with `fedchat roster add` or `rotate`), then approve the roster they send back.")
        print(f"this node: identity key {key_path} is member {member.name} ({short_key(hex_key)}...)")
        if node_name and member.name != node_name:
            _warn(f"node.toml's node-name is {node_name!r}, but the roster lists this node's key as {member.name!r}: "
                  "set node-name to the roster's name, or ask the roster keeper to fix the name")
    else:
        _warn(f"no identity key at {key_path} yet: make one (`fedchat roster key --out {key_path}`), send its public "
              "key to the roster keeper, and approve the roster that lists it; until then the node takes part in "
              "no round")
        if node_name and all(m.name != node_name for m in roster.members):
            _warn(f"node-name {node_name!r} is not a member of this roster")

    stricter = nf.node.secagg_colluders
    if stricter >= len(roster.members):
        _warn(f"node.toml's secagg-colluders = {stricter} is not below the roster's {len(roster.members)} members: "
              "this node would refuse every round; lower it, or set -1 for the roster's bound")
    elif 0 <= stricter < roster.colluder_bound:
        _warn(f"node.toml's secagg-colluders = {stricter} is below the roster's bound {roster.colluder_bound}: a "
              "node can only be stricter than its federation; set -1 (the roster's bound) or a larger value")

    written = record_approval(nf, roster_path, roster)
    replaced = f"; the roster approved before (sha256 {before_sha}) no longer is" \
        if before_sha and before_sha != roster.sha256 else ""
    print(f"{written}: approved roster sha256 {roster.sha256} (federation {roster.federation}, version "
          f"{roster.version}){replaced}. The node uses it from its next start (`fedchat node start`).")
    return 0


def record_approval(nf, roster_path: Path, roster: Roster) -> Path:
    """Record `roster` (at `roster_path`) as the one the node's operator approved, replacing the approval before:
    in the file node.toml's [approval] roster-file names (a read-only node.toml), else in node.toml's [node]
    (the rest of node.toml, comments included, is kept). Returns the file written."""
    comment = f"federation {roster.federation}, version {roster.version} (`fedchat roster approve`)"
    if nf.roster_approval is not None:
        target = nf.roster_approval
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = os.stat(target).st_mode & 0o777 if target.exists() else 0o644
        atomic_write_text(target, f"# The federation roster this node's operator approved: {comment}.\n"
                          f"roster = {_toml_string(str(roster_path))}\nroster-sha256 = \"{roster.sha256}\"\n",
                          mode=mode)
        return target
    text = nf.path.read_text(encoding="utf-8")
    updated = set_node_keys(text, {"roster": str(roster_path), "roster-sha256": roster.sha256}, comment)
    try:
        node = tomllib.loads(updated)["node"]
        ok = node["roster"] == str(roster_path) and node["roster-sha256"] == roster.sha256
    except (tomllib.TOMLDecodeError, KeyError):
        ok = False
    if not ok:
        raise RosterError(f"cannot record the approval in {nf.path} without breaking it (an unusual [node] section "
                          f"or path?): set these two lines in its [node] section yourself:\n  roster = "
                          f"{_toml_string(str(roster_path))}\n  roster-sha256 = \"{roster.sha256}\"")
    atomic_write_text(nf.path, updated, mode=os.stat(nf.path).st_mode & 0o777)
    return nf.path


def add_roster_command(sub: argparse._SubParsersAction) -> None:
    roster = sub.add_parser("roster", help="the federation roster: identity keys, versions, a node's approval",
                            description=__doc__.strip().splitlines()[0])
    rsub = roster.add_subparsers(dest="action", required=True)

    key = rsub.add_parser("key", help="make this node's identity key (0600, never overwritten); print the line to "
                                      "send to the roster keeper")
    key.add_argument("--out", required=True, help="where to write it, e.g. STATE_DIR/identity-key.pem (the default "
                                                  "path node.toml's identity-key points at)")
    key.add_argument("--name", help="your node-name, to fill in the line for the roster keeper")
    key.set_defaults(func=cmd_key)

    def member_arg(p, help_text):
        p.add_argument("--member", action="append", required=True, metavar="NAME=KEY", help=help_text)

    def out_args(p):
        p.add_argument("--out", required=True, help="the new roster file (each version in a file of its own)")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")

    key_help = ("a member: its node-name and identity key (the hex `fedchat roster key` printed, or its "
                "identity-key.pub); repeat per member")
    init = rsub.add_parser("init", help="the first version of a federation's roster")
    init.add_argument("--federation", required=True, help="the federation's name")
    init.add_argument("--colluders", type=int, help="how many members may collude with the coordinator (default: "
                                                    "the largest minority, (members - 1) // 2)")
    member_arg(init, key_help)
    out_args(init)
    init.set_defaults(func=cmd_init)

    add = rsub.add_parser("add", help="the next version, with new members")
    add.add_argument("roster", help="the current roster")
    member_arg(add, key_help)
    add.add_argument("--colluders", type=int, help="a new colluder bound (default: unchanged)")
    out_args(add)
    add.set_defaults(func=cmd_add)

    remove = rsub.add_parser("remove", help="the next version, without some members (revokes their keys)")
    remove.add_argument("roster", help="the current roster")
    member_arg(remove, "a member's name; repeat per member")
    remove.add_argument("--colluders", type=int, help="a new colluder bound (default: unchanged)")
    out_args(remove)
    remove.set_defaults(func=cmd_remove)

    rotate = rsub.add_parser("rotate", help="the next version, with new identity keys for members (revokes the old)")
    rotate.add_argument("roster", help="the current roster")
    member_arg(rotate, "a member's name and new identity key; repeat per member")
    out_args(rotate)
    rotate.set_defaults(func=cmd_rotate)

    colluders = rsub.add_parser("set-colluders", help="the next version, with another colluder bound")
    colluders.add_argument("roster", help="the current roster")
    colluders.add_argument("colluders", type=int, help="how many members may collude with the coordinator")
    out_args(colluders)
    colluders.set_defaults(func=cmd_set_colluders)

    show = rsub.add_parser("show", help="a roster's members, keys, colluder bound, version and sha256")
    show.add_argument("roster")
    show.add_argument("--against", metavar="OLD", help="also list what changed against an earlier roster")
    show.add_argument("--full", action="store_true", help="print whole identity keys, not their first 16 digits")
    show.set_defaults(func=cmd_show)

    approve = rsub.add_parser("approve", help="approve a roster for a node: record its path and sha256 in "
                                              "node.toml's [node] (replacing the roster approved before)")
    approve.add_argument("node_toml", metavar="NODE_TOML", help="the node's config file")
    approve.add_argument("roster", metavar="ROSTER", help="the roster file to approve")
    approve.set_defaults(func=cmd_approve)
