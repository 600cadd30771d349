"""fedchat's secure sum between real node mods and the real coordinator workflow, in one process.

Fast protocol and adversary tests: every node runs ``client.secagg_mod.secure_aggregation`` (its real
mod, its own identity key, an approved roster) over a known synthetic update, and the coordinator
runs ``server.secagg_workflow.SecureAggregation`` (or a subclass a test writes as the adversary). Messages
are Flower ``Message`` objects handed from one to the other by ``InProcessGrid``, in place of a
SuperLink; the engine tests (tests/test_secagg.py, tests/test_secagg_attacks.py) run the same code
through Flower's simulation engine.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.task_identity import TaskIdentity

from client.secagg_mod import secure_aggregation
from server.secagg_workflow import SecureAggregation
from shared.config import NodeConfig, RunConfig
from shared.crypto import create_identity_key, raw_public_hex
from shared.protocol import fit_config
from shared.roster import Member, Roster, write_roster

SHAPES = [(6, 4), (10,)]
RUN = "run-1"


@contextmanager
def coordinator_identity():
    """Messages are created on the coordinator (the ServerApp runtime sets this identity)."""
    saved = {n: getattr(TaskIdentity, n, None) for n in ("_task_id", "_run_id", "_node_id")}
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


@dataclass
class SimNode:
    node_id: int
    name: str
    config: NodeConfig
    update: list[np.ndarray]
    weight: int
    context: Context = field(default=None)
    trained: int = 0
    refusals: list[str] = field(default_factory=list)
    plan_share: object = None  # distributed DP's planner (client.client_app.plan_distributed_share's signature)

    def __post_init__(self) -> None:
        self.context = Context(run_id=1, node_id=self.node_id, node_config={}, state=RecordDict(), run_config={})
        self.mod = secure_aggregation(lambda context, run: self.config, self.plan_share)

    def train(self, msg: Message, context: Context) -> Message:
        self.trained += 1
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(self.update), self.weight, {"node": self.name})
        return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

    def handle(self, msg: Message) -> Message:
        try:
            return self.mod(msg, self.context, self.train)
        except Exception as exc:  # as Flower returns a ClientApp's exception: an error reply
            self.refusals.append(str(exc))
            return Message(Error(code=0, reason=str(exc)), reply_to=msg)


class InProcessGrid:
    """Hands each message to its node's mod and collects the replies (a node in `offline` never answers)."""

    def __init__(self, nodes: dict[int, SimNode]) -> None:
        self.nodes = nodes
        self.offline: set[int] = set()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = self.nodes.get(msg.metadata.dst_node_id)
            if node is None or node.node_id in self.offline:
                continue
            reply = node.handle(msg)
            self.received.append(reply)
            replies.append(reply)
        return replies


class RecordingStrategy(Strategy):
    """Samples every node, records what the secure sum hands `aggregate_fit`."""

    def __init__(self, cfg: RunConfig, node_ids: list[int], sizes) -> None:
        self.cfg, self.node_ids, self.sizes = cfg, node_ids, sizes
        self.mean: list[np.ndarray] | None = None
        self.results, self.failures, self.halted = [], [], None
        self.outcome = None

    def configure_fit(self, server_round, parameters, client_manager):
        config = fit_config(self.cfg, server_round, RUN, "frozen-a")
        return [(Proxy(n), FitIns(parameters, dict(config))) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = results, failures
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def record_halt(self, results, failures):
        self.halted = (results, failures)

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, *args):
        return []

    def aggregate_evaluate(self, *args):
        return None, {}

    def evaluate(self, *args):
        return None


class Federation:
    """`n` nodes with identity keys and one approved roster; node i's update is known to the test."""

    def __init__(self, folder: Path, n: int, colluders: int | None = None, cfg: RunConfig | None = None,
                 plan_share=None, **node_settings) -> None:
        self.folder, self.cfg = folder, cfg or RunConfig(learning_rate=0.05, local_steps=2, secagg=True)
        rng = np.random.default_rng(7)
        bound = self.cfg.update_bound
        keys = {}
        self.nodes: dict[int, SimNode] = {}
        for i in range(n):
            name, node_id = f"org-{i + 1}", 1000 + 17 * i
            keys[name] = create_identity_key(folder / name / "identity-key.pem")
            update = [rng.uniform(-bound, bound, s) for s in SHAPES]
            self.nodes[node_id] = SimNode(node_id, name, None, update, weight=50 + 10 * i, plan_share=plan_share)
        self.roster = Roster("test", 1, (n - 1) // 2 if colluders is None else colluders,
                             tuple(Member(name, raw_public_hex(k)) for name, k in keys.items()), None)
        write_roster(folder / "roster.json", self.roster)
        for node in self.nodes.values():
            node.config = NodeConfig(node_name=node.name, state_dir=str(folder / node.name),
                                     roster=str(folder / "roster.json"), roster_sha256=self.roster.sha256,
                                     **node_settings)
        self.grid = InProcessGrid(self.nodes)

    def expected_mean(self, node_ids) -> list[np.ndarray]:
        """The weighted mean of these nodes' (clipped) updates, as plaintext FedAvg computes it."""
        weights = [self.nodes[n].weight for n in node_ids]
        bound = self.cfg.update_bound
        return [sum(w * np.clip(self.nodes[n].update[k], -bound, bound) for n, w in zip(node_ids, weights))
                / sum(weights) for k in range(len(SHAPES))]

    def run(self, workflow_cls=SecureAggregation, rnd: int = 1, **workflow_args):
        """One round of the secure sum; (strategy, workflow) afterwards."""
        strategy = RecordingStrategy(self.cfg, sorted(self.nodes), SHAPES)
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy,
                               client_manager=SimpleClientManager())
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([np.zeros(s, dtype=np.float32) for s in SHAPES]), True)
        workflow = workflow_cls(self.cfg, self.roster, SHAPES, **workflow_args)
        with coordinator_identity():
            workflow(self.grid, legacy)
        return strategy, workflow
