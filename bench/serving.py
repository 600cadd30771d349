"""Serving benchmark: `fedchat serve` against `transformers serve --continuous-batching` and against a direct
transformers greedy `generate` in this process, in one run, on the same merged model, prompts and threads.

    .venv/bin/python -m bench.serving [--max-tokens 64] [--repeats 2] [--clients 1 4 8]

1. Builds a merged model the way the coordinator does: a LoRA adapter (small random B, so the merge
   really changes the weights) checkpointed as round 1 of a run on the embedded smollm2-135m, then
   `merge_adapter`.
2. Starts both servers on 127.0.0.1 as child processes (stopped by PID): `fedchat serve --model MERGED`
   (batches of up to 8, its default) and `transformers serve MERGED --continuous-batching`, offline
   (HF_HUB_OFFLINE=1), float32 both, with the same KV cache (pages, size) and prefill chunk.
3. For 1, 4 and 8 concurrent clients (threads, one official `openai` client each, streaming, greedy,
   max_tokens 64), each client sends its share of the requests one after the other: completion
   tokens/s (all completion tokens / wall time of the level), time to first token of each request
   (to its first content chunk) and latency. The servers alternate, level by level, `--repeats`
   times; each (server, clients) keeps its fastest try (other work on the machine only slows a try).
   Each try also runs the direct row: `model.generate` (greedy, max_new_tokens 64) on the same prompts
   one after the other, in this process (the servers idle), with as many torch threads as the servers.
4. A second request arriving mid-answer (fedchat serve): a client streams an answer alone; when it has
   10 pieces, a second client asks. The first request leaves the fast path for the batch (serving/engine.py):
   the first's latency against alone, the second's time to first token.
5. One stream against `generate`, paired: prompt by prompt, one request to fedchat serve and one `generate`
   right after each other (which goes first alternates), so both meet the same load on a shared machine;
   their tokens/s over the same prompts, and the CPU time per token each costs (fedchat serve: the server
   process and this client process; `generate`: this process), which the machine's load does not change
   as much as it changes wall time.
6. The greedy answers of the two servers and of `generate`, prompt by prompt (the same model, all greedy).

Writes bench/results/serving.json ({"ratio", "ratio_vs_direct", "paired", "rows": [...]}: ratio is fedchat
serve's tokens/s at 8 clients over 1 client, ratio_vs_direct one client over direct `generate` (the levels'
best tries), paired the interleaved comparison of 5) and bench/results/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS
from server.checkpoint import RunState, round_dir, save_checkpoint
from serving.engine import PAGE_TOKENS, PREFILL_TOKENS
from shared.adapter import attach_adapter, exchanged_names, get_arrays, set_arrays
from shared.config import RunConfig
from shared.logs import quiet_library_warnings
from shared.merge import merge_adapter
from shared.model import load_model, load_tokenizer, resolve_base_model
from tests.support.serve_process import ServeProcess

BASE = "smollm2-135m"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main causes of the French Revolution? Answer in detail.",
    "Give me a detailed recipe for a vegetable soup.",
    "Explain the difference between a virus and a bacterium.",
    "Write a poem about autumn leaves falling in a quiet park.",
    "How does a bicycle stay upright while moving? Explain the physics.",
]
SERVERS = ("fedchat serve", "transformers serve --continuous-batching")
DIRECT = "direct transformers generate (in process)"
# Both get the same KV cache (fedchat serve's default for this model: 8 requests of 2048 tokens) and the
# same prefill chunk. Left to itself on a CPU, transformers serve sizes its cache to most of the free
# memory (about 10 GB here: the kernel's OOM killer ended it).
CACHE_TOKENS = 16384
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_merged(work: Path) -> Path:
    """Round 1 of a run on the embedded model, merged as the coordinator merges it."""
    cfg = RunConfig(base_model=BASE)
    base_dir = resolve_base_model(BASE)
    model = attach_adapter(load_model(base_dir, torch.device("cpu"), torch.float32), cfg)
    names = exchanged_names(model, "fedavg")
    rng = np.random.default_rng(0)
    set_arrays(model, names, [a + rng.normal(scale=0.005, size=a.shape).astype(np.float32) if ".lora_B." in n
                              else a for n, a in zip(names, get_arrays(model, names))])
    save_checkpoint(work, RunState(run_id="bench", config=cfg.to_flower(), round=1), model,
                    {"base_model": BASE, "base_model_path": str(base_dir), "run_id": "bench"})
    return merge_adapter(round_dir(work, 1), work / "models" / "merged-round-0001")


class Server(ServeProcess):
    """One of the two servers, with what a client sends it."""

    def __init__(self, name: str, model_dir: Path, log: Path) -> None:
        self.name = name
        if name == SERVERS[0]:
            super().__init__(["--model", str(model_dir), "--device", "cpu", "--dtype", "float32",
                              "--kv-cache-tokens", str(CACHE_TOKENS)], log, env=OFFLINE, timeout=300)
            self.model, self.extra = "fedchat", {"stream_options": {"include_usage": True}}
        else:  # it refuses stream_options, and sends usage on the last chunk unasked
            cache = ["--cb-block-size", str(PAGE_TOKENS), "--cb-num-blocks", str(CACHE_TOKENS // PAGE_TOKENS + 1),
                     "--cb-max-batch-tokens", str(PREFILL_TOKENS)]
            super().__init__([str(model_dir), "--continuous-batching", "--device", "cpu", "--dtype", "float32", *cache],
                             log, env=OFFLINE, timeout=300,
                             program=[str(Path(sys.executable).parent / "transformers"), "serve"])
            self.model, self.extra = str(model_dir), {}

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="bench", max_retries=0, timeout=600)


def streamed(server: Server, client, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy request: its text, completion tokens, time to first token and latency."""
    started = time.perf_counter()
    first, tokens, pieces = None, 0, []
    stream = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True, **server.extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"text": "".join(pieces), "tokens": tokens, "ttft": first, "latency": time.perf_counter() - started}


