"""What a round costs as nodes and adapters grow: plaintext against SecAgg+, side by side.

    python -m bench.scale --nodes 5 10 20 50 100 --adapter-params 500000 --colluding 0.5 0.1
    python -m bench.scale --nodes 5 --adapter-params 500000 2000000 10000000 40000000
    python -m bench.scale --train --nodes 5 20 100 --colluding 0.1
    python -m bench.scale --parallel
    python -m bench.scale --deployment --nodes 3 --adapter-params 40000000
    python -m bench.scale --report

Kinds of rows (each configuration runs in a process of its own, so peak memory is its own):

* synthetic (default): Flower's simulation engine, fedchat's coordinator (strategy, round loop,
  FedchatSecAgg) and node guard around random updates of --adapter-params parameters
  (bench/scale_app.py): the protocol's cost without training. For every (nodes, adapter) a
  plaintext round, then one SecAgg+ round per --colluding value: 0.5 (any minority: keys shared
  between all pairs) and, below it, the sparse graph fedchat picks from secagg-sparse-from nodes
  (shared/secagg_graph.py), every node assuming the same fraction.
* train (--train): the real ServerApp and ClientApp, every node training the tiny model
  (local-steps 2, batch 4, no DP: DP's accountant would add the same seconds to both sides and
  flatter the ratio) on its share of the demo corpus.
* parallel (--parallel): a 3-node round of the embedded model with DP (2 local steps of 8, micro-batches
  of 512 tokens so three copies fit in memory),
  nodes one after another (today's default) against all three at once (sim-cpus-per-node 2/3,
  one torch thread each), back to back.
* deployment (--deployment): Flower's deployment engine as deploy/local-federation.sh runs it
  (TLS, authenticated SuperNodes, approved app bundle, ClientApps in processes of their own),
  SecAgg+ over synthetic updates; peak RSS per process role.

Every run has --rounds rounds (default 2) and a row reports the last one (the first also loads
models and starts processes). Peak RSS is the kernel's high-water mark (VmHWM) of each process,
polled while the run lasts: coordinator = the simulation's driver (ServerApp, in-process
SuperLink) or, in deployment, each of SuperLink and ServerApp; node = the largest Ray worker or
ClientApp process. Bytes are the serialized message contents the coordinator meters per node
(all four SecAgg+ stages). Results: bench/results/scale.json (rows merged by configuration),
scale.md (the README's tables), scale_nodes.png and scale_adapter.png (with fitted growth).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, machine, md_table

RESULT_TAG = "SCALE-RESULT "
TINY_TRAIN = {"base-model": "tiny", "local-steps": 2, "batch-size": 4, "dp": False, "merge": False, "eval-data": ""}
DEMO_ROUND = {"base-model": "smollm2-135m", "local-steps": 2, "micro-batch-tokens": 512, "dp": True, "merge": False,
              "eval-data": ""}


# ------------------------------------------------------------------ one configuration (child process)


def _run_config(spec: dict, out: Path):
    from shared.config import RunConfig

    values = {"num-rounds": spec["rounds"], "min-nodes": spec["nodes"], "secagg": spec["secagg"],
              "out-dir": str(out / "run"), "dp": False, "merge": False, "eval-data": "",
              "secagg-colluding-fraction": spec.get("colluding", 0.5), **spec.get("run", {})}
    return RunConfig.from_flower(values)


def _node_settings(spec: dict) -> dict:
    return {"secagg-colluding-fraction": spec.get("colluding", 0.5), "require-secagg": spec["secagg"],
            "require-dp": bool(spec.get("run", {}).get("dp", False)), "target-epsilon": 1000.0}


def run_synthetic(spec: dict, out: Path) -> dict:
    from bench.scale_app import ADAPTER_KEY, make_client_app, make_server_app
    from fedchat.simulation import run_apps

    cfg = _run_config(spec, out)
    server = make_server_app({**cfg.to_flower(), ADAPTER_KEY: spec["adapter_params"]})
    return run_apps(cfg, server, make_client_app(_node_settings(spec)), spec["nodes"])


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
    from fedchat.simulation import simulate

    cfg = _run_config(spec, out)
    paths = split_corpus(out / "data", spec["nodes"])
    nodes = {i: {"data-path": str(p), "state-dir": str(out / "nodes" / p.stem), "node-name": p.stem,
                 **_node_settings(spec)} for i, p in enumerate(paths)}
    return simulate(cfg, nodes)


def run_deployment(spec: dict, out: Path) -> dict:
    """The local federation (fedchat.local_federation) with an app bundle whose components are the
    synthetic ones: built, approved by every node, submitted with `flwr run`."""
    from fedchat.local_federation import LocalFederation, Runner
    from fedchat.processes import become_subreaper

    app = _synthetic_bundle_folder(out / "app-src", spec["adapter_params"])
    fed = LocalFederation(nodes=spec["nodes"], rounds=spec["rounds"], base_model="tiny", out=out / "fed",
                          dp=False, secagg=spec["secagg"], app=app, timeout=3000.0, startup_timeout=300.0,
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
    for name in ("scale_app.py",):
        shutil.copyfile(root / "bench" / name, folder / "bench" / name)
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
    with tempfile.TemporaryDirectory(prefix="fedchat-scale-") as tmp:
        try:
            report = runner(spec, Path(tmp))
        except BaseException:
            if spec.get("keep_logs") and (Path(tmp) / "fed" / "logs").exists():  # the processes' logs, kept
                shutil.copytree(Path(tmp) / "fed" / "logs", spec["keep_logs"], dirs_exist_ok=True)
            raise
    last = report["rounds"][-1]
    clients = last["clients"]
    result = {"round_seconds": last["seconds"], "status": last["status"],
              "round_seconds_all": [r["seconds"] for r in report["rounds"]],
              "bytes_up_per_node": sum(c.get("bytes_up", 0) for c in clients) / max(len(clients), 1),
              "bytes_down_per_node": sum(c.get("bytes_down", 0) for c in clients) / max(len(clients), 1),
              "update_bytes_float32": report.get("adapter_update_bytes"), "nodes_in_round": len(clients)}
    if "secagg" in last:
        s = last["secagg"]
        result.update({"graph": s.get("graph"), "num_shares": s.get("num_shares"),
                       "threshold": s.get("reconstruction_threshold"), "assumption": s.get("assumption"),
                       "stage_seconds": s.get("stage_seconds")})
    if "deployment" in report:
        result["deployment"] = {k: report["deployment"][k] for k in ("engine", "flower", "tls", "supernode_auth",
                                                                       "app_sha256", "seconds")}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------ the parent: run, watch memory, merge


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
                         ("node_runtime", "clientapp"), ("flower-supernode", "supernode"),
                         ("flower-superexec", "superexec"), ("coordinator start", "superlink"),
                         ("node start", "supernode")):
        if needle in cmdline:
            return role
    return "other"


def measure(spec: dict, log: Path) -> dict:
    """Run `spec` in a child process; its result, with the peak RSS of each process role it started."""
    import psutil

    argv = [sys.executable, "-m", "bench.scale", "--one", json.dumps({**spec, "keep_logs": str(log) + ".d"})]
    peaks: dict[str, float] = {}
    started = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
        root = psutil.Process(child.pid)
        while child.poll() is None:
            try:
                processes = [root] + root.children(recursive=True)
            except psutil.Error:
                processes = []
            for p in processes:
                try:
                    role = "coordinator" if p.pid == child.pid else _role(" ".join(p.cmdline()), spec["kind"])
                except psutil.Error:
                    continue
                hwm = _vmhwm_mb(p.pid)
                if hwm is not None:
                    peaks[role] = max(peaks.get(role, 0.0), hwm)
            time.sleep(0.2)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith(RESULT_TAG)]
    if child.returncode != 0 or not lines:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{spec} failed (exit {child.returncode}); log {log}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["peak_rss_mb_by_role"] = {k: round(v, 1) for k, v in sorted(peaks.items())}
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def row_for(spec: dict, result: dict) -> dict:
    peaks = result.pop("peak_rss_mb_by_role")
    if spec["kind"] == "deployment":
        coordinator = max(peaks.get("superlink", 0.0), peaks.get("serverapp", 0.0))
        node = max(peaks.get("supernode", 0.0), peaks.get("clientapp", 0.0))
    else:
        coordinator, node = peaks.get("coordinator", 0.0), peaks.get("node", 0.0)
    row = {"kind": spec["kind"], "nodes": spec["nodes"], "adapter_params": spec["adapter_params"],
           "secagg": spec["secagg"], "colluding_fraction": spec.get("colluding", 0.5) if spec["secagg"] else None,
           "round_seconds": result.pop("round_seconds"), "peak_rss_mb": round(max(coordinator, node), 1),
           "peak_rss_mb_coordinator": round(coordinator, 1), "peak_rss_mb_node": round(node, 1),
           "peak_rss_mb_by_role": peaks, "bytes_up_per_node": round(result.pop("bytes_up_per_node")),
           "rounds": spec["rounds"],
           **{k: v for k, v in spec.items() if k in ("label", "at_once", "threads", "sparse_from")}, **result,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    return row


def _key(row: dict) -> tuple:
    return (row["kind"], row["nodes"], row["adapter_params"], row["secagg"], row.get("colluding_fraction"),
            row.get("label"))


def merge_rows(rows: list[dict]) -> list[dict]:
    path = RESULTS / "scale.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    fresh = {_key(r) for r in rows}
    merged = [r for r in old if _key(r) not in fresh] + rows
    return sorted(merged, key=lambda r: (r["kind"], r["adapter_params"], r["nodes"], r["secagg"],
                                         -(r.get("colluding_fraction") or 1), str(r.get("label"))))


# ------------------------------------------------------------------ fits, tables, plots


def power_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(a, b) of y = a * x**b by least squares in log-log; None with fewer than 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my - b * mx), b


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(a, b) of y = a + b * x by least squares; None with fewer than 2 distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _series(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        name = "plaintext" if not r["secagg"] else (
            "SecAgg+ all pairs" if (r.get("colluding_fraction") or 0.5) >= 0.5
            else f"SecAgg+ sparse from {r.get('sparse_from', 40)} (colluding {r['colluding_fraction']:g})")
        out.setdefault(name, []).append(r)
    return out


def fits(rows: list[dict]) -> dict:
    """Growth of round time with nodes (power law) and with adapter size (linear), per series."""
    out: dict = {"vs_nodes": {}, "vs_adapter": {}}
    for kind in ("synthetic", "train"):
        rs = [r for r in rows if r["kind"] == kind]
        for params in sorted({r["adapter_params"] for r in rs}):
            for name, series in _series([r for r in rs if r["adapter_params"] == params]).items():
                series = sorted(series, key=lambda r: r["nodes"])
                fit = power_fit([r["nodes"] for r in series], [r["round_seconds"] for r in series])
                if fit and len(series) >= 3:
                    out["vs_nodes"][f"{kind}, {params:,} params, {name}"] = {
                        "a": round(fit[0], 4), "exponent": round(fit[1], 3),
                        "nodes": [r["nodes"] for r in series], "seconds": [r["round_seconds"] for r in series]}
    rs = [r for r in rows if r["kind"] == "synthetic"]
    for nodes in sorted({r["nodes"] for r in rs}):
        for name, series in _series([r for r in rs if r["nodes"] == nodes]).items():
            series = sorted(series, key=lambda r: r["adapter_params"])
            if len(series) < 3:
                continue
            xs = [r["adapter_params"] / 1e6 for r in series]
            entry = {"params_millions": xs}
            for metric in ("round_seconds", "peak_rss_mb_coordinator", "peak_rss_mb_node", "bytes_up_per_node"):
                fit = linear_fit(xs, [r[metric] for r in series])
                if fit:
                    entry[metric] = {"intercept": round(fit[0], 3), "per_million": round(fit[1], 4)}
            out["vs_adapter"][f"{nodes} nodes, {name}"] = entry
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """SecAgg+ / plaintext round time and upload, measured side by side (same run of this script)."""
    out = []
    for r in rows:
        if not r["secagg"] or r["kind"] == "parallel":
            continue
        plain = [p for p in rows if not p["secagg"] and p["kind"] == r["kind"] and p["nodes"] == r["nodes"]
                 and p["adapter_params"] == r["adapter_params"] and p.get("label") == r.get("label")]
        if plain:
            p = plain[0]
            out.append({"kind": r["kind"], "nodes": r["nodes"], "adapter_params": r["adapter_params"],
                        "graph": r.get("graph"), "num_shares": r.get("num_shares"),
                        "colluding_fraction": r.get("colluding_fraction"),
                        "time_ratio": round(r["round_seconds"] / p["round_seconds"], 3),
                        "upload_ratio": round(r["bytes_up_per_node"] / p["bytes_up_per_node"], 3)})
    return out


def _graph(row: dict) -> str:
    """The SecAgg+ graph of a row, with the colluding fraction every party assumed when it was below 0.5."""
    colluding = row.get("colluding_fraction") or 0.5
    return f"{row.get('graph', '')}" + (f" (colluding {colluding:g})" if colluding < 0.5 else "")


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def tables(data: dict) -> str:
    rows = data["rows"]
    main = [r for r in rows if r["kind"] in ("synthetic", "train", "deployment")]
    header = ["kind", "nodes", "adapter params", "transport", "shares / threshold", "round s", "stages s (setup, "
              "share keys, collect, unmask)", "peak RSS MB coord / node", "MB up / node"]
    body = []
    for r in main:
        st = r.get("stage_seconds") or {}
        stages = ", ".join(f"{st[k]:.2f}" for k in ("setup", "share_keys", "collect_masked_vectors", "unmask")
                           if k in st)
        transport = "plaintext" if not r["secagg"] else f"SecAgg+ {_graph(r)}"
        shares = f"{r['num_shares']} / {r['threshold']}" if r["secagg"] and r.get("num_shares") else ""
        body.append([r["kind"], r["nodes"], f"{r['adapter_params']:,}", transport, shares, f"{r['round_seconds']:.1f}",
                     stages, f"{r['peak_rss_mb_coordinator']:.0f} / {r['peak_rss_mb_node']:.0f}",
                     _mb(r["bytes_up_per_node"])])
    out = md_table(header, body)
    ratio_rows = [[x["kind"], x["nodes"], f"{x['adapter_params']:,}", _graph(x), x["num_shares"],
                   f"{x['time_ratio']:.3f}", f"{x['upload_ratio']:.3f}"] for x in data.get("ratios", [])]
    if ratio_rows:
        out += "\n\n" + md_table(["kind", "nodes", "adapter params", "SecAgg+ graph", "shares",
                                  "SecAgg+ / plaintext round time", "SecAgg+ / plaintext upload"], ratio_rows)
    par = [r for r in rows if r["kind"] == "parallel"]
    if par:
        out += "\n\n" + md_table(
            ["3-node demo round", "nodes at once", "torch threads each", "round s", "peak RSS MB coord / node"],
            [[r.get("label"), r.get("at_once"), r.get("threads"), f"{r['round_seconds']:.1f}",
              f"{r['peak_rss_mb_coordinator']:.0f} / {r['peak_rss_mb_node']:.0f}"] for r in par])
        if data.get("parallel_speedup"):
            out += f"\n\nSpeed-up of the parallel round over the serial one: {data['parallel_speedup']:.3f}x."
    growth = data.get("fits", {}).get("vs_nodes", {})
    if growth:
        out += "\n\n" + md_table(["series", "nodes", "fit: round s = a * nodes^b"],
                                 [[k, ", ".join(map(str, v["nodes"])), f"a = {v['a']:.3g}, b = {v['exponent']:.2f}"]
                                  for k, v in growth.items()])
    return out


def plots(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["kind"] in ("synthetic", "train")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, kind in zip(axes, ("synthetic", "train")):
        rs = [r for r in rows if r["kind"] == kind]
        params = sorted({r["adapter_params"] for r in rs if len({x["nodes"] for x in rs
                                                                 if x["adapter_params"] == r["adapter_params"]}) >= 3})
        for p in params:
            for name, series in _series([r for r in rs if r["adapter_params"] == p]).items():
                series = sorted(series, key=lambda r: r["nodes"])
                xs, ys = [r["nodes"] for r in series], [r["round_seconds"] for r in series]
                line = ax.plot(xs, ys, "o", label=None)[0]
                fit = power_fit(xs, ys)
                if fit and len(xs) >= 3:
                    grid = [min(xs) * (max(xs) / min(xs)) ** (i / 50) for i in range(51)]
                    ax.plot(grid, [fit[0] * x ** fit[1] for x in grid], "-", color=line.get_color(),
                            label=f"{name}: {fit[0]:.3g}·n^{fit[1]:.2f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes in the round")
        ax.set_ylabel("round seconds")
        titles = {"synthetic": "synthetic updates (protocol only)", "train": "tiny model, every node training"}
        ax.set_title(titles[kind]
                     + (f", {params[0]:,} params" if len(params) == 1 else ""))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_nodes.png", dpi=110)
    plt.close(fig)

    rs = [r for r in data["rows"] if r["kind"] == "synthetic"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for nodes in sorted({r["nodes"] for r in rs}):
        for name, series in _series([r for r in rs if r["nodes"] == nodes]).items():
            series = sorted(series, key=lambda r: r["adapter_params"])
            if len(series) < 3:
                continue
            xs = [r["adapter_params"] / 1e6 for r in series]
            for ax, metric, label in ((axes[0], "round_seconds", "round seconds"),
                                      (axes[1], "peak_rss_mb_coordinator", "coordinator peak RSS (MB)"),
                                      (axes[2], "peak_rss_mb_node", "node peak RSS (MB)")):
                ys = [r[metric] for r in series]
                line = ax.plot(xs, ys, "o")[0]
                fit = linear_fit(xs, ys)
                if fit:
                    ax.plot([0, max(xs)], [fit[0], fit[0] + fit[1] * max(xs)], "-", color=line.get_color(),
                            label=f"{nodes} nodes, {name}: {fit[0]:.3g} + {fit[1]:.3g}/M params")
                ax.set_xlabel("adapter parameters (millions)")
                ax.set_ylabel(label)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "scale_adapter.png", dpi=110)
    plt.close(fig)


def write(rows: list[dict], extra: dict | None = None) -> None:
    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(extra or {})
    data["rows"] = rows
    data["ratios"] = ratios(rows)
    data["fits"] = fits(rows)
    data["machine"] = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    (RESULTS / "scale.md").write_text(tables(data).rstrip() + "\n")
    plots(data)
    print(tables(data))
    print(f"wrote {path}, scale.md, scale_nodes.png, scale_adapter.png")


# ------------------------------------------------------------------ command line


def specs(args) -> list[dict]:
    base = {"rounds": args.rounds}
    if args.parallel:
        cores = os.cpu_count() or 1
        run = {**DEMO_ROUND}
        return [{**base, "kind": "parallel", "nodes": 3, "adapter_params": 0, "secagg": True, "label": "serial",
                 "at_once": 1, "threads": cores, "run": run},
                {**base, "kind": "parallel", "nodes": 3, "adapter_params": 0, "secagg": True, "label": "parallel",
                 "at_once": 3, "threads": 1,
                 "run": {**run, "sim-cpus-per-node": cores / 3, "sim-threads-per-node": 1}}]
    out = []
    kind = "deployment" if args.deployment else "train" if args.train else "synthetic"
    for params in (args.adapter_params if kind != "train" else [0]):
        for nodes in args.nodes:
            run = {**(TINY_TRAIN if kind == "train" else {}), "secagg-sparse-from": args.sparse_from}
            common = {**base, "kind": kind, "nodes": nodes, "adapter_params": params, "run": run}
            if not args.secagg_only:
                out.append({**common, "secagg": False})
            for colluding in args.colluding:
                out.append({**common, "secagg": True, "colluding": colluding, "sparse_from": args.sparse_from})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[5])
    parser.add_argument("--adapter-params", type=int, nargs="+", default=[500_000])
    parser.add_argument("--colluding", type=float, nargs="*", default=[0.5],
                        help="secagg-colluding-fraction of the coordinator and every node: one SecAgg+ row each "
                             "(0.5: keys shared between all pairs; none: plaintext only)")
    parser.add_argument("--sparse-from", type=int, default=40, help="secagg-sparse-from")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--secagg-only", action="store_true", help="no plaintext row")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="nodes train the tiny model (real ClientApp)")
    mode.add_argument("--parallel", action="store_true", help="3-node demo round: serial against parallel")
    mode.add_argument("--deployment", action="store_true", help="Flower's deployment engine (TLS, auth)")
    mode.add_argument("--report", action="store_true", help="rebuild tables and plots from scale.json")
    mode.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one(json.loads(args.one))
    if args.report:
        path = RESULTS / "scale.json"
        return write(json.loads(path.read_text())["rows"])
    if args.train:
        args.adapter_params = [0]
    logs = Path(tempfile.mkdtemp(prefix="fedchat-scale-logs-"))
    rows = []
    for i, spec in enumerate(specs(args)):
        size = "the tiny model's adapter" if spec["kind"] == "train" else f"{spec['adapter_params']:,} params"
        what = (f"{spec['kind']} {spec['nodes']} nodes, {size}, "
                + ("plaintext" if not spec["secagg"] else f"SecAgg+ colluding {spec.get('colluding', 0.5):g}")
                + (f" ({spec['label']})" if spec.get("label") else ""))
        print(f"== {what}", flush=True)
        result = measure(spec, logs / f"{i:02d}.log")
        row = row_for(spec, result)
        if spec["kind"] == "train":
            row["adapter_params"] = result.get("update_bytes_float32", 0) // 4
        print(f"   {row['round_seconds']:.1f} s, peak RSS {row['peak_rss_mb_coordinator']:.0f} / "
              f"{row['peak_rss_mb_node']:.0f} MB, {row['bytes_up_per_node'] / 1e6:.3f} MB up per node "
              f"(wall {result['wall_seconds']:.0f} s)", flush=True)
        rows.append(row)
    extra = {}
    if args.parallel:
        serial, parallel = rows
        extra["parallel_speedup"] = round(serial["round_seconds"] / parallel["round_seconds"], 3)
    write(merge_rows(rows), extra)


if __name__ == "__main__":
    main()
