"""What a round costs as nodes and adapters grow: plaintext, Flower's stock SecAgg+ and fedchat's secure sum,
side by side.

    python -m bench.scale --nodes 5 20 100 --adapter-params 500000
    python -m bench.scale --nodes 5 --adapter-params 500000 40000000
    python -m bench.scale --train --nodes 5 20
    python -m bench.scale --parallel
    python -m bench.scale --deployment --nodes 3 --adapter-params 40000000 --protocols plaintext fedchat
    python -m bench.scale --report

Every configuration runs in a process of its own (so peak memory is its own), once per protocol of
--protocols (default: plaintext, flower-secagg+, fedchat; bench/scale_app.py says what each runs), the
protocols of one configuration back to back, so they share the machine's load.

Kinds of rows:

* synthetic (default): Flower's simulation engine, fedchat's coordinator (strategy, round loop) and
  node mods around random updates of --adapter-params parameters: the protocols' cost without training.
* train (--train): fedchat's real ServerApp and ClientApp, every node training the tiny model (local-steps
  2, batch 4, no DP: DP's accountant would add the same seconds to every protocol and flatter the
  ratio) on its share of the demo corpus; --base-model smollm2-135m trains the demo model (with DP).
* parallel (--parallel): a 3-node round of the embedded model with DP under fedchat's secure sum, nodes
  one after another (the default) against all three at once (sim-cpus-per-node 2/3, one torch thread each).
* deployment (--deployment): Flower's deployment engine as deploy/local-federation.sh runs it (TLS,
  authenticated SuperNodes, approved app bundle), synthetic updates; plaintext and fedchat only.

A row reports the median of the rounds after the first (the first also loads models and starts
processes; the only one when --rounds is 1), per-stage seconds of the last round, bytes per node
per round (the serialized message contents the coordinator meters, every stage), and peak RSS (the
kernel's high-water mark, VmHWM, polled while the run lasts: coordinator = the simulation's driver,
node = the largest Ray worker; in deployment each process role). A configuration that runs past
--timeout is stopped and its row says so, with how long it ran (a lower bound, not a skipped row).
Results: bench/results/scale.json (rows merged by configuration), scale.md, scale_nodes.png and
scale_adapter.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine, md_table

RESULT_TAG = "SCALE-RESULT "
PROTOCOLS = ("plaintext", "flower-secagg+", "fedchat")
STOCK = "flower-secagg+"
TINY_TRAIN = {"base-model": "tiny", "local-steps": 2, "batch-size": 4, "dp": False}
DEMO_ROUND = {"base-model": "smollm2-135m", "local-steps": 2, "micro-batch-tokens": 512, "dp": True}
PROGRESS_SECONDS = 30.0


# ------------------------------------------------------------------ one configuration (child process)


def _run_config(spec: dict, out: Path):
    from shared.config import RunConfig

    values = {"num-rounds": spec["rounds"], "min-nodes": spec["nodes"], "secagg": spec["protocol"] != "plaintext",
              "out-dir": str(out / "run"), "dp": False, "merge": False, "eval-data": "", "secagg-timeout": 3600.0,
              **spec.get("run", {})}
    return RunConfig.from_flower(values)


def _node_settings(spec: dict) -> dict:
    return {"require-secagg": spec["protocol"] != "plaintext",
            "require-dp": bool(spec.get("run", {}).get("dp", False))}


def run_synthetic(spec: dict, out: Path) -> dict:
    from bench.scale_app import ADAPTER_KEY, make_client_app, make_server_app, use_stock_secagg
    from fedchat.federation.simulation import provision_roster, run_apps

    cfg = _run_config(spec, out)
    nodes = {i: {**_node_settings(spec), "node-name": f"node-{i}", "state-dir": str(out / "nodes" / f"node-{i}")}
             for i in range(spec["nodes"])}
    if cfg.secagg:
        roster, nodes = provision_roster(out / "run", nodes)
        cfg = cfg.replace(secagg_roster=str(roster))
    if spec["protocol"] == STOCK:
        use_stock_secagg(spec["nodes"])
    server = make_server_app({**cfg.to_flower(), ADAPTER_KEY: spec["adapter_params"]})
    return run_apps(cfg, server, make_client_app(spec["protocol"], nodes), spec["nodes"])


def split_corpus(folder: Path, nodes: int) -> list[Path]:
    """Every English conversation of the demo corpus dealt out to `nodes` files (more nodes than topics)."""
    from fedchat.demo_data import load_topics
    from shared.dialogue import write_dialogues

    conversations = [c for topic in load_topics().values() for c in topic]
    random.Random(0).shuffle(conversations)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"org-{i + 1}.jsonl" for i in range(nodes)]
    for i, path in enumerate(paths):
        write_dialogues(path, conversations[i::nodes])
    return paths


def run_train(spec: dict, out: Path) -> dict:
    import fedchat.federation.simulation as simulation
    from bench.scale_app import STOCK as STOCK_APP
    from bench.scale_app import train_client_app, use_stock_secagg

    cfg = _run_config(spec, out)
    paths = split_corpus(out / "data", spec["nodes"])
    # Each organisation its own host's ledger registry: the demo corpus repeats a few conversations across
    # topics, which one shared registry would (rightly) refuse to budget twice.
    nodes = {i: {"data-path": str(p), "state-dir": str(out / "nodes" / p.stem), "node-name": p.stem,
                 "ledger-registry": str(out / "nodes" / p.stem / "registry"), **_node_settings(spec)}
             for i, p in enumerate(paths)}
    if spec["protocol"] == STOCK_APP:  # the same simulation, with Flower's stock protocol on both sides
        use_stock_secagg(spec["nodes"])
        simulation.make_client_app = lambda sim_nodes: train_client_app(STOCK_APP, sim_nodes)
    return simulation.simulate(cfg, nodes)


def run_deployment(spec: dict, out: Path) -> dict:
    """The local federation (fedchat.federation.local_federation) with an app bundle whose components are the
    synthetic ones: built, approved by every node, submitted with `flwr run`."""
    from fedchat.federation.local_federation import LocalFederation, Runner
    from fedchat.federation.processes import become_subreaper

    if spec["protocol"] == STOCK:
        raise SystemExit("deployment rows run plaintext and fedchat only (the bundle ships product code)")
    app = _synthetic_bundle_folder(out / "app-src", spec["adapter_params"])
    fed = LocalFederation(nodes=spec["nodes"], rounds=spec["rounds"], base_model="tiny", out=out / "fed",
                          dp=False, secagg=spec["protocol"] == "fedchat", app=app, timeout=3000.0,
                          startup_timeout=300.0,
                          run_config={"secagg-timeout": 1800.0, "merge": False, "eval-data": ""})
    become_subreaper()  # Flower's orphans come back to this process, to be watched and stopped
    runner = Runner(fed)
    try:
        report = runner.run()
    finally:
        runner.stop()
    return report


def _synthetic_bundle_folder(folder: Path, params: int) -> Path:
    """A copy of this project whose Flower app components are bench/scale_app.py's, adapter size in its config."""
    import tomllib

    import tomli_w

    root = Path(__file__).resolve().parents[1]
    shutil.rmtree(folder, ignore_errors=True)
    for package in ("server", "client", "shared"):
        for source in (root / package).rglob("*.py"):
            target = folder / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    (folder / "bench").mkdir(parents=True)
    (folder / "bench" / "__init__.py").write_text("")
    shutil.copyfile(root / "bench" / "scale_app.py", folder / "bench" / "scale_app.py")
    project = tomllib.loads((root / "pyproject.toml").read_text())
    flwr = project["tool"]["flwr"]["app"]
    flwr["components"] = {"serverapp": "bench.scale_app:server_app", "clientapp": "bench.scale_app:client_app"}
    flwr["fab-include"] = [*flwr["fab-include"], "bench/__init__.py", "bench/scale_app.py"]
    flwr["config"]["scale-adapter-params"] = int(params)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def one(spec: dict) -> None:
    """Run one configuration; its result is the last line of stdout."""
    from shared.logs import setup_logging

    setup_logging(quiet_flower=True)
    runner = {"synthetic": run_synthetic, "train": run_train, "parallel": run_train,
              "deployment": run_deployment}[spec["kind"]]
    print(RESULT_TAG + json.dumps(summary(runner(spec, Path(spec["workdir"])))), flush=True)


