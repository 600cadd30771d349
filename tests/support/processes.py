"""Commands the tests start in sessions of their own, stopped by process group id, never by name."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Child:
    """A command in a session of its own (its process group is what Ctrl-C in a terminal
    reaches), its output in a log file: a pipe nobody reads while the test waits would block
    the child once full. Stopped by its process group id, never by name."""

    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, argv: list[str], log: Path, **popen) -> Child:
        with open(log, "wb") as f:
            return cls(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **popen),
                       log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Ctrl-C to the whole group, then SIGKILL if it has not ended within 60 s."""
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def finish(self, timeout: float) -> str:
        """Its output once it has ended on its own; stopped and failed after `timeout` s."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.proc.args[0]} did not end within {timeout} s:\n{self.output()[-4000:]}")
        return self.output()
