"""What `fedchat node start` runs: a SuperNode whose ClientApps come only from approved bundles.

Why this shape (Flower 1.41):

* In its default ``subprocess`` isolation, ``flower-supernode`` starts ``flower-superexec``, which
  starts ``flwr-clientapp`` for each message; that process installs the FAB the SuperLink sent
  and imports the ClientApp *from the bundle* (the bundle's folder goes first on ``sys.path``):
  the coordinator's code, not the node's. Nothing in that chain asks the node operator.
* ``--trusted-entities`` (Flower's FAB signatures) also requires a ``valid_license`` verification
  that only Flower Hub bundles carry: a self-hosted SuperLink never provides it.
* ``--isolation process`` makes the SuperNode start no ClientApp at all: it only queues tasks on
  its local Runtime API (127.0.0.1:runtime-port) for an outside process to take. That outside
  process is this module, code the node operator installed:

  - ``run_node`` starts ``flower-supernode --isolation process`` as a child, takes only
    ClientApp tasks from its Runtime API (never agent apps or any other kind), and starts one
    runner per task; it stops everything when the SuperNode ends or on Ctrl-C / SIGTERM;
  - the runner (``python -I -m fedchat.node.runtime``) is Flower's own ``flwr-clientapp`` loop
    (``flwr.supernode.runtime.run_clientapp``) with its two first steps guarded: when the task's
    inputs arrive it keeps the run and the FAB, and *before the FAB is installed or any of its
    code imported* it checks the SHA-256 of the FAB's bytes against node.toml's
    ``[approval] app-sha256`` (read afresh for every task, so an approval applies at the next
    run). An unapproved bundle raises ``UnapprovedApp``: Flower's loop logs it and replies to the
    coordinator with an error naming the refused hash (no local path); nothing is installed. An
    approved bundle is installed into a fresh folder and loaded only from the folder it was
    installed to (the run's claimed FAB id, version and hash must name that folder).

  The runner imports nothing of the project's own packages before the approved bundle is
  loaded: Flower would otherwise resolve the bundle's ``client``/``shared`` imports to modules
  already imported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedchat.node.app_bundle import AppBundleError, approved_hashes

TASK_POLL_SECONDS = 0.5
ACTIVATION_RETRY_SECONDS = 5.0


class UnapprovedApp(Exception):
    """The node refused an app bundle its operator did not approve (its text goes to the coordinator)."""


# ------------------------------------------------------------------ the runner (one per ClientApp task)


class BundleGuard:
    """Wraps the first two steps of Flower's ClientApp loop: pull the task's inputs, install the FAB."""

    def __init__(self, node_file: Path) -> None:
        self.node_file = node_file
        self.run = None
        self.fab = None

    def pull(self, original):
        def pull_task_input(client):
            message, context, run, fab = original(client)
            self.run, self.fab = run, fab
            return message, context, run, fab
        return pull_task_input

    def install(self, original):
        def install_from_fab(fab_file, install_dir=None, skip_prompt=False):
            if not isinstance(fab_file, bytes) or self.fab is None or self.run is None:
                raise UnapprovedApp("the node checks app bundles by their bytes; it received no bundle to check")
            self.check(fab_file)
            from flwr.common.config import get_project_dir

            target = get_project_dir(self.run.fab_id, self.run.fab_version, self.fab.hash_str)
            shutil.rmtree(target, ignore_errors=True)  # never reuse a folder: install the approved bytes afresh
            installed = original(fab_file, install_dir, skip_prompt)
            if Path(installed).resolve() != target.resolve():
                raise UnapprovedApp(f"the run names app {self.run.fab_id} {self.run.fab_version}, which is not the "
                                    "approved bundle it sent")
            return installed
        return install_from_fab

    def check(self, content: bytes) -> str:
        from logging import ERROR, INFO

        from flwr.supercore import log

        digest = hashlib.sha256(content).hexdigest()
        try:
            approved = approved_hashes(self.node_file)
        except AppBundleError as exc:
            log(ERROR, "REFUSED app bundle sha256 %s: the node's approvals cannot be read: %s", digest, exc)
            raise UnapprovedApp(f"node refused app bundle sha256 {digest}: its approvals cannot be read "
                                "(the node operator must fix its config file)") from None
        if digest not in approved:
            log(ERROR, "REFUSED app bundle sha256 %s: it is not approved in %s [approval] app-sha256 (%d approved). "
                "Nothing of it was installed or run. If its operator wants it: fedchat node approve %s BUNDLE.fab",
                digest, self.node_file, len(approved), self.node_file)
            raise UnapprovedApp(f"node refused app bundle sha256 {digest}: its operator did not approve it "
                                f"({len(approved)} other bundle(s) approved). Nodes run only bundles their operators "
                                "approved: hand out the bundle (`fedchat app build`) and ask them to approve it "
                                "(`fedchat node approve`).")
        if self.fab.hash_str != digest:
            raise UnapprovedApp(f"node refused app bundle sha256 {digest}: the run calls it {self.fab.hash_str[:64]!r}")
        log(INFO, "app bundle sha256 %s is approved in %s: installing it", digest, self.node_file)
        return digest


def run_guarded_clientapp(runtime_api_address: str, token: str, node_file: Path, parent_pid: int | None) -> None:
    """Flower's `flwr-clientapp` loop for one task, with the bundle checked before it is installed."""
    from flwr.supernode.runtime import run_clientapp as flower

    for name in ("pull_task_input", "install_from_fab", "run_clientapp"):  # fail closed if Flower's loop changed
        if not callable(getattr(flower, name, None)):
            raise SystemExit(f"fedchat.node.runtime: Flower's ClientApp loop has no {name}() to guard (Flower "
                             "version other than 1.41?): refusing to run any app bundle.")
    guard = BundleGuard(node_file)
    flower.pull_task_input = guard.pull(flower.pull_task_input)
    flower.install_from_fab = guard.install(flower.install_from_fab)
    flower.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True, certificates=None,
                         parent_pid=parent_pid, runtime_dependency_install=False)


def runner_command(runtime_api_address: str, token: str, node_file: Path) -> list[str]:
    # -I: neither the working folder nor PYTHON* variables on the import path of the ClientApp's process
    return [sys.executable, "-I", "-m", "fedchat.node.runtime", "--runtime-api-address", runtime_api_address,
            "--token", token, "--node-file", str(Path(node_file).resolve()), "--parent-pid", str(os.getpid())]


# ------------------------------------------------------------------ the node: SuperNode + task loop


def _runtime_client(address: str):
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")], retry_invoker=None)


def _acquire(client):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return (res.task, res.token) if res.HasField("task") and res.token else (None, None)


def _activation_window() -> tuple[float, float]:
    """(how long the SuperLink keeps a silent node online, how long to retry an activation it refuses)."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    online = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    return online, 2 * online


class _SuperNode:
    """The SuperNode child, its output passed on line by line to ours (the node's log) and watched for
    the SuperLink's refusal to activate it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        from flwr.supercore.error.base import ApiErrorCode

        from fedchat.federation.processes import _die_with_parent

        self.marker = f"[code: {int(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)}]".encode()
        self.refused = False
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        self._pump = threading.Thread(target=self._pass_on, daemon=True)
        self._pump.start()

    def _pass_on(self) -> None:
        out = sys.stdout.buffer
        for line in iter(self.proc.stdout.readline, b""):
            self.refused = self.refused or self.marker in line
            out.write(line)
            out.flush()

    def ended(self) -> bool:
        """It exited (and all its output is passed on)."""
        if self.proc.poll() is None:
            return False
        self._pump.join(timeout=10)
        return True


def run_node(supernode: list[str], runtime_api_address: str, node_file: Path, env: dict[str, str]) -> int:
    """Run the SuperNode (a child) and a guarded runner per ClientApp task until it ends; its exit code.

    A node restarted right after a crash finds the SuperLink still holding its previous connection
    online (until two heartbeat intervals without a heartbeat, 60 s in Flower 1.41), and Flower's
    SuperNode exits at once when its activation is refused (`[code: 2004] Failed to activate
    SuperNode`, exit code 1). So a SuperNode that exits for that reason is started again, every
    ACTIVATION_RETRY_SECONDS, for twice that window; then the node gives up with its exit code.
    """
    online, window = _activation_window()
    node = _SuperNode(supernode, env)
    child = node.proc
    refused_since: float | None = None
    runners: list[subprocess.Popen] = []
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    os.environ.update(env)  # the runners inherit FLWR_HOME and the rest
    client = None
    try:
        while stop["signal"] is None:
            if node.ended():
                if not node.refused:
                    break
                if refused_since is None or time.monotonic() - node.started > online:  # it ran: a new episode
                    refused_since = time.monotonic()
                if time.monotonic() - refused_since > window:
                    print(f"fedchat node: the SuperLink refused this node for {window:.0f} s: is its public key "
                          "registered (`flwr supernode register`), and the SuperLink reachable? Giving up.",
                          file=sys.stderr, flush=True)
                    break
                print("fedchat node: the SuperLink refused to activate this node (Failed to activate SuperNode). "
                      f"After a crash it keeps the node's previous connection online for up to {online:.0f} s: "
                      f"starting the SuperNode again in {ACTIVATION_RETRY_SECONDS:.0f} s (for at most "
                      f"{window:.0f} s).", file=sys.stderr, flush=True)
                deadline = time.monotonic() + ACTIVATION_RETRY_SECONDS
                while stop["signal"] is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if stop["signal"] is not None:
                    break
                node = _SuperNode(supernode, env)
                child = node.proc
                client = None
                continue
            runners = [r for r in runners if r.poll() is None]
            try:
                client = client or _runtime_client(runtime_api_address)
                task, token = _acquire(client)
            except Exception:  # the Runtime API is not up yet, or going away: try again
                client = None
                task = None
            if task is not None:
                runners.append(subprocess.Popen(runner_command(runtime_api_address, token, node_file), env=env))
            time.sleep(TASK_POLL_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.send_signal(stop["signal"] or signal.SIGTERM)
        for proc in runners:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (child, *runners):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    return child.returncode if stop["signal"] is None else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedchat.node.runtime",
                                description="Run one ClientApp task from an approved app bundle (started by "
                                            "`fedchat node start`, not by hand).")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--node-file", required=True, type=Path)
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    run_guarded_clientapp(args.runtime_api_address, args.token, args.node_file, args.parent_pid)


if __name__ == "__main__":
    main()
