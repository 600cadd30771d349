"""Faults on a real network: separate hosts, cut links, stalls, killed processes, a full disk.

The slow tests run the drill of tests.support.drill: the coordinator (SuperLink with TLS and node
authentication, its ServerApp) and three nodes (`fedchat node start`, approved bundle only) each
on a host of its own, a network namespace with its own address and name, talking real TCP over
veth pairs through a fault proxy (tests.support.netproxy) on a "wan" host; the certificate is issued
for coordinator.fedchat.test, which each node resolves through its own hosts file. One topology
(namespaces, certificates, SuperLink) serves the module. Five faults act within one round: they
share one run on fresh nodes (new state dirs and ledgers; the same identity keys and approved
roster), a fault per round and a sixth round (tests.support.drill.run_chain), under fedchat's secure
aggregation and DP. The two faults that resubmit the run (the coordinator killed, the SuperLink
restarted) come in that sixth round of the same run: the SuperLink restarts once round 5 is over,
then the resumed run's ServerApp is killed once every node trained round 6, and the run submitted
again completes round 6. Each test checks:

* the run completes, or the faulted round fails with an error that says what happened and in the
  next round the victim is back (after the last fault: the round runs with every node);
* no ledger line is lost, duplicated or corrupt, and every update (or masked update) that reached
  the coordinator is bound to its node's ledger line (tests.support.drill.check_ledgers: each ledger
  verified with shared/ledger.py and audited against the report with fedchat/audit/ledger_audit.py);
* no process is left: after each test none runs on any node host, and at the end no process,
  namespace, hosts file or mount of the drill survives.

They skip, saying why, where network namespaces cannot be made (not root, no `ip`), except under
CI=true, where they fail instead (CI must run them); they carry the
marker `faults` as well as `slow`. The fast tests check the tools (the proxy's modes, the namespaces,
the ledger check, which must be able to fail) and the two fixes for a node restarted after a crash on
their own: the node starts its SuperNode again while the SuperLink refuses it, and the coordinator asks
a node the SuperLink reports unavailable again while too few can train.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.drill import NETPROXY
from tests.support.netns import Network, unavailable
from tests.support.netproxy import ProxyControl

NETNS = unavailable()
MUST_RUN = os.environ.get("CI", "").lower() in ("true", "1", "yes")  # CI=true: the drill must run, never skip


def require_netns() -> None:
    """Skip where network namespaces cannot be made; under CI=true fail instead: a CI machine without them
    would otherwise pass without running the drill."""
    if NETNS is None:
        return
    if MUST_RUN:
        pytest.fail(f"CI=true, but no network namespaces here ({NETNS}): the fault drill must run in CI. Run the "
                    "tests as root on a machine with iproute2 and veth support (a CI runner VM, or a container with "
                    "--privileged), or unset CI to let the drill skip locally.", pytrace=False)
    pytest.skip(f"no network namespaces here: {NETNS}")


@pytest.fixture
def netns_required() -> None:
    require_netns()


needs_netns = pytest.mark.usefixtures("netns_required")
VICTIM = "org-2"  # the faulted node (tests.support.drill.VICTIM)
OTHERS = ("org-1", "org-3")


# ------------------------------------------------------------------ the fault proxy (fast, loopback)

class Echo:
    """A TCP echo server on 127.0.0.1 (a thread)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxy(tmp_path):
    echo = Echo()
    port = _free_port()
    control = ProxyControl(tmp_path / "proxy.sock")
    proc = subprocess.Popen([sys.executable, str(NETPROXY), "--control", str(control.path), "--route",
                             f"a=127.0.0.1:{port},127.0.0.1:{echo.port}"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not control.ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the proxy did not start"
            time.sleep(0.1)
        yield port, control
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        echo.server.close()


def _roundtrip(port: int, timeout: float = 5.0, payload: bytes = b"ping") -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = s.recv(100)
    return data, time.monotonic() - started


def _broken(s: socket.socket) -> bool:
    """The connection was reset (or closed) under us: nothing echoes back any more."""
    try:
        s.sendall(b"?")
        return s.recv(100) == b""
    except OSError:
        return True


def test_the_fault_proxy_passes_delays_holds_and_breaks_connections(proxy):
    port, control = proxy
    assert _roundtrip(port)[0] == b"ping"
    control.mode("a", "delay", 0.6)
    data, seconds = _roundtrip(port)
    assert data == b"ping" and seconds >= 1.2  # 0.6 s each way
    control.mode("a", "pause")  # held, not lost: the bytes come through once the route passes again
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"held")
        s.settimeout(0.8)
        with pytest.raises(socket.timeout):
            s.recv(100)
        control.mode("a", "pass")
        s.settimeout(5)
        assert s.recv(100) == b"held"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"x")
        assert s.recv(100) == b"x"
        control.mode("a", "drop")  # open connections are reset...
        assert _broken(s)
    assert _roundtrip(port)[0] == b"ping"  # ...and new ones go through
    control.mode("a", "cut")  # every connection, new ones too
    try:  # the proxy resets it at once: a loaded machine may see the reset already while connecting
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert _broken(s)
    except ConnectionResetError:
        pass
    routes = control.mode("a", "pass")
    assert routes["a"]["refused"] >= 1 and routes["a"]["reset"] >= 1 and routes["a"]["bytes_up"] >= 10
    with pytest.raises(ValueError, match="no route"):
        control.mode("b", "cut")


# ---------------------------------------------------------- the coordinator's side of a reconnecting node (fast)

class FlakyGrid:
    """A grid on which `late` is unavailable the first `times` it is asked (the SuperLink answers for it, as
    Flower 1.41 does for a node with no recent heartbeat: a node restarting after a crash), then can train."""

    def __init__(self, late: int, times: int) -> None:
        self.late, self.times, self.asked = late, times, []

    def send_and_receive(self, messages, *, timeout=None):
        import uuid

        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import Message
        from flwr.common import Code, GetPropertiesRes, Status
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        replies = []
        for q in messages:
            q.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what pushing it does
            self.asked.append(q.metadata.dst_node_id)
            if q.metadata.dst_node_id == self.late and self.asked.count(self.late) <= self.times:
                replies.append(create_message_error_unavailable_res_message(q.metadata, "node_unavail"))
            else:
                res = GetPropertiesRes(Status(Code.OK, ""), {"can-train": True})
                replies.append(Message(compat.getpropertiesres_to_recorddict(res), reply_to=q))
        return replies


class Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


@pytest.fixture
def coordinator_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy(grid, **run):
    from server.strategy import FedchatStrategy
    from shared.config import RunConfig

    cfg = RunConfig.from_flower({"base-model": "tiny", "node-wait-timeout": 30.0, **run})
    return FedchatStrategy(cfg, "run-1", [], "", grid)


def test_a_node_restarting_after_a_crash_is_asked_again_while_too_few_can_train(coordinator_identity, monkeypatch):
    """Fault 'kill-before-masked-update': the node's old connection is still timing out when the next round asks.
    The SuperLink answers for it (node unavailable); while fewer than min-nodes can train the coordinator asks it
    again instead of failing the round, and a node that stays away is left out saying why."""
    import server.strategy

    monkeypatch.setattr(server.strategy, "UNAVAILABLE_RETRY_SECONDS", 0.01)
    nodes = [Proxy(11), Proxy(22), Proxy(33)]
    grid = FlakyGrid(late=22, times=2)
    able, left_out = _strategy(grid)._able_to_train(2, nodes)
    assert [n.node_id for n in able] == [11, 22, 33] and left_out == []
    assert grid.asked == [11, 22, 33, 22, 22]  # only the unavailable node is asked again

    grid = FlakyGrid(late=22, times=10**6)  # it never comes back: left out when node-wait-timeout is spent
    able, left_out = _strategy(grid, **{"node-wait-timeout": 0.5})._able_to_train(2, nodes)
    assert [n.node_id for n in able] == [11, 33]
    assert left_out[0]["node_id"] == 22 and "Node Unavailable" in left_out[0]["reason"]  # the SuperLink's words

    grid = FlakyGrid(late=22, times=10**6)  # enough nodes can train without it: the round does not wait
    able, _ = _strategy(grid, **{"min-nodes": 3, "nodes-per-round": 0})._able_to_train(2, [*nodes, Proxy(44)])
    assert len(able) == 3 and grid.asked.count(22) == 1


