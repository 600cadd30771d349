"""The coordinator's round logic as a Flower (legacy) Strategy.

One code path for a round, with or without secure aggregation: Flower's default fit
workflow hands ``aggregate_fit`` each node's update; the secure sum (server/secagg_workflow.py) hands it the
unmasked weighted average in place of every update (it never has one node's). Either
way the weighted average of what arrives is the round's update, because the average
of identical vectors is that vector.

Before a round, every candidate node is asked whether it can train it (its own budget
guard answers one bit); only nodes that can are sampled, so a node with no budget left
never joins key sharing and never adds a zero to a secure sum. A secure-sum round needs at
least three such nodes; with fewer it is not run, and its row says why.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Message
from flwr.common import (
    FitIns,
    FitRes,
    GetPropertiesIns,
    MessageTypeLegacy,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server.aggregate import apply_update, update_problem, weighted_average
from server.ledger_heads import LedgerHeads
from shared.config import SECAGG_MIN_NODES, RunConfig
from shared.errors import FederationError
from shared.protocol import CAN_TRAIN, fit_config

log = logging.getLogger("fedchat.coordinator")
UNAVAILABLE_RETRY_SECONDS = 5.0
NOT_AGGREGATED = "not aggregated: its masked update arrived, then the round halted"


@dataclass
class RoundOutcome:
    round: int
    applied: bool = False
    clients: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    dropped: int = 0  # sampled nodes whose update never arrived
    train_loss: float | None = None
    left_out: list[dict] = field(default_factory=list)  # candidates not sampled: node_id and why
    error: str | None = None  # why the round was not run


def _unavailable(reply: Message) -> bool:
    """The SuperLink's answer for a node it has had no heartbeat from (Flower's node availability check)."""
    return reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE


def _can_train(reply: Message) -> bool:
    return not reply.has_error() and \
        compat.recorddict_to_getpropertiesres(reply.content).properties.get(CAN_TRAIN) is True


def _failure_text(failure) -> str:
    """The node's own error message, without Flower's wrapping."""
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else failure
        text = str(getattr(error, "reason", error)).strip()
        if "Message: " in text:
            text = text.split("Message: ", 1)[1].removesuffix("'>")
        elif wrapped := re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", text, re.DOTALL):  # a ClientApp's exception
            text = wrapped.group(1)
        return text[:500]
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"


class FedchatStrategy(Strategy):
    def __init__(self, cfg: RunConfig, run_id: str, initial: list[np.ndarray], frozen_a: str, grid) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.current = initial
        self.shapes = [tuple(a.shape) for a in initial]
        self.frozen_a = frozen_a
        self.grid = grid  # to ask nodes, before a round, whether they can train it
        self.exhausted: set[int] = set()  # node ids that said they cannot train (budget spent)
        self.ledger_heads: dict[int, tuple] = {}  # node id -> (entries, head[, key fingerprint]) it last reported
        self.heads_across_runs = LedgerHeads.of(cfg.ledger_heads)  # per ledger key, kept across runs
        self.outcome: RoundOutcome | None = None
        self._sample: tuple[int, list[ClientProxy], list[dict]] | None = None

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
        """This round's nodes (seeded, stable within the round): only nodes that said they can train it."""
        if (sampled := self._sampled(rnd)) is not None:
            return sampled
        self.wait_for_nodes(client_manager)
        candidates = sorted((c for c in client_manager.all().values() if c.node_id not in self.exhausted),
                            key=lambda c: c.node_id)
        able, left_out = self._able_to_train(rnd, candidates)
        k = min(self.cfg.nodes_per_round or len(able), len(able))
        chosen = random.Random(f"{self.cfg.seed}:{rnd}").sample(able, k)
        self._sample = (rnd, chosen, left_out)
        return chosen

    def _sampled(self, rnd: int) -> list[ClientProxy] | None:
        return self._sample[1] if self._sample and self._sample[0] == rnd else None

    def _able_to_train(self, rnd: int, candidates: list[ClientProxy]) -> tuple[list[ClientProxy], list[dict]]:
        """Ask every candidate at once whether it can train round `rnd` (its budget guard answers
        one bit, before any key is shared); a node that cannot is never asked again in this run.

        A node the SuperLink answers for as unavailable (no heartbeat within two intervals: it lost
        its link, or it was restarted and its old connection has not timed out yet) is asked again
        every UNAVAILABLE_RETRY_SECONDS while fewer than min-nodes can train, until node-wait-timeout:
        a node back within that time takes part instead of failing the round."""
        if not candidates:
            return [], []
        deadline = time.monotonic() + self.cfg.node_wait_timeout
        ins = GetPropertiesIns(fit_config(self.cfg, rnd, self.run_id, self.frozen_a))
        replies: dict[int, Message] = {}
        pending = [c.node_id for c in candidates]
        while True:
            queries = [Message(content=compat.getpropertiesins_to_recorddict(ins), dst_node_id=node_id,
                               message_type=MessageTypeLegacy.GET_PROPERTIES, group_id=str(rnd)) for node_id in pending]
            answered = self.grid.send_and_receive(queries, timeout=max(1.0, deadline - time.monotonic()))
            # By the query each answers: the SuperLink's own error replies (a node unavailable) come from it.
            asked = {q.metadata.message_id: q.metadata.dst_node_id for q in queries}
            replies.update({asked.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m for m in answered})
            pending = [n for n in pending if n not in replies or _unavailable(replies[n])]
            able = sum(_can_train(r) for r in replies.values())
            if not pending or able >= self.cfg.min_nodes or time.monotonic() + UNAVAILABLE_RETRY_SECONDS > deadline:
                break
            log.warning("round %d: %d node(s) unavailable, %d can train: asking them again in %.0fs (until "
                        "node-wait-timeout)", rnd, len(pending), able, UNAVAILABLE_RETRY_SECONDS)
            time.sleep(UNAVAILABLE_RETRY_SECONDS)
        able, left_out = [], []
        for node in candidates:
            reply = replies.get(node.node_id)
            if reply is None:
                why = f"no answer within {self.cfg.node_wait_timeout:.0f}s (node-wait-timeout)"
            elif reply.has_error():
                why = _failure_text(Exception(reply.error.reason))
            elif _can_train(reply):
                able.append(node)
                continue
            else:
                self.exhausted.add(node.node_id)
                why = "cannot train: its privacy budget is spent; it is left out from now on"
            log.warning("round %d: node %s is left out of this round: %s", rnd, node.node_id, why)
            left_out.append({"node_id": node.node_id, "reason": why})
        return able, left_out

    # ------------------------------------------------------------ Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.current)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        self.outcome = RoundOutcome(server_round)
        nodes = self.sample(server_round, client_manager)
        self.outcome.left_out = list(self._sample[2])
        needed = SECAGG_MIN_NODES if self.cfg.secagg else 1
        if len(nodes) < needed:
            self.outcome.error = (f"{len(nodes)} node(s) can train this round" +
                                  (f"; secure aggregation needs at least {SECAGG_MIN_NODES} (a sum of fewer updates "
                                   "reveals them), so the round was not run" if self.cfg.secagg else "") +
                                  f" ({len(self.outcome.left_out)} left out); the global adapter is unchanged")
            log.error("round %d: %s", server_round, self.outcome.error)
            return []
        # Each node gets the head of its own ledger as last recorded here, to check against its ledger.
        return [(node, FitIns(parameters, fit_config(self.cfg, server_round, self.run_id, self.frozen_a,
                                                     self.ledger_heads.get(node.node_id)
                                                     or self.heads_across_runs.for_node(node.node_id))))
                for node in nodes]

    def _client(self, proxy: ClientProxy, res: FitRes) -> dict:
        """A node's row of the report from its reply; the ledger head it reports is recorded."""
        m = dict(res.metrics)
        if "ledger-entries" in m and "ledger-head" in m:
            self.ledger_heads[proxy.node_id] = (int(m["ledger-entries"]), str(m["ledger-head"]), m.get("ledger-key"))
            self.heads_across_runs.record(m.get("ledger-key"), proxy.node_id, int(m["ledger-entries"]),
                                          str(m["ledger-head"]))
        client = {"node": m.get("node", str(proxy.node_id)), "node_id": proxy.node_id,
                  "ledger_key": m.get("ledger-key"),
                  # under the secure sum a node's count travels masked: only the round's total is known
                  "num_examples": None if self.cfg.secagg else res.num_examples,
                  "status": m.get("status", "ok"), "epsilon": m.get("epsilon"),
                  "target_epsilon": m.get("target-epsilon"), "ledger_head": m.get("ledger-head"),
                  "ledger_entries": m.get("ledger-entries"), "clipped_values": m.get("clipped-values")}
        if not self.cfg.dp:  # under DP no statistic of a node's data is kept, whatever a node sends
            client.update({"train_loss": m.get("train-loss"), "train_seconds": m.get("seconds")})
        return client

    def record_halt(self, results: list[tuple[ClientProxy, FitRes]], failures) -> None:
        """A secure-sum round that halted before aggregation: the nodes whose masked updates had arrived (each
        charged to its node's ledger, whose head it reported: the report binds them) and why nodes failed."""
        outcome = self.outcome
        if outcome is None:
            return
        for proxy, res in results:
            client = self._client(proxy, res)
            client["status"] = NOT_AGGREGATED
            outcome.clients.append({k: v for k, v in client.items() if v is not None})
        outcome.failures += [t for t in dict.fromkeys(_failure_text(f) for f in failures) if t not in outcome.failures]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        outcome = self.outcome or RoundOutcome(server_round)
        # The secure sum hands every node's result the same unmasked mean: decoded and checked once, weighted once.
        updates: dict[int, tuple[list[np.ndarray], str | None]] = {}
        weights: dict[int, int] = {}
        losses = []
        for proxy, res in results:
            client = self._client(proxy, res)
            if client["status"] == "budget-exhausted":
                self.exhausted.add(proxy.node_id)
                log.warning("round %d: node %s has exhausted its privacy budget (epsilon %.3f of %.3f); it is left "
                            "out from now on", server_round, client["node"], client["epsilon"] or 0,
                            client["target_epsilon"] or 0)
            elif res.num_examples > 0:
                key = id(res.parameters)
                if key not in updates:
                    update = parameters_to_ndarrays(res.parameters)
                    updates[key] = (update, update_problem(update, self.shapes, self.cfg.update_bound))
                problem = updates[key][1]
                if problem:
                    client["status"] = f"rejected: {problem}"
                    log.error("round %d: update from node %s rejected: %s", server_round, client["node"], problem)
                else:
                    weights[key] = weights.get(key, 0) + res.num_examples
                    if client.get("train_loss") is not None:
                        losses.append((res.num_examples, client["train_loss"]))
            outcome.clients.append({k: v for k, v in client.items() if v is not None})
        replied = {proxy.node_id for proxy, _ in results}
        outcome.dropped = sum(p.node_id not in replied for p in self._sampled(server_round) or [])
        for text in dict.fromkeys(_failure_text(f) for f in failures):  # a protocol may list an error twice
            outcome.failures.append(text)
            log.error("round %d: a node failed: %s", server_round, text)
        self.outcome = outcome
        if not weights:
            log.error("round %d: no usable update; the global adapter is unchanged", server_round)
            return None, {}
        self.current = apply_update(self.current, weighted_average([updates[k][0] for k in weights],
                                                                   list(weights.values())))
        outcome.applied = True
        outcome.train_loss = sum(w * loss for w, loss in losses) / sum(w for w, _ in losses) if losses else None
        return ndarrays_to_parameters(self.current), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # held-out evaluation runs on the coordinator

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None  # the coordinator loop evaluates after each round
