"""The node's SecAgg+ guard against a modified ServerApp, on Flower's real secaggplus_mod.

Each test sends the stage messages a coordinator sends (real Flower Message objects, the
protocol run between real nodes for as far as it needs), then one crafted the way a
modified ServerApp could, to the node's mod stack as the ClientApp runs it.
"""

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.secagg_guard import secagg_guard
from shared.config import NodeConfig
from shared.errors import ConfigError, PrivacyError

IDS = (101, 202, 303)


@pytest.fixture(autouse=True)
def coordinator_identity(monkeypatch):
    """Messages are created on the coordinator (the ServerApp runtime sets this identity)."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def guarded(**node):
    return secagg_guard(lambda context: NodeConfig(node_name=f"node-{context.node_id}", **node))


class Node:
    """One node's ClientApp state and mod; `train` is what its fit() returns."""

    def __init__(self, nid: int, mod, num_examples: int = 10):
        self.nid, self.mod, self.num_examples = nid, mod, num_examples
        self.context = Context(run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={})
        self.trained = 0

    def train(self, msg: Message, context: Context) -> Message:
        self.trained += 1
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.full(4, 0.25)]), self.num_examples, {})
        return Message(compat.fitres_to_recorddict(res, False), reply_to=msg)

    def send(self, configs: dict, fit: bool = False) -> dict:
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(4)]), {}), True) \
            if fit else RecordDict()
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        msg = Message(content=content, dst_node_id=self.nid, message_type=MessageType.TRAIN, group_id="1")
        return dict(self.mod(msg, self.context, self.train).content.config_records[RECORD_KEY_CONFIGS])


def setup(n: int, threshold: int, shares: int | None = None) -> dict:
    return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: shares or n, Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 100.0}


def keys_shared(mod, num_examples=lambda nid: 10):
    """Three nodes through setup and key sharing: the nodes, and the key shares to forward to each."""
    nodes = {nid: Node(nid, mod, num_examples(nid)) for nid in IDS}
    keys = {nid: node.send(setup(3, 2)) for nid, node in nodes.items()}
    public = {str(nid): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for nid, k in keys.items()}
    forward = {nid: ([], []) for nid in IDS}
    for nid, node in nodes.items():
        res = node.send({Key.STAGE: Stage.SHARE_KEYS, **public})
        for dst, ciphertext in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST]):
            forward[dst][0].append(nid)
            forward[dst][1].append(ciphertext)
    return nodes, forward


def collect(srcs: list[int], ciphertexts: list[bytes]) -> dict:
    return {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs}


def up_to_unmask(mod) -> dict[int, Node]:
    """An honest round of three nodes up to (not including) the unmask stage."""
    nodes, forward = keys_shared(mod)
    for nid, node in nodes.items():
        assert Key.MASKED_PARAMETERS in node.send(collect(*forward[nid]), fit=True)
    return nodes


def unmask(active: list[int], dropped: list[int]) -> dict:
    return {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dropped}


def test_a_node_refuses_to_unmask_when_dropped_and_active_overlap():
    a, b, victim = IDS
    crafted = unmask([a, b, victim], [victim])  # the victim sent its masked update: it is active
    # Flower's mod alone answers: the victim's mask seed share and its secret key share, in one reply.
    res = up_to_unmask(secaggplus_mod)[a].send(crafted)
    assert res[Key.NODE_ID_LIST].count(victim) == 2

    nodes = up_to_unmask(guarded())
    with pytest.raises(PrivacyError, match=r"both active and dropped"):
        nodes[a].send(crafted)
    with pytest.raises(PrivacyError, match="does not list this node as active"):
        nodes[b].send(unmask([a, victim], [b]))  # this node itself listed as dropped
    with pytest.raises(PrivacyError, match="only 2 node"):
        nodes[victim].send(unmask([a, victim], [b]) | {Key.ACTIVE_NODE_ID_LIST: [a, victim],
                                                       Key.DEAD_NODE_ID_LIST: []})
    # An honest unmask request is answered.
    assert sorted(nodes[a].send(unmask([a, b, victim], []))[Key.NODE_ID_LIST]) == sorted(IDS)


def test_a_node_refuses_a_threshold_of_half_the_sample():
    node = Node(IDS[0], secaggplus_mod)
    assert Key.PUBLIC_KEY_1 in node.send(setup(4, 2))  # Flower alone takes part with 2 of 4
    guard = Node(IDS[0], guarded())
    with pytest.raises(PrivacyError, match="threshold 2 is half the sample of 4 or less"):
        guard.send(setup(4, 2))
    with pytest.raises(PrivacyError, match="4 key shares cannot reach the reconstruction threshold 5"):
        guard.send(setup(7, 5, shares=4))
    assert Key.PUBLIC_KEY_1 in guard.send(setup(4, 3))  # a strict majority


def test_a_two_node_secagg_round_is_refused_by_the_node():
    node = Node(IDS[0], guarded())
    with pytest.raises(PrivacyError, match="round of 2 node.*at least 3 \\(secagg-min-nodes\\)"):
        node.send(setup(2, 2))
    stricter = Node(IDS[0], guarded(secagg_min_nodes=5))
    with pytest.raises(PrivacyError, match="round of 4 node.*at least 5"):
        stricter.send(setup(4, 3))
    with pytest.raises(ConfigError, match="secagg-min-nodes' must be at least 3"):
        NodeConfig(secagg_min_nodes=2)


def test_a_node_refuses_key_sharing_and_masking_with_too_few_nodes():
    pair = {nid: Node(nid, guarded()) for nid in IDS[:2]}
    keys = {nid: node.send(setup(3, 2)) for nid, node in pair.items()}  # told 3, but only 2 take part
    public = {str(nid): [k[Key.PUBLIC_KEY_1], k[Key.PUBLIC_KEY_2]] for nid, k in keys.items()}
    with pytest.raises(PrivacyError, match=r"2 node\(s\), this one included, share keys"):
        pair[IDS[0]].send({Key.STAGE: Stage.SHARE_KEYS, **public})

    nodes, forward = keys_shared(guarded())
    a, b, _ = IDS
    srcs, ciphertexts = forward[a]
    only_b = srcs.index(b)
    with pytest.raises(PrivacyError, match=r"from 1 other node\(s\).*fewer than 3"):
        nodes[a].send(collect([b], [ciphertexts[only_b]]), fit=True)
    with pytest.raises(PrivacyError, match="list a source twice"):
        nodes[a].send(collect([b, b], [ciphertexts[only_b]] * 2), fit=True)
    assert nodes[a].trained == 0  # refused before training: nothing of its update was computed or sent


def test_a_node_with_nothing_to_contribute_sends_no_masked_update():
    nodes, forward = keys_shared(guarded(), num_examples=lambda nid: 0 if nid == IDS[2] else 10)
    with pytest.raises(PrivacyError, match="does not add an empty one"):
        nodes[IDS[2]].send(collect(*forward[IDS[2]]), fit=True)


def test_a_node_that_requires_secagg_refuses_a_plaintext_training_message():
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters([np.zeros(4)]), {}), True)
    node = Node(IDS[0], guarded())
    msg = Message(content=content, dst_node_id=node.nid, message_type=MessageType.TRAIN, group_id="1")
    with pytest.raises(PrivacyError, match="requires secure aggregation"):
        node.mod(msg, node.context, node.train)
    assert node.trained == 0
    relaxed = Node(IDS[0], guarded(require_secagg=False))
    relaxed.mod(msg, relaxed.context, relaxed.train)
    assert relaxed.trained == 1