def summary(report: dict) -> dict:
    """A row's figures from a run's report (or from the rounds a stopped run had finished)."""
    rounds = report["rounds"]
    warm = rounds[1:] or rounds
    last = rounds[-1]
    clients = last["clients"]
    result = {"round_seconds": round(statistics.median(r["seconds"] for r in warm), 3),
              "round_seconds_all": [r["seconds"] for r in rounds], "status": [r["status"] for r in rounds],
              "bytes_up_per_node": sum(c.get("bytes_up", 0) for c in clients) / max(len(clients), 1),
              "bytes_down_per_node": sum(c.get("bytes_down", 0) for c in clients) / max(len(clients), 1),
              "update_bytes_float32": report.get("adapter_update_bytes"), "nodes_in_round": len(clients)}
    if "secagg" in last:
        s = last["secagg"]
        result.update({"stage_seconds": s.get("stage_seconds"), "threshold": s.get("threshold"),
                       "num_shares": s.get("num_shares", s.get("nodes"))})
    if "deployment" in report:
        result["deployment"] = {k: report["deployment"][k] for k in ("engine", "flower", "tls", "supernode_auth",
                                                                       "app_sha256", "seconds")}
    return result


# ------------------------------------------------------------------ the parent: run, watch, merge


def _vmhwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _role(cmdline: str, kind: str) -> str:
    """Which part of the federation a process is, from its command line."""
    if kind != "deployment":
        return "node" if "ray::" in cmdline or "default_worker.py" in cmdline else "ray-runtime"
    for needle, role in (("flower-superlink", "superlink"), ("flwr-serverapp", "serverapp"),
                         ("fedchat.node.runtime", "clientapp"), ("flower-supernode", "supernode"),
                         ("flower-superexec", "superexec"), ("coordinator start", "superlink"),
                         ("node start", "supernode")):
        if needle in cmdline:
            return role
    return "other"