# ------------------------------------------------------------------ the node's side of a restart after a crash (fast)

FAKE_SUPERNODE = """
import pathlib, sys, time
starts = pathlib.Path(sys.argv[1])
n = int(starts.read_text() or 0) + 1 if starts.exists() else 1
starts.write_text(str(n))
if n <= int(sys.argv[2]):
    print("Exit Code: 305\\n[code: 2004] Failed to activate SuperNode.", flush=True)  # what Flower 1.41 prints
    sys.exit(1)
if sys.argv[3] == "fail":
    print("Exit Code: 302\\nInvalid SuperNode authentication key.", flush=True)
    sys.exit(1)
time.sleep(1)
"""


def test_a_node_refused_after_a_crash_starts_its_supernode_again(tmp_path, monkeypatch, capfd):
    """Fault 'kill-*': a node restarted at once finds the SuperLink still holding its old connection online and
    Flower's SuperNode exits on the refusal; `fedchat node start` starts it again until the SuperLink lets it in,
    gives up after its window, and does not retry any other failure."""
    import fedchat.node.runtime as runtime

    monkeypatch.setattr(runtime, "ACTIVATION_RETRY_SECONDS", 0.1)
    monkeypatch.setattr(runtime, "_activation_window", lambda: (60.0, 3.0))

    def node(refusals: int, then: str = "run") -> tuple[int, int]:
        starts = tmp_path / f"starts-{refusals}-{then}"
        code = runtime.run_node([sys.executable, "-c", FAKE_SUPERNODE, str(starts), str(refusals), then],
                                "127.0.0.1:9", tmp_path / "node.toml", dict(os.environ))
        return code, int(starts.read_text())

    assert node(2) == (0, 3)  # refused twice, let in the third time
    assert "starting the SuperNode again" in capfd.readouterr().err
    code, starts = node(10**6)  # refused for longer than the window: it gives up, with the SuperNode's exit code
    assert code == 1 and 2 < starts < 60
    assert "Giving up" in capfd.readouterr().err
    assert node(0, "fail") == (1, 1)  # another failure: no retry


# ------------------------------------------------------------------ the drill's ledger check (fast)

