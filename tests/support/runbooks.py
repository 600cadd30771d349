"""The runbook runner: each ```bash block of docs/runbooks/NAME.md by section, and simulated terminals
that type them in (variables and the folder carry over between blocks; a `# keeps running` block gets
a terminal of its own), with what a person does to the services (Ctrl-C, a crash)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from fedchat.federation.processes import Service, Supervisor

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "docs" / "runbooks"


@dataclass
class Block:
    runbook: str
    section: str
    text: str
    first: str = field(init=False)

    def __post_init__(self) -> None:
        self.first = self.text.splitlines()[0].strip() if self.text.strip() else ""

    @property
    def keeps_running(self) -> bool:
        return self.first.startswith("# keeps running")

    @property
    def ready(self) -> str | None:
        match = re.search(r'ready when it prints "([^"]+)"', self.first)
        return match.group(1) if match else None

    @property
    def for_a_real_host(self) -> bool:
        return self.first.startswith(("# once per host", "# production host"))


def runbook(name: str) -> dict[str, list[Block]]:
    """Section number ("## 5. Start ...") -> its ```bash blocks, in order."""
    sections: dict[str, list[Block]] = {}
    section, block = None, None
    for line in (RUNBOOKS / f"{name}.md").read_text().splitlines():
        if block is not None:
            if line.strip() == "```":
                sections.setdefault(section, []).append(Block(name, section, "\n".join(block) + "\n"))
                block = None
            else:
                block.append(line)
            continue
        heading = re.match(r"^## (\d+)\. ", line)
        if heading:
            section = heading.group(1)
        elif line.startswith("## "):
            section = line[3:].strip()
        elif line.strip() == "```bash":
            block = []
    return sections


class Terminal:
    """A shell a person types a runbook's blocks into: variables and the folder carry over between blocks."""

    def __init__(self, name: str, sup: Supervisor, env: dict[str, str], cwd: Path, scripts: Path) -> None:
        self.name, self.sup, self.env, self.cwd, self.scripts = name, sup, dict(env), cwd, scripts
        self.initial = dict(env)
        self.count = 0
        self.transcript: list[str] = []

    def run(self, block: Block, timeout: float = 300) -> str:
        self.count += 1
        script = self.scripts / f"{self.name}-{self.count:02d}.sh"
        state = script.with_suffix(".env")
        script.write_text(f"set -eo pipefail\n{block.text}\nenv -0 > {shlex.quote(str(state))}\n"
                          f"pwd >> {shlex.quote(str(state))}\n")
        started = time.monotonic()
        done = self.sup.run(self.name, ["bash", str(script)], env=self.env, cwd=self.cwd, timeout=timeout)
        out = done.stdout + done.stderr
        self.transcript.append(f"$ [{block.runbook} {block.section}] ({time.monotonic() - started:.0f} s)\n"
                               f"{block.text}{out}")
        assert done.returncode == 0, (f"{block.runbook}.md section {block.section}, in {self.name}'s terminal, "
                                      f"exit {done.returncode}:\n{block.text}\n--- output:\n{out[-4000:]}")
        *pairs, cwd = state.read_bytes().split(b"\0")
        self.env = {k.decode(): v.decode() for k, _, v in (p.partition(b"=") for p in pairs)}
        for drop in ("PWD", "OLDPWD", "SHLVL", "_", "PS1", "PS2", "PS4"):
            self.env.pop(drop, None)
        self.env.pop("FEDCHAT_SUPERVISOR_TOKEN", None)  # the supervisor adds it to every run
        self.cwd = Path(cwd.decode().strip())
        return out

    def start(self, block: Block, timeout: float = 180) -> Service:
        """A block marked `# keeps running`: a new terminal of its own; wait until it prints it is ready."""
        self.count += 1
        script = self.scripts / f"{self.name}-{self.count:02d}-service.sh"
        script.write_text(f"set -eo pipefail\n{block.text}")
        service = self.sup.start(f"{self.name}-{block.runbook}-{block.section}-{self.count}", ["bash", str(script)],
                                 env=self.initial, cwd=Path(self.initial["HOME"]))
        deadline = time.monotonic() + timeout
        # (the log's first line is the Supervisor's "$ bash SCRIPT": only what the block printed counts)
        while block.ready not in service.log_path.read_text(errors="replace").partition("\n")[2]:
            assert service.exited() is None, f"{block.runbook} section {block.section} exited:\n{service.log_tail(40)}"
            assert time.monotonic() < deadline, (f"{block.runbook} section {block.section} did not print "
                                                 f"{block.ready!r} within {timeout} s:\n{service.log_tail(40)}")
            time.sleep(0.5)
        self.transcript.append(f"$ [{block.runbook} {block.section}] (in a terminal of its own)\n{block.text}")
        return service

    def follow(self, blocks: list[Block], timeout: float = 300) -> list[Service]:
        started = []
        for block in blocks:
            if block.for_a_real_host:
                continue
            if block.keeps_running:
                started.append(self.start(block))
            else:
                self.run(block, timeout)
        return started


def ctrl_c(service: Service, timeout: float = 60) -> None:
    """What Ctrl-C in the service's terminal does: SIGINT to its foreground process group."""
    os.killpg(service.pid, signal.SIGINT)
    try:
        service.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{service.name} did not stop within {timeout} s of Ctrl-C:\n{service.log_tail(30)}")


def crash(service: Service) -> None:
    """The coordinator host dies: SIGKILL to the SuperLink and everything it started."""
    root = psutil.Process(service.pid)
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def clean_path() -> str:
    venv = str(ROOT / ".venv")
    return os.pathsep.join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                           if p and not p.startswith(venv))


def checkout_snapshot(dest: Path) -> Path:
    """FEDCHAT_SRC for the runbooks: the app's files as `flwr run` packs them, and this venv.

    Other work on this checkout while the test runs would change the app bundle between the
    coordinator's `fedchat app build` and its `flwr run .` (and the nodes would rightly refuse it).
    """
    from fedchat.node.app_bundle import build_bundle, unpack_bundle

    unpack_bundle(build_bundle(ROOT), dest)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest
