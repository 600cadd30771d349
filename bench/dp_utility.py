"""What differential privacy costs in held-out loss and ROUGE-L, local DP beside distributed DP, at matched compute.

    .venv/bin/python -m bench.dp_utility [--nodes 6 3] [--colluders ...] [--epsilons 8 4 1] [--modes local distributed]
        [--rounds R] [--local-steps S] [--run-config key=value ...] [--reference key=value ...]
        [--distributed key=value ...] [--distributed-rounds R] [--fresh] [--report] [--results-dir bench/results]

The demo data split over each federation size in --nodes (the demo corpus' English topics as organisations),
the same seed for every setting, and per federation size: the base model; federated without DP in the best
non-private recipe we know at this compute (--reference: small batches, many steps; with --same-recipe also
the DP recipe without noise); and at each epsilon (delta 1e-5, per node, over the whole run):

* **local DP**: every node trains the DP recipe (the run config's defaults plus --run-config) with DP-SGD
  and adds all the noise its own update needs (secure aggregation off: it changes the aggregate by less
  than the quantisation step, tests/test_secagg.py);
* **distributed DP** (dp-mode "distributed"): each round is one DP-SGD step of the whole federation; every
  node adds a Skellam share to its clipped gradient sum inside fedchat's secure sum (which the mode needs),
  counting on the shares of the survivors minus the colluder bound minus itself; the coordinator steps
  with Adam (learning-rate). The recipe is the DP recipe plus --distributed, over --distributed-rounds.

Every setting processes the same expected conversations per node (matched compute): rounds x local steps
x expected batch in local mode, rounds x expected batch in distributed mode (one step a round); the script
refuses recipes that do not. The colluder bound of each federation is --colluders (default: 0 up to 3
nodes, 1 above), the roster's bound in every setting of that size.
For each setting: the coordinator's held-out loss (shared.model.heldout_loss), the ROUGE-L F1 of greedy
answers on the held-out questions (shared.evaluation, rouge-score), and the share of the non-private gain
kept: (base - DP) / (base - best no-DP model of the same federation size and compute).
DP noise is seeded from the OS (never reproducible by design), so repeated runs differ a little.

Settings run in the order given (epsilons first, then federation sizes: the first epsilon on every size
before the next epsilon), each written to dp_utility.json as soon as it ends; a rerun with the same protocol
skips the settings already there (--fresh starts over; --report only rewrites the tables and the plot).
Writes dp_utility.json, dp_utility.md and dp_utility.png to --results-dir.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine, md_table, simulate_demo
from shared.config import parse_overrides
from shared.logs import setup_logging

# Keys each setting sets itself: a --run-config override of them would break the comparison.
_SET_HERE = {"dp", "dp-mode", "secagg", "base-model", "num-rounds", "local-steps", "merge", "eval-data", "out-dir",
             "min-nodes", "secagg-roster", "eval-max-conversations",
             "secagg-timeout", "node-wait-timeout"}
RECIPE_KEYS = ("batch-size", "local-steps", "learning-rate", "lora-r", "aggregation", "dp-max-grad-norm")
# Before issue 10 this was the run config's default; it is the best non-private recipe we measured at
# this compute (small batches, many steps), so the DP recipes are judged against it.
NON_PRIVATE_RECIPE = {"batch-size": 8, "local-steps": 10, "learning-rate": 0.002, "lora-r": 8, "lora-alpha": 16,
                      "aggregation": "fedavg"}
# Distributed DP at matched compute: the local recipe's conversations per round in one federation step of
# twice the expected batch, over as many rounds as local DP (see docs/results/dp_utility.md for the measured
# choice against twice the rounds at the local batch).
DISTRIBUTED_RECIPE = {"batch-size": 80, "local-steps": 1}
# What must match for a rerun to keep the settings a results file already holds.
_PROTOCOL = ("base_model", "rounds", "distributed_rounds", "run_config", "reference", "distributed", "delta",
             "rouge_conversations", "max_new_tokens", "eval_conversations", "validation_fraction")


def retained(base: float, value: float, reference: float) -> float | None:
    """The share of the reference's gain over the base that `value` keeps (None without a gain)."""
    gain = reference - base
    return None if gain == 0 else (value - base) / gain