def test_the_ledger_check_finds_lost_duplicated_and_unbound_lines(tmp_path):
    """tests.support.drill.check_ledgers can fail: a line removed at the end, an update recorded twice, a report row
    that names a line the ledger does not hold are each found and counted."""
    import json
    from types import SimpleNamespace

    from shared import ledger
    from shared.accounting import compute_epsilon
    from shared.crypto import key_fingerprint
    from tests.support.drill import Node, Run, check_ledgers
    from tests.support.ledger import entry, rewrite, signed_lines

    state = tmp_path / "org-1" / "state"
    key = ledger.signing_key_for(state / "ledger.jsonl", state / "ledger-key.pem")
    history, lines = [], []
    with ledger.open_for_training(state / "ledger.jsonl", key) as book:
        for rnd in (1, 2):
            history.append((0.9, 0.02, 10))
            book.append(entry(rnd, history, update_sha256=f"{rnd:064x}"))
            lines.append(ledger.read_lines(state / "ledger.jsonl")[-1])
    log = "".join(f"node org-1 round {r}: trained 10 steps in 1.0s, train loss 1.0, epsilon 1/8\n" for r in (1, 2))
    rows = [{"round": r, "status": "ok", "clients": [{"node": "org-1", "status": "ok", "ledger_entries": r,
                                                       "ledger_key": key_fingerprint(key.public_key()),
                                                       "ledger_head": ledger.line_hash(lines[r - 1]),
                                                       "epsilon": compute_epsilon(history[:r], 1e-5, "prv")}]}
            for r in (1, 2)]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps({"run_id": "run-1", "rounds": rows}))
    fed = SimpleNamespace(nodes={"org-1": Node(1, tmp_path / "org-1", state, None, "1", 0)},
                          node_log=lambda name: log, runs=[Run("run", tmp_path / "run", "1")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())

    check = check_ledgers(fed, report)
    assert check.problems == [] and check.lost == 0 and check.bound_rows == 2

    rewrite(state / "ledger.jsonl", lines[:1])  # the last line lost (its head file still says 2)
    check = check_ledgers(fed, report)
    assert check.lost == 2  # the training the node logged, and the update the coordinator received
    assert any("head file records 2" in p for p in check.problems)

    twice = dict(ledger.parse(lines[0]), round=2)  # the same update recorded for two rounds
    (state / "ledger.head").unlink()
    rewrite(state / "ledger.jsonl", signed_lines([ledger.parse(lines[0]), twice], key))
    assert any("recorded twice" in p for p in check_ledgers(fed, report).problems)


# ------------------------------------------------------------------ namespaces (fast, root)

@needs_netns
def test_a_network_of_namespaces_is_made_and_removed_entirely(tmp_path):
    net = Network({"a": ["10.77.0.1"], "b": ["10.77.0.2"]})
    with net:
        net.set_hosts("b", {"server.test": "10.77.0.1"})
        server = subprocess.Popen(net.exec_argv("a", [sys.executable, "-c", (
            "import socket\ns = socket.create_server(('10.77.0.1', 9000))\n"
            "while True:\n    s.accept()[0].sendall(b'hi')")]))
        try:
            client = ("import socket, sys\nfor _ in range(50):\n    try:\n"
                      "        print(socket.create_connection(('server.test', 9000), timeout=2).recv(10).decode())\n"
                      "        sys.exit(0)\n    except ConnectionRefusedError:\n        __import__('time').sleep(0.1)\n"
                      "sys.exit(1)")
            done = net.run("b", [sys.executable, "-c", client], timeout=30)
            assert done.stdout.strip() == "hi", done.stderr  # by name, from b's own hosts file
            assert socket.gethostbyname("localhost")  # the machine's resolver is untouched
            assert net.pids("a") == [server.pid]
            net.link("b", up=False)
            done = net.run("b", [sys.executable, "-c", "import socket; socket.create_connection(('10.77.0.1', 9), "
                                                       "timeout=1)"], timeout=30)
            assert "timed out" in done.stderr  # a pulled cable: packets dropped, no refusal
        finally:
            server.kill()
            server.wait(timeout=10)
        assert len(net.leftovers()) == 5  # the switch, a and b, and a's and b's hosts files
    assert net.leftovers() == [] and net.problems == []


# ------------------------------------------------------------------ the drill (slow, root)

@pytest.fixture(scope="module")
def fed(tmp_path_factory, model_cache):
    from tests.support.drill import DrillSettings, NetworkFederation

    require_netns()
    net = NetworkFederation(tmp_path_factory.mktemp("faults"), DrillSettings())
    try:
        net.open()
        yield net
    finally:
        left = net.close()
        assert left == [], f"left behind: {left}"


def _survived(out):
    report = out.facts.get("report") or {}
    assert out.problems == [], f"{out.detail}\n--- ServerApp log:\n{out.facts.get('server_log', '')[-4000:]}"
    assert out.survived and out.ledger_entries_lost == 0
    assert report.get("status") == "finished" and out.flower_status == "finished:completed"
    return out


@pytest.fixture(scope="module")
def chain(fed):
    """One run, a fault per round (tests.support.drill.CHAIN: link-down, node-stall, kill-after-key-sharing,
    kill-before-masked-update, disk-full) and a last round without one, through both restarts (RESTARTS: the
    SuperLink restarted once round 5 is over, the resumed run's ServerApp SIGKILLed once every node trained round 6,
    the run submitted again): each fault's test reads its round and the next."""
    from tests.support.drill import CHAIN, RESTARTS, node_host, run_chain

    outs = {o.name: o for o in run_chain(fed, restarts=True)}
    assert list(outs) == [*CHAIN, RESTARTS]
    for i in range(1, fed.settings.nodes + 1):
        assert fed.net.pids(node_host(i)) == [], f"processes left on {node_host(i)}"
    return outs


def _failed_then_back(out) -> tuple[dict, dict]:
    """The fault's round failed, saying why; in the next the victim was back: it advertised and shared its keys
    (the next fault may end that round), or, after the last fault, the round ran with every node."""
    first, second = out.rows
    assert first["round"] == out.facts["fault_round"]
    assert first["status"] == "failed" and first["error"], first
    if second["status"] == "ok":
        assert sorted(second["clients"]) == ["org-1", "org-2", "org-3"], second
        assert set(second["clients"].values()) == {"ok"}
    else:
        gone = second["dropped"].get("advertise", []) + second["dropped"].get("share-keys", [])
        assert VICTIM not in gone and second["halted_at"] not in (None, "advertise", "share-keys"), second
    return first, second


def _not_aggregated(row: dict) -> None:
    """The faulted node's masked update never reached the coordinator; the others' that did (on a loaded machine
    one may miss the round's timeout too) are in the halted round's row, and check_ledgers bound each to its line."""
    assert "org-2" not in row["clients"] and set(row["clients"]) <= set(OTHERS) and row["clients"], row
    assert all(s.startswith("not aggregated") for s in row["clients"].values()), row


def _faulted(chain, name: str):
    out = _survived(chain[name])
    return (out, *_failed_then_back(out))


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_a_link_cut_while_a_node_trains_fails_the_round_clearly_and_the_next_round_runs(chain):
    out, first, _ = _faulted(chain, "link-down")
    rnd = first["round"]
    assert "dropped out at 'collect'" in first["error"] and first["halted_at"] == "collect"
    _not_aggregated(first)
    assert out.facts["entries_while_down"] == out.facts["entries_before"] + 1  # it trained and recorded the round...
    assert rnd in out.facts["ledger_rounds"]["org-2"]  # ...while cut off; that line is kept (over-count, never under)


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_a_node_stalled_past_the_round_timeout_fails_the_round_clearly_and_the_next_round_runs(chain, fed):
    out, first, _ = _faulted(chain, "node-stall")
    assert "dropped out at" in first["error"]
    stalled = out.facts["proxy_while_stalled"]
    assert stalled["mode"] == "delay" and stalled["delay"] > fed.settings.secagg_timeout


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_a_node_killed_after_key_sharing_is_restarted_and_the_next_round_runs(chain):
    out, first, _ = _faulted(chain, "kill-after-key-sharing")
    assert out.facts["entries_at_kill"] == out.facts["entries_before"]  # killed before it trained: nothing recorded
    assert first["round"] not in out.facts["ledger_rounds"]["org-2"]
    assert "dropped out at 'collect'" in first["error"] and first["halted_at"] == "collect"


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_a_node_killed_before_sending_its_masked_update_keeps_its_ledger_line(chain):
    out, first, _ = _faulted(chain, "kill-before-masked-update")
    assert out.facts["entries_at_kill"] == out.facts["entries_before"] + 1  # killed after its ledger append
    assert first["round"] in out.facts["ledger_rounds"]["org-2"]  # the line survived the kill, whole
    _not_aggregated(first)  # its masked update never arrived; the others' did, and are bound to their ledgers
    # Too few masked updates for a sum that hides each one: the round halted before the consistency round, so no
    # node was ever asked for a share (nothing of any update was revealed).
    assert first["halted_at"] == "collect" and "dropped out at 'collect'" in first["error"]
    stages = out.facts["report"]["rounds"][first["round"] - 1]["secagg"]["stage_seconds"]
    assert list(stages) == ["advertise", "share-keys", "collect"]


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_a_full_disk_before_the_ledger_append_sends_no_update_and_the_next_round_runs(chain):
    out, first, _ = _faulted(chain, "disk-full")
    assert out.facts["fill"] == "No space left on device"
    assert out.facts["entries_after_round"] == out.facts["entries_before"]  # no line for an update that never left
    assert out.facts["temporary_files"] == []
    assert any("org-2" in f and "No space left on device" in f for f in first["failures"]), first["failures"]
    _not_aggregated(first)
    assert first["round"] not in out.facts["ledger_rounds"]["org-2"]


@pytest.fixture(scope="module")
def restarts(chain):
    """The chain's last round through both restarts: the SuperLink restarted once round 5 is over (the run submitted
    again resumes), then that run's ServerApp SIGKILLed once every node trained round 6 (submitted again, it
    resumes once more)."""
    from tests.support.drill import RESTARTS

    out = _survived(chain[RESTARTS])
    assert out.facts["fault_round"] == 6
    return out


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_nodes_reconnect_to_a_restarted_superlink_and_the_run_resumes(restarts):
    assert restarts.facts["same_node_processes"] is True  # the SuperNodes reconnected by themselves (Flower #4844)
    assert not restarts.facts["interrupted_run_status"].startswith("finished:completed")  # the restart cut the run
    assert restarts.facts["report"]["resumed"][0]["from_round"] == 5  # resumed after round 5, its checkpoint
    assert [(r["round"], r["status"]) for r in restarts.rows] == [(6, "ok")]


@pytest.mark.slow
@pytest.mark.faults
@needs_netns
def test_the_coordinator_killed_mid_round_resumes_and_completes(restarts):
    report = restarts.facts["report"]
    assert restarts.facts["killed"] and [(r["round"], r["status"]) for r in restarts.rows] == [(6, "ok")]
    assert len(report["resumed"]) == 2 and report["resumed"][-1]["from_round"] == 5  # again from round 5's checkpoint
    for name in ("org-1", "org-2", "org-3"):  # round 6 was trained twice (killed, then resumed): both lines are kept
        rounds = restarts.facts["ledger_rounds"][name]
        assert rounds[-2:] == [6, 6] and rounds.count(6) == 2 and all(r <= 5 for r in rounds[:-2]), rounds


def test_under_ci_the_drill_fails_instead_of_skipping_without_namespaces(tmp_path):
    """A CI machine without network namespaces must fail the drill, not pass it as skipped: run one drill test
    where `ip` cannot be found, with and without CI=true."""
    test = f"{__file__}::test_a_link_cut_while_a_node_trains_fails_the_round_clearly_and_the_next_round_runs"
    outcomes = {}
    for ci in ("true", ""):
        env = {**os.environ, "PATH": str(tmp_path), "CI": ci,  # no `ip` on this PATH
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # tests.support from another folder
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:xdist", "-p", "no:cacheprovider",
                               test], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        outcomes[ci] = (done.returncode, done.stdout + done.stderr)
    assert outcomes["true"][0] == 1 and "CI=true, but no network namespaces here" in outcomes["true"][1]
    assert outcomes[""][0] == 0 and "SKIPPED" in outcomes[""][1] and "1 skipped" in outcomes[""][1]
