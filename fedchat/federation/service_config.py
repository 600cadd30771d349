"""The TOML files a node and a coordinator are started from, their checks, and their commands.

A node operator keeps one file (`fedchat node check-config FILE`, `fedchat node start FILE`)::

    [node]                    # the node config (docs/configuration.md, "Node config")
    node-name = "hospital-a"
    data-path = "data/dialogues.jsonl"
    state-dir = "state"
    target-epsilon = 8.0
    target-delta = 1e-5
    device = "auto"
    dtype = "auto"

    [connection]
    superlink = "coordinator.example.org:9093"
    root-certificates = "certs/ca.pem"
    auth-private-key = "keys/nodes/hospital-a"
    runtime-port = 9094        # local port of the node's ClientApp processes (127.0.0.1)
    max-wait-time = 0          # seconds to keep trying to reach the SuperLink; 0 = forever

    roster = "roster-v1.json"  # the federation roster and the SHA-256 its operator approved
    roster-sha256 = "..."      # (`fedchat roster approve FILE ROSTER` writes both)
    identity-key = "state/identity-key.pem"   # the default (`fedchat roster key --out ...` makes it)

    [approval]                 # the app bundles this node may run (`fedchat node approve FILE BUNDLE`)
    app-sha256 = ["..."]

Where node.toml is read-only to the tools (deploy/compose.yaml), approvals go to files it names:
`[approval] file = PATH` for the bundle hashes, `[approval] roster-file = PATH` for the roster (a small
TOML file with `roster` and `roster-sha256`, written by `fedchat roster approve`; [node] then sets
neither key, so that one roster is approved in one place).

and the coordinator one (`fedchat coordinator check-config|start FILE`)::

    [superlink]
    host = "0.0.0.0"           # default 127.0.0.1: the Control API shares this port (docs/runbooks/coordinator.md)
    port = 9093
    certfile = "certs/superlink.pem"
    keyfile = "certs/superlink.key"
    ca-certfile = "certs/ca.pem"
    database = "state/superlink.db"
    supernode-auth = true

Relative paths are relative to the file's folder. `start` runs exactly the command that
`deploy/local-federation.sh`, the containers and the systemd units run.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedchat.node.app_bundle import APPROVAL_SECTION, ROSTER_FILE_KEY, AppBundleError, check_approval_section
from shared.config import NodeConfig
from shared.errors import ConfigError, FedchatError

IDENTITY_KEY_FILE = "identity-key.pem"  # in the node's state-dir, unless [node] identity-key says otherwise
ROSTER_KEYS = ("roster", "roster-sha256")

NODE_SECTIONS = {"node": None, "connection": {"superlink", "root-certificates", "auth-private-key", "runtime-port",
                                              "max-wait-time", "insecure"},
                 APPROVAL_SECTION: None}  # checked by app_bundle.check_approval_section
COORDINATOR_SECTIONS = {"superlink": {"host", "port", "certfile", "keyfile", "ca-certfile", "database",
                                      "supernode-auth", "insecure"}}
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


class ConfigFileError(ConfigError):
    """A deployment config file has problems; the message lists every one."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        listed = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{listed}")


def _read(path: str | Path, sections: dict) -> tuple[Path, dict, list[str]]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text.") from None
    problems = []
    for name, value in data.items():
        if name not in sections:
            close = difflib.get_close_matches(name, list(sections), n=1)
            problems.append(f"unknown section [{name}]" + (f": did you mean [{close[0]}]?" if close else
                                                          f" (sections: {', '.join(f'[{s}]' for s in sections)})"))
        elif not isinstance(value, dict):
            problems.append(f"'{name}' must be a section ([{name}]), not a value")
        elif sections[name] is not None:
            for key in value:
                if key not in sections[name]:
                    close = difflib.get_close_matches(key, list(sections[name]), n=1)
                    problems.append(f"[{name}] unknown key '{key}'" + (f": did you mean '{close[0]}'?" if close else
                                    f" (keys: {', '.join(sorted(sections[name]))})"))
    return path, data, problems


def _resolve(base: Path, value: object) -> Path:
    return (base / str(value)).resolve() if not Path(str(value)).is_absolute() else Path(str(value))


