"""A TCP proxy that makes links slow, stalled or broken on command: the fault drill's bad network.

    python tests/support/netproxy.py --control /run/proxy.sock \\
        --route node-1=10.77.0.11:9093,10.77.0.1:9093 --route node-2=10.77.0.12:9093,10.77.0.1:9093

Each route listens on one address and forwards every connection to its target, byte for byte
(TLS passes through untouched: the proxy sees only ciphertext). A route is in one mode at a
time, set over the control socket (a Unix socket: reachable from any network namespace):

* ``pass``: bytes go through at once;
* ``delay`` SECONDS: every chunk waits SECONDS after it arrived before it goes on (latency;
  the order is kept and nothing is lost);
* ``pause``: bytes are held (connections stay open, nothing is lost) until the next mode;
* ``drop``: every open connection is reset now; new ones are accepted (a flapping NAT);
* ``cut``: like drop, and every new connection is reset at once until the next mode.

The control protocol is one JSON object per line, answered by one JSON line:
``{"route": "node-2", "mode": "delay", "seconds": 30}`` -> ``{"ok": true, "routes": {...}}``;
``{"mode": "status"}`` answers the routes' modes and counters (connections, bytes each way),
which is how a drill shows that the traffic really went through the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("pass", "delay", "pause", "drop", "cut")
CHUNK = 65536


@dataclass
class Route:
    name: str
    listen: tuple[str, int]
    target: tuple[str, int]
    mode: str = "pass"
    delay: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    connections: set = field(default_factory=set)
    accepted: int = 0
    refused: int = 0
    reset: int = 0
    bytes_up: int = 0  # listener side -> target
    bytes_down: int = 0

    def status(self) -> dict:
        return {"mode": self.mode, "delay": self.delay, "open": len(self.connections), "accepted": self.accepted,
                "refused": self.refused, "reset": self.reset, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down}

    def set_mode(self, mode: str, seconds: float = 0.0) -> None:
        self.mode, self.delay = mode, (seconds if mode == "delay" else 0.0)
        self.changed.set()
        self.changed = asyncio.Event()
        if mode in ("drop", "cut"):
            for conn in list(self.connections):
                conn.reset()
            self.reset += len(self.connections)
            self.connections.clear()
            if mode == "drop":
                self.mode = "pass"


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a broken middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Connection:
    def __init__(self, route: Route, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.route, self.client, self.upstream = route, client, upstream
        self.tasks: list[asyncio.Task] = []

    def reset(self) -> None:
        _abort(self.client)
        _abort(self.upstream)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """Read as fast as the sender sends; write each chunk when the route's mode lets it go. A reset on
        either side resets the other (what a TCP proxy must pass on); an end of stream half-closes it."""
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except (OSError, asyncio.IncompleteReadError):
                    data = None  # reset by the sender
                await queue.put((time.monotonic(), data))
                if not data:
                    return

        reading = asyncio.ensure_future(read())
        try:
            while True:
                arrived, data = await queue.get()
                while True:  # wait until this chunk may go: re-checked whenever the mode changes
                    route = self.route
                    if route.mode in ("pause", "cut"):
                        wait = None
                    elif route.mode == "delay":
                        wait = arrived + route.delay - time.monotonic()
                    else:
                        wait = 0
                    if wait is not None and wait <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(route.changed.wait(), wait)
                if data is None:
                    self.reset()
                    return
                if not data:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    self.reset()
                    return
                if up:
                    self.route.bytes_up += len(data)
                else:
                    self.route.bytes_down += len(data)
        finally:
            reading.cancel()


async def handle(route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if route.mode == "cut":
        route.refused += 1
        _abort(writer)
        return
    try:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*route.target), 10)
    except (OSError, TimeoutError):
        route.refused += 1
        _abort(writer)
        return
    route.accepted += 1
    conn = Connection(route, writer, up_writer)
    route.connections.add(conn)
    conn.tasks = [asyncio.ensure_future(conn.pump(reader, up_writer, True)),
                  asyncio.ensure_future(conn.pump(up_reader, writer, False))]
    try:
        await asyncio.gather(*conn.tasks, return_exceptions=True)
    finally:
        route.connections.discard(conn)
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


async def control(routes: dict[str, Route], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            try:
                ask = json.loads(line)
                mode = ask.get("mode", "status")
                if mode != "status":
                    if mode not in MODES:
                        raise ValueError(f"mode must be one of {', '.join(MODES)} or status")
                    names = list(routes) if ask.get("route") in (None, "*") else [ask["route"]]
                    for name in names:
                        if name not in routes:
                            raise ValueError(f"no route {name!r} (routes: {', '.join(routes)})")
                        routes[name].set_mode(mode, float(ask.get("seconds", 0.0)))
                answer = {"ok": True, "routes": {n: r.status() for n, r in routes.items()}}
            except (ValueError, TypeError, AttributeError) as exc:
                answer = {"ok": False, "error": str(exc)}
            writer.write((json.dumps(answer) + "\n").encode())
            await writer.drain()
    finally:
        writer.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def parse_route(text: str) -> tuple[str, tuple[str, int], tuple[str, int]]:
    name, _, rest = text.partition("=")
    listen, _, target = rest.partition(",")
    if not name or not listen or not target:
        raise argparse.ArgumentTypeError(f"a route is NAME=LISTEN_HOST:PORT,TARGET_HOST:PORT, not {text!r}")
    return name, _address(listen), _address(target)


async def serve(specs: list[tuple[str, tuple[str, int], tuple[str, int]]], control_path: Path) -> None:
    routes = {name: Route(name, listen, target) for name, listen, target in specs}
    servers = [await asyncio.start_server(lambda r, w, route=route: handle(route, r, w), *route.listen)
               for route in routes.values()]
    control_path.unlink(missing_ok=True)
    servers.append(await asyncio.start_unix_server(lambda r, w: control(routes, r, w), str(control_path)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"netproxy: {len(routes)} route(s) ready; control {control_path}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()
    for route in routes.values():
        for conn in list(route.connections):
            conn.reset()
    control_path.unlink(missing_ok=True)


class ProxyControl:
    """The drill's end of the control socket."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.path, self.timeout = Path(path), timeout

    def send(self, **ask) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(str(self.path))
            s.sendall((json.dumps(ask) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if not answer.get("ok"):
            raise ValueError(f"the proxy refused {ask}: {answer.get('error')}")
        return answer["routes"]

    def mode(self, route: str, mode: str, seconds: float = 0.0) -> dict:
        return self.send(route=route, mode=mode, seconds=seconds)

    def status(self) -> dict:
        return self.send(mode="status")

    def ready(self) -> bool:
        try:
            self.status()
            return True
        except (OSError, ValueError):
            return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netproxy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--route", action="append", type=parse_route, required=True,
                   help="NAME=LISTEN_HOST:PORT,TARGET_HOST:PORT (repeat for more routes)")
    p.add_argument("--control", required=True, type=Path, help="Unix socket for control commands")
    args = p.parse_args(argv)
    asyncio.run(serve(args.route, args.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
