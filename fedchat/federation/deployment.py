"""Flower 1.41's deployment engine, as fedchat drives it: the commands and their settings.

What Flower 1.41 expects (established from its source and by running it):

* ``flower-superlink`` serves its **Fleet** (SuperNodes), **Control** (``flwr`` CLI) and
  **Runtime** (its own ``flwr-serverapp`` processes) APIs over HTTPS on ONE address,
  ``--host``/``--port``. TLS: ``--ssl-certfile --ssl-keyfile --ssl-ca-certfile`` (the CA is
  what its own SuperExec trusts when it connects back to the Runtime API).
  The Control API cannot be given an address of its own (``--control-api-address`` is deprecated
  and ignored), so `fedchat coordinator start` listens on 127.0.0.1 unless told otherwise.
  ``--enable-supernode-auth`` requires TLS and makes the Fleet API accept only nodes whose
  public key was registered with ``flwr supernode register``; nodes cannot register
  themselves. ``--disable-runtime-dependency-installation`` keeps it from running ``uv sync``
  for each app (no network here: the app's dependencies are installed in the venv).
* ``flower-supernode --superlink HOST:PORT --root-certificates CA`` connects over HTTPS,
  signing every Fleet request with ``--auth-supernode-private-key`` (ECDSA on a NIST curve,
  OpenSSH format). It also serves a Runtime API for its ``flwr-clientapp`` processes on
  ``--host``/``--port`` (default 127.0.0.1:9094: give each node on one machine its own port).
  ``--node-config`` takes ``key=value`` pairs or a ``.toml`` file.
* The ``flwr`` CLI finds SuperLinks in ``$FLWR_HOME/config.toml`` (``~/.flwr`` by default):
  ``[superlink.NAME] address = "HOST:PORT"``, ``root-certificates = "/abs/ca.pem"``; commands
  take the connection NAME (``flwr run APP NAME``, ``flwr ls NAME``, ``flwr supernode
  register KEY.pub NAME``). ``--run-config`` takes ``key=value`` pairs or a ``.toml`` file.
* In the default ``subprocess`` isolation both engines start ``flower-superexec``, which starts
  ``flwr-serverapp`` / ``flwr-clientapp`` found on PATH: the venv's ``bin`` must come first.
  FABs are unpacked under each process's ``$FLWR_HOME/apps``. A fedchat node runs its SuperNode
  with ``--isolation process`` instead and starts the ClientApps itself, from approved bundles
  only (fedchat.node.runtime).

* The SuperLink keeps its state and every message's payload in SQLite (``--database``), whose
  connections wait at most 5 s for a lock (``flwr.supercore.constant.SQLITE_PRAGMAS``). Three
  nodes pushing 160 MB updates (a 40M-parameter adapter) hold it longer on a busy host: requests
  fail with "database is locked" and the run with them. `fedchat coordinator start` therefore
  runs ``flower-superlink`` in its own process (``run_superlink``: same PID and arguments as an
  exec) with that wait raised to ``SQLITE_BUSY_TIMEOUT_MS``.

Everything here builds commands and files; starting and stopping processes is
``fedchat.federation.processes``; a whole federation on one machine is ``fedchat.federation.local_federation``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from shared.errors import FederationError
from shared.files import atomic_write_text

CONNECTION = "fedchat"  # the connection name fedchat writes into $FLWR_HOME/config.toml
LOOPBACK = "127.0.0.1"
# Flower's processes report usage events to Flower's telemetry service and check its update
# service at start-up unless told not to. A privacy-focused deployment tells them not to (and
# here, as in CI, there is no network to reach anyway).
NO_PHONING_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (flower-superlink, flwr, fedchat...)."""
    return Path(sys.executable).parent


def process_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: this venv's tools first on PATH, no phoning home."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"  # flwr-serverapp/-clientapp of this venv
    env.update(NO_PHONING_HOME)
    return env


