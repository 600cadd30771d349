"""The coordinator's round logic as a Flower (legacy) Strategy.

One code path for a round, with or without secure aggregation: Flower's default fit
workflow hands ``aggregate_fit`` each node's update; the SecAgg+ workflow hands it the
unmasked weighted average in place of every update (it never has one node's). Either
way the weighted average of what arrives is the round's update, because the average
of identical vectors is that vector.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server.aggregate import apply_update, update_problem, weighted_average
from shared.config import RunConfig
from shared.errors import FederationError
from shared.protocol import fit_config

log = logging.getLogger("fedchat.coordinator")


@dataclass
class RoundOutcome:
    round: int
    applied: bool = False
    clients: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    dropped: int = 0  # sampled nodes whose update never arrived
    train_loss: float | None = None


def _failure_text(failure) -> str:
    """The node's own error message, without Flower's wrapping."""
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else failure
        text = str(getattr(error, "reason", error)).strip()
        if "Message: " in text:
            text = text.split("Message: ", 1)[1].removesuffix("'>")
        return text[:500]
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"


class FedChatStrategy(Strategy):
    def __init__(self, cfg: RunConfig, run_id: str, initial: list[np.ndarray], frozen_a: str) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.current = initial
        self.shapes = [tuple(a.shape) for a in initial]
        self.frozen_a = frozen_a
        self.exhausted: set[int] = set()  # node ids whose budget is spent
        self.outcome: RoundOutcome | None = None
        self._sample: tuple[int, list[ClientProxy]] | None = None

    # ------------------------------------------------------------ sampling
    def wait_for_nodes(self, client_manager: ClientManager) -> None:
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        while client_manager.num_available() < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {client_manager.num_available()} of the {self.cfg.min_nodes} nodes required (min-nodes) "
                    f"connected within {self.cfg.node_wait_timeout:.0f}s: start more SuperNodes, or lower min-nodes.")
            time.sleep(1)

    def sample(self, rnd: int, client_manager: ClientManager) -> list[ClientProxy]:
        """This round's nodes (seeded, stable within the round), never an exhausted one."""
        if (sampled := self._sampled(rnd)) is not None:
            return sampled
        self.wait_for_nodes(client_manager)
        available = sorted((c for c in client_manager.all().values() if c.node_id not in self.exhausted),
                           key=lambda c: c.node_id)
        k = min(self.cfg.nodes_per_round or len(available), len(available))
        chosen = random.Random(f"{self.cfg.seed}:{rnd}").sample(available, k)
        self._sample = (rnd, chosen)
        return chosen

    def _sampled(self, rnd: int) -> list[ClientProxy] | None:
        return self._sample[1] if self._sample and self._sample[0] == rnd else None

    # ------------------------------------------------------------ Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.current)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        self.outcome = RoundOutcome(server_round)
        nodes = self.sample(server_round, client_manager)
        if self.cfg.secagg and len(nodes) < 2:
            log.error("round %d: %d node(s) with budget left; secure aggregation needs at least 2", server_round,
                      len(nodes))
            return []
        ins = FitIns(parameters, fit_config(self.cfg, server_round, self.run_id, self.frozen_a))
        return [(node, ins) for node in nodes]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        outcome = self.outcome or RoundOutcome(server_round)
        updates, weights, losses = [], [], []
        for proxy, res in results:
            m = dict(res.metrics)
            client = {"node": m.get("node", str(proxy.node_id)), "node_id": proxy.node_id,
                      "num_examples": res.num_examples, "status": m.get("status", "ok"),
                      "train_loss": m.get("train-loss"), "epsilon": m.get("epsilon"),
                      "target_epsilon": m.get("target-epsilon"), "ledger_head": m.get("ledger-head"),
                      "ledger_entries": m.get("ledger-entries"), "clipped_values": m.get("clipped-values"),
                      "train_seconds": m.get("seconds"), "fit_seconds": m.get("fit-seconds")}
            if client["status"] == "budget-exhausted":
                self.exhausted.add(proxy.node_id)
                log.warning("round %d: node %s has exhausted its privacy budget (epsilon %.3f of %.3f); it is left "
                            "out from now on", server_round, client["node"], client["epsilon"] or 0,
                            client["target_epsilon"] or 0)
            elif res.num_examples > 0:
                update = parameters_to_ndarrays(res.parameters)
                problem = update_problem(update, self.shapes, self.cfg.update_bound)
                if problem:
                    client["status"] = f"rejected: {problem}"
                    log.error("round %d: update from node %s rejected: %s", server_round, client["node"], problem)
                else:
                    updates.append(update)
                    weights.append(res.num_examples)
                    if client["train_loss"] is not None:
                        losses.append((res.num_examples, client["train_loss"]))
            outcome.clients.append({k: v for k, v in client.items() if v is not None})
        replied = {proxy.node_id for proxy, _ in results}
        outcome.dropped = sum(p.node_id not in replied for p in self._sampled(server_round) or [])
        for text in dict.fromkeys(_failure_text(f) for f in failures):  # SecAgg+ lists some errors twice
            outcome.failures.append(text)
            log.error("round %d: a node failed: %s", server_round, text)
        self.outcome = outcome
        if not updates:
            log.error("round %d: no usable update; the global adapter is unchanged", server_round)
            return None, {}
        self.current = apply_update(self.current, weighted_average(updates, weights))
        outcome.applied = True
        outcome.train_loss = sum(w * l for w, l in losses) / sum(w for w, _ in losses) if losses else None
        return ndarrays_to_parameters(self.current), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # held-out evaluation runs on the coordinator

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None  # the coordinator loop evaluates after each round