def rouge_of(adapter: str | None, base_model: str, heldout, max_len: int, max_new_tokens: int) -> dict:
    """ROUGE-L, BLEU and chrF of base + adapter (or the base alone) on the held-out questions."""
    import torch

    from shared.evaluation import score_model
    from shared.merge import merged_in_memory
    from shared.model import load_model, load_tokenizer, resolve_base_model

    cpu = torch.device("cpu")
    if adapter:
        model, base_dir, _, _ = merged_in_memory(Path(adapter), cpu, torch.float32, base_model, flag="--base-model")
    else:
        base_dir = resolve_base_model(base_model)
        model = load_model(base_dir, cpu, torch.float32)
    s = score_model(model, load_tokenizer(base_dir), heldout, name=adapter or base_model, max_len=max_len,
                    max_new_tokens=max_new_tokens, with_loss=False)
    return {"rouge_l": s.rouge_l, "bleu": s.bleu, "chrf": s.chrf}


def setting_key(nodes: int, mode: str | None, epsilon: float | None, recipe: str) -> str:
    return f"{nodes}/{mode or 'none'}/{'-' if epsilon is None else f'{epsilon:g}'}/{recipe}"


def plan_settings(args, reference: dict) -> list[dict]:
    """Every setting to measure, most important first: per epsilon, per federation size, the no-DP references
    of that size (once), then each DP mode."""
    plan, seen = [], set()
    for eps in args.epsilons:
        for n, t in zip(args.nodes, args.colluders):
            todo = [] if args.no_reference else [("no DP, non-private recipe", None, None, "reference", reference)]
            if args.same_recipe:
                todo.append(("no DP, same recipe", None, None, "dp-recipe", {}))
            todo += [(f"{mode} DP epsilon {eps:g}", mode, eps, mode, {}) for mode in args.modes]
            for label, mode, e, recipe, extra in todo:
                key = setting_key(n, mode, e, recipe)
                if key not in seen:
                    seen.add(key)
                    plan.append({"key": key, "setting": f"{n} nodes, {label}", "nodes": n, "colluders": t,
                                 "dp_mode": mode, "epsilon": e, "recipe_name": recipe, "extra": extra})
    return plan


def run_setting(s: dict, args, overrides: dict, distributed: dict, tmp: Path) -> dict:
    from shared.evaluation import load_heldout
    from shared.ledger import read_entries

    out = tmp / s["key"].replace("/", "_")
    mode, eps = s["dp_mode"], s["epsilon"]
    if mode == "distributed":
        run = {"local_steps": args.local_steps, **overrides, **distributed, "num_rounds": args.distributed_rounds,
               "dp": True, "dp_mode": "distributed", "secagg": True}
    else:
        run = {"local_steps": args.local_steps, **overrides, **s["extra"], "num_rounds": args.rounds,
               "dp": mode is not None, "secagg": False}
    started = time.perf_counter()
    report = simulate_demo(out, s["nodes"], target_epsilon=eps or 8.0, base_model=args.base_model,
                           colluders=s["colluders"], node_config={"validation-fraction": args.validation_fraction},
                           eval_max_conversations=args.eval_conversations, secagg_timeout=args.stage_timeout,
                           node_wait_timeout=args.stage_timeout,
                           **{k.replace("-", "_"): v for k, v in run.items()})
    seconds = time.perf_counter() - started
    if report["failed_rounds"]:  # never a measurement: the adapter missed rounds the others took
        raise SystemExit(f"{s['setting']}: rounds {report['failed_rounds']} failed (see the log above); it is not "
                         "recorded. On a loaded host raise --stage-timeout and run the same command again.")
    cfg = report["config"]
    heldout = load_heldout(out / "data" / "eval.jsonl", args.rouge_conversations)
    losses = [report["base_eval_loss"]] + [r["eval_loss"] for r in report["rounds"]]
    spent = [c["epsilon"] for r in report["rounds"] for c in r["clients"] if c.get("epsilon") is not None]
    # Each node's local epsilon (its own noise alone) is in its ledger, not in the coordinator's report.
    local_spent = [e["local_epsilon"] for f in (out / "nodes").glob("*/ledger.jsonl") for e in read_entries(f)
                   if e.get("local_epsilon") is not None]
    steps = 1 if mode == "distributed" else cfg["local-steps"]
    base = {"loss": report["base_eval_loss"],
            **rouge_of(None, args.base_model, heldout, cfg["max-seq-len"], args.max_new_tokens)} \
        if args.rouge_conversations else {"loss": report["base_eval_loss"]}
    scores = rouge_of(report["adapter"], args.base_model, heldout, cfg["max-seq-len"], args.max_new_tokens) \
        if args.rouge_conversations else {}
    return {k: v for k, v in s.items() if k != "extra"} | {
        "max_epsilon_spent": max(spent) if spent else None,
        "max_local_epsilon_spent": max(local_spent) if local_spent else None,
        "loss": losses[-1], **scores, "eval_loss_per_round": losses, "base": base,
        "recipe": {k: cfg[k] for k in RECIPE_KEYS}, "rounds": cfg["num-rounds"],
        "conversations_per_node": cfg["num-rounds"] * steps * cfg["batch-size"],
        "failed_rounds": report["failed_rounds"], "seconds": round(seconds, 1)}