def _address_problem(key: str, value: object) -> str | None:
    match = _ADDRESS.match(str(value))
    if not match or not 0 < int(match.group(2)) < 65536:
        return f"{key} must be HOST:PORT (e.g. 'coordinator.example.org:9093'), got {value!r}"
    return None


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _section(data: dict, name: str) -> dict:
    """A [name] table of the file ({} when missing or not a table: _read reports that)."""
    value = data.get(name)
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------ node


@dataclass(frozen=True)
class NodeFile:
    path: Path
    node: NodeConfig
    superlink: str
    root_certificates: Path | None
    auth_private_key: Path | None
    runtime_port: int
    max_wait_time: float | None  # None: keep trying forever
    approved: tuple[str, ...] = ()  # SHA-256 of the app bundles this node may run
    roster_approval: Path | None = None  # [approval] roster-file: where the roster approval is kept, if not in [node]

    @property
    def node_config_file(self) -> Path:
        """Where `start` writes the [node] section for flower-supernode's --node-config."""
        return Path(self.node.state_dir) / "node-config.toml"

    @property
    def identity_key_path(self) -> Path:
        """The node's identity key: [node] identity-key, else STATE_DIR/identity-key.pem."""
        return Path(self.node.identity_key) if self.node.identity_key else Path(self.node.state_dir) / IDENTITY_KEY_FILE


def read_roster_approval(path: Path) -> dict[str, str]:
    """The `roster` (resolved against the file's folder) and `roster-sha256` an [approval] roster-file holds;
    {} while it does not exist (no roster approved yet)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the roster approval {path}: {exc.strerror}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the roster approval {path} is not valid TOML ({exc}): approve the roster again "
                          "(`fedchat roster approve NODE_TOML ROSTER`) to rewrite it.") from None
    unknown = sorted(set(data) - set(ROSTER_KEYS))
    if unknown or not all(isinstance(data.get(k), str) and data.get(k) for k in ROSTER_KEYS):
        raise ConfigError(f"the roster approval {path} must hold exactly 'roster' and 'roster-sha256' (strings)"
                          f"{f', not {unknown}' if unknown else ''}: approve the roster again (`fedchat roster "
                          "approve NODE_TOML ROSTER`) to rewrite it.")
    return {"roster": str(_resolve(path.parent, data["roster"])), "roster-sha256": data["roster-sha256"]}


def read_node_file(path: str | Path) -> NodeFile:
    """Parse and validate the file's structure and values (not what the paths point at)."""
    path, data, problems = _read(path, NODE_SECTIONS)
    base = path.parent.resolve()
    node_values = dict(_section(data, "node"))
    for key in ("data-path", "state-dir", "ledger-key", "roster", "identity-key"):
        if node_values.get(key) and isinstance(node_values[key], str):
            node_values[key] = str(_resolve(base, node_values[key]))
    roster_approval = None
    approval = _section(data, APPROVAL_SECTION)
    if ROSTER_FILE_KEY in approval:
        value = approval[ROSTER_FILE_KEY]
        in_node = [k for k in ROSTER_KEYS if k in node_values]
        if not isinstance(value, str) or not value:
            problems.append(f"[{APPROVAL_SECTION}] '{ROSTER_FILE_KEY}' must be a path (where `fedchat roster approve` "
                            "records the approved roster)")
        elif in_node:
            keys = " and ".join(repr(k) for k in in_node)
            problems.append(f"the roster is approved in two places: [node] sets {keys} and [{APPROVAL_SECTION}] "
                            f"names '{ROSTER_FILE_KEY}'. Keep one: remove the [node] keys (a read-only node.toml), or "
                            f"the '{ROSTER_FILE_KEY}' line")
        else:
            roster_approval = _resolve(base, value)
            try:
                node_values.update(read_roster_approval(roster_approval))
            except ConfigError as exc:
                problems.append(str(exc))
    node = None
    try:
        node = NodeConfig.from_flower(node_values)
        for key in ("data-path", "state-dir"):
            if not node_values.get(key):
                problems.append(f"[node] '{key}' is required")
    except ConfigError as exc:
        problems.append(f"[node] {exc}")
    conn = _section(data, "connection")
    insecure = conn.get("insecure", False) is True
    superlink = conn.get("superlink")
    if superlink is None:
        problems.append("[connection] 'superlink' is required: the coordinator's HOST:PORT")
    elif problem := _address_problem("[connection] 'superlink'", superlink):
        problems.append(problem)
    ca = conn.get("root-certificates")
    if ca is None and not insecure:
        problems.append("[connection] 'root-certificates' is required: the CA certificate (ca.pem) the coordinator "
                        "gave you (only a test set-up may use insecure = true)")
    key = conn.get("auth-private-key")
    if key is None and not insecure:
        problems.append("[connection] 'auth-private-key' is required: this node's key from "
                        "`fedchat certs --node NAME --no-superlink`, whose .pub the coordinator registered")
    port = conn.get("runtime-port", 9094)
    if not _is_port(port):
        problems.append(f"[connection] 'runtime-port' must be a port number, got {port!r}")
    wait = conn.get("max-wait-time", 0)
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0:
        problems.append(f"[connection] 'max-wait-time' must be seconds >= 0 (0 = forever), got {wait!r}")
    approved: list[str] = []
    try:
        approved = check_approval_section(_section(data, APPROVAL_SECTION), path)
    except AppBundleError as exc:
        problems.append(str(exc).removeprefix(f"{path}: "))
    if problems:
        raise ConfigFileError(path, problems)
    return NodeFile(path, node, str(superlink), _resolve(base, ca) if ca else None,
                    _resolve(base, key) if key else None, int(port), float(wait) or None, tuple(approved),
                    roster_approval)


