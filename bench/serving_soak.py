"""Serving soak: well-behaved users while abusive ones try to stall them, against the same run without abusers.

    .venv/bin/python -m bench.serving_soak [--seconds 120] [--max-tokens 64]

One `fedchat serve` (the embedded smollm2-135m, cpu, float32; --max-batch 8 --max-queue 16, --header-timeout 5
--body-timeout 5 so that slow clients are cut off several times a run) as a child process on 127.0.0.1. Two
phases of `--seconds` each, the same server:

1. baseline: 4 well-behaved clients (threads, one `openai` client each) stream greedy answers of
   `--max-tokens` to the bench prompts, one request after the other;
2. abuse: the same 4 clients, and 4 abusive ones, one kind each, each as fast as its own requests go:
   * stops: 4 stop strings of the maximal length (serving.openai_schema.MAX_STOP_CHARS, none ever said), 64
     tokens streamed, and every other request one stop string a character over the cap (400);
   * bodies: a 2 MiB Content-Length (413 before a byte is read), then 4 connections at once that send their
     headers and 10 bytes of body, then a byte a second (408 at --body-timeout), and one that sends its
     headers a byte a second (closed at --header-timeout);
   * disconnect: streams an answer of up to 512 tokens and closes the connection after 5 pieces;
   * flood: every 2 s, 40 requests at once (8 tokens each; the body of every other one never sent): past its
     share of places (--max-client-requests) each gets 429 with Retry-After before its body is read (503 if
     batch and queue were full).

Every client connects from an address of its own on loopback (127.0.0.10-13 the well-behaved, 127.0.0.2-5
the abusive ones), as users on different hosts would: the server shares its places and batch slots per
client address (--max-client-requests, its default of 8, and round robin).

Records the well-behaved clients' latency p50/p90, time to first token and tokens/s in each phase, the
server's resident memory (VmRSS sampled every 0.5 s: baseline at the end of phase 1, the peak, and after
phase 2 with 10 s of rest), every abusive request's outcome, and errors. Writes
bench/results/serving_soak.json and bench/results/serving_soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import RESULTS
from bench.serving import OFFLINE, PROMPTS, say
from serving.openai_schema import MAX_STOP_CHARS
from shared.logs import quiet_library_warnings
from shared.model import resolve_base_model
from tests.support.serve_process import ServeProcess

BASE = "smollm2-135m"
SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--kv-cache-tokens", "16384", "--max-batch", "8",
               "--max-queue", "16", "--header-timeout", "5", "--body-timeout", "5"]
ADDRESSES = {"stops": "127.0.0.2", "bodies": "127.0.0.3", "disconnect": "127.0.0.4", "flood": "127.0.0.5"}
HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Soak:
    def __init__(self, server: ServeProcess, max_tokens: int) -> None:
        self.server, self.max_tokens = server, max_tokens
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.outcomes: dict[str, Counter] = {}
        self.rss: list[int] = []

    def client(self, address: str):
        """An `openai` client whose connections come from `address` (a client of its own to the server)."""
        import httpx
        from openai import OpenAI

        return OpenAI(base_url=f"{self.server.url}/v1", api_key="soak", max_retries=0, timeout=120,
                      http_client=httpx.Client(transport=httpx.HTTPTransport(local_address=address)))

    def outcome(self, kind: str, what: str) -> None:
        with self.lock:
            self.outcomes.setdefault(kind, Counter())[what] += 1

    # ------------------------------------------------------------- the well-behaved

    def user(self, i: int) -> None:
        client, n = self.client(f"127.0.0.{10 + i}"), i
        while not self.stop.is_set():
            started, first, tokens = time.perf_counter(), None, 0
            try:
                for chunk in client.chat.completions.create(
                        model="fedchat", messages=[{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
                        max_tokens=self.max_tokens, temperature=0, stream=True,
                        stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - started
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except Exception as exc:  # noqa: BLE001 (counted: a well-behaved request must not fail)
                with self.lock:
                    self.errors.append(repr(exc)[:200])
                continue
            with self.lock:
                self.results.append({"end": time.perf_counter(), "latency": time.perf_counter() - started,
                                     "ttft": first, "tokens": tokens})
            n += 4

    # ------------------------------------------------------------- the abusive

    def stops(self) -> None:
        import openai

        client, n = self.client(ADDRESSES["stops"]), 0
        longest = [c * MAX_STOP_CHARS for c in "#@~^"]
        while not self.stop.is_set():
            n += 1
            try:
                if n % 2:
                    list(client.chat.completions.create(model="fedchat", messages=[{"role": "user", "content":
                                                        PROMPTS[n % len(PROMPTS)]}], max_tokens=64, stream=True,
                                                        stop=longest))
                    self.outcome("stops", "answered (4 stops of the maximal length)")
                else:
                    client.chat.completions.create(model="fedchat", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=64, stop=["x" * (MAX_STOP_CHARS + 1)])
                    self.outcome("stops", "answered a stop over the cap (a failure)")
            except openai.APIStatusError as exc:
                self.outcome("stops", f"{exc.status_code}")

    def _send(self, address: str, data: bytes, then: bytes = b"", pace: float = 0.0) -> str:
        """From `address`, send `data` (and `then` a byte every `pace` s); the status the server answers, or
        'closed'."""
        try:
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=60,
                                          source_address=(address, 0)) as sock:
                sock.sendall(data)
                sock.settimeout(pace or 60)
                for byte in then:
                    try:
                        answer = sock.recv(64)
                    except TimeoutError:
                        sock.sendall(bytes([byte]))
                        continue
                    return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
                sock.settimeout(60)
                answer = sock.recv(64)
                return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"
        except OSError as exc:
            return type(exc).__name__

    def bodies(self) -> None:
        head, me = HEAD + "Authorization: Bearer soak\r\n", ADDRESSES["bodies"]
        while not self.stop.is_set():
            self.outcome("bodies", "huge: " + self._send(me, (head + f"Content-Length: {2 << 20}\r\n\r\n").encode()))
            slow = [threading.Thread(target=lambda: self.outcome("bodies", "slow body: " + self._send(
                me, (head + "Content-Length: 5000\r\n\r\n").encode() + b'{"model": "', b"x" * 5000, pace=1.0)))
                for _ in range(4)]
            for t in slow:
                t.start()
            self.outcome("bodies", "slow head: " + self._send(me, head.encode()[:30], head.encode()[30:], pace=1.0))
            for t in slow:
                t.join()

    def disconnect(self) -> None:
        client, n = self.client(ADDRESSES["disconnect"]), 0
        while not self.stop.is_set():
            n += 1
            try:
                stream = client.chat.completions.create(
                    model="fedchat", messages=[{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
                    max_tokens=512, stream=True)
                for k, _ in enumerate(stream):
                    if k == 5:
                        break
                stream.close()
                self.outcome("disconnect", "left after 5 pieces")
            except Exception as exc:  # noqa: BLE001 (counted)
                self.outcome("disconnect", type(exc).__name__)

    def flood(self) -> None:
        import httpx

        body = json.dumps({"model": "fedchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        me = ADDRESSES["flood"]

        async def one(client: httpx.AsyncClient, i: int) -> None:
            if i % 2:  # headers only: its body never comes
                status = await asyncio.to_thread(self._send, me, (HEAD + "Authorization: Bearer soak\r\n"
                                                                   "Content-Length: 500\r\n\r\n").encode())
                self.outcome("flood", f"headers only: {status}")
                return
            try:
                reply = await client.post("/v1/chat/completions", content=body,
                                          headers={"Authorization": "Bearer soak", "Content-Type": "application/json"})
                self.outcome("flood", f"{reply.status_code}" + (" retry-after" if "retry-after" in reply.headers
                                                                 else ""))
            except httpx.HTTPError as exc:
                self.outcome("flood", type(exc).__name__)

        async def bursts() -> None:
            async with httpx.AsyncClient(base_url=self.server.url, timeout=60,
                                         limits=httpx.Limits(max_connections=40),
                                         transport=httpx.AsyncHTTPTransport(local_address=me)) as client:
                while not self.stop.is_set():
                    started = time.perf_counter()
                    await asyncio.gather(*(one(client, i) for i in range(40)))
                    await asyncio.sleep(max(0.0, 2.0 - (time.perf_counter() - started)))

        asyncio.run(bursts())

    # ------------------------------------------------------------- a phase

    def phase(self, seconds: float, abusers: bool) -> dict:
        self.stop.clear()
        self.results, self.errors, self.outcomes = [], [], {}
        peak = 0

        def watch() -> None:
            nonlocal peak
            while not self.stop.is_set():
                peak = max(peak, rss_kb(self.server.proc.pid))
                time.sleep(0.5)

        threads = [threading.Thread(target=self.user, args=(i,)) for i in range(4)]
        if abusers:
            threads += [threading.Thread(target=f) for f in (self.stops, self.bodies, self.disconnect, self.flood)]
        threads.append(threading.Thread(target=watch))
        started = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        ended = time.perf_counter()
        for t in threads:
            t.join(120)
        done = [r for r in self.results if r["end"] <= ended]
        if not done:
            raise SystemExit(f"no well-behaved request finished within {seconds:.0f} s (errors: {self.errors[:3]}): "
                             "give the phases more --seconds on this machine")
        latencies = [r["latency"] for r in done]
        ttft = [r["ttft"] for r in done if r["ttft"] is not None]
        return {"abusers": abusers, "seconds": round(ended - started, 1), "requests": len(done),
                "completion_tokens": sum(r["tokens"] for r in done),
                "tokens_per_s": round(sum(r["tokens"] for r in done) / (ended - started), 2),
                "latency_p50": round(statistics.median(latencies), 3),
                "latency_p90": round(float(np.percentile(latencies, 90)), 3),
                "ttft_p50": round(statistics.median(ttft), 3), "ttft_p90": round(float(np.percentile(ttft, 90)), 3),
                "errors": len(self.errors), "error_samples": self.errors[:5], "peak_rss_mb": round(peak / 1024, 1),
                "abusive_outcomes": {k: dict(v) for k, v in self.outcomes.items()}}


def markdown(r: dict) -> str:
    base, abuse, m = r["baseline"], r["abuse"], r["memory"]
    lines = [f"`{r['command']}`: {r['model']}, `fedchat serve {' '.join(r['server_args'])}`; 4 well-behaved "
             f"streaming clients (greedy, max_tokens {r['max_tokens']}), {r['seconds']:.0f} s a phase. "
             f"{r['machine']['cpu_cores']} CPU cores shared with other work: load average (1 min) "
             f"{r['machine']['load_average_start']} at the start, {r['machine']['load_average_end']} at the end.",
             "",
             "| phase | requests | tokens/s | latency p50 | latency p90 | TTFT p50 | TTFT p90 | errors | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in (("without abusers", base), ("with 4 abusers", abuse)):
        lines.append(f"| {name} | {row['requests']} | {row['tokens_per_s']:.1f} | {row['latency_p50']:.2f} s | "
                     f"{row['latency_p90']:.2f} s | {row['ttft_p50']:.2f} s | {row['ttft_p90']:.2f} s | "
                     f"{row['errors']} | {row['peak_rss_mb']:.0f} MB |")
    lines += ["", f"Well-behaved latency p90 with abusers / without: **{r['p90_ratio']:.2f}x** (goal <= 1.5); "
              f"tokens/s {r['tokens_ratio']:.2f}x. Server RSS: {m['baseline_mb']:.0f} MB after the baseline phase, "
              f"peak {m['peak_mb']:.0f} MB, {m['after_mb']:.0f} MB 10 s after the abuse "
              f"(**{m['after_over_baseline']:.3f}x** the baseline; goal within 10%).", "",
              "| abusive client | outcomes |", "|---|---|"]
    for kind, outcomes in abuse["abusive_outcomes"].items():
        lines.append(f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="length of each phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="the server's torch threads (OMP_NUM_THREADS; default torch's)")
    parser.add_argument("--note", default="", help="what else ran on the machine (kept in the results)")
    args = parser.parse_args()
    quiet_library_warnings()
    load_before = os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)
    model = resolve_base_model(BASE)
    log = Path(tempfile.gettempdir()) / f"fedchat-soak-{os.getpid()}.log"
    say(f"starting fedchat serve on {BASE}")
    env = {**OFFLINE, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    server = ServeProcess(["--model", str(model), *SERVER_ARGS], log, env=env, timeout=300)
    try:
        soak = Soak(server, args.max_tokens)
        say("warming up")
        client = soak.client("127.0.0.10")
        for prompt in PROMPTS[:2]:
            client.chat.completions.create(model="fedchat", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=args.max_tokens, temperature=0)
        say(f"phase 1: 4 well-behaved clients for {args.seconds:.0f} s")
        baseline = soak.phase(args.seconds, abusers=False)
        baseline_rss = rss_kb(server.proc.pid)
        say(f"  {baseline['tokens_per_s']} tokens/s, p90 {baseline['latency_p90']} s, RSS {baseline_rss // 1024} MB")
        say(f"phase 2: the same and 4 abusive clients for {args.seconds:.0f} s")
        abuse = soak.phase(args.seconds, abusers=True)
        say(f"  {abuse['tokens_per_s']} tokens/s, p90 {abuse['latency_p90']} s, peak RSS {abuse['peak_rss_mb']} MB")
        time.sleep(10)
        after_rss = rss_kb(server.proc.pid)
        log_tail = log.read_text(errors="replace")[-2000:]
        alive = server.proc.poll() is None
    finally:
        server.stop()
    result = {
        "command": " ".join([".venv/bin/python -m bench.serving_soak", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": f"{BASE} (embedded, cpu, float32)",
        "server_args": SERVER_ARGS, "server_threads": args.threads or "torch's default", "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "baseline": baseline, "abuse": abuse,
        "p90_ratio": round(abuse["latency_p90"] / baseline["latency_p90"], 3),
        "tokens_ratio": round(abuse["tokens_per_s"] / baseline["tokens_per_s"], 3),
        "memory": {"baseline_mb": round(baseline_rss / 1024, 1),
                   "peak_mb": max(baseline["peak_rss_mb"], abuse["peak_rss_mb"]),
                   "after_mb": round(after_rss / 1024, 1), "after_over_baseline": round(after_rss / baseline_rss, 3)},
        "server_alive_at_end": alive, "server_log_tail": log_tail,
        "machine": {"cpu_cores": os.cpu_count(), "load_average_start": round(load_before[0], 2),
                    "load_average_end": round(os.getloadavg()[0], 2), "note": args.note},
    }
    (args.results / "serving_soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "serving_soak.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