def main() -> None:
    from shared.config import RunConfig

    default = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[6, 3], help="federation sizes, in this order")
    parser.add_argument("--colluders", type=int, nargs="+",
                        help="the roster's colluder bound per federation size (default: 0 up to 3 nodes, 1 above)")
    parser.add_argument("--modes", nargs="*", choices=("local", "distributed"), default=["local", "distributed"],
                        help="DP modes to measure (none: only the no-DP settings)")
    parser.add_argument("--rounds", type=int, default=default.num_rounds, help="rounds of the local-DP and no-DP runs")
    parser.add_argument("--distributed-rounds", type=int, help="rounds of the distributed-DP runs (default --rounds)")
    parser.add_argument("--local-steps", type=int, default=default.local_steps)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--eval-conversations", type=int, default=200,
                        help="held-out conversations in the coordinator's loss each round (eval-max-conversations)")
    parser.add_argument("--stage-timeout", type=float, default=4 * 3600.0,
                        help="seconds the coordinator waits for nodes and for each secure-sum stage (secagg-timeout, "
                             "node-wait-timeout): the simulation trains its nodes one after another, so a stage lasts "
                             "as long as all of them together (over 600 s on a loaded 2-core host)")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="each node's local validation share (its loss stays on the node: 0 trains on all and "
                             "saves the time)")
    parser.add_argument("--rouge-conversations", type=int, default=40,
                        help="held-out questions answered per setting (0: held-out loss only)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--same-recipe", action="store_true", help="also run the DP recipe without noise")
    parser.add_argument("--run-config", nargs="*", metavar="KEY=VALUE", help="run-config keys for every DP setting "
                        "(the recipe: batch-size, learning-rate, dp-max-grad-norm, lora-r, aggregation ...)")
    parser.add_argument("--reference", nargs="*", metavar="KEY=VALUE",
                        default=[f"{k}={v}" for k, v in NON_PRIVATE_RECIPE.items()],
                        help="the non-private recipe to compare with at the same compute (default: %(default)s)")
    parser.add_argument("--distributed", nargs="*", metavar="KEY=VALUE",
                        default=[f"{k}={v}" for k, v in DISTRIBUTED_RECIPE.items()],
                        help="the distributed-DP recipe on top of the DP recipe (default: %(default)s; learning-rate "
                             "is the coordinator's Adam rate)")
    parser.add_argument("--no-reference", action="store_true",
                        help="without the non-private reference recipe (a second process measuring other settings "
                             "beside one that runs it, into another --results-dir; --merge joins them)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of keeping the settings measured")
    parser.add_argument("--report", action="store_true", help="only rewrite the table and the plot from the JSON")
    parser.add_argument("--merge", nargs="*", metavar="JSON", default=[],
                        help="with --report: add the settings of these results files (same protocol, settings not "
                             "already in --results-dir's file)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where dp_utility.json/.md/.png go")
    args = parser.parse_args()
    setup_logging(quiet_flower=True)
    results_dir = Path(args.results_dir)
    path = results_dir / "dp_utility.json"
    if args.report:
        if not path.exists():
            parser.error(f"--report: no {path} to report")
        data = json.loads(path.read_text())
        for other in map(Path, args.merge):
            extra = json.loads(other.read_text())
            differs = [k for k in _PROTOCOL if extra.get(k) != data.get(k)]
            if differs:
                parser.error(f"--merge {other}: measured with another protocol ({', '.join(differs)} differ)")
            have = {r["key"] for r in data["settings"]}
            data["settings"] += [r for r in extra["settings"] if r["key"] not in have]
            data["merged_from"] = sorted({*data.get("merged_from", []), str(other)})
        measured = {r["key"] for r in data["settings"]}
        data["complete"] = all(k in measured for k in data["planned"])
        write_outputs(data, results_dir)
        return

    args.distributed_rounds = args.distributed_rounds or args.rounds
    if args.colluders is None:
        args.colluders = [0 if n <= 3 else 1 for n in args.nodes]
    if len(args.colluders) != len(args.nodes):
        parser.error(f"--colluders gives {len(args.colluders)} bound(s) for {len(args.nodes)} federation size(s): "
                     "give one per --nodes value")
    for n, t in zip(args.nodes, args.colluders):
        if n < 3 or not 0 <= t <= n - 3:
            parser.error(f"--nodes {n} with --colluders {t}: a secure sum needs 3 nodes or more, and its colluder "
                         "bound must leave at least 2 honest shares an observer cannot know (0 <= colluders <= "
                         "nodes - 3)")
    if any(not e > 0 for e in args.epsilons):
        parser.error(f"--epsilons must all be > 0 (got {args.epsilons})")
    overrides, reference = parse_overrides(args.run_config), parse_overrides(args.reference)
    distributed = parse_overrides(args.distributed)
    # The reference may take other steps (at the same conversations per node); nothing else of the protocol.
    clash = sorted(set(overrides) & _SET_HERE | set(reference) & (_SET_HERE - {"local-steps"})
                   | set(distributed) & (_SET_HERE - {"local-steps"}))
    if clash:
        parser.error(f"--run-config/--reference/--distributed may not set {', '.join(clash)}: each setting sets them")
    recipe = RunConfig.from_flower({"local-steps": args.local_steps, **overrides})
    ref = RunConfig.from_flower({"local-steps": args.local_steps, **overrides, **reference})
    dist = RunConfig.from_flower({"local-steps": args.local_steps, **overrides, **distributed})
    compute = {"local DP recipe": args.rounds * recipe.local_steps * recipe.batch_size,
               "--reference": args.rounds * ref.local_steps * ref.batch_size,
               "--distributed": args.distributed_rounds * dist.batch_size}
    if len(set(compute.values())) != 1:
        parser.error("the settings would not be at matched compute (expected conversations per node: "
                     + ", ".join(f"{k} {v}" for k, v in compute.items()) + "): distributed DP takes one step a "
                     "round, so set --distributed batch-size x --distributed-rounds to rounds x local-steps x "
                     "batch-size of the DP recipe, and --reference batch-size x local-steps to the DP recipe's")

    protocol = {"base_model": args.base_model, "rounds": args.rounds, "distributed_rounds": args.distributed_rounds,
                "run_config": overrides, "reference": reference, "distributed": distributed, "delta": 1e-5,
                "rouge_conversations": args.rouge_conversations, "max_new_tokens": args.max_new_tokens,
                "eval_conversations": args.eval_conversations, "validation_fraction": args.validation_fraction}
    done: dict[str, dict] = {}
    if path.exists() and not args.fresh:
        old = json.loads(path.read_text())
        differs = [k for k in _PROTOCOL if old.get(k) != protocol[k]]
        if differs:
            parser.error(f"{path} holds settings measured with another protocol ({', '.join(differs)} differ, or a "
                         "results file from before local and distributed DP): give the same options to continue "
                         "it, or --fresh to start over (or another --results-dir)")
        done = {r["key"]: r for r in old["settings"]}
    plan = plan_settings(args, reference)
    todo = [s for s in plan if s["key"] not in done]
    print(f"{len(plan)} settings, {len(plan) - len(todo)} already measured in {path}", flush=True)
    results = list(done.values())
    with tempfile.TemporaryDirectory() as tmp:
        for s in todo:
            print(f"== {s['setting']} ({len(results) + 1}/{len(plan)})", flush=True)
            results.append(run_setting(s, args, overrides, distributed, Path(tmp)))
            # Written after every setting: an interrupted run keeps what it measured, and a rerun continues.
            data = {**protocol, "settings": results, "compute": compute, "planned": [p["key"] for p in plan],
                    "complete": all(p["key"] in {r["key"] for r in results} for p in plan), "machine": machine()}
            write_outputs(data, results_dir)