def tool(name: str) -> str:
    path = venv_bin() / name
    return str(path) if path.exists() else name


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel picks it; bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_toml(path: str | Path, values: dict[str, Any]) -> Path:
    path = Path(path)
    atomic_write_text(path, tomli_w.dumps(values))
    return path


# ------------------------------------------------------------------ commands

@dataclass(frozen=True)
class SuperLinkTLS:
    certfile: Path
    keyfile: Path
    ca_certfile: Path


SQLITE_BUSY_TIMEOUT_MS = 120_000


def wait_longer_for_sqlite_locks() -> None:
    """Every SQLite connection Flower opens from now on in this process waits SQLITE_BUSY_TIMEOUT_MS for a lock."""
    import flwr.supercore.sql_mixin as sql

    pragmas = getattr(sql, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple) or "busy_timeout" not in dict(pragmas):
        raise FederationError("Flower's SQLite settings are not where Flower 1.41 keeps them "
                              "(flwr.supercore.sql_mixin.SQLITE_PRAGMAS): install flwr 1.41.0.")
    sql.SQLITE_PRAGMAS = tuple((k, str(SQLITE_BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in pragmas)


def run_superlink(argv: list[str]) -> None:
    """Run `argv` (a superlink_command) as Flower's ``flower-superlink`` entry point in this process,
    with SQLite's lock wait raised from Flower's 5 s to SQLITE_BUSY_TIMEOUT_MS. Refuses to start if
    Flower's SQLite settings are not where 1.41 keeps them (rather than run with the short wait)."""
    import logging

    from flwr.supercore.logger import FLOWER_LOGGER, update_console_handler
    from flwr.superlink.cli.flower_superlink import flower_superlink

    wait_longer_for_sqlite_locks()
    # Flower's own logging, as the command would have it (fedchat's CLI quiets Flower's INFO lines).
    FLOWER_LOGGER.setLevel(logging.DEBUG)
    update_console_handler(level=(os.getenv("FLWR_LOG_LEVEL") or "INFO").upper())
    sys.argv = list(argv)
    flower_superlink()


def superlink_command(*, host: str, port: int, tls: SuperLinkTLS | None, node_auth: bool = True,
                      database: str | Path | None = None) -> list[str]:
    """`flower-superlink` for a coordinator: TLS and SuperNode authentication unless told otherwise."""
    cmd = [tool("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        if node_auth:
            raise FederationError("SuperNode authentication needs TLS: give the SuperLink its certificate and key.")
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", str(Path(tls.certfile).resolve()), "--ssl-keyfile", str(Path(tls.keyfile).resolve()),
                "--ssl-ca-certfile", str(Path(tls.ca_certfile).resolve())]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(Path(database).resolve())]
    return cmd


def supernode_command(*, superlink: str, root_certificates: str | Path | None, auth_key: str | Path | None,
                      node_config: str | Path, runtime_port: int, max_wait_time: float | None = 60.0,
                      runtime_host: str = LOOPBACK, isolation: str = "subprocess") -> list[str]:
    """`flower-supernode` for a node: TLS to the SuperLink, signed with the node's key.

    `node_config` is a TOML file or a ``key=value ...`` string; `max_wait_time` bounds how long
    it keeps trying to reach the SuperLink before it gives up (None: forever). `isolation`
    "process" makes it start no ClientApp itself: `fedchat node start` runs them, from approved
    app bundles only (fedchat.node.runtime).
    """
    if isolation not in ("subprocess", "process"):
        raise FederationError(f"isolation is 'subprocess' or 'process', not {isolation!r}.")
    cmd = [tool("flower-supernode"), "--superlink", superlink, "--host", runtime_host, "--port", str(runtime_port),
           "--isolation", isolation]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(Path(root_certificates).resolve())]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    cmd += ["--node-config", str(node_config)]
    return cmd


def write_cli_config(flwr_home: str | Path, address: str, root_certificates: str | Path | None,
                     name: str = CONNECTION) -> Path:
    """$FLWR_HOME/config.toml with one SuperLink connection, the default one."""
    conn: dict[str, Any] = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    return write_toml(Path(flwr_home) / "config.toml", {"superlink": {"default": name, name: conn}})


# ------------------------------------------------------------------ readiness

def http_ready(host: str, port: int) -> bool:
    """The server answers GET /health (plain HTTP: `fedchat serve`)."""
    return _answers_health(http.client.HTTPConnection(host, port, timeout=3))


def https_ready(host: str, port: int, ca: str | Path) -> bool:
    """The SuperLink answers GET /health over TLS, with a certificate the CA vouches for."""
    context = ssl.create_default_context(cafile=str(ca))
    return _answers_health(http.client.HTTPSConnection(host, port, timeout=3, context=context))


def _answers_health(conn: http.client.HTTPConnection) -> bool:
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.5,
               alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll `check` until true; fail after `timeout` or as soon as `alive()` returns a problem."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        problem = alive()
        if problem:
            raise FederationError(f"{what}: {problem}")
        if time.monotonic() > deadline:
            raise FederationError(f"{what}: not within {timeout:.0f} s.")
        time.sleep(interval)


# ------------------------------------------------------------------ the flwr CLI

class FlowerCLI:
    """`flwr` commands against one SuperLink connection, each bounded in time, JSON parsed.

    `runner(name, argv, env=..., timeout=...)` runs a command to its end (a Supervisor's
    ``run``), so that even a hung CLI call is stopped with everything else. `record(argv, env)`,
    if given, is told every command that changes the SuperLink's state (not the queries).
    """

    def __init__(self, flwr_home: str | Path, runner: Callable[..., subprocess.CompletedProcess],
                 connection: str = CONNECTION, timeout: float = 120.0,
                 record: Callable[[list[str], dict[str, str]], None] | None = None) -> None:
        self.flwr_home = Path(flwr_home)
        self.runner = runner
        self.connection = connection
        self.timeout = timeout
        self.record = record

    def _call(self, args: list[str], *, timeout: float | None = None, expect_json: bool = True,
              changes: bool = False) -> Any:
        argv = [tool("flwr"), *args]
        if changes and self.record is not None:
            self.record(argv, {"FLWR_HOME": str(self.flwr_home)})
        env = {**NO_PHONING_HOME, "FLWR_HOME": str(self.flwr_home), "COLUMNS": "200", "NO_COLOR": "1"}
        done = self.runner("flwr-cli", argv, env=env, timeout=timeout or self.timeout)
        failed = FederationError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                                 f"{(done.stderr or done.stdout).strip()[-800:]}")
        if not expect_json:
            if done.returncode != 0:
                raise failed
            return done.stdout
        try:
            payload = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            raise failed from None
        if not payload.get("success", False):
            raise FederationError(f"`flwr {' '.join(args)}` failed: {payload.get('error-message', payload)}")
        return payload

    def register(self, public_key: str | Path, name: str) -> str:
        payload = self._call(["supernode", "register", str(public_key), self.connection, "--name", name,
                              "--format", "json"], changes=True)
        return str(payload["node-id"])

    def nodes(self) -> list[dict]:
        return self._call(["supernode", "list", self.connection, "--format", "json"])["nodes"]

    def run(self, app: str | Path, run_config: str | Path) -> str:
        payload = self._call(["run", str(app), self.connection, "--run-config", str(run_config), "--format", "json"],
                             changes=True)
        return str(payload["run-id"])

    def run_status(self, run_id: str) -> dict:
        runs = self._call(["ls", self.connection, "--run-id", str(run_id), "--format", "json"])["runs"]
        if not runs:
            raise FederationError(f"the SuperLink does not know run {run_id}.")
        return runs[0]

    def logs(self, run_id: str, timeout: float = 60.0) -> str:
        return self._call(["log", str(run_id), self.connection, "--show"], timeout=timeout, expect_json=False)

    def stop(self, run_id: str) -> None:
        self._call(["stop", str(run_id), self.connection, "--format", "json"], changes=True)