def check_node_file(nf: NodeFile) -> list[str]:
    """Check what the file points at, as the node will use it; return what was found.

    Raises ConfigFileError listing every problem: unreadable or invalid data (every bad line),
    a delta not below 1/n, a state folder that cannot be written or a ledger that does not
    verify, certificates and keys that do not load, a device this machine lacks, no approved
    roster (with require-secagg), a roster that is not the approved one or that does not list
    the node's identity key, no approved app bundle.
    """
    from client.privacy import check_delta
    from fedchat.federation.certs import load_cert, load_node_key
    from shared import ledger
    from shared.dialogue import read_dialogues
    from shared.model import select_device

    node, problems, found = nf.node, [], []
    try:
        dialogues = read_dialogues(node.data_path, skip_bad_lines=node.skip_bad_lines)
        n_train = len(dialogues.conversations) - int(len(dialogues.conversations) * node.validation_fraction)
        found.append(f"data: {len(dialogues.conversations)} conversations in {node.data_path} ({n_train} for "
                     f"training{f', {len(dialogues.skipped)} bad lines skipped' if dialogues.skipped else ''})")
        check_delta(node.target_delta, max(n_train, 1))
    except FedchatError as exc:
        problems.append(str(exc))
    state = Path(node.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / ".fedchat-write-test"
        probe.write_text("ok")
        probe.unlink()
        ledger_key = Path(node.ledger_key) if node.ledger_key else state / "ledger-key.pem"
        ledger.signing_key_for(state / "ledger.jsonl", ledger_key)
        entries = ledger.read_entries(state / "ledger.jsonl")
        if entries:
            from fedchat.audit.ledger_audit import audit_ledger

            # the private key also tells the public key the entries must verify against
            audit = audit_ledger(state / "ledger.jsonl", ledger_key, recompute=False)
            problems += [f"ledger {state / 'ledger.jsonl'}: {p}" for p in audit.problems]
            spent = entries[-1]["epsilon"]  # None: a round was trained without DP (infinite epsilon)
            found.append(f"ledger: {len(entries)} rounds trained, epsilon "
                         f"{'inf (trained without DP)' if spent is None else f'{spent:.3f}'} of "
                         f"{node.target_epsilon:g} spent")
        else:
            found.append(f"ledger: none yet ({state / 'ledger.jsonl'} is created at the first round)")
        found.append(f"ledger key: {ledger_key} (public key {ledger_key.with_suffix('.pub')} is for auditors)")
    except OSError as exc:
        problems.append(f"state-dir {state} is not writable: {exc.strerror}")
    except FedchatError as exc:
        problems.append(str(exc))
    if nf.root_certificates is not None:
        try:
            cert = load_cert(nf.root_certificates)
            found.append(f"CA: {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
        except FedchatError as exc:
            problems.append(str(exc))
    if nf.auth_private_key is not None:
        try:
            load_node_key(nf.auth_private_key)
            mode = nf.auth_private_key.stat().st_mode & 0o077
            found.append(f"auth key: {nf.auth_private_key}" + (" (readable by others: chmod 600 it)" if mode else ""))
        except FedchatError as exc:
            problems.append(str(exc))
    try:
        found.append(f"device: {select_device(node.device)}")
    except FedchatError as exc:
        problems.append(str(exc))
    roster_found, roster_problems = check_roster(nf)
    found += roster_found
    problems += roster_problems
    if nf.approved:
        found += [f"approved app bundle: sha256 {h}" for h in nf.approved]
    else:
        problems.append(f"[{APPROVAL_SECTION}] no app bundle is approved: the node would refuse every run. Get the "
                        "bundle (.fab) from the coordinator and approve it: "
                        f"`fedchat node approve {nf.path} BUNDLE.fab` (it lists the bundle's files first)")
    if problems:
        raise ConfigFileError(nf.path, problems)
    return found


def check_roster(nf: NodeFile) -> tuple[list[str], list[str]]:
    """The approved roster and the node's identity key, as the node's secure aggregation will use them:
    (what was found, the problems). The roster must load, be the approved one, and list the node's key."""
    from shared.crypto import load_identity_key, raw_public_hex
    from shared.errors import RosterError
    from shared.roster import load_approved

    node, found, problems = nf.node, [], []
    approve = f"`fedchat roster approve {nf.path} ROSTER`"
    roster = None
    if not node.roster and not node.roster_sha256:
        if not node.require_secagg:
            found.append("roster: none approved (this node takes part only in runs without secure aggregation)")
            return found, problems
        where = f"in {nf.roster_approval} ([approval] roster-file)" if nf.roster_approval else "in [node]"
        problems.append(f"no roster is approved ({where}): the node would refuse every secure-aggregation round. Get "
                        f"the federation's roster from its roster keeper, check it (`fedchat roster show ROSTER`, the "
                        f"sha256 compared with the other operators) and approve it: {approve}")
    else:
        try:
            roster = load_approved(node.roster, node.roster_sha256)
            found.append(f"roster: {node.roster}, federation {roster.federation} version {roster.version}, "
                         f"{len(roster.members)} members, colluder bound {roster.colluder_bound}, sha256 "
                         f"{roster.sha256} (approved)")
        except RosterError as exc:
            problems.append(str(exc))
    key_path = nf.identity_key_path
    try:
        public = raw_public_hex(load_identity_key(key_path))
    except RosterError as exc:
        problems.append(f"{exc} The roster must list it ({approve} after the roster keeper added it).")
        return found, problems
    readable = " (readable by others: chmod 600 it)" if key_path.stat().st_mode & 0o077 else ""
    if roster is None:
        found.append(f"identity key: {key_path} (public key {public}){readable}")
        return found, problems
    member = roster.by_key(public)
    if member is None:
        problems.append(f"this node's identity key {key_path} (public key {public}) is not in the approved roster "
                        f"(federation {roster.federation} version {roster.version}): the node could take part in "
                        f"no round. Send the roster keeper the line `--member {node.node_name or 'NODE_NAME'}="
                        f"{public}`, then approve the roster they send back ({approve})")
        return found, problems
    found.append(f"identity key: {key_path}, roster member {member.name}{readable}")
    if node.node_name and member.name != node.node_name:
        found.append(f"warning: node-name is {node.node_name!r} but the roster lists this node's key as "
                     f"{member.name!r}: set node-name to the roster's name, or ask the roster keeper to fix it")
    if node.secagg_colluders >= len(roster.members):
        problems.append(f"[node] secagg-colluders = {node.secagg_colluders} is not below the roster's "
                        f"{len(roster.members)} members: the node would refuse every round; lower it, or set -1 "
                        "(the roster's colluder bound)")
    return found, problems


def node_command(nf: NodeFile) -> list[str]:
    from fedchat.federation.deployment import supernode_command

    return supernode_command(superlink=nf.superlink, root_certificates=nf.root_certificates,
                             auth_key=nf.auth_private_key, node_config=nf.node_config_file,
                             runtime_port=nf.runtime_port, max_wait_time=nf.max_wait_time, isolation="process")


def write_node_config(nf: NodeFile) -> Path:
    """The [node] section as flower-supernode's --node-config file (absolute paths)."""
    from fedchat.federation.deployment import write_toml

    values = {k: v for k, v in nf.node.to_flower().items() if v not in ("", None)}
    return write_toml(nf.node_config_file, values)


# ------------------------------------------------------------------ coordinator


@dataclass(frozen=True)
class CoordinatorFile:
    path: Path
    host: str
    port: int
    certfile: Path | None
    keyfile: Path | None
    ca_certfile: Path | None
    database: Path | None
    supernode_auth: bool


def read_coordinator_file(path: str | Path) -> CoordinatorFile:
    path, data, problems = _read(path, COORDINATOR_SECTIONS)
    base = path.parent.resolve()
    s = _section(data, "superlink")
    if "superlink" not in data:
        problems.append("section [superlink] is required")
    # loopback unless told: Flower 1.41 serves the unauthenticated Control API on the nodes' port
    host, port = s.get("host", "127.0.0.1"), s.get("port", 9093)
    if not isinstance(host, str) or not host:
        problems.append(f"[superlink] 'host' must be an address to listen on, got {host!r}")
    if not _is_port(port):
        problems.append(f"[superlink] 'port' must be a port number, got {port!r}")
    insecure = s.get("insecure", False) is True
    auth = s.get("supernode-auth", True)
    if not isinstance(auth, bool):
        problems.append(f"[superlink] 'supernode-auth' must be true or false, got {auth!r}")
    tls = {k: s.get(k) for k in ("certfile", "keyfile", "ca-certfile")}
    if not insecure:
        problems += [f"[superlink] '{k}' is required (from `fedchat certs --out DIR --hosts ...`)"
                     for k, v in tls.items() if not v]
    elif auth is True:
        problems.append("[superlink] supernode-auth needs TLS: remove insecure = true")
    if problems:
        raise ConfigFileError(path, problems)
    paths = {k: _resolve(base, v) if v and not insecure else None for k, v in tls.items()}
    database = _resolve(base, s["database"]) if s.get("database") else None
    return CoordinatorFile(path, host, port, paths["certfile"], paths["keyfile"], paths["ca-certfile"], database,
                           bool(auth))


def check_coordinator_file(cf: CoordinatorFile) -> list[str]:
    from fedchat.federation.certs import cert_hosts, check_server_cert, load_cert

    problems, found = [], []
    if cf.certfile is not None:
        try:
            check_server_cert(cf.certfile, cf.keyfile, cf.ca_certfile)
            hosts = cert_hosts(load_cert(cf.certfile))
            found.append(f"TLS certificate {cf.certfile} for {', '.join(sorted(hosts))}")
            if "127.0.0.1" not in hosts:
                problems.append(f"{cf.certfile} does not cover 127.0.0.1, where the SuperLink's own ServerApp "
                                "processes reach it: reissue with `fedchat certs --hosts ... 127.0.0.1`")
        except FedchatError as exc:
            problems.append(str(exc))
    if cf.database is not None:
        try:
            cf.database.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(cf.database.parent, os.W_OK):
                raise PermissionError
            found.append(f"database: {cf.database}" + (" (exists: registrations and runs are kept)"
                                                         if cf.database.exists() else ""))
        except OSError:
            problems.append(f"cannot write the database folder {cf.database.parent}")
    else:
        found.append("database: none (registrations are lost when the SuperLink restarts)")
    found.append(f"listening on {cf.host}:{cf.port}, SuperNode authentication {'on' if cf.supernode_auth else 'OFF'}")
    if cf.host not in ("127.0.0.1", "localhost", "::1"):
        found.append(f"the Control API (registrations, runs; no authentication in Flower 1.41) listens on {cf.host}:"
                     f"{cf.port} too: let only the node hosts reach it, and reach it yourself through SSH")
    if problems:
        raise ConfigFileError(cf.path, problems)
    return found


def coordinator_command(cf: CoordinatorFile) -> list[str]:
    from fedchat.federation.deployment import SuperLinkTLS, superlink_command

    tls = SuperLinkTLS(cf.certfile, cf.keyfile, cf.ca_certfile) if cf.certfile else None
    return superlink_command(host=cf.host, port=cf.port, tls=tls, node_auth=cf.supernode_auth, database=cf.database)