def _last_progress(log: Path) -> str:
    """The child's last log line worth showing (fedchat's round and stage lines)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if "fedchat" in line or "round" in line]
    return lines[-1][-160:] if lines else ""


def _finished_rounds(workdir: Path) -> dict:
    """The figures of the rounds a stopped run had finished (its report is written after each round)."""
    reports = [p for p in workdir.rglob("report.json") if "rounds" in p.read_text(errors="replace")]
    try:
        report = json.loads(reports[0].read_text()) if reports else {}
    except ValueError:
        report = {}
    if not report.get("rounds"):
        return {}
    return {f"finished_{k}": v for k, v in summary(report).items()}


def _stop(processes: list) -> None:
    """Stop the child and every process it started (by pid), then wait for them."""
    import psutil

    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=30)


def measure(spec: dict, log: Path, timeout: float | None = None) -> dict:
    """Run `spec` in a child process; its result, with the peak RSS of each process role it started.
    Past `timeout` seconds the child is stopped and the result says how long it ran."""
    import psutil

    workdir = Path(tempfile.mkdtemp(prefix="fedchat-scale-"))
    argv = [sys.executable, "-m", "bench.scale", "--one", json.dumps({**spec, "workdir": str(workdir)})]
    peaks: dict[str, float] = {}
    started = shown = time.perf_counter()
    timed_out = False
    with open(log, "w") as f:
        # On a loaded host Ray's workers can take longer than its 60 s to register, and the run then waits forever.
        env = {**os.environ, "RAY_worker_register_timeout_seconds": "600"}
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                 env=env)
        root = psutil.Process(child.pid)
        processes = [root]
        while child.poll() is None:
            try:
                processes = [root] + root.children(recursive=True)
            except psutil.Error:
                pass
            for p in processes:
                try:
                    role = "coordinator" if p.pid == child.pid else _role(" ".join(p.cmdline()), spec["kind"])
                except psutil.Error:
                    continue
                hwm = _vmhwm_mb(p.pid)
                if hwm is not None:
                    peaks[role] = max(peaks.get(role, 0.0), hwm)
            elapsed = time.perf_counter() - started
            if elapsed - (shown - started) >= PROGRESS_SECONDS:
                shown = time.perf_counter()
                print(f"   ... {elapsed:.0f} s: {_last_progress(log)}", flush=True)
            if timeout is not None and elapsed > timeout:
                timed_out = True
                _stop(processes)
                break
            time.sleep(0.2)
    wall = round(time.perf_counter() - started, 1)
    if timed_out:
        partial = _finished_rounds(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        return {**partial, "timed_out_after_seconds": wall, "last_progress": _last_progress(log),
                "peak_rss_mb_by_role": {k: round(v, 1) for k, v in sorted(peaks.items())}, "wall_seconds": wall}
    shutil.rmtree(workdir, ignore_errors=True)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(RESULT_TAG)]
    if child.returncode != 0 or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{spec} failed (exit {child.returncode}); log {log}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    if any(status != "ok" for status in result["status"]):
        tail = "\n".join(line for line in log.read_text(errors="replace").splitlines() if "Error" in line)[-3000:]
        raise SystemExit(f"{spec}: rounds {result['status']}; log {log}:\n{tail}")
    result["peak_rss_mb_by_role"] = {k: round(v, 1) for k, v in sorted(peaks.items())}
    result["wall_seconds"] = wall
    return result


def row_for(spec: dict, result: dict) -> dict:
    peaks = result.pop("peak_rss_mb_by_role")
    if spec["kind"] == "deployment":
        coordinator = max(peaks.get("superlink", 0.0), peaks.get("serverapp", 0.0))
        node = max(peaks.get("supernode", 0.0), peaks.get("clientapp", 0.0))
    else:
        coordinator, node = peaks.get("coordinator", 0.0), peaks.get("node", 0.0)
    row = {"kind": spec["kind"], "protocol": spec["protocol"], "nodes": spec["nodes"],
           "adapter_params": spec["adapter_params"], "round_seconds": result.pop("round_seconds", None),
           "bytes_up_per_node": round(result.pop("bytes_up_per_node", 0)) or None,
           "bytes_down_per_node": round(result.pop("bytes_down_per_node", 0)) or None,
           "stage_seconds": result.pop("stage_seconds", None), "rounds": spec["rounds"],
           "peak_rss_mb_coordinator": round(coordinator, 1), "peak_rss_mb_node": round(node, 1),
           **{k: v for k, v in spec.items() if k in ("label", "at_once", "threads", "base_model")}, **result,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if row["round_seconds"] is None and row.get("finished_round_seconds_all"):  # stopped after finishing a round
        row["round_seconds"] = row["finished_round_seconds_all"][-1]
        row["round_seconds_note"] = (f"the last of the {len(row['finished_round_seconds_all'])} round(s) finished "
                                     f"before the run was stopped after {row['timed_out_after_seconds']:.0f} s")
        for key in ("bytes_up_per_node", "bytes_down_per_node", "stage_seconds"):
            row[key] = row.get(f"finished_{key}")
    if spec["kind"] in ("train", "parallel") and result.get("update_bytes_float32"):
        row["adapter_params"] = result["update_bytes_float32"] // 4
    return row


def run_specs(specs: list[dict], logs: Path, timeouts: dict[int, float] | None = None) -> list[dict]:
    """Measure each spec in turn, printing progress; the rows."""
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, spec in enumerate(specs):
        size = spec.get("base_model", "tiny") + " model" if spec["kind"] != "synthetic" else \
            f"{spec['adapter_params']:,} params"
        print(f"== [{i + 1}/{len(specs)}] {spec['kind']}, {spec['nodes']} nodes, {size}, {spec['protocol']}"
              + (f" ({spec['label']})" if spec.get("label") else "") + f", {time.strftime('%H:%M:%S')}", flush=True)
        result = measure(spec, logs / f"{i:02d}.log", (timeouts or {}).get(i))
        row = row_for(spec, result)
        if row["round_seconds"] is None:
            print(f"   stopped after {row['timed_out_after_seconds']:.0f} s (limit): {row['last_progress']}",
                  flush=True)
        else:
            print(f"   {row['round_seconds']:.2f} s a round (all: {row['round_seconds_all']}), stages "
                  f"{row['stage_seconds']}, {(row['bytes_up_per_node'] or 0) / 1e6:.3f} MB up per node, peak RSS "
                  f"{row['peak_rss_mb_coordinator']:.0f} / {row['peak_rss_mb_node']:.0f} MB (wall "
                  f"{row['wall_seconds']:.0f} s)", flush=True)
        rows.append(row)
    return rows


def key(row: dict) -> tuple:
    return (row["kind"], row["nodes"], row["adapter_params"], row["protocol"], row.get("label"),
            row.get("base_model"))


def merge_rows(rows: list[dict]) -> list[dict]:
    """scale.json's rows with these in place of the same configurations' (rows of the protocol fedchat
    replaced, which have no 'protocol', are dropped)."""
    path = RESULTS / "scale.json"
    old = [r for r in json.loads(path.read_text())["rows"] if "protocol" in r] if path.exists() else []
    fresh = {key(r) for r in rows}
    merged = [r for r in old if key(r) not in fresh] + rows
    return sorted(merged, key=lambda r: (r["kind"], r["adapter_params"], r["nodes"], PROTOCOLS.index(r["protocol"]),
                                         str(r.get("label"))))


# ------------------------------------------------------------------ tables and plots


def ratios(rows: list[dict]) -> list[dict]:
    """fedchat against Flower's stock SecAgg+ and against plaintext, per configuration."""
    out = []
    for r in rows:
        if r["protocol"] != "fedchat" or r["kind"] == "parallel":
            continue
        same = {p["protocol"]: p for p in rows if key(p)[:3] == key(r)[:3] and p.get("label") == r.get("label")
                and p.get("base_model") == r.get("base_model")}
        entry = {"kind": r["kind"], "nodes": r["nodes"], "adapter_params": r["adapter_params"],
                 **({"base_model": r["base_model"]} if r.get("base_model") else {})}
        for other, name in ((STOCK, "flower"), ("plaintext", "plaintext")):
            o = same.get(other)
            for metric in ("round_seconds", "bytes_up_per_node", "bytes_down_per_node"):
                if o and r.get(metric) and o.get(metric):
                    entry[f"{metric}_fedchat_over_{name}"] = round(r[metric] / o[metric], 3)
            if o and o.get("round_seconds") is None:
                entry[f"{name}_stopped_after_seconds"] = o.get("timed_out_after_seconds")
        out.append(entry)
    return out


