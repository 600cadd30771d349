"""The apps of bench/scale.py: fedchat's coordinator and node code around synthetic updates, and Flower's
stock SecAgg+ beside fedchat's secure sum, so every protocol runs the same round in the same engine.

Protocols (a row's ``protocol``):

* ``plaintext``: Flower's default fit workflow; nodes send float32 updates.
* ``flower-secagg+``: Flower 1.41's stock ``SecAggPlusWorkflow`` and ``secaggplus_mod`` (kept here, in
  bench/, only: no product module imports them), every node sharing keys with every other (the only
  Flower graph that holds against any minority, as fedchat's does), threshold a strict majority,
  clipping range and quantisation levels as fedchat derives them. Its masked vectors travel as Flower
  sends them (int64).
* ``fedchat``: fedchat's secure sum (client.secagg_mod.secure_aggregation, server.secagg_workflow.SecureAggregation)
  with identity keys and one approved roster (fedchat.federation.simulation.provision_roster).

The synthetic ServerApp runs the coordinator's strategy (server.strategy) and round loop
(server.server_app.FitRounds: rounds timed, bytes metered) without a base model: the global adapter is
`scale-adapter-params` zeros shaped like LoRA r=16 tensors of a Llama-3-8B layer. Its nodes'
"training" draws a random update within the run's update bound, seeded by node and round (float64
under a secure sum, float32 in plaintext, as client/client_app.py hands them to Flower).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
import uuid
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from client.secagg_mod import SECAGG_FLAG, secure_aggregation
from shared.config import NodeConfig, RunConfig
from shared.protocol import CAN_TRAIN, META_ROUND, split_fit_config

log = logging.getLogger("fedchat.bench")
ADAPTER_KEY = "scale-adapter-params"
PROTOCOLS = ("plaintext", "flower-secagg+", "fedchat")
STOCK = "flower-secagg+"
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


# ------------------------------------------------------------------ Flower's stock SecAgg+ (bench only)


class StockSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ as shipped, all pairs, each stage timed into `last_parameters` as fedchat's is."""

    def __init__(self, cfg: RunConfig, nodes: int) -> None:
        super().__init__(num_shares=nodes, reconstruction_threshold=nodes // 2 + 1,
                         max_weight=float(cfg.secagg_max_weight), clipping_range=cfg.update_bound,
                         quantization_range=2 ** (31 - math.ceil(math.log2(max(nodes, 2)))), timeout=cfg.secagg_timeout)
        self.last_parameters: dict = {}

    def __call__(self, grid, context) -> None:
        self.last_parameters = {"protocol": STOCK, "num_shares": self.num_shares,
                                "threshold": self.reconstruction_threshold, "stage_seconds": {},
                                "active_after_stage": {}}
        super().__call__(grid, context)

    def _timed(self, name: str, stage, grid, context, state) -> bool:
        started = time.perf_counter()
        ok = stage(grid, context, state)
        self.last_parameters["stage_seconds"][name] = round(time.perf_counter() - started, 3)
        self.last_parameters["active_after_stage"][name] = len(state.active_node_ids)
        log.info("%s stage '%s' done in %.1f s", STOCK, name, self.last_parameters["stage_seconds"][name])
        if not ok:
            self.last_parameters["halted_at"] = name
        return ok

    def setup_stage(self, grid, context, state):
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid, context, state):
        return self._timed("share-keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid, context, state):
        return self._timed("collect", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid, context, state):
        return self._timed("unmask", super().unmask_stage, grid, context, state)


def use_stock_secagg(nodes: int) -> None:
    """The coordinator's round loop (server.server_app.FitRounds) runs Flower's stock SecAgg+ in place of fedchat's
    secure sum, in this process (a bench child process of its own)."""
    import server.server_app

    server.server_app.SecureAggregation = lambda cfg, roster, shapes: StockSecAggPlus(cfg, nodes)


def stock_flag_mod(msg, context: Context, call_next):
    """Tells the node's client (client/client_app.py, or SyntheticNode) that Flower's stock mod masks this update."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        context.state.config_records[SECAGG_FLAG] = ConfigRecord({"active": True})
    return call_next(msg, context)


def node_mods(protocol: str, node_config) -> list:
    """The mod stack of a node under `protocol` (`node_config`: (Context, RunConfig | None) -> NodeConfig)."""
    return [stock_flag_mod, secaggplus_mod] if protocol == STOCK else [secure_aggregation(node_config)]


def train_client_app(protocol: str, sim_nodes: dict[int, dict]) -> ClientApp:
    """fedchat's real ClientApp (client/client_app.py: data, training, ledger) under `protocol`'s mods."""
    from client.client_app import FedchatClient, make_client_app, resolve_node_config
    from shared.logs import setup_logging

    if protocol != STOCK:
        return make_client_app(sim_nodes)

    def client_fn(context: Context):
        setup_logging(quiet_flower=True)
        given = context.node_config.get("partition-id")
        partition = None if given is None else int(given)
        node = resolve_node_config(context, sim_nodes, partition)
        active = bool(context.state.config_records.get(SECAGG_FLAG, {}).get("active", False))
        return FedchatClient(node, active, partition).to_client()

    return ClientApp(client_fn=client_fn, mods=node_mods(protocol, None))


# ------------------------------------------------------------------ coordinator


def run_synthetic(grid: Grid, context: Context, cfg: RunConfig, params: int) -> dict:
    from server.server_app import FitRounds
    from server.strategy import FedchatStrategy
    from server.traffic import TrafficMeter

    shapes = adapter_shapes(params)
    meter = TrafficMeter(grid)
    strategy = FedchatStrategy(cfg, uuid.uuid4().hex[:12], [np.zeros(s, np.float32) for s in shapes], "", meter)
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


def make_client_app(protocol: str = "fedchat", sim_nodes: dict[int, dict] | None = None) -> ClientApp:
    """Synthetic nodes under `protocol`; `sim_nodes` (partition -> NodeConfig keys) gives each its settings
    (identity key, approved roster), under the node config Flower gives it."""

    def node_config(context: Context, run: RunConfig | None = None) -> NodeConfig:
        given = dict(context.node_config)
        partition = given.pop("partition-id", None)
        given.pop("num-partitions", None)
        mine = (sim_nodes or {}).get(int(partition), {}) if partition is not None else {}
        node = NodeConfig.from_flower({**mine, **given})
        return node if node.node_name else node.replace(node_name=f"node-{partition}")

    def client_fn(context: Context):
        secagg_active = bool(context.state.config_records.get(SECAGG_FLAG, {}).get("active", False))
        return SyntheticNode(node_config(context), secagg_active).to_client()

    return ClientApp(client_fn=client_fn, mods=node_mods(protocol, node_config))


server_app = make_server_app()
client_app = make_client_app()
