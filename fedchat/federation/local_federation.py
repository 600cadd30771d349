"""A real federation on one machine: Flower's deployment engine, TLS, authenticated nodes.

``deploy/local-federation.sh --nodes N --rounds R --base-model M --out DIR`` runs this. It
uses the commands a multi-machine deployment uses (deploy/README.md), all on 127.0.0.1
with ports the kernel picks, and writes under DIR:

    certs/            CA, SuperLink certificate (127.0.0.1, localhost), a key pair per node
    roster.json       the federation roster (secure aggregation): every node's identity key, built by the
                      coordinator side (`fedchat roster init`), approved by each node (`fedchat roster approve`),
                      and the run config's secagg-roster
    data/             demo dialogues: org-1.jsonl .. org-N.jsonl, eval.jsonl
    superlink/        coordinator.toml (the SuperLink's config file), its database and FLWR_HOME
    app/              the app bundle: fedchat.fab (`fedchat app build`), and src/, its files, which `flwr run`
                      submits (the very bundle the nodes approved, whatever happens to the checkout meanwhile)
    nodes/org-i/      node i's state: node.toml (its config file, with the approved bundle's and roster's
                      SHA-256), identity key (`fedchat roster key`), privacy ledger, ledger key, FLWR_HOME
    flwr/             the `flwr` CLI's FLWR_HOME (config.toml: the connection to the SuperLink)
    run/              the coordinator's output: checkpoints, adapter, merged model, report.json
    ledgers/          each node's ledger (for `fedchat audit`)
    ledger-keys/      each node's ledger public key (`fedchat audit --keys`)
    logs/             superlink.log, org-i.log, serverapp.log, flwr-cli.log, ...
    report.json       the coordinator's report plus a "deployment" section
    commands.sh       the exact commands it ran
    processes.json    every process it started or saw (to check none survives)

Every process it starts is stopped when it ends: on success, on failure, on Ctrl-C or
SIGTERM. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from fedchat.demo_data import demo_node_config, write_demo_data
from fedchat.federation.certs import DEFAULT_HOSTS, write_certs
from fedchat.federation.deployment import (
    LOOPBACK,
    FlowerCLI,
    SuperLinkTLS,
    free_port,
    https_ready,
    process_env,
    tool,
    wait_until,
    write_cli_config,
    write_toml,
)
from fedchat.federation.processes import Service, Supervisor, become_subreaper, survivors
from shared.config import AGGREGATIONS, NodeConfig, RunConfig, org_name, parse_overrides
from shared.errors import ConfigError, FedchatError, FederationError
from shared.files import atomic_write_text
from shared.logs import FORMAT

log = logging.getLogger("fedchat.federation")

_BIND_ERRORS = ("address already in use", "error while attempting to bind")


class Interrupted(FedchatError):
    """Ctrl-C or SIGTERM: stop everything and leave."""


@dataclass(frozen=True)
class LocalFederation:
    """What to run. Values are checked at construction; an error names the flag."""

    nodes: int
    rounds: int
    base_model: str
    out: Path
    local_steps: int = 10
    batch_size: int = 8
    aggregation: str = "fedavg"
    dp: bool = True
    secagg: bool = True
    target_epsilon: float = 8.0
    timeout: float = 3600.0
    startup_timeout: float = 180.0
    app: Path = field(default_factory=lambda: find_app())
    run_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError("--nodes must be at least 1.")
        if self.secagg and self.nodes < 3:
            raise ConfigError("--nodes must be at least 3 with secure aggregation (with two, each node learns the "
                              "other's update from the sum); give --nodes 3 or more, or --no-secagg.")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}.")
        for name in ("timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds.")
        self.coordinator_config()  # RunConfig checks the rest (rounds, steps, ...) and names the key
        self.node_config(1)

    def coordinator_config(self) -> dict:
        """The run-config overrides `flwr run` submits (validated as a RunConfig)."""
        out = self.out.resolve()
        values = {
            "base-model": self.base_model, "num-rounds": self.rounds, "local-steps": self.local_steps,
            "batch-size": self.batch_size, "aggregation": self.aggregation, "dp": self.dp, "secagg": self.secagg,
            "min-nodes": self.nodes, "node-wait-timeout": float(self.startup_timeout),
            "out-dir": str(out / "run"), "eval-data": str(out / "data" / "eval.jsonl"),
            **({"secagg-roster": str(self.roster_path)} if self.secagg else {}),
            **self.run_config,
        }
        RunConfig.from_flower(values)
        return values

    @property
    def roster_path(self) -> Path:
        """The federation roster: the coordinator's copy (secagg-roster), the one every node approves."""
        return self.out.resolve() / "roster.json"

    def node_config(self, i: int) -> dict:
        """Node i's --node-config (validated as a NodeConfig)."""
        values = demo_node_config(self.out.resolve(), org_name(i), target_epsilon=self.target_epsilon, dp=self.dp,
                                  secagg=self.secagg)
        NodeConfig.from_flower(values)
        return values

    def coordinator_file(self, port: int, tls: SuperLinkTLS, database: Path) -> dict:
        """The SuperLink's config file (`fedchat coordinator start FILE`), as TOML values."""
        return {"superlink": {"host": LOOPBACK, "port": port, "certfile": str(tls.certfile),
                              "keyfile": str(tls.keyfile), "ca-certfile": str(tls.ca_certfile),
                              "database": str(database), "supernode-auth": True}}

    def node_file(self, i: int, superlink: str, ca: Path, key: Path, runtime_port: int) -> dict:
        """Node i's config file (`fedchat node start FILE`), as TOML values."""
        return {"node": self.node_config(i), "connection": {
            "superlink": superlink, "root-certificates": str(ca), "auth-private-key": str(key),
            "runtime-port": runtime_port, "max-wait-time": self.startup_timeout}}


