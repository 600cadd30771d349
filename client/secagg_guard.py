"""The node's own checks on every SecAgg+ message, before Flower's ``secaggplus_mod`` acts on it.

Flower's client side of SecAgg+ trusts the coordinator for the parameters that decide
what the coordinator can learn: how many nodes take part, how many shares unmask a
node, and which nodes count as dropped. A modified ServerApp could choose them so that
the "sum" it unmasks is one node's update. This mod refuses, with a ``PrivacyError``
and before the node sends anything of its update, any stage message that would allow it:

* setup: fewer nodes than the node's ``secagg-min-nodes`` (never below 3: the sum of two
  updates is the other node's update to each of them), or key sharing that could expose the
  node's update under the node's own assumptions (shared/secagg_graph.py): by default
  (``secagg-colluding-fraction`` 0.5, any minority) a reconstruction threshold that is a strict
  majority of the sample (then the coordinator cannot collect one node's mask seed from some
  nodes and its secret key from the others) with more shares than that; a node that assumes
  fewer colluders also accepts a sparse graph (fewer shares, threshold a strict majority of
  them) that keeps its update hidden except with probability 2**-40 under its own assumed
  colluding and dropout fractions, whatever the coordinator assumed;
* share keys / collect masked vectors: fewer than the minimum nodes sharing keys with this
  node, or a key-share source listed twice or being the node itself;
* unmask: active and dropped lists that overlap or repeat a node (Flower 1.41 does not
  check it: listing a node in both gets both its mask seed and its key), this node listed
  as dropped or missing from the active list, or fewer than the minimum still active.

It also refuses to add an empty update (zero examples) to a secure sum, and, for a node
with ``require-secagg``, any training message that does not run SecAgg+.

Its masked update leaves as unsigned 32-bit integers (shared/secagg_wire.py): Flower's mod
masks modulo 2**32 but hands back int64 arrays, twice the bytes.

What it cannot see: the node ids and public keys it counts come from the SuperLink. A
coordinator that runs modified code can make up nodes whose keys it holds (or choose a
round of the victim and its colluders), and then every count here passes. Against such a
coordinator the update is protected by DP alone (docs/threat-model.md, row 5c); these
checks stop a ServerApp that only changes the protocol's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from shared import secagg_wire
from shared.config import NodeConfig
from shared.errors import PrivacyError
from shared.secagg_graph import majority, sparse_refusal

SECAGG_FLAG = "fedchat.secagg"  # context state: whether the current training message runs SecAgg+


def check_stage(stage: str, configs: ConfigRecord, own_id: int, node: NodeConfig) -> None:
    """Raise a PrivacyError if this stage message could expose less than a sum of `node.secagg_min_nodes`
    updates, or (setup) use key sharing that could expose one update under the node's own assumptions."""
    min_nodes = node.secagg_min_nodes
    if stage == Stage.SETUP:
        sample, shares, threshold = (_int(configs, k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
        if sample < min_nodes:
            _refuse(f"the coordinator started a round of {sample} node(s); this node takes part only in rounds of "
                    f"at least {min_nodes} (secagg-min-nodes): a sum of fewer updates reveals them")
        if shares < threshold:
            _refuse(f"{shares} key shares cannot reach the reconstruction threshold {threshold}")
        if shares >= sample and 2 * threshold <= sample:
            _refuse(f"reconstruction threshold {threshold} is half the sample of {sample} or less; it must be a "
                    f"strict majority ({majority(sample)} or more), or a minority could unmask one node")
        problem = sparse_refusal(sample, min(shares, sample), threshold, node.secagg_colluding_fraction,
                                 node.secagg_dropout_fraction)
        if problem:
            _refuse(f"{problem} (this node's secagg-colluding-fraction {node.secagg_colluding_fraction:g}, "
                    f"secagg-dropout-fraction {node.secagg_dropout_fraction:g})")
    elif stage == Stage.SHARE_KEYS:
        neighbours = {k for k in configs if k != Key.STAGE}
        if len(neighbours) < min_nodes:
            _refuse(f"{len(neighbours)} node(s), this one included, share keys with this node; it needs at least "
                    f"{min_nodes} (secagg-min-nodes)")
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        sources = _ids(configs, Key.SOURCE_LIST)
        if len(set(sources)) != len(sources) or own_id in sources:
            _refuse("the key shares forwarded to this node list a source twice, or this node itself")
        if len(sources) + 1 < min_nodes:
            _refuse(f"key shares reached this node from {len(sources)} other node(s); its update would be masked "
                    f"into a sum of fewer than {min_nodes} (secagg-min-nodes)")
    elif stage == Stage.UNMASK:
        active, dropped = _ids(configs, Key.ACTIVE_NODE_ID_LIST), _ids(configs, Key.DEAD_NODE_ID_LIST)
        if len(set(active)) != len(active) or len(set(dropped)) != len(dropped):
            _refuse("the unmask request lists a node twice")
        if both := set(active) & set(dropped):
            _refuse(f"the unmask request lists node(s) {sorted(both)} as both active and dropped: their mask seed and "
                    "their secret key together would unmask their update")
        if own_id in dropped or own_id not in active:
            _refuse("the unmask request does not list this node as active although it sent its masked update")
        if len(active) < min_nodes:
            _refuse(f"only {len(active)} node(s) remain active to unmask; this node reveals its shares only for a "
                    f"sum of at least {min_nodes} (secagg-min-nodes)")


def secagg_guard(node_config: Callable[[Context], NodeConfig]):
    """A ClientApp mod: SecAgg+ (Flower's secaggplus_mod) behind `check_stage`, with the node's own minimum.

    `node_config` gives the node's settings from its context (the operator's, never the run's).
    """

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        node = node_config(context)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        context.state.config_records[SECAGG_FLAG] = ConfigRecord({"active": configs is not None})
        if configs is None:
            if node.require_secagg:
                raise PrivacyError(f"node {node.node_name} requires secure aggregation (require-secagg=true); the "
                                   "coordinator asked for a plaintext update, refused.")
            return call_next(msg, context)
        stage = configs.get(Key.STAGE)
        try:
            check_stage(stage, configs, msg.metadata.dst_node_id, node)
        except PrivacyError as exc:
            raise PrivacyError(f"node {node.node_name} refuses SecAgg+ stage '{stage}': {exc}") from None
        reply = secaggplus_mod(msg, context, _no_empty_update(node, call_next))
        if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            configs[Key.MASKED_PARAMETERS] = secagg_wire.pack(configs[Key.MASKED_PARAMETERS])
        return reply

    return mod


def _no_empty_update(node: NodeConfig, call_next):
    """`call_next` (the node's training) behind a check that its update is not empty."""

    def train(msg: Message, context: Context) -> Message:
        reply = call_next(msg, context)
        if not reply.has_error() and recorddict_to_fitres(reply.content, keep_input=True).num_examples <= 0:
            raise PrivacyError(f"node {node.node_name} has no update for this round; it does not add an empty one to "
                               "a secure sum (the sum would then reveal the others' updates more).")
        return reply

    return train


def _int(configs: ConfigRecord, key: str) -> int:
    value = configs.get(key)
    if type(value) is not int:  # noqa: E721 (bool is not a count)
        _refuse(f"'{key}' must be an integer (got {type(value).__name__})")
    return value


def _ids(configs: ConfigRecord, key: str) -> list[int]:
    value = configs.get(key)
    if not isinstance(value, list) or any(type(v) is not int for v in value):  # noqa: E721
        _refuse(f"'{key}' must be a list of node ids")
    return list(value)


def _refuse(reason: str):
    raise PrivacyError(reason)
