"""Fault drill: a real federation on a private network of namespaces, and the faults a real network brings.

`NetworkFederation` runs what a multi-machine deployment runs (deploy/README.md), each party on a
host of its own (`tests.support.netns`):

    coordinator  10.77.0.1    coordinator.fedchat.test: `fedchat coordinator start` (flower-superlink,
                              TLS, SuperNode authentication), the `flwr` CLI, the ServerApp
    wan          10.77.0.2    the network between them: `netproxy.py`, one route per node,
                 10.77.0.1i   the address node-i reaches the coordinator at (its hosts file says so)
    node-i       10.77.0.10i  `fedchat node start node.toml` (flower-supernode --isolation process,
                              the approved app bundle only), its data, state dir and privacy ledger

Every node has an identity key of its own (identities/org-i, kept across sessions like its node
key) and the coordinator's side builds the roster of them (roster.json, the run config's
secagg-roster), which each node's operator approves in its node.toml, as `fedchat roster key`,
`fedchat roster init` and `fedchat roster approve` do.

The TLS certificate is issued for coordinator.fedchat.test (and 10.77.0.1, 127.0.0.1, localhost)
and every node verifies it by that name, over real TCP through the proxy. Everything runs under
one `fedchat.federation.processes.Supervisor`; `close` stops every process, unmounts what it mounted and
removes every namespace, and `leftovers` says whether anything survived.

The scenarios (`SCENARIOS`) each start fresh nodes (new state dirs and ledgers: a node's budget
is spent by one run), submit a run under secure aggregation and DP, inject one fault at a chosen moment,
and collect the evidence: the coordinator's report, each node's ledger verified with its public
key (shared/ledger.py) and audited against the report (fedchat/audit/ledger_audit.py, what `fedchat audit` runs),
the nodes' own record of what they trained (their logs), and what was left behind.
`check_ledgers` is the invariant every scenario must keep: no ledger line lost, duplicated or
corrupt, and every update that reached the coordinator bound to its node's ledger line.
`run_scenario` gives a fault a run of its own (fault in round 1, a clean round 2); `run_chain` puts
the faults that act within one round into one run, a fault per round and a clean last round, so each
fault's next round shows the victim back (and costs no session and run of its own).

tests/test_faults.py runs the chain and the two faults that resubmit their run, a test per fault;
`python -m bench.fault_drill` runs each fault on its own and writes bench/results/faults.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedchat.federation.deployment import FlowerCLI, process_env, write_cli_config, write_toml
from fedchat.federation.processes import Service, Supervisor, signal_all, survivors
from shared.config import org_name
from shared.errors import FederationError
from tests.support.netns import Network, sweep_stale
from tests.support.netproxy import ProxyControl

log = logging.getLogger("fedchat.drill")
NETPROXY = Path(__file__).with_name("netproxy.py")  # stdlib only: it runs as a script on the wan host

COORDINATOR = "coordinator.fedchat.test"
PORT = 9093
SUBNET = "10.77.0"
RUNTIME_PORT = 9094  # each node's own loopback: the same port on every node host
SERVERAPP = "flwr-serverapp"


def node_host(i: int) -> str:
    return f"node-{i}"


@dataclass
class DrillSettings:
    """What every drill run uses: the tiny model, the fewest steps that train, short waits."""

    nodes: int = 3
    conversations: int = 120  # per node: enough for delta 1e-5 and a batch of 4
    local_steps: int = 1
    batch_size: int = 4
    secagg_timeout: float = 90.0  # seconds per secure-aggregation stage: the round's timeout
    node_wait_timeout: float = 120.0
    startup_timeout: float = 120.0
    run_timeout: float = 600.0
    target_epsilon: float = 8.0


@dataclass
class Node:
    i: int
    folder: Path  # node.toml, flwr-home
    state: Path  # state dir: ledger, its head, its key
    service: Service
    node_id: str
    log_offset: int  # where this session's part of the node's log starts
    mounted: bool = False

    @property
    def name(self) -> str:
        return org_name(self.i)

    @property
    def ledger(self) -> Path:
        return self.state / "ledger.jsonl"

    @property
    def public_key(self) -> Path:
        return self.state / "ledger-key.pub"


@dataclass
class Run:
    name: str
    out: Path
    flower_id: str

    @property
    def report_path(self) -> Path:
        return self.out / "report.json"

    def report(self) -> dict | None:
        try:
            return json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return None

    def rows(self) -> list[dict]:
        report = self.report()
        return list(report.get("rounds", [])) if report else []


class NetworkFederation:
    """A SuperLink on its host, a fault proxy on the wan host, N node hosts; nodes started per session."""

    def __init__(self, root: str | Path, settings: DrillSettings | None = None, app: str | Path | None = None):
        self.root = Path(root).resolve()
        self.settings = settings or DrillSettings()
        self.app = Path(app).resolve() if app else None
        n = self.settings.nodes
        hosts = {"coordinator": [f"{SUBNET}.1"],
                 "wan": [f"{SUBNET}.2", *(f"{SUBNET}.{10 + i}" for i in range(1, n + 1))]}
        hosts.update({node_host(i): [f"{SUBNET}.{100 + i}"] for i in range(1, n + 1)})
        self.net = Network(hosts)
        self.logs = self.root / "logs"
        self.sup = Supervisor(self.logs, record=self.root / "processes.json")
        self.env = process_env()
        self.env.update({"PYTHONUNBUFFERED": "1", "FLWR_HOME": str(self.root / "flwr")})
        self.cli = FlowerCLI(self.root / "flwr", self._cli_runner, timeout=120.0)
        self.superlink: Service | None = None
        self.proxy_service: Service | None = None
        self.proxy = ProxyControl(self.root / "proxy.sock")
        self.node_ids: dict[str, str] = {}
        self.nodes: dict[str, Node] = {}
        self.app_src: Path | None = None
        self.app_sha256 = ""
        self.certs = None
        self.mounts: list[Path] = []
        self.runs: list[Run] = []
        self.roster_sha256 = ""
        self.down: set[str] = set()  # services stopped on purpose (a killed node, a restarting SuperLink)

    # ---------------------------------------------------------------- set-up

    def open(self) -> NetworkFederation:
        from fedchat.demo_data import write_demo_data
        from fedchat.federation.certs import write_certs
        from fedchat.federation.local_federation import find_app
        from fedchat.node.app_bundle import build_bundle, unpack_bundle
        from shared.model import resolve_base_model

        self.root.mkdir(parents=True, exist_ok=True)
        stale = sweep_stale()
        if stale:
            log.info("removed %d namespace(s) a killed drill left: %s", len(stale), ", ".join(stale))
        try:
            self.net.open()
            coordinator_ip = self.net.address("coordinator")
            self.net.set_hosts("coordinator", {COORDINATOR: coordinator_ip})
            for i in range(1, self.settings.nodes + 1):  # node i reaches "the coordinator" through its proxy route
                self.net.set_hosts(node_host(i), {COORDINATOR: self._route_address(i)})
            names = [org_name(i) for i in range(1, self.settings.nodes + 1)]
            self.certs = write_certs(self.root / "certs", hosts=[COORDINATOR, coordinator_ip, "127.0.0.1", "localhost"],
                                     nodes=names)
            self._make_roster(names)
            write_demo_data(self.root / "data", self.settings.nodes)
            for name in names:  # a small share of each organisation's dialogues: the drill tests faults, not learning
                path = self.root / "data" / f"{name}.jsonl"
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                path.write_text("".join(lines[: self.settings.conversations]), encoding="utf-8")
            resolve_base_model("tiny")  # prepared once, in the cache every process shares
            bundle = build_bundle(self.app or find_app())
            self.app_sha256 = bundle.sha256
            # what `flwr run` submits, whatever the checkout does
            self.app_src = unpack_bundle(bundle, self.root / "app")
            self.start_superlink()
            write_cli_config(self.root / "flwr", f"{COORDINATOR}:{PORT}", self.certs.ca_cert)
            for name in names:
                self.node_ids[name] = self.cli.register(self.certs.node_public_key(name), name)
            self._start_proxy()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def roster_path(self) -> Path:
        return self.root / "roster.json"

    def identity_key(self, name: str) -> Path:
        return self.root / "identities" / name / "identity-key.pem"

    def _make_roster(self, names: list[str]) -> None:
        """Each node operator's identity key (`fedchat roster key`), and the roster of them all that the coordinator's
        side builds (`fedchat roster init`, colluder bound: the largest minority)."""
        from shared.crypto import create_identity_key, raw_public_hex
        from shared.roster import Member, Roster, write_roster

        members = tuple(Member(name, raw_public_hex(create_identity_key(self.identity_key(name)))) for name in names)
        roster = Roster("fault-drill", 1, (len(members) - 1) // 2, members, None)
        write_roster(self.roster_path, roster)
        self.roster_sha256 = roster.sha256

    def _route_address(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    def _cli_runner(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, timeout: float):
        """`flwr` runs on the coordinator's host, as its operator runs it there."""
        return self.sup.run(name, self.net.exec_argv("coordinator", argv), env={**self.env, **(env or {})},
                            timeout=timeout)

    def _on(self, host: str, python: str, timeout: float = 30.0) -> bool:
        """A Python snippet run on `host`: did it exit 0?"""
        done = self.sup.run("probe", self.net.exec_argv(host, [sys.executable, "-c", python]), env=self.env,
                            timeout=timeout)
        return done.returncode == 0

    def superlink_answers(self) -> bool:
        return self._on("coordinator", "import sys; from fedchat.federation.deployment import https_ready; "
                                       f"sys.exit(0 if https_ready({COORDINATOR!r}, {PORT}, "
                                       f"{str(self.certs.ca_cert)!r}) "
                                       "else 1)")

    def start_superlink(self) -> Service:
        from fedchat.federation.local_federation import service_command

        folder = self.root / "superlink"
        config = write_toml(folder / "coordinator.toml", {"superlink": {
            "host": "0.0.0.0", "port": PORT, "certfile": str(self.certs.server_cert),
            "keyfile": str(self.certs.server_key), "ca-certfile": str(self.certs.ca_cert),
            "database": str(folder / "state.db"), "supernode-auth": True}})
        if self.superlink is not None:
            self.sup.forget(self.superlink)
        self.superlink = self.sup.start("superlink",
                                        self.net.exec_argv("coordinator", service_command("coordinator", config)),
                                        env={**self.env, "FLWR_HOME": str(folder / "flwr-home")}, cwd=folder)
        self.down.discard("superlink")
        self.wait(self.superlink_answers, self.settings.startup_timeout, "the SuperLink did not answer over TLS",
                  interval=1.0)
        return self.superlink

    def stop_superlink(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the SuperLink and what it started (its SuperExec and ServerApps), as its host's service manager does."""
        procs = _tree(self.superlink.pid)
        self.down.add("superlink")
        signal_all(procs, sig)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
        self.superlink.popen.wait(timeout=10)

    def _start_proxy(self) -> None:
        routes = [f"{org_name(i)}={self._route_address(i)}:{PORT},{self.net.address('coordinator')}:{PORT}"
                  for i in range(1, self.settings.nodes + 1)]
        argv = [sys.executable, str(NETPROXY), "--control", str(self.proxy.path)]
        for route in routes:
            argv += ["--route", route]
        self.proxy_service = self.sup.start("netproxy", self.net.exec_argv("wan", argv), env=self.env, cwd=self.root)
        self.wait(self.proxy.ready, 30, "the fault proxy did not start")

    # ---------------------------------------------------------------- nodes

    def start_nodes(self, session: str, tmpfs: dict[str, int] | None = None) -> dict[str, Node]:
        """Fresh nodes (new state dirs, so new ledgers and ledger keys; the same node identities) for a
        session; `tmpfs` gives a node a state dir on a tmpfs of that many bytes (a small disk)."""
        self.stop_nodes()
        self.proxy.mode("*", "pass")
        for i in range(1, self.settings.nodes + 1):
            name = org_name(i)
            folder = self.root / "sessions" / session / name
            state = folder / "state"
            state.mkdir(parents=True, exist_ok=True)
            mounted = False
            if tmpfs and name in tmpfs:
                _run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs[name]},mode=0700", "fedchat-drill", str(state)])
                self.mounts.append(state)
                mounted = True
            config = write_toml(folder / "node.toml", {
                "node": {"node-name": name, "data-path": str(self.root / "data" / f"{name}.jsonl"),
                         "state-dir": str(state), "identity-key": str(self.identity_key(name)),
                         # each scenario is a fresh federation over the same drill data: its own registry
                         "ledger-registry": str(folder / "ledger-registry"),
                         "target-epsilon": self.settings.target_epsilon, "require-dp": True, "require-secagg": True},
                "connection": {"superlink": f"{COORDINATOR}:{PORT}", "root-certificates": str(self.certs.ca_cert),
                               "auth-private-key": str(self.certs.node_key(name)), "runtime-port": RUNTIME_PORT,
                               "max-wait-time": 900}})
            from fedchat.cli.roster_commands import record_approval
            from fedchat.federation.service_config import read_node_file
            from fedchat.node.app_bundle import write_approvals
            from shared.roster import load_roster

            write_approvals(config, [self.app_sha256])  # the operator approved the coordinator's bundle...
            record_approval(read_node_file(config), self.roster_path, load_roster(self.roster_path))  # ...and roster
            log_path = self.logs / f"{name}.log"
            offset = log_path.stat().st_size if log_path.exists() else 0
            service = self._start_node_service(i, folder)
            self.nodes[name] = Node(i, folder, state, service, self.node_ids[name], offset, mounted)
        self.wait_online(list(self.nodes))
        return self.nodes

    def _start_node_service(self, i: int, folder: Path) -> Service:
        from fedchat.federation.local_federation import service_command

        argv = self.net.exec_argv(node_host(i), service_command("node", folder / "node.toml"))
        return self.sup.start(org_name(i), argv, env={**self.env, "FLWR_HOME": str(folder / "flwr-home")}, cwd=folder)

    def online(self) -> set[str]:
        return {str(n["node-id"]) for n in self.cli.nodes() if n.get("status") == "online"}

    def wait_online(self, names: list[str], timeout: float | None = None) -> None:
        wanted = {self.node_ids[n] for n in names}
        self.wait(lambda: wanted <= self.online(), timeout or self.settings.startup_timeout,
                  f"nodes {', '.join(names)} did not come online", interval=1.0)

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL the node's whole service (`fedchat node start`, its SuperNode, its ClientApps): its host
        crashes. Returns the process ids killed (all of them started by this drill)."""
        node = self.nodes[name]
        procs = _tree(node.service.pid)
        signal_all(procs, signal.SIGKILL)
        self.down.add(name)
        psutil.wait_procs(procs, timeout=10)
        node.service.popen.wait(timeout=10)
        return [p.pid for p in procs]

    def restart_node(self, name: str) -> Node:
        node = self.nodes[name]
        if node.service.exited() is None:
            raise FederationError(f"{name} is still running")
        self.sup.forget(node.service)
        node.service = self._start_node_service(node.i, node.folder)
        self.down.discard(name)
        return node

    def stop_nodes(self) -> None:
        trees = {name: _tree(node.service.pid) if node.service.exited() is None else []
                 for name, node in self.nodes.items()}
        for procs in trees.values():  # every node at once: each takes a second or two to stop gracefully
            signal_all(procs[:1], signal.SIGTERM)
        for name, node in self.nodes.items():
            _, alive = psutil.wait_procs(trees[name], timeout=30)
            signal_all(alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=10)
            if node.service.exited() is None:
                node.service.popen.wait(timeout=10)
            self.sup.forget(node.service)
        self.nodes = {}
        self.unmount()

    def unmount(self) -> None:
        for path in reversed(self.mounts):
            _run(["umount", str(path)], check=False)
        self.mounts = [p for p in self.mounts if os.path.ismount(p)]

    def node_log(self, name: str) -> str:
        """This session's part of the node's log."""
        node = self.nodes[name]
        with open(self.logs / f"{name}.log", "rb") as f:
            f.seek(node.log_offset)
            return f.read().decode(errors="replace")

    # ---------------------------------------------------------------- runs

    def run_config(self, name: str, rounds: int, **extra) -> dict:
        s = self.settings
        return {"base-model": "tiny", "num-rounds": rounds, "local-steps": s.local_steps, "batch-size": s.batch_size,
                "min-nodes": s.nodes, "node-wait-timeout": s.node_wait_timeout, "secagg-timeout": s.secagg_timeout,
                "dp": True, "secagg": True, "secagg-roster": str(self.roster_path), "eval-data": "", "merge": False,
                "out-dir": str(self.root / "runs" / name),
                **extra}

    def submit(self, name: str, rounds: int, **extra) -> Run:
        """`flwr run` of the approved bundle; out-dir runs/NAME (a second submit of NAME resumes it)."""
        config = write_toml(self.root / "runs" / f"{name}.toml", self.run_config(name, rounds, **extra))
        run = Run(name, self.root / "runs" / name, self.cli.run(self.app_src, config))
        self.runs.append(run)
        return run

    def status(self, run: Run) -> str:
        return self.cli.run_status(run.flower_id)["status"]

    def wait_finished(self, run: Run, timeout: float | None = None) -> str:
        """Until Flower says the run finished (its status), bounded; the status."""
        found = {}

        def finished() -> bool:
            report = run.report()
            if report and report.get("status") == "finished" or time.monotonic() - found.get("asked", 0) > 15:
                found["asked"] = time.monotonic()
                found["status"] = self.status(run)
                return found["status"].startswith("finished")
            return False

        self.wait(finished, timeout or self.settings.run_timeout, f"run {run.name} did not finish", interval=1.0)
        return found["status"]

    def wait_round(self, run: Run, rnd: int, timeout: float | None = None) -> dict:
        """Until the coordinator's report holds round `rnd`; that row."""
        self.wait(lambda: len(run.rows()) >= rnd, timeout or self.settings.run_timeout,
                  f"run {run.name} did not finish round {rnd}", interval=1.0)
        return run.rows()[rnd - 1]

    def server_log(self, run: Run) -> str:
        try:
            return self.cli.logs(run.flower_id, timeout=60)
        except Exception as exc:  # a run whose ServerApp was killed may have no log to give
            return f"(no ServerApp log: {exc})"

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink's SuperExec started (descendants of our SuperLink)."""
        return [p.pid for p in _tree(self.superlink.pid)[1:] if _is(p, SERVERAPP)]

    # ---------------------------------------------------------------- waiting

    def problem(self) -> str | None:
        """A service that should run and does not (the SuperLink, the proxy, a node not killed on purpose)."""
        for service in (self.superlink, self.proxy_service, *(n.service for n in self.nodes.values())):
            if service is not None and service.exited() is not None and service.name not in self.down:
                return f"{service.name} exited (code {service.exited()}):\n{service.log_tail(20)}"
        return None

    def wait(self, check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            problem = self.problem()
            if problem:
                raise FederationError(f"{what}: {problem}")
            if time.monotonic() > deadline:
                raise FederationError(f"{what} within {timeout:.0f} s")
            time.sleep(interval)

    # ---------------------------------------------------------------- end

    def close(self) -> list[str]:
        """Stop every process, unmount, remove every namespace; what was left behind (empty: nothing)."""
        left = []
        killed = self.sup.stop(grace=15.0)
        if killed:
            log.warning("had to SIGKILL: %s", ", ".join(killed))
        self.nodes = {}
        self.unmount()
        left += [f"process {p}" for p in survivors(self.sup.record_path)] if self.sup.record_path.exists() else []
        left += [f"mount {p}" for p in self.mounts]
        left += self.net.close()
        left += [f"left: {x}" for x in self.net.leftovers()]
        return left

    def __enter__(self) -> NetworkFederation:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _is(proc: psutil.Process, program: str) -> bool:
    try:
        return any(Path(part).name == program for part in proc.cmdline()[:3])
    except psutil.Error:
        return False


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise FederationError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


# ------------------------------------------------------------------ evidence: ledgers against the report

TRAINED = re.compile(r"node (\S+) round (\d+): trained \d+ steps")


@dataclass
class LedgerCheck:
    """What the nodes' ledgers show against the coordinator's report and the nodes' own logs."""

    problems: list[str] = field(default_factory=list)
    lost: int = 0  # trainings (logged by a node, or an update the coordinator received) with no ledger line
    entries: dict[str, list[dict]] = field(default_factory=dict)  # node name -> its verified entries
    bound_rows: int = 0  # report client rows bound to a ledger line


def check_ledgers(fed: NetworkFederation, report: dict | None) -> LedgerCheck:
    """No ledger line lost, duplicated or corrupt; every update the coordinator received bound to its ledger line.

    * each node's ledger verifies line by line with its public key (canonical JSON, hash chain, signatures,
      the head file not ahead of the ledger) and holds no update twice;
    * every round a node logged as trained (the node logs it after its ledger append) has its line;
    * every client row of the coordinator's report (an update, or a masked update, that reached it) names a
      ledger line by (entries, head) that exists, is that run's and round's, and claims the same epsilon;
    * fedchat.audit.ledger_audit (what `fedchat audit --report` runs) finds no problem in any ledger or in the report.
    """
    from fedchat.audit.ledger_audit import audit_ledger, check_against_report
    from shared import ledger
    from shared.crypto import key_fingerprint, load_public_key
    from shared.errors import LedgerError

    out = LedgerCheck()
    by_key: dict[str, tuple[str, list[bytes], list[dict]]] = {}
    audits = []
    for name, node in fed.nodes.items():
        if not node.public_key.exists():
            out.problems.append(f"{name}: no ledger public key in {node.state}")
            continue
        key = load_public_key(node.public_key)
        try:
            lines = ledger.read_lines(node.ledger)
            entries = ledger.verify_lines(node.ledger, lines, key)
            recorded = ledger._read_head_file(node.ledger)
            if recorded and recorded[0] > len(lines):
                out.problems.append(f"{name}: its head file records {recorded[0]} entries, "
                                    f"the ledger holds {len(lines)}")
        except LedgerError as exc:
            out.problems.append(f"{name}: ledger corrupt: {exc}")
            continue
        out.entries[name] = entries
        by_key[key_fingerprint(key)] = (name, lines, entries)
        twice = [h for h in {e["update_sha256"] for e in entries}
                 if sum(e["update_sha256"] == h for e in entries) > 1]
        if twice:
            out.problems.append(f"{name}: {len(twice)} update(s) recorded twice")
        trained: dict[int, int] = {}
        for who, rnd in TRAINED.findall(fed.node_log(name)):
            if who == name:
                trained[int(rnd)] = trained.get(int(rnd), 0) + 1
        for rnd, count in sorted(trained.items()):
            have = sum(e["round"] == rnd for e in entries)
            if have < count:
                out.lost += count - have
                out.problems.append(f"{name}: logged {count} training(s) of round {rnd}, its ledger holds {have}")
        if entries:
            audits.append(audit_ledger(node.ledger, node.public_key))
    if report is None:
        out.problems.append("no coordinator report to check the ledgers against")
        return out
    for row in report.get("rounds", []):
        for c in row.get("clients", []):
            where = f"report round {row['round']} ({c.get('status')}) node {c.get('node')}"
            found = by_key.get(c.get("ledger_key") or "")
            count, head = c.get("ledger_entries"), c.get("ledger_head")
            if found is None or count is None or not head:
                out.lost += 1
                out.problems.append(f"{where}: bound to no ledger (key {str(c.get('ledger_key'))[:12]}, "
                                    f"entries {count})")
                continue
            name, lines, entries = found
            if not 0 < int(count) <= len(lines) or ledger.line_hash(lines[int(count) - 1]) != head:
                out.lost += 1
                out.problems.append(f"{where}: {name}'s ledger holds no line {count} with the head it reported")
                continue
            entry = entries[int(count) - 1]
            if entry["run"] != report["run_id"] or entry["round"] != row["round"]:
                out.problems.append(f"{where}: {name}'s line {count} is run {entry['run']} round {entry['round']}")
            if c.get("epsilon") is not None and entry["epsilon"] != c["epsilon"]:
                out.problems.append(f"{where}: epsilon {c['epsilon']} in the report, {entry['epsilon']} in the ledger")
            out.bound_rows += 1
    if audits:
        against = check_against_report(audits, fed.runs[-1].report_path if fed.runs else "")
        for a in [*audits, against]:
            out.problems += [f"audit {a.node}: {p}" for p in a.problems]
    return out


def leftover_files(node: Node) -> list[str]:
    """Temporary files a write left in the node's state dir (an atomic write that did not clean up)."""
    return sorted(p.name for p in node.state.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ the faults

@dataclass
class Outcome:
    """One fault's drill: what happened, what the evidence shows, and whether the federation survived it."""

    name: str
    fault: str
    survived: bool = False
    ledger_entries_lost: int = 0
    rounds_completed: int = 0
    detail: str = ""
    flower_status: str = ""
    rows: list[dict] = field(default_factory=list)  # per round of the final report: status, error, clients
    facts: dict = field(default_factory=dict)  # what the scenario saw (for its test's assertions)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"name": self.name, "survived": self.survived, "ledger_entries_lost": self.ledger_entries_lost,
                "rounds_completed": self.rounds_completed, "detail": self.detail}


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str  # what is done, in a line
    # in_round: (fed, out, run, rnd) injects the fault into round `rnd` of a running run and returns once the
    # coordinator ended that round and the fault is undone; otherwise (fed, out) submits, injects and resubmits
    # as the fault needs, and returns the run to judge
    inject: Callable
    in_round: bool = True
    composite: bool = False  # two faults above in one run (the tests' way to drill both for the price of one run)
    may_fail: tuple[int, ...] = (1,)  # rounds the fault may fail (with a clear error); every other must be ok
    tmpfs: dict[str, int] | None = None


VICTIM = "org-2"
ROUND_MARK = re.compile(r"\[RUN \d+, ROUND (\d+)\]")  # what a SuperNode logs before each message it receives or sends


def _lock_mark(node: Node) -> tuple | None:
    """The ledger lock file as it is now: a node writes its process id there when it takes the lock to train."""
    try:
        st = (node.state / "ledger.jsonl.lock").stat()
        return st.st_mtime_ns, st.st_size, st.st_ino
    except OSError:
        return None


def _head_entries(node: Node) -> int:
    try:
        return int(json.loads((node.state / "ledger.head").read_bytes())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _train_replies_sent(node_log: str, rnd: int) -> int:
    """How many replies to training messages (the secure sum's stages) of round `rnd` the node sent."""
    parts = ROUND_MARK.split(node_log)  # [before, round, text, round, text, ...]
    return sum(int(r) == rnd and "Sending: train message" in text and "Sent successfully" in text
               for r, text in zip(parts[1::2], parts[2::2]))


def _victim_training(fed: NetworkFederation, out: Outcome, rnd: int) -> Node:
    """Return once the victim holds its ledger lock for round `rnd`: it trains now."""
    node = fed.nodes[VICTIM]
    mark = _lock_mark(node)
    out.facts["entries_before"] = _head_entries(node)
    fed.wait(lambda: _lock_mark(node) != mark, fed.settings.run_timeout,
             f"{node.name} did not start training round {rnd}", interval=0.05)
    return node


def _link_down(fed: NetworkFederation, out: Outcome, run: Run, rnd: int) -> None:
    node = _victim_training(fed, out, rnd)
    fed.net.link(node_host(node.i), up=False)  # its cable is pulled while it trains
    t = time.monotonic()
    fed.wait_round(run, rnd)  # the coordinator gives up on it and ends the round
    out.facts["link_down_seconds"] = round(time.monotonic() - t, 1)
    out.facts["entries_while_down"] = _head_entries(node)
    fed.net.link(node_host(node.i), up=True)


def _stall(fed: NetworkFederation, out: Outcome, run: Run, rnd: int) -> None:
    _victim_training(fed, out, rnd)
    delay = fed.settings.secagg_timeout + 30  # every byte to and from the node now arrives after the round's timeout
    fed.proxy.mode(VICTIM, "delay", delay)
    out.facts["delay_seconds"] = delay
    fed.wait_round(run, rnd)
    out.facts["proxy_while_stalled"] = fed.proxy.status()[VICTIM]
    fed.proxy.mode(VICTIM, "pass")


def _kill_after_key_sharing(fed: NetworkFederation, out: Outcome, run: Run, rnd: int) -> None:
    node = fed.nodes[VICTIM]
    out.facts["entries_before"] = _head_entries(node)
    # its second reply of the round (advertise: its signed public keys; share-keys: its key shares) left
    fed.wait(lambda: _train_replies_sent(fed.node_log(VICTIM), rnd) >= 2, fed.settings.run_timeout,
             f"{VICTIM} did not share its keys in round {rnd}", interval=0.1)
    out.facts["entries_at_kill"] = _head_entries(node)
    out.facts["killed"] = fed.kill_node(VICTIM)
    fed.restart_node(VICTIM)  # its service manager starts it again at once
    fed.wait_online([VICTIM])
    fed.wait_round(run, rnd)


def _kill_before_masked_update(fed: NetworkFederation, out: Outcome, run: Run, rnd: int) -> None:
    node = fed.nodes[VICTIM]
    before = out.facts["entries_before"] = _head_entries(node)
    fed.wait(lambda: _head_entries(node) > before, fed.settings.run_timeout,
             f"{VICTIM} did not record round {rnd} in its ledger", interval=0.02)
    out.facts["killed"] = fed.kill_node(VICTIM)  # its ledger line is written; its masked update not yet sent
    out.facts["entries_at_kill"] = _head_entries(node)
    fed.restart_node(VICTIM)
    fed.wait_online([VICTIM])
    fed.wait_round(run, rnd)


def _disk_full(fed: NetworkFederation, out: Outcome, run: Run, rnd: int) -> None:
    node = _victim_training(fed, out, rnd)
    filler = node.state / "filler"
    with open(filler, "wb", buffering=0) as f:  # the disk fills up while the node trains: its ledger append is next
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            out.facts["fill"] = exc.strerror
    fed.wait_round(run, rnd)
    out.facts["entries_after_round"] = _head_entries(node)
    out.facts["temporary_files"] = leftover_files(node)
    filler.unlink()  # the operator frees space


def _kill_serverapp(fed: NetworkFederation, out: Outcome, run: Run, rnd: int, session: str | None = None,
                    rounds: int = 2) -> Run:
    """Once every node trained round `rnd` (one ledger line more than when the run was submitted), SIGKILL the
    ServerApp mid-round; the operator submits the run again and it resumes from its last checkpoint. The resumed
    run (of SESSION, out.name by default, and ROUNDS rounds)."""
    nodes = list(fed.nodes.values())
    before = {n.name: out.facts.get("entries_at_submit", {}).get(n.name, rnd - 1) for n in nodes}
    fed.wait(lambda: all(_head_entries(n) > before[n.name] for n in nodes), fed.settings.run_timeout,
             f"the nodes did not train round {rnd}", interval=0.1)
    pids = fed.serverapp_pids()
    if not pids:
        raise FederationError("no ServerApp process to kill")
    signal_all([psutil.Process(p) for p in pids], signal.SIGKILL)  # the coordinator's ServerApp dies mid-round
    out.facts["killed"] = pids
    out.facts["killed_run_status"] = _stop_dead_run(fed, run)
    resumed = fed.submit(session or out.name, rounds)  # the operator resubmits: it resumes from its last checkpoint
    out.facts["resumed_flower_run"] = resumed.flower_id
    return resumed


def _coordinator_killed(fed: NetworkFederation, out: Outcome) -> Run:
    return _kill_serverapp(fed, out, fed.submit(out.name, 2), 1)


def _restart_superlink(fed: NetworkFederation, out: Outcome, run: Run, session: str, rounds: int) -> Run:
    """SIGTERM the SuperLink while every node is connected (as `systemctl restart` does) and start it again; the
    operator submits the interrupted run again (it resumes). The resumed run, or RUN when it had finished."""
    pids = {name: n.service.pid for name, n in fed.nodes.items()}
    fed.stop_superlink()  # SIGTERM, as `systemctl restart` does, while every node is connected
    fed.start_superlink()
    t = time.monotonic()
    fed.wait_online(list(fed.nodes), timeout=180)  # the same SuperNode processes reconnect (Flower issue #4844)
    out.facts["reconnect_seconds"] = round(time.monotonic() - t, 1)
    out.facts["same_node_processes"] = all(fed.nodes[n].service.pid == p and fed.nodes[n].service.exited() is None
                                           for n, p in pids.items())
    out.facts["interrupted_run_status"] = _stop_dead_run(fed, run)
    if out.facts["interrupted_run_status"].startswith("finished:completed"):
        return run
    out.facts["entries_at_submit"] = {name: _head_entries(n) for name, n in fed.nodes.items()}
    resumed = fed.submit(session, rounds)
    out.facts["resumed_flower_run"] = resumed.flower_id
    return resumed


def _superlink_restart(fed: NetworkFederation, out: Outcome) -> Run:
    run = fed.submit(out.name, 2)
    fed.wait_round(run, 1)
    return _restart_superlink(fed, out, run, out.name, 2)


def _restarts_after(fed: NetworkFederation, out: Outcome, run: Run, rnd: int, session: str, rounds: int) -> Run:
    """Once round `rnd` is over: the SuperLink restarted (the run submitted again resumes), then that run's
    ServerApp SIGKILLed once every node trained round `rnd` + 1 (submitted again, it resumes once more)."""
    fed.wait_round(run, rnd)
    run = _restart_superlink(fed, out, run, session, rounds)
    if out.facts["interrupted_run_status"].startswith("finished:completed"):
        raise FederationError(f"the run finished before the SuperLink restart interrupted it: no round {rnd + 1} "
                              "to kill")
    return _kill_serverapp(fed, out, run, rnd + 1, session, rounds)


def _superlink_restart_then_coordinator_killed(fed: NetworkFederation, out: Outcome) -> Run:
    return _restarts_after(fed, out, fed.submit(out.name, 2), 1, out.name, 2)


def _stop_dead_run(fed: NetworkFederation, run: Run) -> str:
    """What Flower says of a run whose ServerApp is gone; a run still listed `running` is stopped, as the
    coordinator's runbook says (section 11: Flower 1.41 keeps a run whose ServerApp was killed `running`)."""
    status = fed.status(run)
    if not status.startswith("finished"):
        try:
            fed.cli.stop(run.flower_id)
        except FederationError:  # the SuperLink found the ServerApp gone and finished the run meanwhile
            status = fed.status(run)
            if not status.startswith("finished"):
                raise
    return status


SCENARIOS = {s.name: s for s in (
    Scenario("link-down", "org-2's link to the coordinator is cut while it trains a round, and restored after the "
             "coordinator ended that round", _link_down),
    Scenario("node-stall", "every byte to and from org-2 is delayed past the round's timeout (the secure-aggregation "
             "stage timeout) while it trains a round", _stall),
    Scenario("kill-after-key-sharing", "org-2 is SIGKILLed after it sent its key shares in a round, and restarted",
             _kill_after_key_sharing),
    Scenario("kill-before-masked-update", "org-2 is SIGKILLed after its ledger append, before it sent its masked "
             "update, in a round, and restarted", _kill_before_masked_update),
    Scenario("disk-full", "org-2's state dir (a 1 MiB tmpfs) fills up while it trains a round, before its ledger "
             "append; space is freed after the round", _disk_full, tmpfs={VICTIM: 1 << 20}),
    Scenario("coordinator-killed", "the ServerApp is SIGKILLed in round 1 after every node trained; the run is "
             "submitted again and resumes from its checkpoint", _coordinator_killed, in_round=False, may_fail=()),
    Scenario("superlink-restart", "the SuperLink is restarted after round 1 while every node is connected; the run "
             "is submitted again and resumes", _superlink_restart, in_round=False, may_fail=()),
    Scenario("superlink-restart-then-coordinator-killed", "the two above in one run: the SuperLink restarted after "
             "round 1, the resumed run's ServerApp SIGKILLed once every node trained round 2, the run submitted again",
             _superlink_restart_then_coordinator_killed, in_round=False, may_fail=(), composite=True),
)}
CHAIN = tuple(name for name, s in SCENARIOS.items() if s.in_round)  # the faults that fit in one round each
SINGLE = tuple(name for name, s in SCENARIOS.items() if not s.composite)  # each fault on its own (the bench)


def run_scenario(fed: NetworkFederation, name: str) -> Outcome:
    """Fresh nodes, the fault in round 1 of a two-round run, the run to its end; then the evidence. Never raises
    for the fault's sake."""
    spec = SCENARIOS[name]
    return _drill(fed, name, [spec], rounds=2, may_fail=spec.may_fail)[0]


RESTARTS = "superlink-restart-then-coordinator-killed"


def run_chain(fed: NetworkFederation, names: tuple[str, ...] = CHAIN, session: str = "chain",
              restarts: bool = False) -> list[Outcome]:
    """Fresh nodes and one run with one fault per round (`names[k]` in round k + 1) and a last round without
    one: each fault's round may fail, saying why, and the next must find the victim back. The same evidence
    as `run_scenario`, over the whole run; each fault's outcome holds its round and the next.

    restarts: the last round also goes through both restarts (RESTARTS, last in the list returned): the SuperLink
    restarted once the last fault's round is over, the resumed run's ServerApp SIGKILLed once every node trained
    the last round, the run submitted again; the last round must then complete."""
    if not names or not all(SCENARIOS[n].in_round for n in names):
        raise ValueError(f"a chain takes faults that act within one round: {', '.join(CHAIN)}")
    specs = [SCENARIOS[n] for n in names]
    return _drill(fed, session, specs, rounds=len(specs) + 1, may_fail=tuple(range(1, len(specs) + 1)),
                  restarts=restarts)


def _drill(fed: NetworkFederation, session: str, specs: list[Scenario], rounds: int,
           may_fail: tuple[int, ...], restarts: bool = False) -> list[Outcome]:
    outs = [Outcome(s.name, s.fault) for s in specs]
    tail = Outcome(RESTARTS, SCENARIOS[RESTARTS].fault) if restarts else None
    started = time.monotonic()
    run, problems, flower_status = None, [], ""
    try:
        fed.start_nodes(session, {k: v for s in specs for k, v in (s.tmpfs or {}).items()})
        if not specs[0].in_round:
            run = specs[0].inject(fed, outs[0])
        else:
            run = fed.submit(session, rounds)
            for rnd, (spec, out) in enumerate(zip(specs, outs), 1):
                if rnd > 1:
                    fed.wait_round(run, rnd - 1)  # the previous fault's round is over: this one begins
                t = time.monotonic()
                spec.inject(fed, out, run, rnd)
                out.seconds = round(time.monotonic() - t, 1)
            if tail is not None:
                t = time.monotonic()
                run = _restarts_after(fed, tail, run, len(specs), session, rounds)
                tail.seconds = round(time.monotonic() - t, 1)
        flower_status = fed.wait_finished(run)
    except FederationError as exc:
        problems.append(f"the drill could not finish: {exc}")
    except Exception as exc:  # a fault that breaks the drill itself is a finding too: say which, go on
        log.exception("drill %s", session)
        problems.append(f"the drill broke: {type(exc).__name__}: {exc}")
    report = run.report() if run else None
    rows = []
    if run is not None:
        server_log = fed.server_log(run)[-20000:]
        for out in outs:
            out.facts["server_log"] = server_log
    if report:
        names = {c["node_id"]: c["node"] for r in report.get("rounds", []) for c in r.get("clients", [])}
        rows = [{"round": r["round"], "status": r["status"], "error": r.get("error"),
                 "clients": {c["node"]: c.get("status") for c in r.get("clients", [])},
                 "failures": r.get("failures", []), "halted_at": r.get("secagg", {}).get("halted_at"),
                 "dropped": {stage: [names.get(i, str(i)) for i in ids]
                             for stage, ids in r.get("secagg", {}).get("dropped_at_stage", {}).items()}}
                for r in report.get("rounds", [])]
        for r in rows:
            if r["status"] != "ok" and r["round"] not in may_fail:
                problems.append(f"round {r['round']} failed and the fault should not fail it: {r['error']}")
            if r["status"] != "ok" and not r["error"]:
                problems.append(f"round {r['round']} failed without saying why")
        if len(rows) != rounds or report.get("status") != "finished":
            problems.append(f"the report holds {len(rows)} of {rounds} rounds, status {report.get('status')}")
    if flower_status and flower_status != "finished:completed":
        problems.append(f"the run ended as {flower_status}")
    check = check_ledgers(fed, report)
    problems += check.problems
    ledger_rounds = {n: [e["round"] for e in entries] for n, entries in check.entries.items()}
    if tail is not None:
        tail.facts["server_log"] = outs[0].facts.get("server_log", "")
    judged = outs + ([tail] if tail is not None else [])
    for k, out in enumerate(judged):
        # a single scenario is judged by its whole run; a chained fault by its round and the next; the restarts
        # at the end of a chain by the last round
        out.rows = rows if len(judged) == 1 else rows[k:k + 2] if k < len(outs) else rows[-1:]
        out.rounds_completed = sum(r["status"] == "ok" for r in rows)
        out.flower_status = flower_status
        out.ledger_entries_lost = check.lost
        out.problems = list(problems)
        out.facts.update(report=report, ledger_rounds=ledger_rounds, bound_rows=check.bound_rows,
                         fault_round=min(k + 1, rounds))
        if len(judged) == 1:
            out.seconds = round(time.monotonic() - started, 1)
        out.survived = not out.problems
        out.detail = _detail(out)
    fed.stop_nodes()
    return judged


def _detail(out: Outcome) -> str:
    rounds = "; ".join(f"round {r['round']} {r['status']}" + (f" ({_short(r['error'])})" if r["error"] else "")
                       for r in out.rows)
    ledgers = ", ".join(f"{n}: rounds {v}" for n, v in out.facts.get("ledger_rounds", {}).items())
    text = f"{rounds}. Ledgers {ledgers}; {out.facts.get('bound_rows', 0)} report rows bound to ledger lines."
    return text + (f" PROBLEMS: {' | '.join(out.problems)}" if out.problems else "")


def _short(text: str, n: int = 140) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