def service_command(role: str, config: str | Path) -> list[str]:
    """The command that starts a coordinator's SuperLink or a node's SuperNode from its config file.

    The one this script runs, and the one the containers (deploy/docker, deploy/compose.yaml) and
    the systemd units (deploy/systemd) run: tests/test_deploy_kit.py keeps them the same.
    """
    if role not in ("coordinator", "node"):
        raise ConfigError(f"a service is 'coordinator' or 'node', not {role!r}.")
    return [tool("fedchat"), role, "start", str(config)]


def find_app() -> Path:
    """The fedchat project folder (its pyproject.toml holds the Flower app)."""
    for folder in (Path(__file__).resolve().parents[2], Path.cwd(), *Path.cwd().parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text(encoding="utf-8"):
            return folder
    raise ConfigError("cannot find the fedchat project (a pyproject.toml with [tool.flwr.app]): run from the "
                      "repository or give --app PATH.")


class Runner:
    """One local federation, from certificates to report."""

    def __init__(self, fed: LocalFederation) -> None:
        self.fed = fed
        self.out = fed.out.resolve()
        self.logs = self.out / "logs"
        self.sup = Supervisor(self.logs, record=self.out / "processes.json")
        self.env = self._base_env()
        self.cli = FlowerCLI(self.out / "flwr", self._exec, timeout=120.0, record=self._record)
        self.superlink: Service | None = None
        self.address = ""
        self.node_ids: dict[str, str] = {}
        self.run_id: str | None = None
        self.certs = None
        self.bundle: Path | None = None  # the app bundle the nodes approve
        self.app_src: Path | None = None  # its files: what `flwr run` submits
        self.app_sha256 = ""
        self.started = time.monotonic()
        self.step_no = 0
        self.steps = 11 if fed.secagg else 10
        self.roster_sha256 = ""

    # ---------------------------------------------------------------- helpers

    def _base_env(self) -> dict[str, str]:
        from shared.model import cache_root

        env = process_env()
        env["FEDCHAT_CACHE"] = str(cache_root().resolve())  # one model cache for every process
        env["PYTHONUNBUFFERED"] = "1"
        env["FLWR_HOME"] = str(self.out / "flwr")  # never the user's ~/.flwr; services get their own
        return env

    def _env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}

    def _record(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        line = (f"(cd {shlex.quote(str(cwd))} && " if cwd else "") + (prefix + " " if prefix else "") \
            + shlex.join(argv) + (")" if cwd else "")
        with open(self.out / "commands.sh", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def _exec(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, timeout: float, cwd=None):
        """Run a command to its end under the supervisor (not recorded: FlowerCLI records its own)."""
        return self.sup.run(name, argv, env=self._env(**(env or {})), timeout=timeout, cwd=cwd)

    def _run(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, timeout: float, cwd=None):
        self._record(argv, None, cwd)
        return self._exec(name, argv, env=env, timeout=timeout, cwd=cwd)

    def _start(self, name: str, argv: list[str], *, cwd: Path, **env: str) -> Service:
        self._record(argv, env, cwd)
        cwd.mkdir(parents=True, exist_ok=True)
        return self.sup.start(name, argv, env=self._env(**env), cwd=cwd)

    def _start_service(self, name: str, role: str, config_path: Path, values: Callable[[int], dict], cwd: Path, *,
                       ready: Callable[[Service, int], None],
                       configure: Callable[[Path], None] = lambda config: None) -> tuple[Service, int]:
        """Start a SuperLink or SuperNode from its config file on a free port; `configure(config)`
        completes the file, `ready(service, port)` waits for it. Another process can take the port
        between choosing and binding it: then (and only then) try again on a new one, up to 3 times."""
        for attempt in range(3):
            port = free_port(LOOPBACK)
            config = write_toml(config_path, values(port))
            configure(config)
            service = self._start(name, service_command(role, config), cwd=cwd, FLWR_HOME=str(cwd / "flwr-home"))
            failure = None
            try:
                ready(service, port)
            except FederationError as exc:
                failure = exc
            lost_port = service.exited() is not None and _bind_failed(service)
            if not lost_port or attempt == 2:
                break
            self.sup.forget(service)
        if failure is not None:
            raise failure
        return service, port

    def step(self, text: str) -> None:
        self.step_no += 1
        log.info("[%d/%d] %s", self.step_no, self.steps, text)

    def _check_services(self) -> str | None:
        for s in self.sup.services:
            code = s.exited()
            if code is not None:
                return (f"{s.name} exited (code {code}); last lines of {s.log_path}:\n{s.log_tail()}")
        return None

    # ---------------------------------------------------------------- steps

    def prepare(self) -> None:
        fed = self.fed
        for sub in ("logs", "flwr", "superlink"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "commands.sh", "#!/usr/bin/env bash\n# The commands this local federation ran, "
                          "in order (FLWR_HOME: where each process keeps Flower's files).\n")

        self.step(f"certificates: a CA, the SuperLink's for {', '.join(DEFAULT_HOSTS)}, a key pair per node")
        names = [org_name(i) for i in range(1, fed.nodes + 1)]
        certs = write_certs(self.out / "certs", hosts=DEFAULT_HOSTS, nodes=names)
        self.certs = certs
        self._record(["fedchat", "certs", "--out", str(certs.root), "--hosts", *DEFAULT_HOSTS,
                      "--nodes", str(fed.nodes)])

        self.step(f"demo data for {fed.nodes} organisations")
        manifest = write_demo_data(self.out / "data", fed.nodes)
        self._record(["fedchat", "data", "demo", "--clients", str(fed.nodes), "--out", str(self.out / "data")])
        for c in manifest["clients"]:
            log.info("    %s: %d conversations", c["node"], c["conversations"])

        self.step(f"base model {fed.base_model} (prepared once in {self.env['FEDCHAT_CACHE']})")
        done = self._run("prepare", [tool("fedchat"), "model", "prepare", "--base-model", fed.base_model],
                         timeout=1800)
        if done.returncode != 0:
            raise FederationError(f"`fedchat model prepare --base-model {fed.base_model}` failed:\n"
                                  f"{done.stderr.strip()[-1500:]}")

    def build_roster(self) -> None:
        """Each node operator's `fedchat roster key` (an identity key in the node's state dir), and the roster
        keeper's `fedchat roster init` of their public keys: the roster every node approves before it starts."""
        from shared.roster import load_roster

        fed = self.fed
        self.step(f"identity keys of the {fed.nodes} nodes (`fedchat roster key`) and the roster of them "
                  "(`fedchat roster init`)")
        members = []
        for i in range(1, fed.nodes + 1):
            name = org_name(i)
            key = self.out / "nodes" / name / "identity-key.pem"  # the node's default: STATE_DIR/identity-key.pem
            done = self._run(f"roster-key-{name}", [tool("fedchat"), "roster", "key", "--out", str(key), "--name",
                                                    name], timeout=120)
            if done.returncode != 0:
                raise FederationError(f"`fedchat roster key` for {name} failed:\n{done.stderr.strip()[-1500:]}")
            members += ["--member", f"{name}={key.with_suffix('.pub')}"]
        done = self._run("roster-init", [tool("fedchat"), "roster", "init", "--federation", "local-federation",
                                         *members, "--out", str(fed.roster_path)], timeout=120)
        if done.returncode != 0:
            raise FederationError(f"`fedchat roster init` failed:\n{done.stderr.strip()[-1500:]}")
        roster = load_roster(fed.roster_path)
        self.roster_sha256 = roster.sha256
        log.info("    %s: %d members, colluder bound %d, sha256 %s", fed.roster_path, len(roster.members),
                 roster.colluder_bound, roster.sha256)

    def build_app(self) -> None:
        """The coordinator's `fedchat app build`: the bundle every node approves, and its files to submit."""
        from fedchat.node.app_bundle import load_bundle_file, unpack_bundle

        self.step(f"app bundle of {self.fed.app} (`fedchat app build`), for the nodes to approve")
        self.bundle = self.out / "app" / "fedchat.fab"
        done = self._run("app-build", [tool("fedchat"), "app", "build", "--app", str(self.fed.app), "--out",
                                       str(self.bundle), "--json"], timeout=300)
        if done.returncode != 0:
            raise FederationError(f"`fedchat app build` failed:\n{done.stderr.strip()[-1500:]}")
        bundle = load_bundle_file(self.bundle)
        self.app_sha256 = bundle.sha256
        self.app_src = unpack_bundle(bundle, self.out / "app" / "src")
        log.info("    %s: %d files, sha256 %s", self.bundle, len(bundle.files), self.app_sha256)

    def approve_app(self, config: Path) -> None:
        """A node operator's `fedchat node approve` of the coordinator's bundle (compared with the
        snapshot of the one checkout every party of this local federation shares)."""
        done = self._run("approve", [tool("fedchat"), "node", "approve", str(config), str(self.bundle), "--app",
                                     str(self.app_src)], timeout=300)
        if done.returncode != 0:
            raise FederationError(f"`fedchat node approve {config}` failed:\n{done.stderr.strip()[-1500:]}")

    def approve_roster(self, config: Path) -> None:
        """A node operator's `fedchat roster approve` of the roster (its hash recorded in node.toml)."""
        done = self._run("approve-roster", [tool("fedchat"), "roster", "approve", str(config),
                                            str(self.fed.roster_path)], timeout=120)
        if done.returncode != 0:
            raise FederationError(f"`fedchat roster approve {config}` failed:\n{done.stderr.strip()[-1500:]}")

    def approve(self, config: Path) -> None:
        """What a node operator approves before the node starts: the app bundle and, with secure aggregation,
        the roster."""
        self.approve_app(config)
        if self.fed.secagg:
            self.approve_roster(config)

    def start_superlink(self) -> None:
        self.step("SuperLink with TLS and SuperNode authentication")
        certs = self.certs
        tls = SuperLinkTLS(certs.server_cert, certs.server_key, certs.ca_cert)
        folder = self.out / "superlink"
        self.superlink, port = self._start_service(
            "superlink", "coordinator", folder / "coordinator.toml",
            lambda port: self.fed.coordinator_file(port, tls, folder / "state.db"), folder,
            ready=lambda service, port: wait_until(lambda: https_ready(LOOPBACK, port, certs.ca_cert),
                                                   timeout=self.fed.startup_timeout, alive=self._check_services,
                                                   what="the SuperLink did not answer over TLS"))
        self.address = f"{LOOPBACK}:{port}"
        write_cli_config(self.out / "flwr", self.address, certs.ca_cert)
        log.info("    https://%s (Fleet, Control and Runtime APIs), log %s", self.address, self.superlink.log_path)

    def register_nodes(self) -> None:
        self.step(f"registering {self.fed.nodes} node public keys")
        for i in range(1, self.fed.nodes + 1):
            name = org_name(i)
            self.node_ids[name] = self.cli.register(self.certs.node_public_key(name), name)
            log.info("    %s: node id %s", name, self.node_ids[name])

    def start_nodes(self) -> None:
        fed = self.fed
        self.step(f"{fed.nodes} SuperNodes, each with its own data, state, keys and ledger")
        for i in range(1, fed.nodes + 1):
            name = org_name(i)
            state = self.out / "nodes" / name
            self._start_service(name, "node", state / "node.toml",
                                lambda port, i=i, name=name: fed.node_file(i, self.address, self.certs.ca_cert,
                                                                           self.certs.node_key(name), port),
                                state, ready=lambda service, port: time.sleep(0.5), configure=self.approve)

        wanted = set(self.node_ids.values())

        def all_online() -> bool:
            online = {n["node-id"] for n in self.cli.nodes() if n.get("status") == "online"}
            return wanted <= online

        wait_until(all_online, timeout=fed.startup_timeout, interval=2.0, alive=self._check_services,
                   what=f"not every SuperNode came online (logs in {self.logs})")
        log.info("    all %d nodes online", fed.nodes)

    def submit(self) -> None:
        self.step(f"submitting the approved app bundle ({self.app_src}) with `flwr run`")
        run_config = write_toml(self.out / "run-config.toml", self.fed.coordinator_config())
        self.run_id = self.cli.run(self.app_src, run_config)
        log.info("    run %s: %d rounds, %s, %s, %s", self.run_id, self.fed.rounds, self.fed.aggregation,
                 "secure aggregation" if self.fed.secagg else "plaintext updates",
                 "DP-SGD" if self.fed.dp else "no DP")

    def wait(self) -> dict:
        fed = self.fed
        self.step(f"waiting for the run to finish (at most {fed.timeout:.0f} s)")
        deadline = time.monotonic() + fed.timeout
        report_path = self.out / "run" / "report.json"
        last_round, last_cli, status = 0, 0.0, ""
        while True:
            problem = self._check_services()
            if problem:
                raise FederationError(f"the federation broke down: {problem}")
            report = _read_json(report_path)
            done = report.get("completed_rounds", 0) if report else 0
            if done > last_round:
                row = report["rounds"][-1]
                loss = row.get("eval_loss")
                log.info("    round %d/%d %s in %.0f s, held-out loss %s", done, fed.rounds, row.get("status"),
                         row.get("seconds", 0), "n/a" if loss is None else f"{loss:.4f}")
                last_round = done
            finishing = bool(report) and report.get("status") == "finished"
            if finishing or time.monotonic() - last_cli > 15:
                status = self.cli.run_status(self.run_id)["status"]
                last_cli = time.monotonic()
                if status.startswith("finished"):
                    break
            if time.monotonic() > deadline:
                try:
                    self.cli.stop(self.run_id)
                except FedchatError as exc:
                    log.warning("could not stop run %s: %s", self.run_id, exc)
                raise FederationError(f"run {self.run_id} did not finish within {fed.timeout:.0f} s (--timeout); "
                                      f"it was stopped. Checkpoints in {self.out / 'run'}; logs in {self.logs}.")
            time.sleep(1.0)
        self._save_server_log()
        if status != "finished:completed":
            raise FederationError(f"run {self.run_id} ended as '{status}'; see {self.logs / 'serverapp.log'}.")
        report = _read_json(report_path)
        if not report or report.get("status") != "finished":
            raise FederationError(f"run {self.run_id} ended without a finished report in {report_path}; "
                                  f"see {self.logs / 'serverapp.log'}.")
        return report

    def _save_server_log(self) -> None:
        if self.run_id is None:
            return
        try:
            text = self.cli.logs(self.run_id)
        except FedchatError as exc:
            text = f"(could not fetch the ServerApp's log: {exc})\n"
        atomic_write_text(self.logs / "serverapp.log", text)

    def collect(self, report: dict) -> dict:
        fed = self.fed
        self.step("collecting ledgers, auditing them, writing the report")
        ledgers, keys = self.out / "ledgers", self.out / "ledger-keys"  # the audit wants keys from elsewhere
        ledgers.mkdir(exist_ok=True)
        keys.mkdir(exist_ok=True)
        nodes, copied = [], []
        for i in range(1, fed.nodes + 1):
            name = org_name(i)
            state = self.out / "nodes" / name
            entry = {"name": name, "node_id": self.node_ids.get(name),
                     "auth_public_key": str(self.certs.node_public_key(name)), "log": str(self.logs / f"{name}.log")}
            if (state / "ledger.jsonl").exists():
                shutil.copyfile(state / "ledger.jsonl", ledgers / f"{name}.jsonl")
                shutil.copyfile(state / "ledger-key.pub", keys / f"{name}.pub")
                entry.update(ledger=str(ledgers / f"{name}.jsonl"), ledger_key=str(keys / f"{name}.pub"))
                copied.append(str(ledgers / f"{name}.jsonl"))
            elif fed.dp:
                raise FederationError(f"node {name} trained with DP but left no ledger in {state}: see "
                                      f"{self.logs / (name + '.log')}.")
            nodes.append(entry)
        audit, problems = None, []
        if copied:
            done = self._run("audit", [tool("fedchat"), "audit", *copied, "--keys", str(keys), "--report",
                                       str(self.out / "run" / "report.json"), "--json"], timeout=600)
            try:
                audit = json.loads(done.stdout)
            except ValueError:
                raise FederationError(f"`fedchat audit` failed: {done.stderr.strip()[-1500:]}") from None
            problems += [f"ledger {a['node']}: {p}" for a in audit for p in a.get("problems", [])]
            if done.returncode != 0 and not problems:
                problems.append(f"`fedchat audit` failed (see {self.logs / 'audit.log'})")
        if report.get("failed_rounds"):
            problems.append(f"rounds {report['failed_rounds']} failed: " + "; ".join(
                r.get("error", "") for r in report["rounds"] if r.get("status") != "ok"))
        report = dict(report)
        report["deployment"] = {
            "engine": "flower-deployment", "flower": version("flwr"), "superlink": self.address,
            "tls": True, "supernode_auth": True, "certs": str(self.certs.root), "run_id": self.run_id,
            "flower_status": "finished:completed", "app": str(fed.app), "app_sha256": self.app_sha256,
            "roster": str(fed.roster_path) if fed.secagg else None, "roster_sha256": self.roster_sha256 or None,
            "seconds": round(time.monotonic() - self.started, 1), "nodes": nodes, "audit": audit,
            "problems": problems, "logs": str(self.logs), "processes": str(self.out / "processes.json"),
        }
        atomic_write_text(self.out / "report.json", json.dumps(report, indent=2) + "\n")
        if problems:
            raise FederationError(f"the run finished but not cleanly ({self.out / 'report.json'}): "
                                  + " | ".join(problems))
        return report

    def start(self) -> None:
        """Everything before a run is submitted: folders, the approved bundle, the SuperLink, the nodes."""
        self.prepare()
        if self.fed.secagg:
            self.build_roster()
        self.build_app()
        self.start_superlink()
        self.register_nodes()
        self.start_nodes()  # returns once every node is online

    def run(self) -> dict:
        self.start()
        self.submit()
        report = self.wait()
        return self.collect(report)

    def stop(self) -> None:
        log.info("stopping every process this federation started")
        if self.run_id is not None and not (self.logs / "serverapp.log").exists() and self.superlink is not None \
                and self.superlink.exited() is None:
            try:
                self._save_server_log()
            except FedchatError:
                pass
        killed = self.sup.stop(grace=10.0)
        seen = len(self.sup.seen)
        if killed:
            log.warning("    %d process(es) had to be killed: %s", len(killed), ", ".join(killed))
        left = survivors(self.sup.record_path)
        if left:
            log.error("    still running: %s", ", ".join(left))
        else:
            log.info("    done: none of the %d processes it saw is left (%s)", seen, self.out / "processes.json")


def _bind_failed(service: Service) -> bool:
    return any(e in service.log_tail(40).lower() for e in _BIND_ERRORS)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="local-federation.sh",
        description="A real federation on this machine: flower-superlink with TLS and SuperNode authentication, N "
                    "flower-supernode processes (own data, state, key and privacy ledger each), the fedchat app "
                    "submitted with `flwr run`; writes OUT/report.json and every process's log under OUT/logs, "
                    "and stops every process it started.")
    p.add_argument("--nodes", type=int, required=True, help="SuperNodes (organisations) to start")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    p.add_argument("--base-model", default="smollm2-135m",
                   help="smollm2-135m (embedded), tiny, or a local HF model folder")
    p.add_argument("--out", required=True, help="folder for everything (must be new or empty)")
    p.add_argument("--fresh", action="store_true", help="delete --out first if it exists")
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per node per round")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="fedavg")
    p.add_argument("--dp", action=argparse.BooleanOptionalAction, default=True, help="DP-SGD on every node")
    p.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=True,
                   help="secure aggregation every round (each node's identity key, a roster of them every node "
                        "approves)")
    p.add_argument("--target-epsilon", type=float, default=8.0, help="every node's privacy budget")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take before it is stopped")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds for the SuperLink to answer and every node to come online")
    p.add_argument("--app", type=Path, default=None, help="the fedchat project folder (default: this repository)")
    p.add_argument("--run-config", nargs="*", metavar="KEY=VALUE", help="any other run-config key")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _raise_interrupted(signum, _frame) -> None:
    raise Interrupted(f"received {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=FORMAT, datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        fed = LocalFederation(nodes=args.nodes, rounds=args.rounds, base_model=args.base_model, out=Path(args.out),
                              local_steps=args.local_steps, batch_size=args.batch_size, aggregation=args.aggregation,
                              dp=args.dp, secagg=args.secagg, target_epsilon=args.target_epsilon, timeout=args.timeout,
                              startup_timeout=args.startup_timeout, app=args.app.resolve() if args.app else find_app(),
                              run_config=parse_overrides(args.run_config))
        if args.fresh and fed.out.exists() and any(fed.out.iterdir()):
            if not (fed.out / "commands.sh").exists():
                raise ConfigError(f"--fresh deletes only an earlier local federation's folder, and {fed.out} is not "
                                  "one (no commands.sh): delete it yourself or choose another --out.")
            shutil.rmtree(fed.out)
        if fed.out.exists() and any(fed.out.iterdir()):
            raise ConfigError(f"{fed.out} is not empty: give a new --out, or --fresh to delete an earlier local "
                              "federation's folder first.")
        fed.out.mkdir(parents=True, exist_ok=True)
        runner = Runner(fed)
    except FedchatError as exc:
        print(f"local-federation: error: {exc}", file=sys.stderr)
        return 2

    become_subreaper()  # orphans of Flower's processes come back to us, to be stopped and reaped
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    code = 1
    try:
        report = runner.run()
        d = report["deployment"]
        log.info("finished: %d/%d rounds, %d nodes, %s, %s in %.0f s; report %s", report["completed_rounds"],
                 report["num_rounds"], len(d["nodes"]), "secure aggregation" if report["secagg"] else "plaintext",
                 "DP" if report["dp"] else "no DP", d["seconds"], fed.out.resolve() / "report.json")
        code = 0
    except Interrupted as exc:
        log.error("interrupted (%s): stopping every process", exc)
        code = 130
    except FedchatError as exc:
        log.error("%s", exc)
        code = 1
    except Exception:  # still stop everything; show the bug
        log.exception("unexpected error")
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        runner.stop()
    if code:
        print(f"local-federation: failed; logs in {runner.logs}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