def write_outputs(data: dict, results_dir: Path) -> None:
    results = data["settings"]
    for r in results:  # against the best non-private setting of the same federation size (and compute)
        no_dp = [x for x in results if x["dp_mode"] is None and x["nodes"] == r["nodes"]]
        if not no_dp:
            r["retained_loss_gain"] = r["retained_rouge_gain"] = None
            continue
        base = r["base"]
        r["retained_loss_gain"] = retained(base["loss"], r["loss"], min(x["loss"] for x in no_dp))
        r["retained_rouge_gain"] = retained(base["rouge_l"], r["rouge_l"], max(x["rouge_l"] for x in no_dp)) \
            if "rouge_l" in r else None
    results.sort(key=lambda r: (-r["nodes"], -(r["epsilon"] or 1e9), r["dp_mode"] or ""))

    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    rows = []
    for n in sorted({r["nodes"] for r in results}, reverse=True):
        same = [r for r in results if r["nodes"] == n]
        b = same[0]["base"]
        rows.append([f"{n} nodes, base model (no training)", "-", "-", "-", f"{b['loss']:.4f}",
                     num(b.get("rouge_l"), ".4f"), "-", "-"])
        rows += [[r["setting"], r["colluders"] if r["dp_mode"] == "distributed" else "-",
                  num(r["max_epsilon_spent"], ".2f"), num(r.get("max_local_epsilon_spent"), ".1f"),
                  f"{r['loss']:.4f}", num(r.get("rouge_l"), ".4f"), pct(r["retained_loss_gain"]),
                  pct(r["retained_rouge_gain"])] for r in same]
    table = md_table(["setting", "colluder bound", "epsilon spent (max node)", "local epsilon of a share",
                      "held-out loss", "ROUGE-L F1", "loss gain kept", "ROUGE-L gain kept"], rows)
    describe = lambda c: ", ".join(f"{k} {c[k]}" for k in RECIPE_KEYS)  # noqa: E731
    recipes = {}
    for r in results:
        recipes.setdefault(r["dp_mode"] or "none", (r["rounds"], r["recipe"]))
    table += (f"\n\n{data['compute']['local DP recipe']} conversations per node in every setting (matched compute). "
              + " ".join(f"{'No-DP' if m == 'none' else m.capitalize() + ' DP'} recipe: {rounds} rounds, "
                         f"{describe(c)}." for m, (rounds, c) in recipes.items())
              + " Gain kept = (base - setting) / (base - best no-DP model of the same federation size). "
              f"ROUGE-L on {data['rouge_conversations']} held-out questions, greedy, {data['max_new_tokens']} new "
              "tokens." + ("" if data.get("complete") else " Incomplete: settings not measured: "
                           + ", ".join(k for k in data["planned"] if k not in {r["key"] for r in results}) + "."))
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "dp_utility.json").write_text(json.dumps(data, indent=2))
    (results_dir / "dp_utility.md").write_text(table.rstrip() + "\n")
    print(table)
    plot(results, results_dir / "dp_utility.png", data)
    print(f"wrote {results_dir / 'dp_utility.json'}, dp_utility.md and dp_utility.png")


