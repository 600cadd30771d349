"""`fedchat demo`: demo data, a federated run in Flower's simulation engine, merge,
a before/after chat, report.json and a plot of held-out loss per round."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from fedchat.demo_data import demo_node_config, write_demo_data
from fedchat.simulation import simulate
from server.report import write_report
from shared.config import SECAGG_MIN_NODES, RunConfig
from shared.dialogue import read_dialogues
from shared.errors import ConfigError
from shared.model import load_model, load_tokenizer, resolve_base_model

log = logging.getLogger("fedchat.demo")


def _step(i: int, n: int, text: str) -> None:
    log.info("[%d/%d] %s", i, n, text)


def generate(model, tokenizer, messages: list[dict], max_new_tokens: int = 48) -> str:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def before_after(base_dir: Path, merged_dir: Path, eval_file: Path, questions: int = 3) -> list[dict]:
    """Greedy answers of the base and the merged model to held-out questions."""
    dialogues = read_dialogues(eval_file).conversations[:questions]
    tokenizer = load_tokenizer(base_dir)
    models = {name: load_model(path, torch.device("cpu"), torch.float32)
              for name, path in (("before", base_dir), ("after", merged_dir))}
    samples = []
    for messages in dialogues:
        prompt = messages[:1]
        sample = {"question": prompt[0]["content"], "reference": messages[1]["content"]}
        for name, model in models.items():
            sample[name] = generate(model, tokenizer, prompt)
        samples.append(sample)
    return samples


def run_demo(*, out: str, clients: int, rounds: int, local_steps: int, base_model: str, aggregation: str,
             dp: bool, secagg: bool, target_epsilon: float, fresh: bool, extra: dict | None = None) -> dict:
    started = time.perf_counter()
    if secagg and clients < SECAGG_MIN_NODES:
        raise ConfigError(f"--clients must be at least {SECAGG_MIN_NODES} with SecAgg+ (with two, each node learns the "
                          f"other's update from the sum); give --clients {SECAGG_MIN_NODES} or more, or --no-secagg.")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        if fresh:
            shutil.rmtree(out_dir)
        elif not (out_dir / "checkpoints").is_dir():
            raise ConfigError(f"{out_dir} exists and is not a fedchat run: choose another --out.")
        else:
            log.info("%s holds a run: resuming it (its nodes keep their privacy ledgers); --fresh starts over",
                     out_dir)
    n = 5
    _step(1, n, f"preparing base model {base_model}")
    base_dir = resolve_base_model(base_model)
    _step(2, n, f"writing demo data for {clients} organisations to {out_dir / 'data'}")
    manifest = write_demo_data(out_dir / "data", clients)
    for c in manifest["clients"]:
        log.info("    %s: %d conversations, topics %s", c["node"], c["conversations"], ", ".join(c["topics"]))
    log.info("    held-out evaluation: %d conversations (no organisation trains on them)",
             manifest["eval"]["conversations"])
    run = RunConfig.from_flower({
        **{"base-model": base_model, "num-rounds": rounds, "local-steps": local_steps, "aggregation": aggregation,
           "eval-data": str(out_dir / "data" / "eval.jsonl"), "out-dir": str(out_dir), "dp": dp, "secagg": secagg,
           "min-nodes": clients},
        **(extra or {})})
    nodes = {i: demo_node_config(out_dir, c["node"], target_epsilon=target_epsilon, dp=dp, secagg=secagg)
             for i, c in enumerate(manifest["clients"])}
    _step(3, n, f"federated fine-tuning in Flower's simulation engine: {clients} nodes x {rounds} rounds x "
                f"{local_steps} steps ({aggregation}{', DP-SGD' if dp else ', no DP'}"
                f"{', SecAgg+' if secagg else ', no SecAgg+'})")
    report = simulate(run, nodes)
    if dp:
        ledgers = out_dir / "ledgers"
        ledgers.mkdir(exist_ok=True)
        for c in manifest["clients"]:
            state = out_dir / "nodes" / c["node"]
            for src, dst in ((state / "ledger.jsonl", f"{c['node']}.jsonl"), (state / "ledger-key.pub", f"{c['node']}.pub")):
                if src.exists():
                    shutil.copyfile(src, ledgers / dst)
        report["ledgers"] = str(ledgers.absolute())
    _step(4, n, "chatting with the model before and after, on held-out questions")
    report["samples"] = before_after(base_dir, Path(report["merged_model"]), out_dir / "data" / "eval.jsonl")
    for s in report["samples"]:
        log.info("    Q: %s\n        reference: %s\n        before:    %s\n        after:     %s",
                 s["question"], s["reference"], s["before"], s["after"])
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_report(out_dir / "report.json", report)
    _step(5, n, f"done in {report['wall_seconds']:.0f}s: held-out loss {report['base_eval_loss']:.4f} -> "
                f"{report['final_eval_loss']:.4f}; report {out_dir / 'report.json'}, plot {out_dir / 'loss.png'}, "
                f"merged model {report['merged_model']}")
    return report
