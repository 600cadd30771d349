"""Deployment on Flower's real engine: certificates, TLS, node authentication, the local federation.

The fast tests check the certificates with a real TLS handshake and the node keys with
Flower's own loaders. The slow ones start real `flower-superlink` / `flower-supernode`
processes on 127.0.0.1 (ports the kernel picks) and stop them, and everything they started,
in finalizers; each asserts that no process of its own survives.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedchat.cli import main as fedchat_main
from fedchat.federation.certs import CertError, cert_hosts, load_cert, write_certs
from fedchat.federation.deployment import (
    LOOPBACK,
    FlowerCLI,
    SuperLinkTLS,
    free_port,
    https_ready,
    process_env,
    superlink_command,
    supernode_command,
    wait_until,
    write_cli_config,
    write_toml,
)
from fedchat.federation.processes import Supervisor, survivors
from shared.errors import FederationError
from shared.secagg_wire import PROTOCOL
from tests.support.processes import Child

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "local-federation.sh"


# ------------------------------------------------------------------ certificates (fast)

def _tls_handshake(certs, server_hostname: str) -> str:
    """Serve one TLS handshake with the SuperLink certificate; connect trusting only the CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server((LOOPBACK, 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                version = tls.version()
                tls.sendall(b"x")
        return version
    finally:
        thread.join(5)
        listener.close()


def test_superlink_certificate_verifies_against_the_ca_for_its_hosts_only(tmp_path):
    certs = write_certs(tmp_path / "certs", hosts=["127.0.0.1", "localhost"], nodes=["org-1"])
    assert _tls_handshake(certs, "127.0.0.1").startswith("TLS")
    assert _tls_handshake(certs, "localhost").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(certs, "coordinator.example.org")
    other = write_certs(tmp_path / "other", nodes=[])
    mixed = SimpleNamespace(server_cert=other.server_cert, server_key=other.server_key, ca_cert=certs.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):  # a certificate from another CA is not trusted
        _tls_handshake(mixed, "127.0.0.1")
    assert oct(certs.ca_key.stat().st_mode & 0o777) == "0o600"
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"


def test_node_keys_are_what_flower_reads_and_verifies(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        public_key_to_bytes,
        sign_message,
        verify_signature,
    )

    certs = write_certs(tmp_path, nodes=["org-1", "org-2"], superlink=False)
    assert not certs.ca_cert.exists()  # node-only: no CA on a node's host
    # flower-supernode's loader
    private = serialization.load_ssh_private_key(certs.node_key("org-1").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    registered = try_load_public_key(certs.node_public_key("org-1"))  # `flwr supernode register`'s loader
    assert registered == public_key_to_bytes(private.public_key())
    signature = sign_message(private, b"2026-01-01T00:00:00")  # what every Fleet request carries
    assert verify_signature(bytes_to_public_key(registered), b"2026-01-01T00:00:00", signature)
    other = try_load_public_key(certs.node_public_key("org-2"))
    assert not verify_signature(bytes_to_public_key(other), b"2026-01-01T00:00:00", signature)
    assert oct(certs.node_key("org-1").stat().st_mode & 0o777) == "0o600"


def test_certs_keeps_identities_and_reissues_the_server_certificate_for_new_hosts(tmp_path, capsys):
    assert fedchat_main(["certs", "--out", str(tmp_path), "--nodes", "2"]) == 0
    ca, key1 = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "nodes" / "org-1").read_bytes()
    assert cert_hosts(load_cert(tmp_path / "superlink.pem")) == {"127.0.0.1", "localhost"}

    assert fedchat_main(["certs", "--out", str(tmp_path), "--nodes", "3"]) == 0  # adds org-3, keeps the rest
    assert (tmp_path / "nodes" / "org-1").read_bytes() == key1 and (tmp_path / "nodes" / "org-3.pub").exists()
    assert fedchat_main(["certs", "--out", str(tmp_path), "--hosts", "coordinator.example.org", "10.0.0.5"]) == 0
    assert cert_hosts(load_cert(tmp_path / "superlink.pem")) == {"coordinator.example.org", "10.0.0.5"}
    assert (tmp_path / "ca.pem").read_bytes() == ca  # same CA: nodes need nothing new
    assert (tmp_path / "nodes" / "org-1").read_bytes() == key1

    assert fedchat_main(["certs", "--out", str(tmp_path), "--nodes", "1", "--force"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca and (tmp_path / "nodes" / "org-1").read_bytes() != key1
    capsys.readouterr()
    assert fedchat_main(["certs", "--out", str(tmp_path), "--hosts", "https://x:9093"]) == 2
    assert "neither an IP address nor a host name" in capsys.readouterr().err
    with pytest.raises(CertError, match="letters, digits"):
        write_certs(tmp_path, nodes=["../evil"], superlink=False)


def test_local_federation_refuses_bad_arguments_before_starting_anything(tmp_path):
    (tmp_path / "keep.txt").write_text("not a federation")
    for args, message in [
        (["--nodes", "2", "--rounds", "1", "--out", str(tmp_path / "a")], "at least 3 with secure aggregation"),
        (["--nodes", "3", "--rounds", "0", "--out", str(tmp_path / "b")], "num-rounds"),
        (["--nodes", "3", "--rounds", "1", "--out", str(tmp_path)], "is not empty"),
        (["--nodes", "3", "--rounds", "1", "--out", str(tmp_path), "--fresh"], "not one (no commands.sh)"),
    ]:
        done = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, args
        assert message in done.stderr, (args, done.stderr[-2000:])
    assert (tmp_path / "keep.txt").exists()  # --fresh never deletes a folder it did not make


# ------------------------------------------------------------------ a TLS SuperLink with node auth (slow)

@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A SuperLink with TLS and SuperNode authentication; org-1 registered, 'rogue' never."""
    root = tmp_path_factory.mktemp("superlink")
    certs = write_certs(root / "certs", nodes=["org-1", "rogue"])
    sup = Supervisor(root / "logs", record=root / "processes.json")
    env = {**process_env(), "FLWR_HOME": str(root / "home")}
    port = free_port()
    service = sup.start("superlink", superlink_command(
        host=LOOPBACK, port=port, tls=SuperLinkTLS(certs.server_cert, certs.server_key, certs.ca_cert),
        node_auth=True, database=root / "state.db"), env=env, cwd=root)
    try:
        wait_until(lambda: https_ready(LOOPBACK, port, certs.ca_cert), timeout=90, what="SuperLink over TLS",
                   alive=lambda: service.exited() is not None and service.log_tail())
        write_cli_config(root / "flwr", f"{LOOPBACK}:{port}", certs.ca_cert)
        cli = FlowerCLI(root / "flwr", sup.run)
        registered = cli.register(certs.node_public_key("org-1"), "org-1")
        node_config = write_toml(root / "node-config.toml", {"data-path": str(root / "none.jsonl"),
                                                             "state-dir": str(root / "state")})
        yield {"root": root, "certs": certs, "sup": sup, "env": env, "port": port, "cli": cli, "service": service,
               "registered": registered, "node_config": node_config}
    finally:
        sup.stop(grace=10)
        assert survivors(root / "processes.json") == []


def _node(superlink, name: str, *, tls: bool = True, key: str | None = None, max_wait: float = 8.0):
    return superlink["sup"].start(name, supernode_command(
        superlink=f"{LOOPBACK}:{superlink['port']}", root_certificates=superlink["certs"].ca_cert if tls else None,
        auth_key=superlink["certs"].node_key(key) if key else None, node_config=superlink["node_config"],
        runtime_port=free_port(), max_wait_time=max_wait), env=superlink["env"], cwd=superlink["root"])


def _wait_exit(service, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while service.exited() is None:
        assert time.monotonic() < deadline, f"{service.name} still running after {timeout} s:\n{service.log_tail()}"
        time.sleep(0.5)
    return service.exited()


def _online(superlink) -> set[str]:
    return {n["node-id"] for n in superlink["cli"].nodes() if n["status"] == "online"}


@pytest.mark.slow
def test_plaintext_clients_are_refused(superlink):
    port, ca = superlink["port"], superlink["certs"].ca_cert
    assert https_ready(LOOPBACK, port, ca)  # the same request over TLS is answered

    plain = http.client.HTTPConnection(LOOPBACK, port, timeout=5)  # HTTP without TLS: no HTTP answer at all
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        plain.request("GET", "/health")
        plain.getresponse()
    plain.close()
    untrusting = http.client.HTTPSConnection(LOOPBACK, port, timeout=5, context=ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):  # TLS that does not trust our CA does not connect either
        untrusting.request("GET", "/health")
    untrusting.close()

    node = _node(superlink, "plaintext-node", tls=False)  # flower-supernode --insecure
    assert _wait_exit(node, timeout=60) != 0
    log = node.log_path.read_text()
    assert "Server disconnected without sending a response" in log
    assert "could not establish a connection to the SuperLink" in log
    assert all(n["node-id"] == superlink["registered"] for n in superlink["cli"].nodes())  # no new node appeared

    insecure_cli = superlink["root"] / "insecure-cli"
    write_cli_config(insecure_cli, f"{LOOPBACK}:{port}", None)  # `flwr` with insecure = true
    with pytest.raises(FederationError):
        FlowerCLI(insecure_cli, superlink["sup"].run, timeout=60).nodes()


@pytest.mark.slow
def test_unregistered_nodes_are_refused_and_the_registered_one_joins(superlink):
    rogue = _node(superlink, "rogue-node", key="rogue")  # valid TLS, a key never registered
    keyless = _node(superlink, "keyless-node")  # valid TLS, no key: tries to register itself
    good = _node(superlink, "org-1-node", key="org-1")  # the control: same everything, registered key
    try:
        assert _wait_exit(rogue, timeout=60) != 0
        assert "Failed to activate SuperNode" in rogue.log_path.read_text()
        assert _wait_exit(keyless, timeout=60) != 0
        assert "All SuperNodes must be registered via the CLI" in keyless.log_path.read_text()
        rogue_key = superlink["certs"].node_key("rogue")
        rogue_pem = serialization.load_ssh_private_key(rogue_key.read_bytes(), None).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        superlink_log = superlink["service"].log_path.read_text()
        assert "No SuperNode found with the given public key" in superlink_log
        assert rogue_pem.splitlines()[1] in superlink_log.replace("\\n", "\n")  # it was this key that was refused

        wait_until(lambda: superlink["registered"] in _online(superlink), timeout=60, interval=1.0,
                   what="the registered node did not come online",
                   alive=lambda: good.exited() is not None and good.log_tail())
        assert _online(superlink) == {superlink["registered"]}  # neither the rogue nor the keyless node joined
        assert [n["node-id"] for n in superlink["cli"].nodes()] == [superlink["registered"]]
        assert good.exited() is None
    finally:
        for service in (rogue, keyless, good):
            if service.exited() is None:
                os.killpg(service.pid, signal.SIGTERM)


# ------------------------------------------------------------------ the local federation script (slow)

def _script(out: Path, *extra: str, nodes: int = 3) -> Child:
    """The script as a user runs it, with a HOME of its own (to see that it leaves ~/.flwr alone)."""
    args = [str(SCRIPT), "--nodes", str(nodes), "--base-model", "tiny", "--out", str(out), "--local-steps", "2",
            "--batch-size", "4", "--startup-timeout", "120", *extra, "--run-config", "eval-max-conversations=16"]
    env = {**os.environ, "HOME": str(out.parent / "home")}  # FEDCHAT_CACHE (conftest) keeps the prepared model
    return Child.start(args, out.parent / "script.log", env=env)


def _assert_nothing_left(out: Path, at_least: int) -> None:
    record = json.loads((out / "processes.json").read_text())
    assert len(record["processes"]) >= at_least, record["processes"]  # it did see what it started
    assert survivors(out / "processes.json") == []


@pytest.mark.slow
def test_local_federation_completes_its_run_and_leaves_no_process(tmp_path, tiny_dir):
    """Three nodes, each running only the app bundle its operator approved (`fedchat node approve`), under
    fedchat's secure aggregation with the roster of their identity keys each operator approved. One round: runs of
    several rounds on the same services are followed in tests/test_deploy_kit.py (the runbooks) and
    tests/test_faults.py."""
    from fedchat.federation.service_config import read_node_file
    from shared.roster import load_roster

    out = tmp_path / "fed"
    script = _script(out, "--rounds", "1", "--timeout", "420")
    log = script.finish(timeout=540)
    assert script.proc.returncode == 0, log[-5000:]

    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "finished" and report["completed_rounds"] == 1 and report["num_rounds"] == 1
    assert report["secagg"] is True and report["dp"] is True
    assert [r["status"] for r in report["rounds"]] == ["ok"]
    for r in report["rounds"]:  # the secure sum's parameters per round: every node survived every stage
        assert r["secagg"]["protocol"] == PROTOCOL and r["secagg"]["nodes"] == 3 and r["secagg"]["survivors"] == 3
        assert list(r["secagg"]["stage_seconds"]) == ["advertise", "share-keys", "collect", "consistency", "unmask"]
    assert report["nodes"] == ["org-1", "org-2", "org-3"]
    d = report["deployment"]
    assert d["tls"] and d["supernode_auth"] and d["flower_status"] == "finished:completed"
    assert d["superlink"].startswith("127.0.0.1:")
    roster = load_roster(out / "roster.json")
    assert d["roster_sha256"] == roster.sha256 and [m.name for m in roster.members] == ["org-1", "org-2", "org-3"]
    for name in ("org-1", "org-2", "org-3"):  # each operator approved that roster, listing the node's own key
        nf = read_node_file(out / "nodes" / name / "node.toml")
        assert nf.node.roster == str(out.resolve() / "roster.json") and nf.node.roster_sha256 == roster.sha256
        assert nf.identity_key_path == out.resolve() / "nodes" / name / "identity-key.pem"
    assert [a["node"] for a in d["audit"] if a["node"].startswith("org-")] == ["org-1", "org-2", "org-3"]
    assert all(a["verdict"] == "OK" and not a["problems"] for a in d["audit"])
    for node in d["nodes"]:
        ledger = Path(node["ledger"])
        assert ledger.parent == out / "ledgers" and len(ledger.read_text().splitlines()) == 1  # one entry per round
        assert Path(node["ledger_key"]).exists()
    assert (out / "run" / "merged").exists()

    for name in ("superlink", "org-1", "org-2", "org-3", "serverapp"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0, name
    server_log = (out / "logs" / "serverapp.log").read_text()
    assert server_log.count("secure sum over 3 nodes") == 1
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert "--enable-supernode-auth" in superlink_log and "Uvicorn running on https://127.0.0.1" in superlink_log
    assert "starting: " in superlink_log and "flower-superlink" in superlink_log  # fedchat coordinator start's exec
    for node in ("org-1", "org-2", "org-3"):
        node_log = (out / "logs" / f"{node}.log").read_text()
        assert "starting: " in node_log and "flower-supernode" in node_log
        assert "--auth-supernode-private-key" in node_log
        assert "--isolation process" in node_log and f"app bundle sha256 {d['app_sha256']} is approved" in node_log
    commands = (out / "commands.sh").read_text()
    assert commands.count(" coordinator start ") == 1 and commands.count(" supernode register ") == 3
    assert commands.count(" app build ") == 1 and commands.count(" node approve ") == 3
    assert commands.count(" roster key ") == 3 and commands.count(" roster init ") == 1
    assert commands.count(" roster approve ") == 3
    assert commands.count(" node start ") == 3 and commands.count(" run ") == 1
    _assert_nothing_left(out, at_least=7)  # superlink, 2 supernodes, their superexecs, the serverapp...
    assert not (tmp_path / "home" / ".flwr").exists()  # Flower's files went under DIR, not the user's home


@pytest.mark.slow
def test_ctrl_c_stops_every_process_of_a_running_federation(tmp_path, tiny_dir):
    """One node without secure aggregation, quicker to bring up: the script stops what it started the same way for
    any federation (Ctrl-C in each of three nodes' own terminals is followed in tests/test_deploy_kit.py)."""
    out = tmp_path / "fed"
    script = _script(out, "--rounds", "3", "--timeout", "600", "--no-secagg", nodes=1)
    deadline = time.monotonic() + 240
    try:
        while not (out / "run" / "checkpoints").exists():  # round 0 checkpointed: the ServerApp runs round 1
            assert script.proc.poll() is None, script.output()[-4000:]
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(1)
    except BaseException:
        script.stop()
        raise
    time.sleep(5)  # the nodes' ClientApps are at work
    os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    log = script.finish(timeout=90)
    assert script.proc.returncode == 130, log[-4000:]
    assert "interrupted" in log and "stopping every process" in log
    _assert_nothing_left(out, at_least=5)  # the SuperLink, its SuperExec, the node, its SuperNode, the ServerApp


@pytest.mark.slow
def test_a_failed_run_exits_non_zero_says_why_and_leaves_no_process(tmp_path, tiny_dir):
    """One node without secure aggregation, quicker to bring up: the failure path is the same for any federation
    (the three-node one runs to its end in the completion test above)."""
    out = tmp_path / "fed"
    script = _script(out, "--rounds", "3", "--timeout", "2", "--no-secagg", nodes=1)  # 3 rounds cannot finish in 2 s
    log = script.finish(timeout=300)
    assert script.proc.returncode == 1, log[-4000:]
    assert "did not finish within 2 s (--timeout); it was stopped" in log
    assert "local-federation: failed; logs in" in log
    assert not (out / "report.json").exists()
    _assert_nothing_left(out, at_least=4)  # the SuperLink, its SuperExec, the node and its SuperNode