def _stages(row: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in (row.get("stage_seconds") or {}).items())


def _mb(b: float | None) -> str:
    return f"{b / 1e6:.3f}" if b else ""


def _seconds(row: dict) -> str:
    if row["round_seconds"] is None:
        return f"> {row['timed_out_after_seconds']:.0f} (stopped)"
    return f"{row['round_seconds']:.2f}"


def tables(rows: list[dict]) -> str:
    header = ["kind", "nodes", "adapter params", "protocol", "round s", "stages s (last round)",
              "MB up / node", "MB down / node", "peak RSS MB coord / node"]
    body = [[r["kind"] + (f" ({r['label']})" if r.get("label") else ""), r["nodes"],
             f"{r['adapter_params']:,}" + (f" ({r['base_model']})" if r.get("base_model") else ""), r["protocol"],
             _seconds(r), _stages(r), _mb(r.get("bytes_up_per_node")), _mb(r.get("bytes_down_per_node")),
             f"{r['peak_rss_mb_coordinator']:.0f} / {r['peak_rss_mb_node']:.0f}"] for r in rows]
    out = md_table(header, body)
    rs = ratios(rows)
    if rs:
        def fmt(x: dict, key: str) -> str:
            return f"{x[key]:.3f}" if key in x else ""

        out += "\n\n" + md_table(
            ["kind", "nodes", "adapter params", "round time fedchat / flower", "round time fedchat / plaintext",
             "bytes up fedchat / flower", "bytes up fedchat / plaintext"],
            [[x["kind"], x["nodes"], f"{x['adapter_params']:,}",
              fmt(x, "round_seconds_fedchat_over_flower") or _stopped(x),
              fmt(x, "round_seconds_fedchat_over_plaintext"), fmt(x, "bytes_up_per_node_fedchat_over_flower"),
              fmt(x, "bytes_up_per_node_fedchat_over_plaintext")] for x in rs])
    return out


