"""`fedchat demo`: demo data, a federated run in Flower's simulation engine, merge,
a before/after chat scored with ROUGE-L, BLEU and chrF, report.json and a plot of held-out
loss per round."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from fedchat.demo_data import demo_node_config, write_demo_data
from fedchat.federation.simulation import simulate
from server.report import write_report
from shared.config import SECAGG_MIN_NODES, RunConfig
from shared.errors import ConfigError
from shared.model import resolve_base_model

log = logging.getLogger("fedchat.demo")


def _step(i: int, n: int, text: str) -> None:
    log.info("[%d/%d] %s", i, n, text)


def _samples(generation: dict | None, merged: bool, questions: int = 3) -> list[dict]:
    """The first held-out questions with the reference, the base's and the merged model's answers."""
    if not merged:
        log.info("    no answers to compare: this run merges no model (merge is off)")
        return []
    if not generation or "samples" not in generation:
        log.warning("    no answers to show: the coordinator's evaluation of the merged model failed (%s)",
                    (generation or {}).get("error", "no held-out data"))
        return []
    return [{"question": s["prompt"], "reference": s["reference"], "before": s["base"], "after": s["model"]}
            for s in generation["samples"][:questions]]


def privacy_spent(ledgers: dict[str, Path]) -> list[dict]:
    """Each node's budget as its own ledger states it after the run: the epsilon against an observer of the secure
    sum and the local epsilon of its own noise alone (the same number in local DP, where a node adds all of it)."""
    from shared.ledger import read_entries

    spent = []
    for node, path in ledgers.items():
        entries = read_entries(path) if path.exists() else []
        if not entries:
            continue
        last = entries[-1]
        spent.append({"node": node, "dp_mode": last.get("dp_mode", "local"), "rounds": len(entries),
                      "epsilon": last.get("epsilon"), "local_epsilon": last.get("local_epsilon", last.get("epsilon")),
                      "target_epsilon": last.get("target_epsilon"), "delta": last.get("delta")})
    return spent


def _fmt_eps(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def run_demo(*, out: str, clients: int, rounds: int, local_steps: int, base_model: str, aggregation: str,
             dp: bool, secagg: bool, target_epsilon: float, fresh: bool, extra: dict | None = None) -> dict:
    started = time.perf_counter()
    if secagg and clients < SECAGG_MIN_NODES:
        raise ConfigError(f"--clients must be at least {SECAGG_MIN_NODES} with secure aggregation (with two, each node "
                          f"learns the other's update from the sum); give --clients {SECAGG_MIN_NODES} or more, or "
                          "--no-secagg.")
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
    resolve_base_model(base_model)
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
                f"{', secure aggregation' if secagg else ', no secure aggregation'})")
    report = simulate(run, nodes)
    if dp:
        ledgers = out_dir / "ledgers"
        ledgers.mkdir(exist_ok=True)
        for c in manifest["clients"]:
            state = out_dir / "nodes" / c["node"]
            for src, dst in ((state / "ledger.jsonl", f"{c['node']}.jsonl"),
                             (state / "ledger-key.pub", f"{c['node']}.pub")):
                if src.exists():
                    shutil.copyfile(src, ledgers / dst)
        report["ledgers"] = str(ledgers.absolute())
        report["privacy"] = privacy_spent({c["node"]: out_dir / "nodes" / c["node"] / "ledger.jsonl"
                                           for c in manifest["clients"]})
        for p in report["privacy"]:
            log.info("    %s (%s DP, %d round(s) in its ledger): epsilon %s against an observer of the secure sum, "
                     "%s of its own noise alone (if the secure sum were broken); budget %g, delta %g", p["node"],
                     p["dp_mode"], p["rounds"], _fmt_eps(p["epsilon"]), _fmt_eps(p["local_epsilon"]),
                     p["target_epsilon"], p["delta"])
    generation = report.get("generation")
    _step(4, n, "the model before and after, on held-out questions (greedy answers, scored by the coordinator)")
    report["samples"] = _samples(generation, run.merge)
    for s in report["samples"]:
        log.info("    Q: %s\n        reference: %s\n        before:    %s\n        after:     %s",
                 s["question"], s["reference"], s["before"], s["after"])
    scores = ""
    if generation and "model" in generation:
        b, m = generation["base"], generation["model"]
        log.info("    %d held-out answers (at most %d tokens): ROUGE-L %.4f -> %.4f, chrF %.2f -> %.2f, BLEU %.2f -> "
                 "%.2f; evaluating both models took %.0fs", generation["scored"], generation["max_new_tokens"],
                 b["rouge_l"], m["rouge_l"], b["chrf"], m["chrf"], b["bleu"], m["bleu"], generation["seconds"])
        scores = f", ROUGE-L {b['rouge_l']:.4f} -> {m['rouge_l']:.4f}, chrF {b['chrf']:.2f} -> {m['chrf']:.2f}"
    privacy = ""
    if report.get("privacy"):
        worst = max(report["privacy"], key=lambda p: p["epsilon"] or 0)
        privacy = (f"; epsilon {_fmt_eps(worst['epsilon'])} (secure sum) / "
                   f"{_fmt_eps(max(p['local_epsilon'] or 0 for p in report['privacy']))} (a node's own noise) of "
                   f"{worst['target_epsilon']:g} ({run.dp_mode} DP)")
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_report(out_dir / "report.json", report)
    _step(5, n, f"done in {report['wall_seconds']:.0f}s: held-out loss {report['base_eval_loss']:.4f} -> "
                f"{report['final_eval_loss']:.4f}{scores}{privacy}; report {out_dir / 'report.json'}, "
                f"plot {out_dir / 'loss.png'}"
                f"{', merged model ' + report['merged_model'] if report.get('merged_model') else ''}")
    return report
