"""Node and coordinator config files: every problem reported, and the commands they start."""

import os
import shlex

import pytest

from fedchat.cli import main
from fedchat.federation.certs import write_certs
from fedchat.federation.deployment import superlink_command, supernode_command
from fedchat.federation.service_config import ConfigFileError, check_node_file, read_coordinator_file, read_node_file
from shared.crypto import create_identity_key, raw_public_hex
from shared.errors import ConfigError
from shared.roster import load_roster
from tests.support.data import conversation, write_jsonl

NODE_TOML = ('[node]\nnode-name = "org-1"\ndata-path = "data.jsonl"\nstate-dir = "state"\ntarget-delta = 1e-3\n'
             '{node}\n'
             '[connection]\nsuperlink = "127.0.0.1:9093"\nroot-certificates = "certs/ca.pem"\n'
             'auth-private-key = "certs/nodes/org-1"\nruntime-port = 9100\n\n'
             f'[approval]\napp-sha256 = ["{"ab" * 32}"]\n{{approval}}')


def _roster(folder, keys: dict[str, str], name: str = "roster-v1.json"):
    """`fedchat roster init` of these members (name -> identity public key hex) into FOLDER/NAME."""
    members = [f"--member={n}={k}" for n, k in keys.items()]
    assert main(["roster", "init", "--federation", "test", *members, "--out", str(folder / name)]) == 0
    return folder / name


@pytest.fixture
def site(tmp_path):
    """A node folder as the runbook leaves it: certificates, data, an identity key in the state dir, a roster of
    it and two other members (its operator's copy beside node.toml), approved; and a coordinator file."""
    write_certs(tmp_path / "certs", nodes=["org-1"])
    write_jsonl(tmp_path / "data.jsonl", [conversation(f"q{i}", f"a{i}") for i in range(50)])
    (tmp_path / "node.toml").write_text(NODE_TOML.format(node="", approval=""))
    me = raw_public_hex(create_identity_key(tmp_path / "state" / "identity-key.pem"))
    others = {f"org-{i}": raw_public_hex(create_identity_key(tmp_path / "others" / f"org-{i}.pem")) for i in (2, 3)}
    _roster(tmp_path, {"org-1": me, **others})
    assert main(["roster", "approve", str(tmp_path / "node.toml"), str(tmp_path / "roster-v1.json")]) == 0
    (tmp_path / "coordinator.toml").write_text(
        '[superlink]\nhost = "0.0.0.0"\nport = 9093\ncertfile = "certs/superlink.pem"\n'
        'keyfile = "certs/superlink.key"\n'
        'ca-certfile = "certs/ca.pem"\ndatabase = "db/superlink.db"\n')
    return tmp_path


def test_a_good_node_file_checks_out_and_starts_the_supernode_it_describes(site, capsys):
    assert main(["node", "check-config", str(site / "node.toml")]) == 0
    out = capsys.readouterr().out
    assert "data: 50 conversations" in out and "OK" in out and f"approved app bundle: sha256 {'ab' * 32}" in out
    assert main(["node", "start", str(site / "node.toml"), "--print"]) == 0
    printed = shlex.split(capsys.readouterr().out.strip())
    assert printed == supernode_command(superlink="127.0.0.1:9093", root_certificates=site / "certs" / "ca.pem",
                                        auth_key=site / "certs" / "nodes" / "org-1",
                                        node_config=site / "state" / "node-config.toml", runtime_port=9100,
                                        max_wait_time=None, isolation="process")
    assert "--isolation" in printed and printed[printed.index("--isolation") + 1] == "process"
    written = (site / "state" / "node-config.toml").read_text()
    assert f"data-path = \"{site / 'data.jsonl'}\"" in written and "node-name = \"org-1\"" in written
    assert f"roster = \"{site / 'roster-v1.json'}\"" in written  # what the node's secure aggregation reads
    assert f"roster-sha256 = \"{load_roster(site / 'roster-v1.json').sha256}\"" in written


def test_the_roster_and_the_identity_key_are_relative_to_the_files_folder(site, tmp_path, monkeypatch):
    sha = load_roster(site / "roster-v1.json").sha256
    (site / "node.toml").write_text(NODE_TOML.format(
        node=f'roster = "roster-v1.json"\nroster-sha256 = "{sha}"\nidentity-key = "state/identity-key.pem"\n',
        approval=""))
    monkeypatch.chdir(tmp_path / "others")  # not the file's folder
    nf = read_node_file(site / "node.toml")
    assert nf.node.roster == str(site / "roster-v1.json") and nf.node.roster_sha256 == sha
    assert nf.node.identity_key == str(site / "state" / "identity-key.pem") == str(nf.identity_key_path)
    found = check_node_file(nf)
    assert any(line.startswith(f"roster: {site / 'roster-v1.json'}, federation test version 1") for line in found)
    assert f"identity key: {site / 'state' / 'identity-key.pem'}, roster member org-1" in found


