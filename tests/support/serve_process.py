"""`fedchat serve` (or another OpenAI-compatible server) as a child process on 127.0.0.1 and a free
port: what the serving tests and the serving benchmark drive with a real HTTP client. Stopped by its
PID, never by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedchat.federation.deployment import LOOPBACK, free_port, http_ready, wait_until
from shared.errors import FederationError

REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    """`python -m fedchat serve ARGS --host 127.0.0.1 --port FREE` (or `PROGRAM ARGS --host ...`: any
    server with those two options and GET /health), output in `log`; the constructor returns once
    /health answers (or stops the process and raises)."""

    def __init__(self, args: list[str], log: Path, *, env: dict[str, str] | None = None,
                 timeout: float = 90.0, program: list[str] | None = None) -> None:
        self.port = free_port(LOOPBACK)
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [*(program or [sys.executable, "-m", "fedchat", "serve"]), *args, "--host", LOOPBACK,
                 "--port", str(self.port)],
                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            wait_until(lambda: http_ready(LOOPBACK, self.port), timeout=timeout, interval=0.2,
                       what=f"{Path(self.proc.args[0]).name} {' '.join(self.proc.args[1:4])} did not answer /health",
                       alive=self._exited)
        except FederationError as exc:
            self.stop()
            raise FederationError(f"{exc}\n--- {log}:\n{log.read_text(errors='replace')[-4000:]}") from None

    def _exited(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"it exited with code {code}"

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=grace)