def level(server: Server, clients: int, max_tokens: int) -> dict:
    """`clients` users at once, each sending its share of the requests one after the other."""
    requests = max(len(PROMPTS), 2 * clients)
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def user(mine: range) -> None:
        client = server.client()
        for i in mine:
            try:
                r = {"prompt": i % len(PROMPTS), **streamed(server, client, PROMPTS[i % len(PROMPTS)], max_tokens)}
            except Exception as exc:  # noqa: BLE001 (reported)
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=user, args=(range(i, requests, clients),)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors or not results:
        raise SystemExit(f"{server.name} failed {len(errors)} of {requests} requests: {errors[:3]}\n"
                         f"--- {server.log}:\n{server.log.read_text(errors='replace')[-3000:]}")
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"server": server.name, "clients": clients, "requests": len(results), "completion_tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50": round(statistics.median(ttft), 3), "ttft_p90": round(float(np.percentile(ttft, 90)), 3),
            "latency_p50": round(statistics.median(r["latency"] for r in results), 3),
            "results": sorted(results, key=lambda r: r["prompt"])}


class Direct:
    """Greedy `generate` on the merged model in this process: what one user gets without a server."""

    name = DIRECT

    def __init__(self, model_dir: Path) -> None:
        self.model = load_model(model_dir, torch.device("cpu"), torch.float32)
        self.tokenizer = load_tokenizer(model_dir)

    def one(self, prompt: str, max_tokens: int) -> dict:
        t0 = time.perf_counter()
        enc = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:]
        return {"tokens": len(out), "latency": time.perf_counter() - t0,
                "text": self.tokenizer.decode(out, skip_special_tokens=True)}

    def level(self, max_tokens: int) -> dict:
        results = []
        started = time.perf_counter()
        for i, prompt in enumerate(PROMPTS):
            results.append({"prompt": i, **self.one(prompt, max_tokens)})
        wall = time.perf_counter() - started
        tokens = sum(r["tokens"] for r in results)
        return {"server": self.name, "clients": 1, "requests": len(results), "completion_tokens": tokens,
                "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2), "ttft_p50": None, "ttft_p90": None,
                "latency_p50": round(statistics.median(r["latency"] for r in results), 3), "results": results}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (all its threads, those ended included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paired(server: Server, direct: Direct, max_tokens: int) -> dict:
    """One stream against `generate`, prompt by prompt, back to back (alternating which goes first): wall time
    and CPU time per token of each over the same prompts."""
    client = server.client()
    totals = {name: {"tokens": 0, "seconds": 0.0, "cpu": 0.0, "server_cpu": 0.0} for name in ("serve", "direct")}
    for i, prompt in enumerate(PROMPTS):
        for name in (("serve", "direct") if i % 2 else ("direct", "serve")):
            mine, theirs = time.process_time(), cpu_seconds(server.proc.pid)
            r = streamed(server, client, prompt, max_tokens) if name == "serve" else direct.one(prompt, max_tokens)
            mine, theirs = time.process_time() - mine, cpu_seconds(server.proc.pid) - theirs
            total = totals[name]
            total["tokens"] += r["tokens"]
            total["seconds"] += r["latency"]
            total["cpu"] += mine + (theirs if name == "serve" else 0.0)  # generate: the idle server's is not its
            total["server_cpu"] += theirs
    row = {name: {"tokens": t["tokens"], "seconds": round(t["seconds"], 3),
                  "tokens_per_s": round(t["tokens"] / t["seconds"], 2),
                  "cpu_ms_per_token": round(1000 * t["cpu"] / t["tokens"], 2),
                  "server_cpu_ms_per_token": round(1000 * t["server_cpu"] / t["tokens"], 2)}
           for name, t in totals.items()}
    return {"prompts": len(PROMPTS), **row,
            "ratio": round(row["serve"]["tokens_per_s"] / row["direct"]["tokens_per_s"], 3),
            "cpu_ratio": round(row["serve"]["cpu_ms_per_token"] / row["direct"]["cpu_ms_per_token"], 3)}


def second_arrives(server: Server, max_tokens: int, pairs: int = 4) -> dict:
    """A client streams an answer alone; at its 10th piece a second client asks: both answers' timings."""
    rows = []
    for i in range(pairs):
        first_prompt, second_prompt = PROMPTS[2 * i % len(PROMPTS)], PROMPTS[(2 * i + 1) % len(PROMPTS)]
        alone = streamed(server, server.client(), first_prompt, max_tokens)
        second: dict = {}
        started, pieces, tokens = time.perf_counter(), [], 0
        other = threading.Thread(target=lambda out, prompt: out.update(streamed(server, server.client(), prompt,
                                                                                max_tokens)),
                                 args=(second, second_prompt))
        for chunk in server.client().chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": first_prompt}], max_tokens=max_tokens,
                temperature=0, stream=True, **server.extra):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 10:
                    other.start()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        first_latency = time.perf_counter() - started
        other.join()
        rows.append({"first_alone_s": alone["latency"], "first_with_second_s": first_latency,
                     "second_ttft_s": second["ttft"], "second_latency_s": second["latency"],
                     "first_same_answer": "".join(pieces) == alone["text"],
                     "tokens_per_s": (tokens + second["tokens"]) / (time.perf_counter() - started)})
    return {"pairs": pairs, "rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                                     for r in rows],
            **{f"{k}_p50": round(statistics.median(r[k] for r in rows), 3)
               for k in ("first_alone_s", "first_with_second_s", "second_ttft_s", "second_latency_s")},
            "first_same_answer": sum(r["first_same_answer"] for r in rows)}


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    by = {(row["server"], row["clients"]): row for row in r["rows"]}
    lines = [
        f"`{r['command']}` on {m['cpu_cores']} CPU cores ({m['torch_threads']} torch threads, cpu, float32), "
        f"{r['model']}; {s['prompts']} prompts, greedy, max_tokens {s['max_tokens']}, streaming `openai` clients; "
        f"each level best of {s['repeats']} tries, the servers alternating. Load average (1 min) "
        f"{m['load_average_start']} at the start, {m['load_average_end']} at the end.",
        "",
        "| server | clients | completion tokens/s | TTFT p50 | TTFT p90 | latency p50 |",
        "|---|---|---|---|---|---|",
    ]
    for server in r["servers"]:
        for clients in s["clients"]:
            row = by[(server, clients)]
            lines.append(f"| {server} | {clients} | {row['tokens_per_s']:.1f} | {row['ttft_p50']:.2f} s | "
                         f"{row['ttft_p90']:.2f} s | {row['latency_p50']:.2f} s |")
    direct = by[(DIRECT, 1)]
    lines.append(f"| {DIRECT} | 1 | {direct['tokens_per_s']:.1f} | - | - | {direct['latency_p50']:.2f} s |")
    top, h, pair = max(s["clients"]), r["second_arrives"], r["paired"]
    lines += ["", f"fedchat serve, one client / direct `generate`: **{r['ratio_vs_direct']:.2f}x** (goal >= 0.95, "
              f"1.0 hoped); at {top} clients / 1 client: **{r['ratio']:.2f}x** (goal >= 2.5); "
              + (f"fedchat serve / transformers serve at {top} clients: **{r['ratio_vs_transformers']:.2f}x**; "
                 if r["ratio_vs_transformers"] is not None else "")
              + f"TTFT p90 at {top} clients: **{by[(SERVERS[0], top)]['ttft_p90']:.2f} s**. Same greedy answers: "
              + (f"fedchat serve and transformers serve {r['same_answers']} of {len(PROMPTS)} prompts, "
                 if r["same_answers"] is not None else "")
              + f"fedchat serve and direct `generate` {r['same_answers_direct']} of {len(PROMPTS)} prompts.",
              "", f"One stream against `generate`, paired (the {pair['prompts']} prompts, each asked of both back to "
              f"back): fedchat serve {pair['serve']['tokens_per_s']:.2f} tokens/s, `generate` "
              f"{pair['direct']['tokens_per_s']:.2f}: **{pair['ratio']:.2f}x**; CPU time per token (server and "
              f"client processes against `generate`'s process) {pair['serve']['cpu_ms_per_token']:.1f} ms against "
              f"{pair['direct']['cpu_ms_per_token']:.1f} ms: **{pair['cpu_ratio']:.2f}x**.",
              "", f"A second request arriving mid-answer (fedchat serve, {h['pairs']} pairs, medians): the first "
              f"answer takes {h['first_with_second_s_p50']:.2f} s against {h['first_alone_s_p50']:.2f} s alone "
              f"(same text {h['first_same_answer']} of {h['pairs']}); the second's first token comes after "
              f"{h['second_ttft_s_p50']:.2f} s, its answer after {h['second_latency_s_p50']:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="tries of each (server, clients) level; best kept")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where serving.json and serving.md go")
    parser.add_argument("--threads", type=int, help="torch threads of the servers and of direct generate (default: "
                        "torch's, the cores); 1 keeps a loaded machine from stalling torch's thread barriers")
    parser.add_argument("--no-transformers-serve", action="store_true",
                        help="fedchat serve and direct generate only (transformers serve is slow on a loaded machine)")
    parser.add_argument("--note", default="", help="what else ran on the machine (kept in serving.json)")
    args = parser.parse_args()
    if 1 not in args.clients:
        parser.error("--clients must include 1: the ratio is against one client")
    quiet_library_warnings()
    names = list(SERVERS[:1] if args.no_transformers_serve else SERVERS)
    if args.threads:
        torch.set_num_threads(args.threads)
        OFFLINE["OMP_NUM_THREADS"] = str(args.threads)  # the servers' environment
    started, load_before = time.perf_counter(), os.getloadavg()
    args.results.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="fedchat-bench-") as tmp:
        work = Path(tmp)
        say(f"building a merged model: a round-1 adapter on {BASE}, merged")
        merged = build_merged(work)
        servers: list[Server] = []
        try:
            for name in names:
                say(f"starting {name} on {merged.name}")
                servers.append(Server(name, merged, work / f"{name.split()[0]}.log"))
            direct = Direct(merged)
            say("warming up (the first request of transformers serve loads the model and its cache)")
            answers = {server.name: [r["text"] for r in level(server, 1, args.max_tokens)["results"]]
                       for server in servers}
            answers[DIRECT] = [r["text"] for r in direct.level(args.max_tokens)["results"]]
            same = sum(a == b for a, b in zip(answers[SERVERS[0]], answers[SERVERS[1]])) if len(names) > 1 else None
            same_direct = sum(a == b for a, b in zip(answers[SERVERS[0]], answers[DIRECT]))
            say(f"same greedy answer: both servers {same}, fedchat serve and generate {same_direct} of {len(PROMPTS)}")
            tries: dict[tuple[str, int], list[dict]] = {}
            for attempt in range(args.repeats):
                for clients in args.clients:
                    runners = [*servers, direct] if clients == 1 else servers
                    for server in runners if (attempt + clients) % 2 == 0 else runners[::-1]:
                        row = direct.level(args.max_tokens) if server is direct else \
                            level(server, clients, args.max_tokens)
                        tries.setdefault((server.name, clients), []).append(row)
                        say(f"try {attempt + 1}: {server.name}, {clients} client(s): {row['tokens_per_s']:.1f} "
                            f"tokens/s, latency p50 {row['latency_p50']:.2f} s")
            say("one stream against generate, prompt by prompt (paired)")
            pairs = paired(servers[0], direct, args.max_tokens)
            say(f"paired: fedchat serve {pairs['serve']['tokens_per_s']} tokens/s, generate "
                f"{pairs['direct']['tokens_per_s']} ({pairs['ratio']}x); CPU per token "
                f"{pairs['serve']['cpu_ms_per_token']} ms against {pairs['direct']['cpu_ms_per_token']} ms "
                f"({pairs['cpu_ratio']}x)")
            say("a second request arriving mid-answer (fedchat serve)")
            arrives = second_arrives(servers[0], args.max_tokens)
            say(f"first answer {arrives['first_with_second_s_p50']:.2f} s (alone "
                f"{arrives['first_alone_s_p50']:.2f} s), second's first token {arrives['second_ttft_s_p50']:.2f} s")
        finally:
            for server in servers:
                server.stop()

    rows = []
    for runs in tries.values():
        best = {k: v for k, v in max(runs, key=lambda row: row["tokens_per_s"]).items() if k != "results"}
        rows.append({**best, "tokens_per_s_all_tries": [row["tokens_per_s"] for row in runs]})
    rows.sort(key=lambda row: ((*SERVERS, DIRECT).index(row["server"]), row["clients"]))
    by = {(row["server"], row["clients"]): row for row in rows}
    top = max(args.clients)
    import transformers

    result = {
        "ratio": round(by[(SERVERS[0], top)]["tokens_per_s"] / by[(SERVERS[0], 1)]["tokens_per_s"], 3),
        "ratio_vs_transformers": round(by[(SERVERS[0], top)]["tokens_per_s"] / by[(SERVERS[1], top)]["tokens_per_s"],
                                       3) if len(names) > 1 else None,
        "servers": names,
        "ratio_vs_direct": round(by[(SERVERS[0], 1)]["tokens_per_s"] / by[(DIRECT, 1)]["tokens_per_s"], 3),
        "paired": pairs,
        "rows": rows,
        "second_arrives": arrives,
        "same_answers": same,
        "same_answers_direct": same_direct,
        "command": " ".join([".venv/bin/python -m bench.serving", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": f"{BASE} merged with a random round-1 LoRA adapter (r=8, q_proj/v_proj)",
        "settings": {"prompts": len(PROMPTS), "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                     "clients": args.clients, "repeats": args.repeats,
                     "requests_per_level": {c: max(len(PROMPTS), 2 * c) for c in args.clients}},
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "load_average_start": round(load_before[0], 2), "load_average_end": round(os.getloadavg()[0], 2),
                    "note": "the cores are shared with other work: each level keeps its fastest try"},
        "load_note": args.note,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (args.results / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "serving.md").write_text(markdown(result))
    say(f"wrote {args.results / 'serving.json'} and {args.results / 'serving.md'} in {result['wall_seconds']:.0f} s")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
