"""Start long-running processes and stop them, with everything they started, for sure.

Flower's engines start processes of their own: ``flower-superlink`` starts a
``flower-superexec`` in a new session, which starts ``flwr-serverapp``; every
``flower-supernode`` starts a ``flower-superexec`` that starts a ``flwr-clientapp`` per
message. Stopping the process we started is not enough, and none of them may be found by
name (another federation on the same machine runs the same programs). So a ``Supervisor``:

* starts each service in a session of its own (a Ctrl-C in the terminal reaches only the
  supervisor, which then stops services in order), with its output in ``LOG_DIR/NAME.log``;
* marks every process it starts with a unique token in the environment, which Flower's
  own subprocesses inherit; a process carrying the token is ours, whoever its parent is now;
* on Linux, asks the kernel to send each service SIGTERM when the supervisor dies
  (``PR_SET_PDEATHSIG``), and can make the supervisor a child subreaper so that orphaned
  grandchildren are re-parented to it rather than to init;
* stops a service with its whole tree and every token-marked process: SIGTERM, a bounded
  wait, SIGKILL for what is left, and records every process it saw in a JSON file so that
  anyone can check afterwards that none survived.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shared.errors import FedchatError
from shared.files import atomic_write_text

log = logging.getLogger("fedchat.processes")

TOKEN_ENV = "FEDCHAT_SUPERVISOR_TOKEN"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_subreaper = False


class ProcessError(FedchatError):
    """A process could not be started, or stopped before it should have."""


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process (so it can reap and stop them).

    Only for a process that owns nothing else (a test runner would collect strangers' orphans).
    """
    global _subreaper
    _subreaper = _subreaper or _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    return _subreaper


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Service:
    name: str
    argv: list[str]
    popen: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        """Its exit code, or None while it runs."""
        return self.popen.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    """Send `sig` to each process; one that is gone already is skipped."""
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


class Supervisor:
    """The processes of one deployment, started and stopped together."""

    def __init__(self, log_dir: str | Path, record: str | Path | None = None, token: str | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.record_path = Path(record) if record else None
        self.token = token or uuid.uuid4().hex
        self.services: list[Service] = []
        self.seen: dict[tuple[int, float], list[str]] = {}

    # ---------------------------------------------------------------- start

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(extra)
        env[TOKEN_ENV] = self.token
        return env

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> Service:
        """Start `argv` in its own session, output appended to LOG_DIR/NAME.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            try:
                popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env(env), cwd=cwd, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
            except OSError as exc:
                raise ProcessError(f"cannot start {name} ({argv[0]}): {exc.strerror}. Is the virtual environment "
                                   "with fedchat and Flower installed and on PATH?") from None
        service = Service(name, argv, popen, log_path)
        self.services.append(service)
        self._see(psutil.Process(popen.pid))
        self.write_record()
        return service

    def run(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout: float) -> subprocess.CompletedProcess:
        """Run a short command to its end (bounded), its process group killed on timeout."""
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=self.env(env), cwd=cwd, start_new_session=True, text=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except OSError as exc:
            raise ProcessError(f"cannot run {name} ({argv[0]}): {exc.strerror}.") from None
        self._see(psutil.Process(popen.pid))
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_tree(popen.pid)
            popen.communicate()
            raise ProcessError(f"{name} did not finish within {timeout:.0f} s: {' '.join(argv)}") from None
        finally:
            if popen.poll() is None:  # interrupted while waiting
                self._kill_tree(popen.pid)
                popen.wait()
        with open(self.log_dir / f"{name}.log", "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(argv)}\n{out}{err}[exit {popen.returncode}]\n")
        return subprocess.CompletedProcess(argv, popen.returncode, out, err)

    # ---------------------------------------------------------------- watch

    def _see(self, proc: psutil.Process) -> None:
        try:
            key = (proc.pid, proc.create_time())
            if key not in self.seen:
                self.seen[key] = proc.cmdline()[:6]
        except psutil.Error:
            pass

    def forget(self, service: Service) -> None:
        """Stop watching a service that has exited (one started again in its place)."""
        self.services.remove(service)

    def marked(self) -> list[psutil.Process]:
        """Live processes carrying this supervisor's token (the supervisor itself excluded)."""
        return _carrying(TOKEN_ENV, self.token)

    def tree(self) -> list[psutil.Process]:
        """Every process of every service, and every marked one."""
        procs: dict[int, psutil.Process] = {}
        for service in self.services:
            try:
                root = psutil.Process(service.pid)
                if root.create_time() > service.started + 5:  # the PID was reused
                    continue
                procs[root.pid] = root
                for child in root.children(recursive=True):
                    procs[child.pid] = child
            except psutil.Error:
                continue
        for proc in self.marked():
            procs.setdefault(proc.pid, proc)
        for proc in procs.values():
            self._see(proc)
        return list(procs.values())

    def write_record(self) -> None:
        if self.record_path is None:
            return
        record = {
            "token": self.token, "token_env": TOKEN_ENV, "supervisor_pid": os.getpid(),
            "services": [{"name": s.name, "pid": s.pid, "argv": s.argv, "log": str(s.log_path)} for s in self.services],
            "processes": [{"pid": pid, "create_time": ct, "cmdline": cmd} for (pid, ct), cmd in self.seen.items()],
        }
        atomic_write_text(self.record_path, json.dumps(record, indent=2) + "\n")

    # ---------------------------------------------------------------- stop

    def _kill_tree(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        signal_all(procs, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=5)


    def stop(self, grace: float = 10.0) -> list[str]:
        """Stop every service (last started first) and everything they started; return what had to be killed."""
        procs = self.tree()
        for service in reversed(self.services):  # SIGTERM first to the services: they stop their children
            if service.exited() is None:
                signal_all([p for p in procs if p.pid == service.pid], signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(s.exited() is None for s in self.services):
            time.sleep(0.1)
        known = {p.pid for p in procs}
        left = [p for p in procs if _alive(p)] + [p for p in self.marked() if p.pid not in known]
        for proc in left:
            self._see(proc)
        signal_all(left, signal.SIGTERM)
        _, left = psutil.wait_procs(left, timeout=min(grace, 5.0))
        killed = []
        for proc in left:
            try:
                killed.append(f"{proc.pid} ({' '.join(proc.cmdline()[:2])})")
            except psutil.Error:
                killed.append(str(proc.pid))
        signal_all(left, signal.SIGKILL)
        psutil.wait_procs(left, timeout=5)
        for service in self.services:
            try:
                service.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _reap_orphans()
        self.write_record()
        return killed


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _carrying(token_env: str, token: str) -> list[psutil.Process]:
    """Live processes whose environment has token_env=token (this process excluded)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(token_env) == token:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _reap_orphans() -> None:
    """Collect exit codes of re-parented descendants (when this process is a subreaper)."""
    while _subreaper:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def survivors(record: str | Path) -> list[str]:
    """Processes recorded by a Supervisor (its JSON record) that still run, or still carry its token."""
    data = json.loads(Path(record).read_text())
    alive: dict[int, str] = {}
    for p in data["processes"]:
        try:
            proc = psutil.Process(p["pid"])
            if abs(proc.create_time() - p["create_time"]) < 0.01 and _alive(proc):
                alive[proc.pid] = " ".join(p["cmdline"][:3])
        except psutil.Error:
            continue
    for proc in _carrying(data["token_env"], data["token"]):
        try:
            alive.setdefault(proc.pid, " ".join(proc.cmdline()[:3]))
        except psutil.Error:
            continue
    return [f"{pid} ({cmd})" for pid, cmd in sorted(alive.items())]