def _stopped(ratio: dict) -> str:
    after = ratio.get("flower_stopped_after_seconds")
    return f"flower stopped after {after:.0f} s" if after else ""


def panel(ax, rows: list[dict], x: str, title: str) -> None:
    """Round seconds against `x` ("nodes" or "adapter_params"), one line per protocol (and per the other
    variable's value); a stopped run is drawn as an open marker at the time it ran (a lower bound)."""
    other = "adapter_params" if x == "nodes" else "nodes"
    for protocol, marker, color in zip(PROTOCOLS, "os^", ("C0", "C1", "C2")):
        for value, style in zip(sorted({r[other] for r in rows}), ("-", "--", ":", "-.")):
            series = sorted((r for r in rows if r["protocol"] == protocol and r[other] == value), key=lambda r: r[x])
            if len(series) < 2:  # a line needs two configurations
                continue
            xs = [r[x] / (1e6 if x == "adapter_params" else 1) for r in series]
            ys = [r["round_seconds"] or r["timed_out_after_seconds"] for r in series]
            label = f"{protocol}, " + (f"{value / 1e6:g}M params" if other == "adapter_params" else f"{value} nodes")
            line = ax.plot(xs, ys, marker + style, color=color, label=label)[0]
            for xv, r in zip(xs, series):
                if r["round_seconds"] is None:
                    ax.plot([xv], [r["timed_out_after_seconds"]], marker, mfc="white", color=line.get_color(),
                            markersize=11)
                    ax.annotate("stopped", (xv, r["timed_out_after_seconds"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes in the round" if x == "nodes" else "adapter parameters (millions)")
    ax.set_ylabel("round seconds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _figure(path: Path, panels: list[tuple[list[dict], str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (rows, x, title) in zip(axes[0], panels):
        panel(ax, rows, x, title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def synthetic_figure(rows: list[dict], path: Path) -> None:
    """Round time against nodes (synthetic 0.5M-parameter rows) and against adapter size (synthetic rows)."""
    synthetic = [r for r in rows if r["kind"] == "synthetic"]
    small = [r for r in synthetic if r["adapter_params"] == min((s["adapter_params"] for s in synthetic), default=0)]
    _figure(path, [(small, "nodes", "synthetic updates: round time against nodes"),
                   (synthetic, "adapter_params", "synthetic updates: round time against adapter size")])


def write(rows: list[dict]) -> None:
    path = RESULTS / "scale.json"
    data = {"rows": rows, "ratios": ratios(rows), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    (RESULTS / "scale.md").write_text(tables(rows).rstrip() + "\n")
    synthetic = [r for r in rows if r["kind"] == "synthetic"]
    _figure(RESULTS / "scale_nodes.png", [([r for r in rows if r["kind"] == kind], "nodes", kind)
                                          for kind in ("synthetic", "train") if any(r["kind"] == kind for r in rows)])
    _figure(RESULTS / "scale_adapter.png", [(synthetic, "adapter_params", "synthetic updates")])
    print(tables(rows))
    print(f"wrote {path}, scale.md, scale_nodes.png, scale_adapter.png")


# ------------------------------------------------------------------ command line


def specs(args) -> list[dict]:
    base = {"rounds": args.rounds}
    if args.parallel:
        cores = os.cpu_count() or 1
        return [{**base, "kind": "parallel", "nodes": 3, "adapter_params": 0, "protocol": "fedchat",
                 "label": "serial", "at_once": 1, "threads": cores, "run": DEMO_ROUND, "base_model": "smollm2-135m"},
                {**base, "kind": "parallel", "nodes": 3, "adapter_params": 0, "protocol": "fedchat",
                 "label": "parallel", "at_once": 3, "threads": 1, "base_model": "smollm2-135m",
                 "run": {**DEMO_ROUND, "sim-cpus-per-node": cores / 3, "sim-threads-per-node": 1}}]
    kind = "deployment" if args.deployment else "train" if args.train else "synthetic"
    out = []
    for params in (args.adapter_params if kind != "train" else [0]):
        for nodes in args.nodes:
            for protocol in args.protocols:
                spec = {**base, "kind": kind, "nodes": nodes, "adapter_params": params, "protocol": protocol}
                if kind == "train":
                    spec["base_model"] = args.base_model
                    spec["run"] = TINY_TRAIN if args.base_model == "tiny" else DEMO_ROUND
                out.append(spec)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[5])
    parser.add_argument("--adapter-params", type=int, nargs="+", default=[500_000])
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-model", default="tiny", help="--train: tiny or smollm2-135m (with DP)")
    parser.add_argument("--timeout", type=float, default=None, help="stop a configuration after this many seconds")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="nodes train (real ServerApp and ClientApp)")
    mode.add_argument("--parallel", action="store_true", help="3-node demo round: serial against parallel")
    mode.add_argument("--deployment", action="store_true", help="Flower's deployment engine (TLS, auth)")
    mode.add_argument("--report", action="store_true", help="rebuild tables and plots from scale.json")
    mode.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one(json.loads(args.one))
    if args.report:
        return write(json.loads((RESULTS / "scale.json").read_text())["rows"])
    todo = specs(args)
    rows = run_specs(todo, Path(tempfile.mkdtemp(prefix="fedchat-scale-logs-")),
                     {i: args.timeout for i in range(len(todo))} if args.timeout else None)
    write(merge_rows(rows))


if __name__ == "__main__":
    main()
