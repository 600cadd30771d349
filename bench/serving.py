"""Serving benchmark: `fedchat serve` against direct `model.generate` on the same merged model.

    .venv/bin/python bench/serving.py [--max-tokens 64] [--passes 3] [--repeats 2]

1. Builds a merged model the way the coordinator does: a LoRA adapter (small random B,
   so the merge really changes the weights) checkpointed as round 1 of a run on the
   embedded smollm2-135m, then `merge_adapter`.
2. Starts `fedchat serve --model MERGED` on 127.0.0.1 (a child process, stopped by PID).
3. ratio: for the same prompts, greedy, the same max_tokens, alternately timed
   - direct: `model.generate` in this process (tokenised beforehand, generation only),
   - served: one non-streaming request through the official `openai` client (the whole
     HTTP round trip: template, queue, generation, JSON);
   tokens are the tokens each side actually generated (usage.completion_tokens on the
   served side, new ids on the direct side); the texts are compared too.
4. Time to first token: streamed requests, one client; time to the first content chunk.
5. Throughput with 1, 4 and 8 concurrent clients (threads, one `OpenAI` client each,
   streaming): total completion tokens / wall time, and TTFT / latency under that load.
6. Batching headroom: raw decode steps of the same model at batch 1, 4 and 8 (what a
   batching engine could at most gain on this machine; the server runs one request at
   a time, see server/serve_engine.py).

Writes bench/results/serving.json and bench/results/serving.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import RESULTS  # noqa: E402
from fedchat.serve_process import ServeProcess  # noqa: E402
from server.checkpoint import RunState, round_dir, save_checkpoint  # noqa: E402
from server.merge import merge_adapter  # noqa: E402
from shared.adapter import attach_adapter, exchanged_names, get_arrays, set_arrays  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.logs import quiet_library_warnings  # noqa: E402
from shared.model import load_model, load_tokenizer, resolve_base_model  # noqa: E402

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
    def __init__(self, model_dir: Path, log: Path) -> None:
        super().__init__(["--model", str(model_dir), "--device", "cpu"], log, timeout=180)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="bench", max_retries=0, timeout=600)


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def direct_generate(model, tokenizer, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    enc = tokenizer.apply_chat_template(messages(prompt), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new), seconds


def served_generate(client, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    started = time.perf_counter()
    reply = client.chat.completions.create(model="fedchat", messages=messages(prompt), max_tokens=max_tokens,
                                           temperature=0)
    seconds = time.perf_counter() - started
    return reply.choices[0].message.content, reply.usage.completion_tokens, seconds


def streamed(client, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model="fedchat", messages=messages(prompt), max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first, "latency": time.perf_counter() - started, "tokens": tokens}


def summarise(per_prompt: list[list[tuple[int, float]]]) -> dict:
    """tokens/s over the prompts, with each prompt's fastest pass (interference from other work on
    the machine only ever slows a run down) and, for comparison, with every pass."""
    best = [min(runs, key=lambda r: r[1]) for runs in per_prompt]
    tokens, seconds = sum(n for n, _ in best), sum(t for _, t in best)
    all_tokens = sum(n for runs in per_prompt for n, _ in runs)
    all_seconds = sum(t for runs in per_prompt for _, t in runs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
            "tokens_per_s_all_runs": round(all_tokens / all_seconds, 2), "runs": sum(len(r) for r in per_prompt)}


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def concurrency(server: Server, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = [list(range(i, requests, clients)) for i in range(clients)]

    def user(mine: list[int]) -> None:
        client = server.client()
        for i in mine:
            try:
                r = streamed(client, PROMPTS[i % len(PROMPTS)], max_tokens)
            except Exception as exc:  # noqa: BLE001 (reported)
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=user, args=(m,)) for m in per_client]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "completion_tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_median_s": round(statistics.median(r["ttft"] for r in results), 3),
            "ttft_p90_s": round(p90([r["ttft"] for r in results]), 3),
            "latency_median_s": round(statistics.median(r["latency"] for r in results), 3)}


def batching_headroom(model, steps: int = 24, tries: int = 3) -> list[dict]:
    """Decode tokens/s of the bare model at batch 1, 4, 8 with a 64-token context (no server), best of `tries`."""
    out = []
    for batch in (1, 4, 8):
        best = float("inf")
        for _ in range(tries):
            ids = torch.randint(100, 10000, (batch, 64))
            with torch.no_grad():
                res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                started = time.perf_counter()
                for _ in range(steps):
                    res = model(input_ids=tok, past_key_values=past, use_cache=True)
                    past, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                best = min(best, time.perf_counter() - started)
        out.append({"batch": batch, "tokens_per_s": round(steps * batch / best, 2),
                    "ms_per_step": round(1000 * best / steps, 1)})
    return out


def markdown(r: dict) -> str:
    m, d, s = r["machine"], r["direct"], r["served"]
    lines = [
        f"Serving benchmark: `{r['command']}` on {m['cpu_cores']} CPU cores ({m['torch_threads']} torch threads, "
        f"{m['device']}, {m['dtype']}), {r['model']['description']}; {r['settings']['prompts']} prompts x "
        f"{r['settings']['passes']} passes, greedy, max_tokens {r['settings']['max_tokens']}. Engine: "
        f"{r['engine']}.",
        "",
        f"Load average (1 min) on the {m['cpu_cores']} cores: {m['load_average_1_5_15_min']['start'][0]} at the start, "
        f"{m['load_average_1_5_15_min']['end'][0]} at the end; wall time {r['wall_seconds']:.0f} s"
        + " (the bench itself keeps both cores busy, so about 2 at the end is its own load; the 1-minute "
          "average at the start still counts whatever ran just before).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| direct `model.generate` | {d['tokens_per_s']:.1f} tokens/s ({d['tokens']} tokens in {d['seconds']:.1f} s) |",
        f"| served (`openai` client, non-streaming) | {s['tokens_per_s']:.1f} tokens/s ({s['tokens']} tokens in "
        f"{s['seconds']:.1f} s) |",
        f"| **ratio served / direct** | **{r['ratio']:.3f}** (goal >= 0.90; {r['ratio_all_runs']:.3f} over every "
        f"pass instead of each prompt's fastest); same text: {'yes' if s['same_text_as_direct'] else 'NO'} |",
        f"| time to first token (1 client, streaming) | median {r['ttft_s']['median']:.3f} s, "
        f"p90 {r['ttft_s']['p90']:.3f} s |",
        "",
        "| concurrent clients | requests | completion tokens/s (best try) | TTFT median | TTFT p90 | latency median |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["concurrency"]:
        lines.append(f"| {c['clients']} | {c['requests']} | {c['tokens_per_s']:.1f} | {c['ttft_median_s']:.2f} s | "
                     f"{c['ttft_p90_s']:.2f} s | {c['latency_median_s']:.2f} s |")
    if r.get("batching_headroom"):
        lines += ["", "The server runs one request at a time (exact answers, see server/serve_engine.py), so "
                  "throughput stays flat as clients are added and they wait in the queue. Batching headroom on this "
                  "machine (bare model decode, no server): " + ", ".join(
                      f"batch {b['batch']}: {b['tokens_per_s']:.1f} tokens/s" for b in r["batching_headroom"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3, help="times each prompt is timed on each side")
    parser.add_argument("--repeats", type=int, default=2, help="tries of each concurrency level (best kept)")
    parser.add_argument("--no-headroom", action="store_true", help="skip the batching headroom probe")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where serving.json and serving.md go")
    args = parser.parse_args()
    quiet_library_warnings()
    started = time.perf_counter()
    args.results.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="fedchat-bench-") as tmp:
        work = Path(tmp)
        say(f"building a merged model: a round-1 adapter on {BASE}, merged")
        merged_dir = build_merged(work)
        say(f"starting fedchat serve --model {merged_dir}")
        server = Server(merged_dir, work / "serve.log")
        try:
            tokenizer = load_tokenizer(merged_dir)
            model = load_model(merged_dir, torch.device("cpu"), torch.float32)
            client = server.client()
            say("warming up both sides")
            direct_generate(model, tokenizer, PROMPTS[0], 8)
            served_generate(client, PROMPTS[0], 8)

            say(f"direct vs served: {len(PROMPTS)} prompts x {args.passes} passes, alternating")
            runs: dict[str, list[list[tuple[int, float]]]] = {"direct": [[] for _ in PROMPTS],
                                                              "served": [[] for _ in PROMPTS]}
            same = True
            for p in range(args.passes):
                for i, prompt in enumerate(PROMPTS):
                    for side in (("direct", "served") if (i + p) % 2 == 0 else ("served", "direct")):
                        if side == "direct":
                            dt, dn, ds = direct_generate(model, tokenizer, prompt, args.max_tokens)
                        else:
                            st, sn, ss = served_generate(client, prompt, args.max_tokens)
                    runs["direct"][i].append((dn, ds))
                    runs["served"][i].append((sn, ss))
                    same &= (dt == st and dn == sn)
                    say(f"  pass {p + 1} prompt {i + 1}: direct {dn} tok {dn / ds:.1f} tok/s | served {sn} tok "
                        f"{sn / ss:.1f} tok/s{'' if dt == st else ' (TEXT DIFFERS)'}")
            direct, served = summarise(runs["direct"]), summarise(runs["served"])
            served["same_text_as_direct"] = bool(same)
            ratio = served["tokens_per_s"] / direct["tokens_per_s"]
            ratio_all = served["tokens_per_s_all_runs"] / direct["tokens_per_s_all_runs"]
            say(f"ratio served/direct = {ratio:.3f} (best of {args.passes} per prompt; all runs: {ratio_all:.3f})")

            say("time to first token: streamed requests, one client")
            ttft = [streamed(client, prompt, args.max_tokens)["ttft"] for prompt in PROMPTS]
            say(f"  TTFT median {statistics.median(ttft):.3f} s")

            levels = []
            for clients in (1, 4, 8):
                tries = []
                for attempt in range(args.repeats):
                    say(f"throughput with {clients} concurrent client(s), try {attempt + 1}/{args.repeats}")
                    tries.append(concurrency(server, clients, 8, args.max_tokens))
                    say(f"  {tries[-1]['tokens_per_s']:.1f} tokens/s, TTFT median {tries[-1]['ttft_median_s']:.2f} s")
                best = max(tries, key=lambda t: t["tokens_per_s"])
                levels.append({**best, "tokens_per_s_all_tries": [t["tokens_per_s"] for t in tries]})

            headroom = []
            if not args.no_headroom:
                say("batching headroom: bare decode steps at batch 1, 4, 8 (best of 3)")
                headroom = batching_headroom(model)
                say("  " + ", ".join(f"batch {b['batch']}: {b['tokens_per_s']:.1f} tok/s" for b in headroom))
            n_params = sum(p.numel() for p in model.parameters())
            context = model.config.max_position_embeddings
        finally:
            server.stop()

    import transformers

    result = {
        "command": ".venv/bin/python bench/serving.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
                    "dtype": "float32", "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_average_1_5_15_min": {"start": [round(x, 2) for x in load_before],
                                                "end": [round(x, 2) for x in os.getloadavg()]},
                    "note": "the 2 cores are shared with other work while measuring: direct and served are timed "
                            "alternately so both see the same load, and the fastest pass / try is kept"},
        "model": {"description": f"{BASE} merged with a random round-1 LoRA adapter (r=8, q_proj/v_proj)",
                  "parameters": n_params, "context_length": context},
        "engine": "one generation worker thread, FIFO request queue, KV-cache token loop (no batching)",
        "settings": {"prompts": len(PROMPTS), "passes": args.passes, "max_tokens": args.max_tokens,
                     "temperature": 0, "concurrency_requests_per_level": 8, "concurrency_repeats": args.repeats},
        "direct": direct,
        "served": served,
        "ratio": round(ratio, 4),
        "ratio_method": f"served/direct tokens per second, each prompt's fastest of {args.passes} alternating passes "
                        "on each side (interference only slows runs down); ratio_all_runs uses every pass",
        "ratio_all_runs": round(ratio_all, 4),
        "ttft_s": {"median": round(statistics.median(ttft), 4), "p90": round(p90(ttft), 4),
                   "min": round(min(ttft), 4), "max": round(max(ttft), 4)},
        "concurrency": levels,
        "batching_headroom": headroom,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (args.results / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "serving.md").write_text(markdown(result))
    say(f"wrote {args.results / 'serving.json'} and {args.results / 'serving.md'} in {result['wall_seconds']:.0f} s")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
