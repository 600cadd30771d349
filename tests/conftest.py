"""Shared fixtures: the tiny random Llama (SmolLM2 tokenizer) prepared once per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.logs import quiet_library_warnings

quiet_library_warnings()


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Prepared base models go to FEDCHAT_CACHE if set (CI can keep it), else a session folder."""
    if not os.environ.get("FEDCHAT_CACHE"):
        os.environ["FEDCHAT_CACHE"] = str(tmp_path_factory.mktemp("fedchat-cache"))
    return Path(os.environ["FEDCHAT_CACHE"])


@pytest.fixture(scope="session")
def tiny_dir(model_cache):
    from shared.model import resolve_base_model

    return resolve_base_model("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from shared.model import load_tokenizer

    return load_tokenizer(tiny_dir)


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def conversation(q: str = "What is the capital of France?", a: str = "Paris.") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


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
