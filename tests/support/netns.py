"""Hosts on a private network of their own, in Linux network namespaces (root only).

A `Network` is what a fault drill runs a federation on instead of loopback: every host (the
coordinator, each node, the fault proxy between them) is a network namespace with its own
interface, address and name; a bridge in a switch namespace connects them; TCP between them
is real TCP over veth pairs. Nothing is added to the machine's own namespace: the addresses
(a private range) exist only inside the namespaces, and names resolve through a hosts file of
each namespace's own (``/etc/netns/NAMESPACE/hosts``, which ``ip netns exec`` mounts over
``/etc/hosts`` for the processes it starts), never through the machine's /etc/hosts.

    with Network({"coordinator": ["10.77.0.1"], "node-1": ["10.77.0.101"]}) as net:
        net.set_hosts("node-1", {"coordinator.fedchat.test": "10.77.0.1"})
        argv = net.exec_argv("node-1", ["fedchat", "node", "start", "node.toml"])  # runs on node-1
        net.link("node-1", up=False)  # node-1's cable pulled: packets dropped, no error, no reset

Namespace names carry the creating process's id and a random tag (``fcn<pid>x<tag>-<host>``),
so runs in parallel never clash, and `sweep_stale` can remove what a killed run left.
`close` removes every namespace, link and hosts file it made; the processes started in them
must be stopped first (a namespace with a process in it is reported, and the process is left
alone: only whoever started it may stop it). `leftovers` says what is still there.

Linux's netem qdisc (delay, loss) is missing in some kernels (gVisor's among them); slow or
stalled links come from `tests/support/netproxy.py`, a TCP proxy run on a host of its own.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from shared.errors import FedchatError

PREFIX = "fcn"
NETNS_ETC = Path("/etc/netns")
SWITCH = "switch"
BRIDGE = "br0"
_NAME = re.compile(rf"^{PREFIX}(\d+)x([0-9a-f]+)-([a-z0-9-]+)$")
_HOST = re.compile(r"^[a-z][a-z0-9-]{0,11}$")


class NetnsError(FedchatError):
    """A network namespace could not be made, changed or removed."""


def ip(*args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`, bounded in time; NetnsError with its message when it fails."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NetnsError("the `ip` command (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`ip {' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if check and done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can): not root, no `ip`,
    or a kernel that refuses them. Tries one namespace with a veth pair, and removes it."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}-probe"
    try:
        ip("netns", "add", probe)
        try:
            ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        finally:
            ip("netns", "del", probe, check=False)
    except NetnsError as exc:
        return f"`ip netns` or veth pairs do not work here: {exc}"
    return None


def namespaces() -> list[str]:
    done = ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def netns_pids(namespace: str) -> list[int]:
    done = ip("netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove namespaces (and hosts files) left by a drill whose process is gone and in which no
    process runs any more; return their names. Never touches a process."""
    removed = []
    for name in namespaces():
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))) and not netns_pids(name):
            ip("netns", "del", name, check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
            removed.append(name)
    return removed


class Network:
    """Hosts (network namespaces) on one bridge; `hosts` maps a host name to its addresses
    (the first is its own, more are extra addresses on the same interface)."""

    def __init__(self, hosts: dict[str, list[str]], prefix_len: int = 24) -> None:
        for name, addresses in hosts.items():
            if not _HOST.match(name) or name == SWITCH:
                raise NetnsError(f"host name {name!r}: 1-12 lower-case letters, digits or '-', not {SWITCH!r}")
            if not addresses:
                raise NetnsError(f"host {name} needs an address")
        self.hosts = {name: list(addresses) for name, addresses in hosts.items()}
        self.prefix_len = prefix_len
        self.tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.made: list[str] = []  # namespaces made so far, in order
        self.problems: list[str] = []  # what `close` could not remove

    def namespace(self, host: str) -> str:
        if host != SWITCH and host not in self.hosts:
            raise NetnsError(f"no host {host!r} in this network (hosts: {', '.join(self.hosts)})")
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return self.hosts[host][0]

    # ---------------------------------------------------------------- make and remove

    def open(self) -> Network:
        """Make the switch, then each host with a veth pair to it; on any failure remove what was made."""
        try:
            switch = self._add_namespace(SWITCH)
            ip("-n", switch, "link", "add", BRIDGE, "type", "bridge")
            ip("-n", switch, "link", "set", BRIDGE, "up")
            for host, addresses in self.hosts.items():
                ns = self._add_namespace(host)
                port = self._port(host)
                ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                ip("-n", switch, "link", "set", port, "master", BRIDGE)
                ip("-n", switch, "link", "set", port, "up")
                for address in addresses:
                    ip("-n", ns, "addr", "add", f"{address}/{self.prefix_len}", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                self.set_hosts(host, {})
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, host: str) -> str:
        ns = self.namespace(host)
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        return ns

    @staticmethod
    def _port(host: str) -> str:
        return f"v-{host}"  # the switch's end of the host's cable (at most 14 characters)

    def close(self) -> list[str]:
        """Remove every namespace and hosts file made (hosts first, the switch last); what could not be
        removed, or still held a process (left running: stop it by its id), is returned and kept in
        `problems`."""
        for ns in reversed(self.made):
            pids = netns_pids(ns)
            if pids:
                self.problems.append(f"namespace {ns} still had processes {pids} when it was removed")
            done = ip("netns", "del", ns, check=False)
            if done.returncode != 0 and ns in namespaces():
                self.problems.append(f"namespace {ns} could not be removed: {done.stderr.strip()}")
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        self.made = []
        try:
            NETNS_ETC.rmdir()  # only if empty: other users' files stay
        except OSError:
            pass
        return list(self.problems)

    def leftovers(self) -> list[str]:
        """Namespaces and hosts files of this network that still exist."""
        left = [ns for ns in namespaces() if ns.startswith(self.tag + "-")]
        if NETNS_ETC.is_dir():
            left += [str(p) for p in NETNS_ETC.iterdir() if p.name.startswith(self.tag + "-")]
        return left

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- use

    def set_hosts(self, host: str, names: dict[str, str]) -> Path:
        """The host's /etc/hosts (for processes started with `exec_argv`): localhost and `names` (name -> IP)."""
        folder = NETNS_ETC / self.namespace(host)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{self.address(host)} {host}",
                 *(f"{address} {name}" for name, address in names.items())]
        path = folder / "hosts"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run on `host` (same process id: `ip netns exec` execs it)."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def run(self, host: str, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_argv(host, argv), capture_output=True, text=True, timeout=timeout)

    def link(self, host: str, up: bool) -> None:
        """Plug (up) or pull (down) the host's cable at the switch: while down, its packets are dropped
        silently, as on a cut line (the host's own interface keeps its address and routes)."""
        ip("-n", self.namespace(SWITCH), "link", "set", self._port(host), "up" if up else "down")

    def pids(self, host: str) -> list[int]:
        """Processes running on the host now."""
        return netns_pids(self.namespace(host))