def test_check_config_refuses_a_missing_changed_or_foreign_roster_and_a_key_it_does_not_list(site):
    def problems() -> str:
        with pytest.raises(ConfigFileError) as err:
            check_node_file(read_node_file(site / "node.toml"))
        return str(err.value)

    text = (site / "node.toml").read_text()
    (site / "node.toml").write_text("\n".join(line for line in text.splitlines() if not line.startswith("roster")))
    assert "no roster is approved (in [node])" in problems() and "fedchat roster approve" in problems()

    (site / "node.toml").write_text(text)
    roster = (site / "roster-v1.json").read_text()
    (site / "roster-v1.json").write_text(roster.replace('"colluder_bound":1', '"colluder_bound":0'))
    assert "but this node's operator approved" in problems()  # changed since it was approved
    (site / "roster-v1.json").write_text(roster)

    stranger = {f"org-{i}": raw_public_hex(create_identity_key(site / "strangers" / f"{i}.pem")) for i in (1, 2, 3)}
    assert main(["roster", "approve", str(site / "node.toml"), str(_roster(site, stranger, "other.json"))]) == 2
    assert check_node_file(read_node_file(site / "node.toml"))  # the refused approval changed nothing
    (site / "node.toml").write_text(text.replace(str(site / "roster-v1.json"), str(site / "other.json"))
                                    .replace(load_roster(site / "roster-v1.json").sha256,
                                             load_roster(site / "other.json").sha256))
    assert "is not in the approved roster (federation test version 1)" in problems()
    assert "--member org-1=" in problems()  # the line to send the roster keeper

    (site / "node.toml").write_text(text)
    os.rename(site / "state" / "identity-key.pem", site / "state" / "moved.pem")
    assert "no identity key at" in problems() and "fedchat roster key --out" in problems()


def test_a_read_only_node_toml_keeps_its_roster_approval_in_the_file_approval_names(site):
    """deploy/compose.yaml mounts node.toml read-only: `fedchat roster approve` writes [approval] roster-file, the
    node reads its roster and hash from there, and `fedchat node approve` keeps the roster-file line."""
    (site / "node.toml").write_text(NODE_TOML.format(node="", approval='roster-file = "approval/roster.toml"\n'))
    before = (site / "node.toml").read_text()
    assert "no roster is approved (in " + str(site / "approval" / "roster.toml") in \
        str(pytest.raises(ConfigFileError, check_node_file, read_node_file(site / "node.toml")).value)
    os.chmod(site / "node.toml", 0o444)
    try:
        assert main(["roster", "approve", str(site / "node.toml"), str(site / "roster-v1.json")]) == 0
    finally:
        os.chmod(site / "node.toml", 0o644)
    assert (site / "node.toml").read_text() == before  # untouched
    nf = read_node_file(site / "node.toml")
    assert nf.roster_approval == site / "approval" / "roster.toml"
    assert nf.node.roster == str(site / "roster-v1.json")
    assert nf.node.roster_sha256 == load_roster(site / "roster-v1.json").sha256
    assert any(line.startswith("roster: ") and "(approved)" in line for line in check_node_file(nf))
    from fedchat.node.app_bundle import write_approvals

    write_approvals(site / "node.toml", ["cd" * 32])  # rewrites [approval], keeping the roster's line
    assert read_node_file(site / "node.toml").roster_approval == site / "approval" / "roster.toml"

    sha = nf.node.roster_sha256
    (site / "node.toml").write_text(NODE_TOML.format(node=f'roster-sha256 = "{sha}"\n',
                                                     approval='roster-file = "approval/roster.toml"\n'))
    with pytest.raises(ConfigFileError, match="the roster is approved in two places"):
        read_node_file(site / "node.toml")
    (site / "node.toml").write_text(before)
    (site / "approval" / "roster.toml").write_text('roster = "x.json"\n')
    with pytest.raises(ConfigFileError, match="must hold exactly 'roster' and 'roster-sha256'"):
        read_node_file(site / "node.toml")


def test_every_structural_problem_is_listed(tmp_path):
    (tmp_path / "bad.toml").write_text('[node]\ndata-path = "d.jsonl"\n\n[conection]\nsuperlink = "x"\n'
                                       '[connection]\nsuperlink = "no-port"\nruntime-port = "high"\n')
    with pytest.raises(ConfigFileError) as err:
        read_node_file(tmp_path / "bad.toml")
    text = str(err.value)
    for expected in ("unknown section [conection]: did you mean [connection]?", "'state-dir' is required",
                     "'superlink' must be HOST:PORT", "'root-certificates' is required",
                     "'auth-private-key' is required", "'runtime-port' must be a port number"):
        assert expected in text


def test_what_the_file_points_at_is_checked(site):
    text = (site / "node.toml").read_text()
    (site / "node.toml").write_text(text.replace('target-delta = 1e-3', 'target-delta = 0.1')
                                    .replace("certs/ca.pem", "certs/nope.pem")
                                    .replace("certs/nodes/org-1", "certs/ca.pem"))
    with pytest.raises(ConfigFileError) as err:
        check_node_file(read_node_file(site / "node.toml"))
    text = str(err.value)
    assert "not below 1/n" in text and "nope.pem" in text and "not an unencrypted OpenSSH private key" in text


def test_not_toml_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.toml").write_text("[node\n")
    assert main(["node", "check-config", str(tmp_path / "x.toml")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_coordinator_file_starts_a_tls_superlink_with_node_auth(site, capsys):
    assert main(["coordinator", "start", str(site / "coordinator.toml"), "--print"]) == 0
    printed = shlex.split(capsys.readouterr().out.strip())
    cf = read_coordinator_file(site / "coordinator.toml")
    from fedchat.federation.deployment import SuperLinkTLS

    assert printed == superlink_command(host="0.0.0.0", port=9093, tls=SuperLinkTLS(cf.certfile, cf.keyfile,
                                        cf.ca_certfile), node_auth=True, database=site / "db" / "superlink.db")
    assert "--enable-supernode-auth" in printed and "--ssl-certfile" in printed
    (site / "coordinator.toml").write_text('[superlink]\nport = 9093\ninsecure = true\nsupernode-auth = false\n')
    assert read_coordinator_file(site / "coordinator.toml").host == "127.0.0.1"  # the Control API: loopback
    (site / "coordinator.toml").write_text('[superlink]\nport = 9093\ninsecure = true\n')
    with pytest.raises(ConfigError, match="supernode-auth needs TLS"):
        read_coordinator_file(site / "coordinator.toml")
