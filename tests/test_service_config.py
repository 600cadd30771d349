"""Node and coordinator config files: every problem reported, and the commands they start."""

import shlex

import pytest

from fedchat.cli import main
from fedchat.deployment import superlink_command, supernode_command
from fedchat.service_config import ConfigFileError, check_node_file, read_coordinator_file, read_node_file
from shared.certs import write_certs
from shared.errors import ConfigError
from tests.support.data import conversation, write_jsonl


@pytest.fixture
def site(tmp_path):
    write_certs(tmp_path / "certs", nodes=["org-1"])
    write_jsonl(tmp_path / "data.jsonl", [conversation(f"q{i}", f"a{i}") for i in range(50)])
    (tmp_path / "node.toml").write_text(
        '[node]\nnode-name = "org-1"\ndata-path = "data.jsonl"\nstate-dir = "state"\ntarget-delta = 1e-3\n\n'
        '[connection]\nsuperlink = "127.0.0.1:9093"\nroot-certificates = "certs/ca.pem"\n'
        'auth-private-key = "certs/nodes/org-1"\nruntime-port = 9100\n\n'
        f'[approval]\napp-sha256 = ["{"ab" * 32}"]\n')
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
    from fedchat.deployment import SuperLinkTLS

    assert printed == superlink_command(host="0.0.0.0", port=9093, tls=SuperLinkTLS(cf.certfile, cf.keyfile,
                                        cf.ca_certfile), node_auth=True, database=site / "db" / "superlink.db")
    assert "--enable-supernode-auth" in printed and "--ssl-certfile" in printed
    (site / "coordinator.toml").write_text('[superlink]\nport = 9093\ninsecure = true\nsupernode-auth = false\n')
    assert read_coordinator_file(site / "coordinator.toml").host == "127.0.0.1"  # the Control API: loopback
    (site / "coordinator.toml").write_text('[superlink]\nport = 9093\ninsecure = true\n')
    with pytest.raises(ConfigError, match="supernode-auth needs TLS"):
        read_coordinator_file(site / "coordinator.toml")