def plot(results: list[dict], out: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"local": ("#d1603d", "o", "--"), "distributed": ("#3b75af", "s", "-")}
    for mode, (colour, marker, line) in styles.items():
        for eps in sorted({r["epsilon"] for r in results if r["dp_mode"] == mode}, reverse=True):
            pts = sorted((r["nodes"], r["retained_loss_gain"]) for r in results
                         if r["dp_mode"] == mode and r["epsilon"] == eps and r["retained_loss_gain"] is not None)
            if pts:
                alpha = {8.0: 1.0, 4.0: 0.7, 1.0: 0.45}.get(eps, 0.8)
                left.plot(*zip(*pts), marker=marker, linestyle=line, color=colour, alpha=alpha,
                          label=f"{mode} DP, epsilon {eps:g}")
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_xlabel("organisations in the federation")
    left.set_ylabel("held-out loss gain kept (vs no DP, same nodes)")
    left.set_xticks(sorted({r["nodes"] for r in results}))
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    largest = max(r["nodes"] for r in results)
    for r in results:
        if r["nodes"] == largest:
            colour = styles.get(r["dp_mode"], ("black", "^", ":"))[0]
            right.plot(range(len(r["eval_loss_per_round"])), r["eval_loss_per_round"], color=colour,
                       marker="o", alpha={8.0: 1.0, 4.0: 0.7, 1.0: 0.45}.get(r["epsilon"], 1.0),
                       label=r["setting"].split(", ", 1)[1])
    right.set_xlabel("round (0 = base model)")
    right.set_ylabel("held-out loss")
    right.set_title(f"{largest} nodes", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"{data['base_model']}: local vs distributed DP at matched compute "
                 f"({data['compute']['local DP recipe']} conversations per node)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
