"""The federation roster: its canonical hash, its validation, its version chain, and `fedchat roster`.

A node takes part in secure aggregation only with members of the roster its operator approved by hash,
so: any change to the roster changes its hash and is refused until approved again; a malformed roster
is refused with a message that says what to fix; and `fedchat roster approve` records exactly one
approval, refusing a roster that does not list the node's own identity key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from fedchat.cli import main as fedchat_main
from shared.crypto import create_identity_key, load_identity_key, new_signing_key, raw_public_hex
from shared.errors import ConfigError, RosterError
from shared.roster import (
    ROSTER_FORMAT,
    Member,
    Roster,
    changes,
    load_approved,
    load_roster,
    write_roster,
)

CONVERSATION = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def new_key_hex() -> str:
    return raw_public_hex(new_signing_key())


def make_roster(n: int = 3, bound: int = 1) -> Roster:
    return Roster("demo", 1, bound, tuple(Member(f"org-{i}", new_key_hex()) for i in range(1, n + 1)), None)


def roster_dict(roster: Roster) -> dict:
    return json.loads(roster.to_json())


# ------------------------------------------------------------------ the roster itself


def test_canonical_json_and_hash_are_stable():
    roster = make_roster()
    again = Roster.from_json(roster.to_json())
    assert again == roster and again.sha256 == roster.sha256
    # a reformatted file (indentation, key order, members out of order) is the same roster, same hash
    value = roster_dict(roster)
    value["members"].reverse()
    pretty = json.dumps(value, indent=4).encode()
    assert Roster.from_json(pretty).sha256 == roster.sha256
    assert json.loads(roster.to_json())["format"] == ROSTER_FORMAT
    assert [m.name for m in roster.members] == sorted(m.name for m in roster.members)
    value["members"].reverse()  # back in name order: the canonical form is exactly this
    assert roster.to_json() == json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def test_hash_changes_with_every_field():
    roster = make_roster(4)
    first = roster.members[0]
    variants = [
        dataclasses.replace(roster, federation="other"),
        dataclasses.replace(roster, version=2, previous="a" * 64),
        dataclasses.replace(roster, colluder_bound=2),
        dataclasses.replace(roster, members=roster.members[1:]),
        dataclasses.replace(roster, members=(Member("org-x", first.identity_key),) + roster.members[1:]),
        dataclasses.replace(roster, members=(Member(first.name, new_key_hex()),) + roster.members[1:]),
    ]
    hashes = {v.sha256 for v in variants} | {roster.sha256}
    assert len(hashes) == len(variants) + 1
    chained = dataclasses.replace(roster, version=2, previous="b" * 64)
    assert chained.sha256 != variants[1].sha256  # the previous hash is covered too


def test_member_lookup():
    roster = make_roster()
    member = roster.members[1]
    assert roster.member(member.name) == member
    assert roster.by_key(member.identity_key.upper()) == member
    assert roster.by_key(new_key_hex()) is None
    assert raw_public_hex(member.public_key) == member.identity_key
    with pytest.raises(RosterError, match="'org-9' is not a member of federation demo"):
        roster.member("org-9")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["members"].append(dict(d["members"][0], identity_key=new_key_hex())), "org-1 is listed twice"),
    (lambda d: d["members"].append({"name": "org-9", "identity_key": d["members"][0]["identity_key"]}),
     "have the same identity key"),
    (lambda d: d["members"][0].update(identity_key="zz" * 32), "not 64 lower-case hex digits"),
    (lambda d: d["members"][0].update(identity_key="ab" * 31), "not 64 lower-case hex digits"),
    (lambda d: d["members"][0].update(name="org 1"), "member name 'org 1' is not allowed"),
    (lambda d: d.update(colluder_bound=3), r"colluder bound 3 must be a whole number from 0 to 2 \(below the 3"),
    (lambda d: d.update(colluder_bound=-1), "colluder bound -1"),
    (lambda d: d.update(colluder_bound=True), "colluder bound True"),
    (lambda d: d.update(version=0), "version 0 must be a whole number, 1 or more"),
    (lambda d: d.update(version=2), "must name the SHA-256 of the version it replaces"),
    (lambda d: d.update(previous="c" * 64), "version 1 replaces nothing"),
    (lambda d: d.update(members=[]), "at least one member"),
    (lambda d: d.update(format="fedchat-roster/9"), "is not a fedchat roster"),
    (lambda d: d.update(extra=1), "unknown field 'extra'"),
    (lambda d: d.pop("colluder_bound"), "missing field 'colluder_bound'"),
    (lambda d: d["members"][0].update(role="admin"), r"members\[0\] unknown field 'role'"),
])
def test_malformed_rosters_are_refused_with_what_to_do(edit, message):
    value = roster_dict(make_roster())
    edit(value)
    with pytest.raises(RosterError, match=message):
        Roster.from_json(json.dumps(value).encode(), "r.json")


def test_unparseable_and_ambiguous_files_are_refused():
    with pytest.raises(RosterError, match="r.json is not JSON"):
        Roster.from_json(b"{not json", "r.json")
    text = make_roster().to_json().decode()
    doubled = text.replace('"colluder_bound":1', '"colluder_bound":1,"colluder_bound":0')
    with pytest.raises(RosterError, match="'colluder_bound' appears twice"):
        Roster.from_json(doubled.encode(), "r.json")
    assert issubclass(RosterError, ConfigError)  # the CLI prints it as a user error


def test_load_approved_refuses_anything_but_the_approved_file(tmp_path):
    roster = make_roster()
    path = tmp_path / "roster.json"
    write_roster(path, roster)
    assert path.read_bytes() == roster.to_json()
    assert load_approved(path, roster.sha256) == roster
    value = roster_dict(roster)
    value["colluder_bound"] = 0
    path.write_text(json.dumps(value))  # valid, but not what was approved
    with pytest.raises(RosterError, match=f"approved {roster.sha256}.*`fedchat roster approve"):
        load_approved(path, roster.sha256)
    path.write_text("{")
    with pytest.raises(RosterError, match="not JSON.*`fedchat roster approve"):
        load_approved(path, roster.sha256)
    with pytest.raises(RosterError, match="cannot read the roster"):
        load_approved(tmp_path / "missing.json", roster.sha256)
    with pytest.raises(RosterError, match="no approved roster"):
        load_approved(path, "")


def test_version_chain_and_changes():
    v1 = make_roster(3)
    added = Member("org-4", new_key_hex())
    v2 = Roster("demo", 2, 1, v1.members + (added,), v1.sha256)
    assert changes(v1, v2) == ["version: 1 -> 2", f"added member org-4 (key {added.identity_key[:16]})"]
    v3 = Roster("demo", 3, 1, tuple(m for m in v2.members if m.name != "org-2"), v2.sha256)
    assert changes(v2, v3)[1:] == [f"removed member org-2 (key {v2.member('org-2').identity_key[:16]})"]
    rotated = Member("org-1", new_key_hex())
    v4 = Roster("demo", 4, 1, (rotated,) + v3.members[1:], v3.sha256)
    assert changes(v3, v4)[1:] == [f"rotated key of org-1: {v3.member('org-1').identity_key[:16]} -> "
                                   f"{rotated.identity_key[:16]}"]
    v5 = dataclasses.replace(v4, version=5, previous=v4.sha256, colluder_bound=0)
    assert changes(v4, v5)[1:] == ["colluder bound: 1 -> 0 (of 3 -> 3 members)"]
    renamed = Roster("demo", 6, 0, (Member("org-one", v5.member("org-1").identity_key),) + v5.members[1:],
                     v5.sha256)
    assert changes(v5, renamed)[1:] == [f"renamed member org-1 -> org-one (same key {rotated.identity_key[:16]})"]
    # skipping versions, or going back to an older one, is flagged
    assert any("does not name this roster" in line for line in changes(v1, v3))
    assert any("is not newer than" in line for line in changes(v3, v2))
    assert changes(v2, v2)[-1] == "no change: the same roster"


# ------------------------------------------------------------------ identity keys


def test_identity_key_is_made_once_and_never_created_on_load(tmp_path):
    path = tmp_path / "state" / "identity-key.pem"
    with pytest.raises(RosterError, match="no identity key at .*`fedchat roster key --out"):
        load_identity_key(path)
    assert not path.exists()
    key = create_identity_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert raw_public_hex(load_identity_key(path)) == raw_public_hex(key)
    assert path.with_suffix(".pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = path.read_bytes()
    with pytest.raises(RosterError, match="refusing to overwrite"):
        create_identity_key(path)
    assert path.read_bytes() == before
    (tmp_path / "other.pem").write_text("not a key")
    with pytest.raises(RosterError, match="not an unencrypted PEM private key"):
        load_identity_key(tmp_path / "other.pem")


# ------------------------------------------------------------------ `fedchat roster`


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = fedchat_main(["roster", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def make_key(capsys, path: Path, name: str) -> str:
    code, out, _ = run(capsys, "key", "--out", path, "--name", name)
    assert code == 0
    hex_key = raw_public_hex(load_identity_key(path))
    assert f"--member {name}={hex_key}" in out
    return hex_key


def node_toml(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    path = folder / "node.toml"
    path.write_text(f'# the operator\'s comment\n[node]\nnode-name = "{name}"\ndata-path = "d.jsonl"\n'
                    'state-dir = "state"  # kept\n\n[connection]\nsuperlink = "127.0.0.1:9093"\ninsecure = true\n')
    return path


def test_cli_round_trip(tmp_path, capsys):
    nodes = {f"org-{i}": tmp_path / f"node-{i}" for i in (1, 2, 3, 4)}
    keys = {name: make_key(capsys, folder / "state" / "identity-key.pem", name) for name, folder in nodes.items()}
    code, _, err = run(capsys, "key", "--out", nodes["org-1"] / "state" / "identity-key.pem")
    assert code == 2 and "refusing to overwrite" in err

    # the roster keeper: the first version of three members, by hex and by identity-key.pub
    v1_path = tmp_path / "roster-v1.json"
    code, out, _ = run(capsys, "init", "--federation", "demo", "--member", f"org-1={keys['org-1']}",
                       "--member", f"org-2={keys['org-2']}",
                       "--member", f"org-3={nodes['org-3'] / 'state' / 'identity-key.pub'}", "--out", v1_path)
    assert code == 0 and "colluder bound: 1 (default: the largest minority of 3 members" in out
    v1 = load_roster(v1_path)
    assert (v1.version, v1.colluder_bound, v1.previous) == (1, 1, None)
    assert {m.name: m.identity_key for m in v1.members} == {n: keys[n] for n in ("org-1", "org-2", "org-3")}
    code, out, _ = run(capsys, "show", v1_path)
    assert code == 0 and v1.sha256 in out and keys["org-2"][:16] in out and "colluder bound  1" in out

    # every operator approves version 1; org-4 is not on it
    for name in ("org-1", "org-2", "org-3"):
        code, out, _ = run(capsys, "approve", node_toml(nodes[name], name), v1_path)
        assert code == 0, out
    org1 = nodes["org-1"] / "node.toml"
    node = tomllib.loads(org1.read_text())["node"]
    assert (node["roster"], node["roster-sha256"]) == (str(v1_path.resolve()), v1.sha256)
    code, _, err = run(capsys, "approve", node_toml(nodes["org-4"], "org-4"), v1_path)
    assert code == 2 and "not approved" in err and f"--member org-4={keys['org-4']}" in err
    assert "roster" not in tomllib.loads((nodes["org-4"] / "node.toml").read_text())["node"]

    # version 2 adds org-4; org-1 approves it: the new approval replaces the old one
    v2_path = tmp_path / "roster-v2.json"
    code, out, _ = run(capsys, "add", v1_path, "--member", f"org-4={keys['org-4']}", "--out", v2_path)
    assert code == 0 and "added member org-4" in out
    v2 = load_roster(v2_path)
    assert (v2.version, v2.previous) == (2, v1.sha256)
    code, out, _ = run(capsys, "show", v2_path, "--against", v1_path)
    assert code == 0 and f"added member org-4 (key {keys['org-4'][:16]})" in out
    code, out, _ = run(capsys, "approve", org1, v2_path)
    assert code == 0 and "changes against the roster approved before" in out and "added member org-4" in out
    text = org1.read_text()
    node = tomllib.loads(text)["node"]
    assert (node["roster"], node["roster-sha256"]) == (str(v2_path.resolve()), v2.sha256)
    assert text.count("roster-sha256") == 1 and v1.sha256 not in text
    assert "# the operator's comment" in text and 'state-dir = "state"  # kept' in text
    assert tomllib.loads(text)["connection"]["superlink"] == "127.0.0.1:9093"
    code, out, _ = run(capsys, "approve", node_toml(nodes["org-4"], "org-4"), v2_path)
    assert code == 0

    # the node config reads what approve wrote
    from fedchat.federation.service_config import read_node_file

    nf = read_node_file(org1)
    assert load_approved(nf.node.roster, nf.node.roster_sha256) == v2

    # later versions: remove, rotate, set-colluders, each chained to the one before
    v3_path, v4_path, v5_path = (tmp_path / f"roster-v{i}.json" for i in (3, 4, 5))
    assert run(capsys, "remove", v2_path, "--member", "org-3", "--out", v3_path)[0] == 0
    new_key = new_key_hex()
    assert run(capsys, "rotate", v3_path, "--member", f"org-2={new_key}", "--out", v4_path)[0] == 0
    code, out, _ = run(capsys, "set-colluders", v4_path, "0", "--out", v5_path)
    assert code == 0 and "colluder bound: 1 -> 0" in out
    chain = [load_roster(p) for p in (v2_path, v3_path, v4_path, v5_path)]
    assert all(b.previous == a.sha256 and b.version == a.version + 1 for a, b in zip(chain, chain[1:]))
    assert [m.name for m in chain[1].members] == ["org-1", "org-2", "org-4"]
    assert chain[2].member("org-2").identity_key == new_key
    code, _, err = run(capsys, "add", v5_path, "--member", f"org-5={new_key_hex()}", "--out", v5_path)
    assert code == 2 and "exists: refusing to replace it" in err


def test_cli_refusals(tmp_path, capsys):
    keys = [new_key_hex() for _ in range(3)]
    members = [f"--member=org-{i}={k}" for i, k in enumerate(keys, 1)]
    code, _, err = run(capsys, "init", "--federation", "demo", *members, "--colluders", "3", "--out",
                       tmp_path / "r.json")
    assert code == 2 and "--colluders 3: the colluder bound must be from 0 to 2" in err
    code, _, err = run(capsys, "init", "--federation", "demo", *members, f"--member=org-4={keys[0]}", "--out",
                       tmp_path / "r.json")
    assert code == 2 and "members org-1 and org-4 have the same identity key" in err
    code, _, err = run(capsys, "init", "--federation", "demo", "--member", "org-1=abc", "--out", tmp_path / "r.json")
    assert code == 2 and "neither an identity key (64 hex digits) nor a file" in err
    private = tmp_path / "k.pem"
    create_identity_key(private)
    code, _, err = run(capsys, "init", "--federation", "demo", "--member", f"org-1={private}", "--out",
                       tmp_path / "r.json")
    assert code == 2 and "is a PRIVATE key" in err
    assert not (tmp_path / "r.json").exists()

    assert run(capsys, "init", "--federation", "demo", *members, "--out", tmp_path / "r.json")[0] == 0
    code, _, err = run(capsys, "remove", tmp_path / "r.json", "--member", "org-1", "--member", "org-2",
                       "--out", tmp_path / "r2.json")
    assert code == 2 and "colluder bound 1 is not below the 1 members left" in err
    code, _, err = run(capsys, "add", tmp_path / "r.json", "--member", f"org-1={new_key_hex()}",
                       "--out", tmp_path / "r2.json")
    assert code == 2 and "already a member" in err and "rotate" in err
    code, _, err = run(capsys, "rotate", tmp_path / "r.json", "--member", f"org-9={new_key_hex()}",
                       "--out", tmp_path / "r2.json")
    assert code == 2 and "'org-9' is not a member" in err

    # a node whose name differs from the roster's name for its key: approved, with a warning
    folder = tmp_path / "node"
    path = node_toml(folder, "hospital-a")
    create_identity_key(folder / "state" / "identity-key.pem")
    hex_key = raw_public_hex(load_identity_key(folder / "state" / "identity-key.pem"))
    assert run(capsys, "add", tmp_path / "r.json", "--member", f"org-4={hex_key}", "--out",
               tmp_path / "r2.json")[0] == 0
    code, _, err = run(capsys, "approve", path, tmp_path / "r2.json")
    assert code == 0 and "node-name is 'hospital-a', but the roster lists this node's key as 'org-4'" in err
    # a node without an identity key yet: approved, with a warning to make and send one
    other = node_toml(tmp_path / "new-node", "org-5")
    code, _, err = run(capsys, "approve", other, tmp_path / "r2.json")
    assert code == 0 and "no identity key at" in err and "`fedchat roster key --out" in err
