"""A federation of synthetic updates, for bench/scale.py: fedchat's coordinator and node code around
updates of any size, where training is not what is measured.

* ServerApp: the coordinator's strategy (server.strategy: the can-train query, sampling, range
  checks, weighted mean) and round loop (server.app.FitRounds: SecAgg+ through FedchatSecAgg, or
  Flower's default fit workflow; rounds timed, bytes metered), without a base model: the global
  adapter is `scale-adapter-params` zeros shaped like LoRA r=16 tensors of a Llama-3-8B layer. It
  writes OUT_DIR/report.json like server.app (rows of server.app._round_row), plus its own peak RSS.
* ClientApp: the node's mod stack (client.secagg_guard around Flower's secaggplus_mod, uint32
  packing included) around a NumPyClient whose "training" draws a random update within the run's
  update bound, seeded by node and round: float64 under SecAgg+ and float32 in plaintext, as
  client/app.py hands them to Flower.

Both read the run config (RunConfig keys plus `scale-adapter-params`); nodes read their node config
(NodeConfig keys; a simulation's partition id names the node).
"""

from __future__ import annotations

import json
import resource
import uuid
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.secagg_guard import SECAGG_FLAG, secagg_guard
from shared.config import NodeConfig, RunConfig
from shared.protocol import CAN_TRAIN, META_ROUND, split_fit_config

ADAPTER_KEY = "scale-adapter-params"
CONVERSATIONS = 100  # every node's weight
# LoRA r=16 on the seven linear layers of one Llama-3-8B block (q, k, v, o, gate, up, down), A then B:
# 1,310,720 parameters a block, 41.9M for all 32 blocks.
BLOCK = [(16, 4096), (4096, 16), (16, 4096), (1024, 16), (16, 4096), (1024, 16), (16, 4096), (4096, 16),
         (16, 4096), (14336, 16), (16, 4096), (14336, 16), (16, 14336), (4096, 16)]


def adapter_shapes(params: int) -> list[tuple[int, ...]]:
    """Tensor shapes of a `params`-parameter adapter: whole LoRA tensors, the last one cut to fit."""
    shapes, total = [], 0
    while total < params:
        for shape in BLOCK:
            size = shape[0] * shape[1]
            if total + size >= params:
                shapes.append(shape if total + size == params else (params - total,))
                return shapes
            shapes.append(shape)
            total += size
    return shapes


def synthetic_update(shapes: list[tuple[int, ...]], bound: float, node: str, rnd: int, dtype) -> list[np.ndarray]:
    """What node `node` sends in round `rnd`: uniform in +-bound/2, reproducible from its name and the round."""
    rng = np.random.default_rng(list(f"{node}:{rnd}".encode()))
    return [rng.uniform(-bound / 2, bound / 2, size=s).astype(dtype) for s in shapes]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------ coordinator


def run_synthetic(grid: Grid, context: Context, cfg: RunConfig, params: int) -> dict:
    from server.app import FitRounds
    from server.strategy import FedChatStrategy
    from server.traffic import TrafficMeter

    shapes = adapter_shapes(params)
    meter = TrafficMeter(grid)
    strategy = FedChatStrategy(cfg, uuid.uuid4().hex[:12], [np.zeros(s, np.float32) for s in shapes], "", meter)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"status": "running", "secagg": cfg.secagg, "adapter_params": params, "tensors": len(shapes),
              "adapter_update_bytes": 4 * params, "num_rounds": cfg.num_rounds, "completed_rounds": 0,
              "failed_rounds": [], "rounds": []}
    with FitRounds(context, cfg, strategy, meter) as rounds:
        for rnd in range(1, cfg.num_rounds + 1):
            row = rounds.run(rnd)
            row["coordinator_peak_rss_mb"] = round(_peak_rss_mb(), 1)
            report["rounds"].append(row)
            report["completed_rounds"] = rnd
            if row["status"] != "ok":
                report["failed_rounds"].append(rnd)
            (out / "report.json").write_text(json.dumps(report, indent=2))
    np.savez(out / "adapter.npz", *strategy.current)  # the global adapter after the last round
    report["status"] = "finished"
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def make_server_app(overrides: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from shared.logs import setup_logging

        setup_logging(quiet_flower=True)
        values = {**context.run_config, **(overrides or {})}
        params = int(values.pop(ADAPTER_KEY))
        run_synthetic(grid, context, RunConfig.from_flower(values), params)

    return app


# ------------------------------------------------------------------ node


class SyntheticNode(NumPyClient):
    def __init__(self, node: NodeConfig, secagg_active: bool) -> None:
        self.node, self.secagg_active = node, secagg_active

    def get_properties(self, config):
        return {CAN_TRAIN: True}

    def fit(self, parameters, config):
        cfg, meta = split_fit_config(config)
        dtype = np.float64 if self.secagg_active else np.float32
        update = synthetic_update([p.shape for p in parameters], cfg.update_bound, self.node.node_name,
                                  int(meta[META_ROUND]), dtype)
        return update, CONVERSATIONS, {"node": self.node.node_name, "status": "ok"}


def make_client_app(node_settings: dict | None = None) -> ClientApp:
    """`node_settings` (NodeConfig keys) apply to every node, under its own node config."""

    def node_config(context: Context) -> NodeConfig:
        given = dict(context.node_config)
        partition = given.pop("partition-id", None)
        given.pop("num-partitions", None)
        node = NodeConfig.from_flower({**(node_settings or {}), **given})
        return node if node.node_name else node.replace(node_name=f"node-{partition}")

    def client_fn(context: Context):
        secagg_active = bool(context.state.config_records.get(SECAGG_FLAG, {}).get("active", False))
        return SyntheticNode(node_config(context), secagg_active).to_client()

    return ClientApp(client_fn=client_fn, mods=[secagg_guard(node_config)])


server_app = make_server_app()
client_app = make_client_app()
